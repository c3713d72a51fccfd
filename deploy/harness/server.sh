#!/bin/sh
# sshd behind nfknock with the shipped rules (rules/ssh.yaml).
set -e
/usr/sbin/sshd
exec nfknock run --rules /etc/nfknock/rules --control-socket /run/nfknock.sock
