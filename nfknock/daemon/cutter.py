"""The conntrack side of a revoke (firewall/handshakes.py): only where a handshake can be
pending, and in a thread of its own.

Why: cutting a source's pending handshakes asks the kernel for a conntrack dump, and the kernel
walks its whole conntrack hash table for it (global, every namespace's buckets: 262,144 on the
bench machine): about 12 ms of CPU per revoke even when the namespace tracks nothing, ~100 ms
for the first (the netlink socket's set-up). Done in the loop for every revoke, that stalled
every packet and control request behind it (a revocation reached another member's status
~20 ms late; a key removed, revoking many sources, stalled the loop 12 ms per source), and the
walk's CPU slowed everything else on a 2-core host.

1. Only where a handshake can be pending. A pending handshake needs a SYN the daemon accepted:
   the judge's sink tells this cutter each ConnectionAccepted (`accepted`). A source whose last
   accepted connection is older than WINDOW has no unassured entry left (the kernel forgets an
   unanswered SYN after 120 s, a half-open one 60 s after the server's last SYN-ACK resend at
   ~63 s; 300 s is the largest TCP timeout short of an assured connection's), so its revoke
   needs no dump. Right after a start (history unknown) and when the record overflowed, every
   revoke cuts, as before.
2. Off the loop. The grant is gone from the engine and the kernel's granted set before the cut
   starts, so no new SYN passes; the cut only keeps a SYN that passed before from completing
   its handshake. That holds the same whether the dump runs here or in the loop (the kernel walks
   its table while ACKs keep arriving either way). One thread owns the netlink socket
   (pyroute2's sockets are not shared between threads).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable

from ..errors import FirewallError
from ..firewall.handshakes import Handshakes

WINDOW = 300.0  # seconds after an accepted SYN during which its handshake may still complete
MAX_SOURCES = 65536  # sources remembered; beyond, every revoke cuts for WINDOW


class HandshakeCutter:
    """`cut(src, ports, now)`: queue Handshakes.cut for a thread when `src` may have a pending
    handshake; the thread logs what it cut."""

    def __init__(self, handshakes: Handshakes, log: logging.Logger, now: float = 0.0):
        self.handshakes, self.log = handshakes, log
        self._last: dict[str, float] = {}  # source -> when a connection of it was last accepted
        self._blind_until = now + WINDOW  # before: we do not know what was accepted (a start)
        self._next_sweep = now + WINDOW
        self.skipped = 0  # revokes that needed no dump
        self._work: queue.SimpleQueue[tuple[str, frozenset[int]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition()
        self._pending = 0

    def accepted(self, src: str, now: float) -> None:
        """A new connection of `src` was accepted: a handshake may be pending for WINDOW."""
        last = self._last
        if src not in last and len(last) >= MAX_SOURCES:
            self._sweep(now)
            if len(last) >= MAX_SOURCES:
                last.clear()
                self._blind_until = now + WINDOW
        last[src] = now

    def cut(self, src: str, ports: Iterable[int], now: float) -> int:
        """Queue the cut if a handshake of `src` may be pending; 0 (the thread logs the count)."""
        if now >= self._next_sweep:
            self._sweep(now)
        if now >= self._blind_until and now - self._last.get(src, -WINDOW) > WINDOW:
            self.skipped += 1
            return 0
        ports = frozenset(ports)
        if not ports:
            return 0
        with self._idle:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nfknock-handshakes", daemon=True)
                self._thread.start()
        self._work.put((src, ports))
        return 0

    def wait(self, timeout: float = 10.0) -> bool:
        """Until every cut queued so far is done (tests); False on a timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        with self._idle:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._work.put(None)
            thread.join(timeout=10)
        else:
            self.handshakes.close()

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + WINDOW
        for src in [src for src, when in self._last.items() if now - when > WINDOW]:
            del self._last[src]

    def _run(self) -> None:
        try:
            while (job := self._work.get()) is not None:
                src, ports = job
                try:
                    cut = self.handshakes.cut(src, ports)
                except FirewallError as exc:
                    self.log.warning("%s: a handshake it started during its grant may still complete", exc)
                except Exception:  # noqa: BLE001 - the thread never dies on one source
                    self.log.exception("internal error while cutting %s's pending handshakes (ignored)", src)
                else:
                    if cut:
                        self.log.info("%s: %d handshake(s) begun during the grant will not complete", src, cut)
                finally:
                    with self._idle:
                        self._pending -= 1
                        self._idle.notify_all()
        finally:
            self.handshakes.close()
