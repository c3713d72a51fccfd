#!/usr/bin/env bash
# Idempotent set-up on Debian/Ubuntu: the system packages nfknock and its tests need, then a
# virtualenv in .venv with nfknock (editable, with the server and metrics extras) and the test
# tools. Safe to run again and again: apt runs only when a package is missing, pip only when the
# package metadata changed or a module the venv needs is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-dev gcc libc6-dev   # building netfilterqueue
  libnetfilter-queue-dev                           # netfilterqueue links against it
  iptables                                         # libip4tc/libxtables for python-iptables; the
                                                   # iptables-{legacy,nft}[-restore] commands the tests run
  ipset                                            # the daemon's set of granted sources
  iproute2                                         # ip netns for the demo and the tests
  knockd                                           # the stock 'knock' client the tests use; knockd for bench
  nmap                                             # the attacker in the scan tests
  iperf3                                           # bench: established throughput
  fwknop-client fwknop-server                      # SPA: the stock peer the tests compare against
  systemd                                          # systemd-analyze: tests/unit/test_daemon.py verifies the unit
  make                                             # make deb, make test, ... (the scripts work without it)
  lintian binutils groff-base                      # make deb: lintian, strip/readelf; the man page test
  prometheus                                       # promtool: tests/unit/test_monitoring.py checks the alert rules
                                                   # (its server is neither started nor enabled: see below)
  redis-server redis-tools                         # fleet mode: the tests start their own redis-server; redis-cli
  nftables                                         # nft: tests/netns/test_self_healing.py runs `nft flush ruleset`
  logwatch fail2ban logcheck logcheck-database     # tests/unit/test_log_tools.py runs the admin's log tools on
                                                   # nfknock's lines (no fail2ban server is started: see below)
)
# Nothing here needs procps (kill, ps, pkill): minimal Debian has none, and the tests signal
# processes with os.kill / Popen.send_signal.

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else echo "setup: need root to run: $*" >&2; exit 1
  fi
}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing system packages: ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # Only tools are wanted: no service these packages bring (a Prometheus server, fwknopd, knockd,
  # ...) may start or be enabled by this script. policy-rc.d (if the host has none) keeps dpkg
  # from starting them; the ones this run installed are then disabled.
  guard=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    as_root sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d'
    guard=1
  fi
  status=0
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null || status=$?
  [ -z "$guard" ] || as_root rm -f /usr/sbin/policy-rc.d
  [ "$status" -eq 0 ] || exit "$status"
  for pkg in "${missing[@]}"; do
    case "$pkg" in
      prometheus|fwknop-server|redis-server|nftables|fail2ban)
        if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
          as_root systemctl disable --now "$pkg" >/dev/null 2>&1 || true
        fi ;;
    esac
  done
fi

pick_python() {
  for candidate in ${PYTHON:-} /usr/bin/python3 python3; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"; return
    fi
  done
  echo "setup: nfknock needs Python >= 3.11 with venv (set PYTHON=/path/to/python3.11+)" >&2
  exit 1
}

stamp=$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys' 2>/dev/null; then
  rm -rf .venv
  "$(pick_python)" -m venv .venv
fi
if [ "$(cat .venv/.nfknock-stamp 2>/dev/null)" != "$stamp" ] \
   || ! .venv/bin/python -c 'import nfknock, netfilterqueue, iptc, pyroute2, prometheus_client, redis, fakeredis, pytest, hypothesis, mypy' 2>/dev/null; then
  echo "setup: installing Python packages into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  # the daemon (server), its exporter (metrics), fleet mode (fleet) and the test tools; a plain 'pip install .' is the client
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[server,metrics,fleet,test]'
  echo "$stamp" > .venv/.nfknock-stamp
fi
