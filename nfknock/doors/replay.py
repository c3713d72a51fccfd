"""Records of what may be used once: SPA packets and rotating sequences. Pure, wall-clock time
passed in.

An SPA packet that passed its HMAC, or a rotating door's sequence that opened the door in its
window, is recorded with the wall-clock time after which it is useless anyway (a packet older
than max_age, a window no longer accepted). A record is never forgotten before that time unless
the cache is full, and every record added comes back as a `Recorded` event, so the daemon can
keep the cache on disk (and a fleet could share it) without polling the engine.

A `shared` cache belongs to a fleet member: a new record is only this member's view, so what it
allows is held back (ClaimNeeded) until the fleet says no other member used it first.
"""

from __future__ import annotations

from collections import OrderedDict

from .events import Recorded


class ReplayCache:
    """Keys with an expiry in wall-clock seconds; insertion-ordered, bounded."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self.shared = False  # fleet mode: see ClaimNeeded
        self._entries: OrderedDict[str, float] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, key: str, expires: float) -> Recorded:
        """Remember `key` until `expires`; the oldest record goes when the cache is full."""
        if key not in self._entries and len(self._entries) >= self.max_entries:
            self._entries.popitem(last=False)
        self._entries[key] = max(expires, self._entries.get(key, expires))
        return Recorded(key, self._entries[key])

    def forget_expired(self, wall: float) -> None:
        """Drop records from the front while they are past their time. Records are close to
        expiry order, so this is cheap; a later-expiring record in front only delays the rest."""
        entries = self._entries
        while entries and next(iter(entries.values())) < wall:
            entries.popitem(last=False)

    def restore(self, entries: dict[str, float], wall: float) -> None:
        """Records saved by an earlier run; those already past their time are dropped."""
        for key, expires in sorted(entries.items(), key=lambda item: item[1]):
            if expires >= wall:
                self.record(key, expires)

    def snapshot(self) -> dict[str, float]:
        return dict(self._entries)
