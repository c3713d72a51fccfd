#!/usr/bin/env bash
# Run by checks.sh inside the systemd container, nfknock active: README's nftables.service recipe
# under real systemd. Debian's stock /etc/nftables.conf (from the nftables package) plus an
# include of `nfknock export nftables`; nftables.service started, then `systemctl reload
# nftables` again and again while the client namespace, which never knocked, starts a connect
# to 22 every 2 ms: not one may connect. A knock still opens 22 with the base rule in place.
# Leaves the host as it found it: nftables.service stopped, the stock conf back, nfknock restarted.
# nftables.sh SERVER NAMESPACE "SEQ" "CLOSE"
set -euo pipefail
SERVER=$1 NS=$2
read -r -a SEQ <<< "$3"
read -r -a CLOSE <<< "$4"
here=/deploy/systemd
RELOADS=10
INCLUDE=/etc/nftables.d/nfknock.nft

ok() { echo "systemd: ok: $*"; }
fail() { echo "systemd: FAIL: $*" >&2; exit 1; }
in_client() { ip netns exec "$NS" "$@"; }
port22() {
  if in_client /usr/bin/python3 /deploy/harness/probe.py "$SERVER" 22 1.5 2>/dev/null | grep -q '^SSH-'; then echo open; else echo closed; fi
}
expect_port() { [ "$(port22)" = "$1" ] || fail "port 22 should be $1: $2"; ok "port 22 $1: $2"; }
doctor() { nfknock doctor --rules /etc/nfknock/rules 2>&1 | grep -E '^(ok|warn|FAIL) +nftables.service:' || true; }

head -n 3 /etc/nftables.conf | grep -qx 'flush ruleset' || fail "/etc/nftables.conf is not Debian's stock file"
cp /etc/nftables.conf /tmp/nftables.conf.stock
doctor | grep -q "^warn nftables.service: .*no nfknock base rule" || fail "doctor did not say the base rule is missing: $(doctor)"
ok "doctor: $(doctor | cut -c1-110)..."

mkdir -p /etc/nftables.d
nfknock export nftables --rules /etc/nfknock/rules > "$INCLUDE"
echo "include \"$INCLUDE\"" >> /etc/nftables.conf
doctor | grep -q "^ok   nftables.service: the nfknock base rule in $INCLUDE matches the doors" || fail "doctor: $(doctor)"
ok "doctor: $(doctor)"

systemctl start nftables   # the flush takes nfknock's chain away; the daemon puts it back on restart
nft list table inet nfknock_base >/dev/null || fail "nftables.service did not load the include"
systemctl restart nfknock
expect_port closed "nftables.service and nfknock both in place"
in_client nfknock knock "$SERVER" "${SEQ[@]}"
expect_port open "a knock opens 22 through nfknock's chain and the base rule after it"
in_client nfknock knock "$SERVER" "${CLOSE[@]}"
expect_port closed "and closes it again"

rm -f /tmp/nft-watch.stop
in_client /usr/bin/python3 "$here/watch.py" "$SERVER" 22 /tmp/nft-watch.stop 2 > /tmp/nft-watch.out 2>&1 &
watcher=$!
sleep 0.3
started=$(date +%s%N)
for _ in $(seq "$RELOADS"); do
  systemctl reload nftables
  sleep 0.05
done
took=$(( ($(date +%s%N) - started) / 1000000 ))
touch /tmp/nft-watch.stop
wait "$watcher" || { cat /tmp/nft-watch.out; fail "port 22 connected during systemctl reload nftables"; }
probes=$(cut -d' ' -f1 /tmp/nft-watch.out)
[ "$probes" -ge "$RELOADS" ] || fail "too few probes: $(cat /tmp/nft-watch.out)"
ok "$RELOADS x systemctl reload nftables (${took} ms) under a 2 ms prober: $(cat /tmp/nft-watch.out); nfknock's rules left: $(iptables -S | grep -c NFKNOCK || true) (0: the base rule held alone)"

systemctl stop nftables   # `nft flush ruleset`: nfknock's chain too
# No PartOf=nftables.service: nfknock runs on and puts its chain back itself.
[ "$(systemctl show nfknock -p ActiveState --value)" = active ] || fail "systemctl stop nftables stopped nfknock"
for _ in $(seq 50); do [ "$(iptables -S INPUT | grep -c -- '-j NFKNOCK' || true)" = 1 ] && break; sleep 0.1; done
[ "$(iptables -S INPUT | grep -c -- '-j NFKNOCK' || true)" = 1 ] || fail "nfknock's chain not back after systemctl stop nftables"
expect_port closed "systemctl stop nftables flushed the ruleset: nfknock, still running, put its chain back"
cp /tmp/nftables.conf.stock /etc/nftables.conf
rm -f "$INCLUDE"
systemctl restart nfknock
expect_port closed "nftables.service stopped, nfknock restarted"
ok "the nftables.service checks took ${SECONDS} s"
