# Sourced by deploy/harness/run.sh and deploy/systemd/run.sh: start dockerd when none answers, and
# stop only the one started here, waiting until it is gone (the next script may start its own
# right after, and dockerd refuses to start while the last one's pid file is there).
started_dockerd=

start_dockerd() {  # $1: log file, $2: the caller's name for messages
  docker info >/dev/null 2>&1 && return 0
  local pidfile=/var/run/docker.pid
  for _ in $(seq 30); do
    [ -e "$pidfile" ] || break
    kill -0 "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null || { rm -f "$pidfile"; break; }  # stale
    sleep 1
  done
  echo "$2: starting dockerd"
  dockerd >"$1" 2>&1 &
  started_dockerd=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && return 0; sleep 1; done
  echo "$2: dockerd did not start (see $1)" >&2
  return 1
}

stop_dockerd() {
  [ -n "$started_dockerd" ] || return 0
  kill "$started_dockerd" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 "$started_dockerd" 2>/dev/null || break; sleep 1; done
  started_dockerd=
}
