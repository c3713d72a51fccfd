#!/bin/sh
# closed -> knock (stock client) -> sshd answers (ssh client), and the other fleet member too
# -> close (our client) -> closed on both -> SPA (stock fwknop client) to one -> open on both.
# (An SPA packet replayed to the other member is refused: the netns tests prove that.)
set -u
server=$1
server2=$2
fail() { echo "client: FAILED: $*"; exit 1; }
probe() { python3 /harness/probe.py "$server" 22 "$1"; }
probe2() { python3 /harness/probe.py "$server2" 22 "$1"; }
probe 2 && fail "port 22 answered before any knock"
probe2 1 && fail "port 22 of the second member answered before any knock"
echo "client: closed before the knock"
knock "$server" 40000 50000 60000 || fail "knock not sent"
banner=$(probe 3) || fail "no answer after the knock"
case "$banner" in SSH-2.0-*) echo "client: open after the knock: $banner" ;; *) fail "unexpected banner $banner" ;; esac
ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o ConnectTimeout=3 "nobody@$server" true 2>&1 \
    | grep -q "Permission denied" || fail "the ssh client did not reach sshd's authentication"
echo "client: the ssh client reached sshd"
banner=$(probe2 3) || fail "the second member did not open after the knock on the first"
echo "client: the second fleet member is open too: $banner"
nfknock knock "$server" --door openSSH --rules /etc/nfknock/rules --close || fail "close knock not sent"
sleep 0.5
probe 2 && fail "port 22 still answers after the close sequence"
probe2 2 && fail "the second member still answers after the close sequence on the first"
echo "client: closed again, on both members"
key=$(sed -n 's/^KEY_BASE64: //p' /etc/nfknock/spa.keys)
hmac=$(sed -n 's/^HMAC_KEY_BASE64: //p' /etc/nfknock/spa.keys)
fwknop -A tcp/22 -a "$(hostname -i | awk '{print $1}')" -D "$server" --use-hmac \
    --key-base64-rijndael "$key" --key-base64-hmac "$hmac" >/dev/null || fail "fwknop did not send"
banner=$(probe 3) || fail "no answer after the SPA packet"
echo "client: open after the stock fwknop client's SPA packet: $banner"
banner=$(probe2 3) || fail "the second member did not open after the SPA packet to the first"
echo "client: the second fleet member is open too: $banner"
