#!/usr/bin/env bash
# Runs inside the systemd container (deploy/systemd/run.sh): installs the package with apt and
# checks what README promises under systemd. checks.sh OLD.deb NEW.deb (NEW has the higher
# version). Every check prints one line; the first failure prints the journal and exits 1.
# Traffic stays inside this container: a client namespace on a veth pair.
set -euo pipefail
old_deb=$1 new_deb=$2
here=/deploy/systemd
SERVER=10.77.0.1 CLIENT=10.77.0.2 NS=nfknock-sd-client
SEQ=(41001 42002 43003)
CLOSE=(43003 42002 41001)

ok() { echo "systemd: ok: $*"; }
fail() {
  echo "systemd: FAIL: $*" >&2
  journalctl -u nfknock --no-pager -n 60 >&2 || true
  exit 1
}
in_client() { ip netns exec "$NS" "$@"; }
# "open" when sshd's banner comes back within 1.5 s, else "closed" (a dropped SYN gets no answer)
port22() {
  if in_client /usr/bin/python3 /deploy/harness/probe.py "$SERVER" 22 1.5 2>/dev/null | grep -q '^SSH-'; then echo open; else echo closed; fi
}
expect_port() { [ "$(port22)" = "$1" ] || fail "port 22 should be $1: $2"; ok "port 22 $1: $2"; }
prop() { systemctl show nfknock -p "$1" --value; }
chain_jumps() { "$1" -S INPUT | grep -c -- '-j NFKNOCK' || true; }
expect_chain_once() {
  local v4 v6
  v4=$(chain_jumps iptables) v6=$(chain_jumps ip6tables)
  [ "$v4" = 1 ] && [ "$v6" = 1 ] || fail "INPUT should jump to NFKNOCK once per family ($1): iptables $v4, ip6tables $v6"
  ok "chain jumped to once per family ($1)"
}
expect_no_chain() {
  local v4 v6
  v4=$(chain_jumps iptables) v6=$(chain_jumps ip6tables)
  [ "$v4" = 0 ] && [ "$v6" = 0 ] || fail "no nfknock rules should exist ($1): iptables $v4, ip6tables $v6"
  ok "no nfknock rules ($1)"
}
journal_count() { journalctl -u nfknock --no-pager -o cat | grep -c -- "$1" || true; }
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
wait_active() {
  for _ in $(seq 100); do
    [ "$(prop ActiveState)" = active ] && [ "$(prop MainPID)" != 0 ] && [ "$(prop MainPID)" != "$1" ] && return 0
    sleep 0.2
  done
  fail "nfknock not active again (state $(prop ActiveState), pid $(prop MainPID))"
}

# The client: a network namespace on a veth pair, the only link to the "bastion" (this container).
ip netns add "$NS"
ip link add sd-srv type veth peer name sd-cli
ip link set sd-cli netns "$NS"
ip addr add "$SERVER/24" dev sd-srv && ip link set sd-srv up
in_client ip addr add "$CLIENT/24" dev sd-cli
in_client ip link set sd-cli up && in_client ip link set lo up
# The probes run python3, which the package pulls in: before it, bash's /dev/tcp serves.
cat > /checks-probe.sh <<'EOF'
timeout 1.5 bash -c 'exec 3<>/dev/tcp/$0/22; head -c 4 <&3' "$1" 2>/dev/null
EOF

for pkg in iptables ipset libnetfilter-queue1 python3 python3-minimal; do
  ! installed "$pkg" || fail "$pkg is installed before nfknock: the test could not tell whether Depends brings it"
done
[ "$(in_client bash /checks-probe.sh "$SERVER")" = "SSH-" ] || fail "sshd does not answer the client before nfknock"
ok "sshd answers the client before nfknock is installed"

# --- install -------------------------------------------------------------------------------------
cp "$old_deb" "$new_deb" /tmp/ && chmod 0644 /tmp/*.deb
old=/tmp/$(basename "$old_deb") new=/tmp/$(basename "$new_deb")
out=$(DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$old" 2>&1) || { echo "$out"; fail "apt install $old"; }
grep -q "nfknock: not started: no rules in /etc/nfknock/rules" <<<"$out" || { echo "$out"; fail "postinst did not say why it did not start"; }
for pkg in iptables ipset libnetfilter-queue1; do installed "$pkg" || fail "Depends did not bring $pkg"; done
ok "apt installed $(basename "$old") and its Depends (iptables ipset libnetfilter-queue1)"
# It carries its interpreter: no python3 on the host, and none in Depends that a release upgrade
# (python3 moving to a new minor version) could resolve by removing nfknock.
installed python3-minimal && fail "the package brought Debian's python3: a python3 transition could remove it"
nfknock --version | grep -q '^nfknock ' || fail "nfknock does not run without Debian's python3"
dpkg-query -W -f='${Depends}' nfknock | grep -q python3 && fail "Depends names python3: $(dpkg-query -W -f='${Depends}' nfknock)"
ok "nfknock runs on the python it carries; Depends names no python3"
# The checks' own probes (probe.py, watch.py, sniff.py) use Debian's python3: installed for them.
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 >/dev/null 2>&1 || fail "apt install python3 (for the probes)"
sim=$(apt-get -s remove python3 python3-minimal "python3.$(python3 -c 'import sys; print(sys.version_info[1])')-minimal" 2>&1)
grep -q "^Remv nfknock" <<<"$sim" && { echo "$sim"; fail "removing Debian's python3 would remove nfknock"; }
ok "removing Debian's python3 (as a release upgrade replaces it) leaves nfknock installed (apt-get -s)"
[ "$(command -v nfknock)" = /usr/bin/nfknock ] || fail "nfknock is not /usr/bin/nfknock on PATH"
nfknock --version | grep -q '^nfknock ' || fail "nfknock --version"
grep -q '^\.SS nfknock run' <<<"$(zcat /usr/share/man/man8/nfknock.8.gz)" || fail "no nfknock(8)"  # no pipe: grep -q would SIGPIPE zcat under pipefail
[ "$(stat -c %a /etc/nfknock)" = 700 ] && [ "$(stat -c %a /etc/nfknock/rules)" = 700 ] && [ "$(stat -c %a /var/lib/nfknock)" = 700 ] \
  || fail "/etc/nfknock, its rules and /var/lib/nfknock must be 0700"
[ -f /etc/nfknock/rules/ssh.yaml.example ] && [ -f /etc/default/nfknock ] || fail "example rules or /etc/default/nfknock missing"
ok "nfknock on PATH, nfknock(8), /etc/default/nfknock, /etc/nfknock and /var/lib/nfknock (0700), example door disabled"
[ "$(systemctl is-enabled nfknock)" = enabled ] || fail "the unit is not enabled"
prop Before | tr ' ' '\n' | grep -qx network-pre.target && prop Wants | tr ' ' '\n' | grep -qx network-pre.target \
  || fail "the unit is not ordered before network-pre.target: Before=$(prop Before) Wants=$(prop Wants)"
prop After | tr ' ' '\n' | grep -qx sysinit.target && fail "the unit waits for sysinit.target: it cannot run before the network"
ok "the unit runs before the network (Before= and Wants=network-pre.target, no default dependencies)"
[ "$(prop ActiveState)" = inactive ] || fail "the daemon runs without rules"
expect_no_chain "after install"
expect_port open "install neither opens nor closes anything"
systemctl start nfknock
[ "$(prop ActiveState)" = inactive ] && [ "$(prop ConditionResult)" = no ] || fail "start without rules should be skipped by the unit's condition"
ok "systemctl start without rules is skipped (ConditionPathExistsGlob)"

# --- the admin sets a door (and an SPA door, to have replay records) ------------------------------
sed -e "s/\[40000, 50000, 60000\]/[${SEQ[0]}, ${SEQ[1]}, ${SEQ[2]}]/" \
    -e "s/\[60000, 50000, 40000\]/[${CLOSE[0]}, ${CLOSE[1]}, ${CLOSE[2]}]/" \
    /etc/nfknock/rules/ssh.yaml.example > /etc/nfknock/rules/ssh.yaml
(umask 077 && nfknock keygen > /etc/nfknock/spa.keys)
cat > /etc/nfknock/rules/spa.yaml <<YAML
doors:
  - name: spaSSH
    kind: spa
    keys_file: /etc/nfknock/spa.keys
    protect: [22/tcp]
YAML
chmod 0600 /etc/nfknock/rules/*.yaml
nfknock check --rules /etc/nfknock/rules >/dev/null 2>/tmp/check.err || { cat /tmp/check.err; fail "nfknock check refuses the admin's rules"; }

# --- start: Type=notify, active only once ready ---------------------------------------------------
systemctl start nfknock || fail "systemctl start"   # returns once READY=1 arrived (Type=notify)
[ "$(prop Type)" = notify ] && [ "$(prop ActiveState)" = active ] && [ "$(prop SubState)" = running ] \
  || fail "not active/running with Type=notify: $(prop Type) $(prop ActiveState) $(prop SubState)"
prop StatusText | grep -q "guarding 2 door" || fail "no readiness status: $(prop StatusText)"
ok "systemctl start: active (running), Type=notify, status '$(prop StatusText)'"
expect_chain_once "after start"
expect_port closed "protected once the daemon runs"

# --- a real knock from the client namespace, then the close sequence ------------------------------
in_client nfknock knock "$SERVER" "${SEQ[@]}"
expect_port open "after the knock ${SEQ[*]}"
[ "$(journal_count "$CLIENT: openSSH: OPEN SESAME")" -ge 1 ] || fail "no OPEN SESAME in the journal"
nfknock status | grep -q "^openSSH  *knock  *22/tcp" || fail "nfknock status shows no door table: $(nfknock status)"
nfknock status --json | python3 -c 'import json, sys; assert json.load(sys.stdin)["grants"][0]["source"] == sys.argv[1]' "$CLIENT" \
  || fail "nfknock status --json does not list the grant"
ok "nfknock status (table) and --json list the door and the grant"
in_client nfknock knock "$SERVER" "${CLOSE[@]}"
expect_port closed "after the close sequence ${CLOSE[*]}"

# --- reload keeps the PID and is logged -----------------------------------------------------------
pid=$(prop MainPID) before=$(journal_count "reloaded ")
systemctl reload nfknock
for _ in $(seq 50); do [ "$(journal_count "reloaded ")" -gt "$before" ] && break; sleep 0.1; done
[ "$(journal_count "reloaded ")" -gt "$before" ] || fail "the reload is not in the journal"
[ "$(prop MainPID)" = "$pid" ] || fail "reload changed the PID ($pid -> $(prop MainPID))"
ok "systemctl reload: same PID $pid, '$(journalctl -u nfknock -o cat | grep "reloaded " | tail -n1)'"

# --- kill -9: systemd restarts it, the chain is still there once, closed meanwhile -----------------
kill -9 "$pid"
expect_port closed "while the daemon is dead"
wait_active "$pid"
[ "$(prop NRestarts)" -ge 1 ] || fail "NRestarts did not grow"
ok "kill -9 $pid: restarted by systemd as PID $(prop MainPID) (NRestarts $(prop NRestarts))"
expect_chain_once "after the restart"
in_client nfknock knock "$SERVER" "${SEQ[@]}"
expect_port open "the restarted daemon opens on a knock"
in_client nfknock knock "$SERVER" "${CLOSE[@]}"
expect_port closed "and closes again"

# --- the unit: sandbox, control socket, reload that checks first, watchdog (deploy/systemd/unit.sh) --
bash "$here/unit.sh" single "$SERVER" "$NS" "${SEQ[*]}" "${CLOSE[*]}" || fail "the unit (unit.sh single)"
expect_chain_once "after the unit's checks"

# --- nftables.service with nfknock's base rule: its reloads never open port 22 (README recipe) ------
bash "$here/nftables.sh" "$SERVER" "$NS" "${SEQ[*]}" "${CLOSE[*]}" || fail "nftables.service and nfknock's base rule"
expect_chain_once "after nftables.service was stopped and nfknock restarted"

# --- SPA: a packet captured on the wire opens once; its replay must stay refused after upgrade -----
/usr/bin/python3 "$here/sniff.py" sd-srv 62201 /tmp/spa.packet &
sniffer=$!
sleep 0.5
in_client nfknock spa "$SERVER" --door spaSSH --rules /etc/nfknock/rules
wait "$sniffer" || fail "the SPA packet was not captured"
expect_port open "after an SPA packet"
nfknock revoke "$CLIENT" >/dev/null
expect_port closed "after nfknock revoke"
records=$(python3 -c 'import json; print(len(json.load(open("/var/lib/nfknock/replay.json"))))')
[ "$records" -ge 1 ] || fail "no replay record in /var/lib/nfknock/replay.json"
cp /var/lib/nfknock/replay.json /tmp/replay.before
ok "SPA opened once; $records replay record(s) in /var/lib/nfknock"

# --- upgrade to the higher version: port 22 probed all along, never open --------------------------
rm -f /tmp/watch.stop
in_client /usr/bin/python3 "$here/watch.py" "$SERVER" 22 /tmp/watch.stop > /tmp/watch.out 2>&1 &
watcher=$!
sleep 1
pid=$(prop MainPID)
out=$(DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$new" 2>&1) || { echo "$out"; fail "apt install $new"; }
echo "$out" | grep "^nfknock:" || true
sleep 1
touch /tmp/watch.stop
wait "$watcher" || { cat /tmp/watch.out; fail "port 22 was open during the upgrade"; }
probes=$(cut -d' ' -f1 /tmp/watch.out)
[ "$probes" -ge 100 ] || fail "too few probes during the upgrade: $(cat /tmp/watch.out)"
ok "upgrade to $(dpkg-query -W -f='${Version}' nfknock): port 22 never open ($(cat /tmp/watch.out))"
[ "$(prop ActiveState)" = active ] && [ "$(prop MainPID)" != "$pid" ] || fail "the upgrade did not restart the daemon"
ok "the upgrade restarted the daemon (PID $pid -> $(prop MainPID))"
expect_chain_once "after the upgrade"
python3 - /tmp/replay.before /var/lib/nfknock/replay.json <<'PY' || fail "replay records lost in the upgrade"
import json, sys
before, after = (json.load(open(path)) for path in sys.argv[1:])
assert set(before) <= set(after), (before, after)
PY
in_client /usr/bin/python3 -c 'import socket, sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(open("/tmp/spa.packet", "rb").read(), (sys.argv[1], 62201))' "$SERVER"
for _ in $(seq 30); do [ "$(journal_count "SPA packet refused: replay")" -ge 1 ] && break; sleep 0.1; done
[ "$(journal_count "SPA packet refused: replay")" -ge 1 ] || fail "the replayed SPA packet was not refused as a replay"
expect_port closed "the SPA packet replayed after the upgrade is refused (replay cache kept)"
in_client nfknock knock "$SERVER" "${SEQ[@]}"
expect_port open "the upgraded daemon opens on a knock"
in_client nfknock knock "$SERVER" "${CLOSE[@]}"
expect_port closed "and closes again"

# --- several cores: the same service with --workers 2 (a supervisor and two worker processes) -----
sed -i 's/^NFKNOCK_OPTS=""/NFKNOCK_OPTS="--workers 2"/' /etc/default/nfknock
pid=$(prop MainPID)
systemctl restart nfknock
[ "$(prop ActiveState)" = active ] && [ "$(prop MainPID)" != "$pid" ] || fail "restart with --workers 2: $(prop ActiveState)"
nfknock status --json | python3 -c 'import json, sys; assert json.load(sys.stdin)["workers"] == 2' \
  || fail "nfknock status does not show two workers: $(nfknock status)"
expect_port closed "two workers: protected"
in_client nfknock knock "$SERVER" "${SEQ[@]}"
expect_port open "two workers: after the knock"
in_client nfknock knock "$SERVER" "${CLOSE[@]}"
expect_port closed "two workers: after the close sequence"
ok "--workers 2 under systemd: $(journalctl -u nfknock -o cat | grep "ready: pid" | tail -n1)"
bash "$here/unit.sh" workers "$SERVER" "$NS" "${SEQ[*]}" "${CLOSE[*]}" || fail "the unit with workers (unit.sh workers)"

# --- a boot with a broken rules file: empty tables, the unit started as at boot --------------------
[ "$(stat -c %a /var/lib/nfknock/last-good.json)" = 600 ] || fail "no last good rules (0600) in /var/lib/nfknock"
cp /etc/nfknock/rules/ssh.yaml /tmp/ssh.yaml.good
as_at_boot() {  # the daemon gone and the kernel without nfknock's rules, as after a reboot
  systemctl stop nfknock
  nfknock down >/dev/null
  expect_no_chain "$1"
  expect_port open "$1: nothing guards 22, so the checks can tell"
}
as_at_boot "boot with a broken rules file and last good rules"
sed -i 's/^    protect: \[22\/tcp\]/    protect: [22\/tcp/' /etc/nfknock/rules/ssh.yaml   # yesterday's edit, never reloaded
nfknock check --rules /etc/nfknock/rules >/dev/null 2>&1 && fail "the rules should be broken now"
systemctl start nfknock || fail "the unit did not start on the last good rules"
prop StatusText | grep -q "^DEGRADED: on the last good rules" || fail "the unit's status does not say DEGRADED: $(prop StatusText)"
[ "$(journal_count "STARTING ON THE LAST GOOD RULES")" -ge 1 ] || fail "no error line about the last good rules in the journal"
[ "$(journal_count "the rules do not load: /etc/nfknock/rules/ssh.yaml")" -ge 1 ] \
  || fail "the journal does not name the file that failed"
set +e; nfknock status >/tmp/status.out; code=$?; set -e
[ "$code" = 3 ] && grep -q "^DEGRADED: running on the last good rules" /tmp/status.out || fail "nfknock status: exit $code, $(cat /tmp/status.out)"
ok "started on the last good rules: status '$(prop StatusText)', nfknock status exits 3 and says DEGRADED"
expect_port closed "a host that never knocked, after a boot with a broken rules file"
in_client nfknock knock "$SERVER" "${SEQ[@]}"
expect_port open "the last good doors open on a knock"
in_client nfknock knock "$SERVER" "${CLOSE[@]}"
cp /tmp/ssh.yaml.good /etc/nfknock/rules/ssh.yaml
systemctl reload nfknock
for _ in $(seq 50); do nfknock status >/dev/null 2>&1 && break; sleep 0.1; done
nfknock status >/dev/null || fail "still degraded after the rules were fixed and reloaded"
ok "fixed and reloaded: no longer degraded ($(prop StatusText))"
as_at_boot "boot with a broken rules file and no last good rules"
rm /var/lib/nfknock/last-good.json
sed -i 's/^    protect: \[22\/tcp\]/    protect: [22\/tcp/' /etc/nfknock/rules/ssh.yaml
restarts=$(prop NRestarts)
systemctl start nfknock 2>/dev/null && fail "the unit started without rules that load nor last good rules"
[ "$(journal_count "installed rules that keep 22/tcp closed")" -ge 1 ] || fail "the journal does not say 22/tcp was kept closed"
sleep 5  # RestartSec=2: two restarts by now, were exit status 2 not in RestartPreventExitStatus=
[ "$(prop ActiveState)" = failed ] && [ "$(prop ExecMainStatus)" = 2 ] && [ "$(prop NRestarts)" = "$restarts" ] \
  || fail "a start that fails on the rules should not be retried: $(prop ActiveState), status $(prop ExecMainStatus), NRestarts $restarts -> $(prop NRestarts)"
ok "exit status 2 (rules that do not load): the unit stays failed, no restart loop (RestartPreventExitStatus=2)"
expect_chain_once "no last good rules: the ports of the broken file closed"
expect_port closed "a host that never knocked, after a boot with a broken rules file and no last good rules"
ok "no last good rules: the unit fails ($(prop ActiveState)/$(prop Result)), 22/tcp closed"
# The journal: the daemon's own identifier, and priorities journalctl can filter on.
grep -q "do not load" <<<"$(journalctl -t nfknock -p err -o cat --no-pager)" || fail "journalctl -t nfknock -p err: no 'do not load' line"
if grep -q "ready: pid" <<<"$(journalctl -t nfknock -p warning -o cat --no-pager)"; then fail "an info line ('ready') at warning priority"; fi
ok "journalctl -t nfknock -p err shows why the rules do not load; info lines stay at info"
cp /tmp/ssh.yaml.good /etc/nfknock/rules/ssh.yaml
systemctl reset-failed nfknock 2>/dev/null || true
systemctl restart nfknock
[ "$(prop ActiveState)" = active ] || fail "not active once the rules were fixed: $(prop ActiveState)"
ok "fixed: systemctl restart serves again"

# --- stop leaves the rules (closed); the journal is readable, without tracebacks ------------------
systemctl stop nfknock
[ "$(prop ActiveState)" = inactive ] || fail "stop: $(prop ActiveState)"
expect_chain_once "after stop (fail closed)"
expect_port closed "after systemctl stop"
journal=$(journalctl -u nfknock --no-pager)
grep -q "ready: pid" <<<"$journal" || fail "journalctl -u nfknock shows no 'ready' line"
if grep -q "Traceback" <<<"$journal"; then echo "$journal" | grep -B2 -A20 Traceback; fail "a traceback in the journal"; fi
ok "journalctl -u nfknock: $(echo "$journal" | wc -l) lines, no traceback"

# --- remove (as apt's resolver does in a release upgrade) leaves the rules and says so; purge removes
# everything: config, state, last good rules and the rules a removal left --------------------------
out=$(DEBIAN_FRONTEND=noninteractive apt-get remove -y nfknock 2>&1) || { echo "$out"; fail "apt remove"; }
echo "$out" | grep "^nfknock:" || true
grep -q "nfknock's firewall rules STAY IN PLACE" <<<"$out" || { echo "$out"; fail "remove did not say the rules stay"; }
expect_chain_once "after apt remove"
expect_port closed "after apt remove (nothing opens it now)"
[ -f /etc/nfknock/rules/ssh.yaml ] && [ -f /var/lib/nfknock/replay.json ] && [ -f /var/lib/nfknock/last-good.json ] \
  || fail "remove must keep the rules and the state"
ok "apt remove kept the firewall rules, /etc/nfknock and /var/lib/nfknock"
out=$(DEBIAN_FRONTEND=noninteractive apt-get purge -y nfknock 2>&1) || { echo "$out"; fail "apt purge"; }
echo "$out" | grep "^nfknock:" || true
for path in /etc/nfknock /var/lib/nfknock /etc/default/nfknock /opt/nfknock /usr/bin/nfknock; do
  [ ! -e "$path" ] || fail "$path is still there after purge"
done
expect_no_chain "after apt purge"
ipset list -n | grep -q '^nfknock-' && fail "ipsets left after purge: $(ipset list -n)"
expect_port open "after purge the port follows the rest of the firewall (none here)"
ok "apt purge removed the rules, /etc/nfknock, /var/lib/nfknock (last good rules too), /etc/default/nfknock and /opt/nfknock"
echo "systemd: all checks passed"
