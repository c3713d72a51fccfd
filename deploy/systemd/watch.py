"""watch.py HOST PORT STOPFILE [MS]: start a TCP connect to HOST:PORT every MS milliseconds
(default 20; HOST may be IPv6), each given 0.25 s, until STOPFILE exists; print how many probes
ran and how many connected, exit 1 if any did.

Run from the client namespace while the package is upgraded: a port open for more than a few
tens of milliseconds would show here (non-blocking connects overlap, so a dropped SYN does not
slow the next probe down).
"""

import errno
import os
import selectors
import socket
import sys
import time

host, port, stopfile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
INTERVAL, TIMEOUT = (float(sys.argv[4]) / 1000 if len(sys.argv) > 4 else 0.02), 0.25
FAMILY = socket.AF_INET6 if ":" in host else socket.AF_INET
probes, opened = 0, []
pending: dict[socket.socket, float] = {}
selector = selectors.DefaultSelector()
started = next_probe = time.monotonic()
while not os.path.exists(stopfile) or pending:
    now = time.monotonic()
    if now >= next_probe and not os.path.exists(stopfile):
        sock = socket.socket(FAMILY, socket.SOCK_STREAM)
        sock.setblocking(False)
        if sock.connect_ex((host, port)) in (0, errno.EINPROGRESS):
            pending[sock] = now
            selector.register(sock, selectors.EVENT_WRITE)
            probes += 1
        else:
            sock.close()
        next_probe = now + INTERVAL
    for key, _ in selector.select(timeout=INTERVAL / 2):
        sock = key.fileobj
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            opened.append(round(pending[sock] - started, 2))
        selector.unregister(sock)
        del pending[sock]
        sock.close()
    for sock, since in list(pending.items()):
        if time.monotonic() - since > TIMEOUT:
            selector.unregister(sock)
            del pending[sock]
            sock.close()
elapsed = time.monotonic() - started
print(f"{probes} probes in {elapsed:.1f}s, {len(opened)} connected" + (f" (at {opened} s)" if opened else ""))
sys.exit(1 if opened else 0)
