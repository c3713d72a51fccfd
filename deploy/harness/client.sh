#!/bin/sh
# closed -> knock (stock client) -> sshd answers (ssh client) -> close (our client) -> closed
# -> SPA (stock fwknop client) -> open -> SPA replayed elsewhere does not matter here (netns tests).
set -u
server=$1
fail() { echo "client: FAILED: $*"; exit 1; }
probe() { python3 /harness/probe.py "$server" 22 "$1"; }
probe 2 && fail "port 22 answered before any knock"
echo "client: closed before the knock"
knock "$server" 40000 50000 60000 || fail "knock not sent"
banner=$(probe 3) || fail "no answer after the knock"
case "$banner" in SSH-2.0-*) echo "client: open after the knock: $banner" ;; *) fail "unexpected banner $banner" ;; esac
ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o ConnectTimeout=3 "nobody@$server" true 2>&1 \
    | grep -q "Permission denied" || fail "the ssh client did not reach sshd's authentication"
echo "client: the ssh client reached sshd"
nfknock knock "$server" --door openSSH --rules /etc/nfknock/rules --close || fail "close knock not sent"
sleep 0.5
probe 2 && fail "port 22 still answers after the close sequence"
echo "client: closed again"
key=$(sed -n 's/^KEY_BASE64: //p' /etc/nfknock/spa.keys)
hmac=$(sed -n 's/^HMAC_KEY_BASE64: //p' /etc/nfknock/spa.keys)
fwknop -A tcp/22 -a "$(hostname -i | awk '{print $1}')" -D "$server" --use-hmac \
    --key-base64-rijndael "$key" --key-base64-hmac "$hmac" >/dev/null || fail "fwknop did not send"
banner=$(probe 3) || fail "no answer after the SPA packet"
echo "client: open after the stock fwknop client's SPA packet: $banner"
