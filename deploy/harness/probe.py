"""probe.py HOST PORT SECONDS: exit 0 and print the banner if a TCP connect gets one in time."""

import socket
import sys

host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    with socket.create_connection((host, port), timeout=seconds) as sock:
        sock.settimeout(seconds)
        print(sock.recv(64).decode(errors="replace").strip())
except OSError as exc:
    print(f"no connection: {exc}")
    sys.exit(1)
