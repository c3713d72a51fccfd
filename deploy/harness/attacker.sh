#!/bin/sh
# A full SYN scan must find nothing open and must not open the door.
set -u
server=$1
out=$(nmap -n -Pn -sS -p- --max-retries 0 --min-rate 20000 "$server") || { echo "attacker: nmap failed"; exit 1; }
echo "$out" | grep -E '^[0-9]+/tcp' || true
if echo "$out" | grep -qE '^[0-9]+/tcp[[:space:]]+open'; then
    echo "attacker: FAILED: the scan found an open port"; exit 1
fi
if python3 /harness/probe.py "$server" 22 2; then
    echo "attacker: FAILED: port 22 answered after the scan"; exit 1
fi
echo "attacker: nothing open, the door stayed closed"
