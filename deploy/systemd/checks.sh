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

for pkg in iptables ipset libnetfilter-queue1 python3; do
  ! installed "$pkg" || fail "$pkg is installed before nfknock: the test could not tell whether Depends brings it"
done
[ "$(in_client bash /checks-probe.sh "$SERVER")" = "SSH-" ] || fail "sshd does not answer the client before nfknock"
ok "sshd answers the client before nfknock is installed"

# --- install -------------------------------------------------------------------------------------
cp "$old_deb" "$new_deb" /tmp/ && chmod 0644 /tmp/*.deb
old=/tmp/$(basename "$old_deb") new=/tmp/$(basename "$new_deb")
out=$(DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$old" 2>&1) || { echo "$out"; fail "apt install $old"; }
echo "$out" | grep -q "nfknock: not started: no rules in /etc/nfknock/rules" || { echo "$out"; fail "postinst did not say why it did not start"; }
for pkg in iptables ipset libnetfilter-queue1 python3; do installed "$pkg" || fail "Depends did not bring $pkg"; done
ok "apt installed $(basename "$old") and its Depends (iptables ipset libnetfilter-queue1 python3)"
[ "$(command -v nfknock)" = /usr/bin/nfknock ] || fail "nfknock is not /usr/bin/nfknock on PATH"
nfknock --version | grep -q '^nfknock ' || fail "nfknock --version"
zcat /usr/share/man/man8/nfknock.8.gz | grep -q '^\.SS nfknock run' || fail "no nfknock(8)"
[ "$(stat -c %a /etc/nfknock)" = 700 ] && [ "$(stat -c %a /etc/nfknock/rules)" = 700 ] && [ "$(stat -c %a /var/lib/nfknock)" = 700 ] \
  || fail "/etc/nfknock, its rules and /var/lib/nfknock must be 0700"
[ -f /etc/nfknock/rules/ssh.yaml.example ] && [ -f /etc/default/nfknock ] || fail "example rules or /etc/default/nfknock missing"
ok "nfknock on PATH, nfknock(8), /etc/default/nfknock, /etc/nfknock and /var/lib/nfknock (0700), example door disabled"
[ "$(systemctl is-enabled nfknock)" = enabled ] || fail "the unit is not enabled"
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
systemctl start nfknock   # returns once READY=1 arrived (Type=notify)
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

# --- stop leaves the rules (closed); the journal is readable, without tracebacks ------------------
systemctl stop nfknock
[ "$(prop ActiveState)" = inactive ] || fail "stop: $(prop ActiveState)"
expect_chain_once "after stop (fail closed)"
expect_port closed "after systemctl stop"
journal=$(journalctl -u nfknock --no-pager)
echo "$journal" | grep -q "ready: pid" || fail "journalctl -u nfknock shows no 'ready' line"
if echo "$journal" | grep -q "Traceback"; then echo "$journal" | grep -B2 -A20 Traceback; fail "a traceback in the journal"; fi
ok "journalctl -u nfknock: $(echo "$journal" | wc -l) lines, no traceback"

# --- remove takes the scaffolding away and says so; purge removes config and state ----------------
out=$(DEBIAN_FRONTEND=noninteractive apt-get remove -y nfknock 2>&1) || { echo "$out"; fail "apt remove"; }
echo "$out" | grep "^nfknock:" || true
echo "$out" | grep -q "taking nfknock's firewall rules away" || { echo "$out"; fail "remove did not say it removes the rules"; }
expect_no_chain "after apt remove"
ipset list -n | grep -q '^nfknock-' && fail "ipsets left after remove: $(ipset list -n)"
expect_port open "after remove the port follows the rest of the firewall (none here)"
[ -f /etc/nfknock/rules/ssh.yaml ] && [ -f /var/lib/nfknock/replay.json ] || fail "remove must keep the rules and the state"
ok "apt remove kept /etc/nfknock and /var/lib/nfknock"
DEBIAN_FRONTEND=noninteractive apt-get purge -y nfknock >/dev/null 2>&1 || fail "apt purge"
for path in /etc/nfknock /var/lib/nfknock /etc/default/nfknock /opt/nfknock /usr/bin/nfknock; do
  [ ! -e "$path" ] || fail "$path is still there after purge"
done
ok "apt purge removed /etc/nfknock, /var/lib/nfknock, /etc/default/nfknock and /opt/nfknock"
echo "systemd: all checks passed"
