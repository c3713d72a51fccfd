"""The conntrack side of a revoke (firewall/handshakes.py): only where a handshake can be
pending, by its exact tuple.

Why: cutting a source's pending handshakes by a conntrack dump makes the kernel walk its whole
conntrack hash table (global, every namespace's buckets: 262,144 on the bench machine): about
12 ms of CPU per revoke even when the namespace tracks nothing, ~100 ms for the first (the
netlink socket's set-up), and pyroute2 then parsed every entry of the source in Python (a client
with 300 finished connections: 100-240 ms). Done in the loop for every revoke, that stalled
every packet and control request behind it (a revocation reached another member's status
~20 ms late), and with --workers every worker walked the table for every revoke.

A pending handshake needs a SYN the daemon accepted: the judge's sink tells this cutter each
ConnectionAccepted with its tuple (`accepted`). A revoke then looks those tuples up (one hash
lookup each in the kernel, no walk) and deletes the unassured ones. A source whose last accepted
connection is older than WINDOW has none left (the kernel forgets an unanswered SYN after
120 s, a half-open one 60 s after the server's last SYN-ACK resend at ~63 s; 300 s is the
largest TCP timeout short of an assured connection's), and a worker that never accepted the
source's connections has none either: nothing to do. What an earlier process let begin is read
once at start (`survey`: one dump of the unassured entries, kernel-filtered); if that fails, and
for a source with more recent connections than are remembered, a revoke walks the table as
before. All of it runs in the caller's thread (the loop): `nfknock revoke` answers once the cut
is done, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from ..errors import FirewallError
from ..firewall.handshakes import Handshakes

WINDOW = 300.0  # seconds after an accepted SYN during which its handshake may still complete
MAX_SOURCES = 65536  # sources remembered; beyond, every revoke cuts for WINDOW
MAX_TUPLES = 64  # connections remembered per source; beyond, its revoke walks the table


class HandshakeCutter:
    """`cut(src, ports, now)`: cut `src`'s pending handshakes, by exact tuples when they are known,
    by a walk of the table when they are not, not at all when none can be pending."""

    def __init__(self, handshakes: Handshakes, log: logging.Logger, now: float = 0.0):
        self.handshakes, self.log = handshakes, log
        self._last: dict[str, float] = {}  # source -> when a connection of it was last accepted
        self._tuples: dict[str, dict[tuple[str, int, int], float]] = {}  # source -> (dst, sport, dport) -> when
        self._many: set[str] = set()  # sources with connections not remembered exactly
        self._blind_until = now + WINDOW  # until the survey is read: what an earlier process accepted
        self._started = now
        self._next_sweep = now + WINDOW
        self.skipped = 0  # revokes that needed no conntrack work
        self.walks = 0  # revokes that needed the whole table

    def survey(self) -> None:
        """Learn the handshakes pending now (an earlier process's): once read, revokes no longer
        need the whole table while the history is unknown. A failure is a warning."""
        try:
            found = self.handshakes.pending()
        except FirewallError as exc:
            self.log.warning("%s (revokes read the whole conntrack table for %.0f s)", exc, WINDOW)
            return
        for src, dst, sport, dport in found:
            self._last[src] = self._started
            self._remember(src, (dst, sport, dport), self._started)
        self._blind_until = float("-inf")

    def accepted(self, src: str, now: float, dst: str = "", sport: int = 0, port: str = "") -> None:
        """A new connection of `src` was accepted: its handshake may be pending for WINDOW."""
        last = self._last
        if src not in last and len(last) >= MAX_SOURCES:
            self._sweep(now)
            if len(last) >= MAX_SOURCES:
                last.clear()
                self._tuples.clear()
                self._many.clear()
                self._blind_until = now + WINDOW
        last[src] = now
        number, _, proto = port.partition("/")
        if proto == "tcp" and dst and sport:
            self._remember(src, (dst, sport, int(number)), now)
        else:
            self._many.add(src)  # not known exactly: its revoke walks the table

    def _remember(self, src: str, exact: tuple[str, int, int], now: float) -> None:
        tuples = self._tuples.setdefault(src, {})
        tuples[exact] = now
        if len(tuples) > MAX_TUPLES:
            for old in [key for key, when in tuples.items() if now - when > WINDOW]:
                del tuples[old]
            if len(tuples) > MAX_TUPLES:
                self._many.add(src)
                tuples.clear()

    def cut(self, src: str, ports: Iterable[int], now: float) -> int:
        """How many of `src`'s pending handshakes to these ports were cut. FirewallError when
        conntrack cannot be read or changed."""
        ports = frozenset(ports)
        if not ports:
            return 0
        if now >= self._next_sweep:
            self._sweep(now)
        recent = now - self._last.get(src, float("-inf")) <= WINDOW
        if now < self._blind_until or (recent and src in self._many):
            self.walks += 1
            return self.handshakes.cut(src, ports)
        exact = [key for key, when in self._tuples.get(src, {}).items() if now - when <= WINDOW and key[2] in ports]
        if not exact:
            self.skipped += 1
            return 0
        return self.handshakes.cut_exact(src, exact)

    def close(self) -> None:
        self.handshakes.close()

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + WINDOW
        for src in [src for src, when in self._last.items() if now - when > WINDOW]:
            del self._last[src]
            self._tuples.pop(src, None)
            self._many.discard(src)
