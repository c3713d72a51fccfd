#!/usr/bin/env bash
# Run by checks.sh inside the systemd container: the unit's sandbox, reload, watchdog and restart
# policy under the real systemd (docs/systemd.md). Every check prints one line; the first failure
# exits 1 (checks.sh prints the journal).
#   unit.sh single SERVER NAMESPACE "SEQ" "CLOSE"   nfknock active, one process
#   unit.sh workers SERVER NAMESPACE "SEQ" "CLOSE"  nfknock active with --workers 2
# Leaves nfknock active with the unit as installed (drop-ins removed) and the rules as found.
set -euo pipefail
mode=$1 SERVER=$2 NS=$3
read -r -a SEQ <<< "$4"
read -r -a CLOSE <<< "$5"
here=/deploy/systemd
MAX_EXPOSURE=2.5 # knockd's unit: 7.4, fwknop-server's: 9.6 (systemd 252)
DROPIN=/run/systemd/system/nfknock.service.d

ok() { echo "systemd: ok: $*"; }
fail() { echo "systemd: FAIL: $*" >&2; exit 1; }
in_client() { ip netns exec "$NS" "$@"; }
port22() {
  if in_client /usr/bin/python3 /deploy/harness/probe.py "$SERVER" 22 1.5 2>/dev/null | grep -q '^SSH-'; then echo open; else echo closed; fi
}
expect_port() { [ "$(port22)" = "$1" ] || fail "port 22 should be $1: $2"; ok "port 22 $1: $2"; }
prop() { systemctl show nfknock -p "$1" --value; }
journal_count() { journalctl -u nfknock --no-pager -o cat | grep -c -- "$1" || true; }
journal_has() { journalctl -u nfknock --no-pager -o cat | grep -- "$1" >/dev/null; }  # not grep -q: pipefail
knock_works() {
  in_client nfknock knock "$SERVER" "${SEQ[@]}"
  expect_port open "$1: a knock opens"
  in_client nfknock knock "$SERVER" "${CLOSE[@]}"
  expect_port closed "$1: the close sequence closes"
}
wait_restarted() {  # old pid, seconds[, NRestarts before: then only a restart by systemd counts]
  local pid
  for _ in $(seq $(($2 * 5))); do
    pid=$(prop MainPID)
    # A number, not what `systemctl show` printed while busy; and systemd's own count, when given
    [[ "$pid" =~ ^[1-9][0-9]*$ ]] && [ "$pid" != "$1" ] && [ "$(prop ActiveState)" = active ] \
      && [ "$(prop NRestarts)" -gt "${3:--1}" ] && return 0
    sleep 0.2
  done
  fail "nfknock not restarted within $2 s (state $(prop ActiveState)/$(prop SubState), pid $(prop MainPID))"
}
with_dropin() {  # text: a drop-in for the unit, in effect after a restart
  mkdir -p "$DROPIN"
  printf '[Service]\n%s\n' "$1" > "$DROPIN/test.conf"
  systemctl daemon-reload
  systemctl restart nfknock
}
without_dropin() {
  rm -rf "$DROPIN"
  systemctl daemon-reload
  systemctl restart nfknock
  [ "$(prop ActiveState)" = active ] || fail "nfknock not active after the test drop-in went"
}

# A stranger probes 22 every 20 ms from before $1 happens until the daemon runs again: none connects.
# watch_start; <do something>; watch_stop "what"
watch_start() {
  rm -f /tmp/unit-watch.stop
  in_client /usr/bin/python3 "$here/watch.py" "$SERVER" 22 /tmp/unit-watch.stop > /tmp/unit-watch.out 2>&1 &
  watcher=$!
  sleep 0.5
}
watch_stop() {
  touch /tmp/unit-watch.stop
  wait "$watcher" || { cat /tmp/unit-watch.out; fail "port 22 was open to a stranger: $1"; }
  ok "port 22 never open to a stranger probing every 20 ms: $1 ($(cat /tmp/unit-watch.out))"
}

watchdog_restart() {  # what to SIGSTOP: "daemon" or "worker"
  with_dropin $'WatchdogSec=3s\nTimeoutAbortSec=2s'
  [ "$(prop WatchdogUSec)" = 3s ] || fail "the drop-in did not set WatchdogSec=3s: $(prop WatchdogUSec)"
  local pid target restarts before
  pid=$(prop MainPID) restarts=$(prop NRestarts) before=$(journal_count "Watchdog timeout")
  sleep 7  # two watchdog intervals and more: a daemon that pings is not restarted
  [ "$(prop MainPID)" = "$pid" ] && [ "$(prop NRestarts)" = "$restarts" ] || fail "restarted while its loop turned"
  ok "WatchdogSec=3s: the $1's loop pings, no restart in 7 s (pid $pid)"
  if [ "$1" = worker ]; then
    before_stuck=$(journal_count "systemd's watchdog (WatchdogSec=3s) restarts nfknock")
    target=$(journalctl -u nfknock -o cat --no-pager | grep "ready: pid $pid," | tail -n1 | sed -n 's/.*(pids \([0-9]*\) .*/\1/p')
    [ -n "$target" ] || fail "no worker pid in the ready line of $pid"
  else
    target=$pid
  fi
  watch_start
  kill -STOP "$target"
  wait_restarted "$pid" 40 "$restarts"
  watch_stop "$1 $target SIGSTOP'd until systemd's watchdog restarted nfknock as $(prop MainPID)"
  [ "$(journal_count "Watchdog timeout")" -gt "$before" ] || fail "no 'Watchdog timeout' in the journal"
  [ "$(prop NRestarts)" -gt "$restarts" ] || fail "NRestarts did not grow"
  if [ "$1" = worker ]; then
    [ "$(journal_count "systemd's watchdog (WatchdogSec=3s) restarts nfknock")" -gt "$before_stuck" ] \
      || fail "the supervisor did not say the stuck worker gets nfknock restarted"
  fi
  ok "a SIGSTOP'd $1 ($target): 'Watchdog timeout', killed and restarted by systemd (NRestarts $(prop NRestarts))"
  knock_works "after the watchdog restart"
  without_dropin
}

if [ "$mode" = workers ]; then
  watchdog_restart worker
  exit 0
fi

# --- the sandbox ---------------------------------------------------------------------------------
line=$(systemd-analyze security nfknock.service 2>&1 | grep 'Overall exposure level for nfknock.service') \
  || fail "systemd-analyze security printed no overall exposure: $(systemd-analyze security nfknock.service 2>&1 | tail -3)"
exposure=$(echo "$line" | sed -n 's/.*: \([0-9.]*\) .*/\1/p')
awk -v e="$exposure" -v max="$MAX_EXPOSURE" 'BEGIN { exit !(e != "" && e <= max) }' \
  || fail "systemd-analyze security: exposure $exposure > $MAX_EXPOSURE ($line)"
ok "systemd-analyze security nfknock.service: exposure $exposure (<= $MAX_EXPOSURE; knockd 7.4, fwknop-server 9.6)"
caps=$(prop CapabilityBoundingSet)
[ "$caps" = "cap_net_admin cap_net_raw" ] || fail "CapabilityBoundingSet: $caps"
[ "$(prop ProtectSystem)" = strict ] && [ "$(prop ProtectKernelModules)" = yes ] && [ "$(prop RestrictNamespaces)" = yes ] \
  || fail "ProtectSystem=$(prop ProtectSystem) ProtectKernelModules=$(prop ProtectKernelModules)"
pid=$(prop MainPID)
grep -q ' / / ro,' "/proc/$pid/mountinfo" || fail "the daemon's / is not read-only: $(grep ' / / ' "/proc/$pid/mountinfo")"
grep -q " /var/lib/nfknock rw," "/proc/$pid/mountinfo" && grep -q " /run/nfknock rw," "/proc/$pid/mountinfo" \
  || fail "the state or runtime directory is not writable for the daemon"
ok "capabilities '$caps' only; / read-only for the daemon, /var/lib/nfknock and /run/nfknock writable"
[ -f /usr/lib/modules-load.d/nfknock.conf ] && grep -qx nfnetlink_queue /usr/lib/modules-load.d/nfknock.conf \
  || fail "no /usr/lib/modules-load.d/nfknock.conf listing nfnetlink_queue"
prop After | tr ' ' '\n' | grep -qx systemd-modules-load.service || fail "not ordered after systemd-modules-load.service"
ok "kernel modules from /usr/lib/modules-load.d/nfknock.conf ($(grep -cv '^#' /usr/lib/modules-load.d/nfknock.conf) modules), before nfknock starts"
prop Documentation | grep -q 'man:nfknock(8)' || fail "Documentation=$(prop Documentation)"
for manager in nftables.service netfilter-persistent.service firewalld.service ufw.service; do
  prop After | tr ' ' '\n' | grep -qx "$manager" || fail "not ordered after $manager: After=$(prop After)"
done
[ -z "$(prop PartOf)" ] || fail "PartOf=$(prop PartOf): a manager's stop would stop nfknock after its flush"
ok "Documentation=man:nfknock(8); After= the firewall managers (nftables, netfilter-persistent, firewalld, ufw), no PartOf="

# --- the control socket, under RuntimeDirectory= ----------------------------------------------------
[ -S /run/nfknock/nfknock.sock ] && [ "$(stat -c %a /run/nfknock)" = 700 ] && [ "$(stat -c %a /run/nfknock/nfknock.sock)" = 600 ] \
  || fail "no control socket /run/nfknock/nfknock.sock (0600 in 0700): $(ls -la /run/nfknock 2>&1)"
CLIENT=$(in_client ip -4 -o addr show | awk '$2 != "lo" {sub("/.*", "", $4); print $4; exit}')
nfknock grant "$CLIENT" --door openSSH --for 60 >/dev/null || fail "nfknock grant with the default socket"
expect_port open "nfknock grant $CLIENT (the default control socket /run/nfknock/nfknock.sock)"
nfknock revoke "$CLIENT" >/dev/null || fail "nfknock revoke"
expect_port closed "nfknock revoke $CLIENT"

# --- reload: the rules are checked first ---------------------------------------------------------
pid=$(prop MainPID) reloads=$(journal_count "reloaded ")
cp /etc/nfknock/rules/ssh.yaml /tmp/unit-ssh.yaml
sed -i 's/^    protect: \[22\/tcp\]/    protect: [22\/tcp/' /etc/nfknock/rules/ssh.yaml
if systemctl reload nfknock 2>/tmp/unit-reload.err; then fail "systemctl reload succeeded with a broken rules file"; fi
journal_has "nfknock: /etc/nfknock/rules/ssh.yaml" \
  || fail "the journal does not name the broken file: $(journalctl -u nfknock -o cat -n 5 --no-pager)"
[ "$(prop MainPID)" = "$pid" ] && [ "$(prop ActiveState)" = active ] || fail "the daemon did not stay: $(prop ActiveState) $(prop MainPID)"
[ "$(journal_count "reloaded ")" = "$reloads" ] || fail "the daemon was signalled"
ok "systemctl reload with a broken rules file fails ($(tr '\n' ' ' < /tmp/unit-reload.err | cut -c1-80)...); the journal names the file; same PID, not signalled"
knock_works "the old rules stay in force"
cp /tmp/unit-ssh.yaml /etc/nfknock/rules/ssh.yaml
chmod 0666 /etc/nfknock/rules/ssh.yaml
if systemctl reload nfknock 2>/dev/null; then fail "systemctl reload succeeded with a rules file anyone may write"; fi
chmod 0600 /etc/nfknock/rules/ssh.yaml
ok "systemctl reload with a rules file others may write fails too (nfknock check --strict, as the daemon)"
systemctl reload nfknock || fail "systemctl reload with good rules"
for _ in $(seq 50); do [ "$(journal_count "reloaded ")" -gt "$reloads" ] && break; sleep 0.1; done
[ "$(journal_count "reloaded ")" -gt "$reloads" ] || fail "a good reload did not reach the daemon"
ok "systemctl reload with the rules fixed: reloaded, PID $(prop MainPID)"

# --- the daemon's other ways under the sandbox: iptables-legacy, metrics ---------------------------
cp /etc/default/nfknock /tmp/unit-default
sed -i 's/^NFKNOCK_OPTS=""/NFKNOCK_OPTS="--firewall legacy --metrics-port 9471"/' /etc/default/nfknock
systemctl restart nfknock || fail "restart with --firewall legacy --metrics-port"
knock_works "--firewall legacy under the sandbox"
/usr/bin/python3 -c 'import urllib.request; assert b"nfknock_" in urllib.request.urlopen("http://127.0.0.1:9471/metrics", timeout=5).read()' \
  || fail "no metrics on 127.0.0.1:9471"
ok "the metrics exporter answers under the sandbox"
cp /tmp/unit-default /etc/default/nfknock
systemctl stop nfknock
nfknock down --firewall legacy >/dev/null || fail "nfknock down --firewall legacy"
systemctl start nfknock

# --- SIGABRT (what systemd's watchdog sends a loop that is wedged but not stopped) -----------------
pid=$(prop MainPID)
kill -ABRT "$pid"
wait_restarted "$pid" 20
stack=$(journalctl -u nfknock -o cat --no-pager | grep -A40 "Fatal Python error: Aborted" || true)
[ -n "$stack" ] || fail "no Python stack in the journal after SIGABRT"
echo "$stack" | grep 'daemon/loop.py", line [0-9]* in run' >/dev/null || fail "the stack after SIGABRT does not show the loop: $stack"
[ "$(prop LimitCORE)" = 0 ] || fail "LimitCORE=$(prop LimitCORE): a core file would hold the keys"
ok "SIGABRT: every thread's stack in the journal (loop.py), no core file (LimitCORE=0), restarted"

# --- the watchdog ---------------------------------------------------------------------------------
watchdog_restart daemon
