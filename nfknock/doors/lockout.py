"""Failed attempts and lockouts of one door. Pure, `now` passed in.

A failure is a reset attempt, a tripwire hit, a reused rotating sequence or an SPA packet that
only a key holder could have sent, refused (spa_access.counts_against_source: junk, a bad HMAC or
a replayed copy comes from any address anyone cares to forge, and never counts). `failures` of
them within `window` of the first lock the source out of the door for `lock_for`: its knocks
are ignored (grants it already has keep working).
"""

from __future__ import annotations

from .events import Event, LockedOut, LockReleased
from .rules import Lockout
from .state import Pool, Table


class Lockouts:
    __slots__ = ("door", "policy", "failures", "locks")

    def __init__(self, door: str, policy: Lockout | None, records: Pool):
        self.door = door
        self.policy = policy  # None: lockout is off
        self.failures = records.table()
        self.locks = records.table()

    def locked(self, src: str, now: float) -> bool:
        lock = self.locks.entries.get(src)
        return lock is not None and lock[0] > now

    def fail(self, src: str, now: float) -> LockedOut | None:
        """Count a failure; the LockedOut event when it locks the source out."""
        policy = self.policy
        if policy is None:
            return None
        entry = self.failures.live(src, now)
        if entry is None:
            count = 1
            self.failures.put(src, now + policy.window, count)
        else:
            count = entry[1] + 1
            self.failures.update(src, count)
        if count < policy.failures:
            return None
        self.failures.pop(src)
        until = now + policy.lock_for
        self.locks.put(src, until)
        return LockedOut(src, self.door, count, until)

    def expire(self, now: float) -> list[Event]:
        for _ in self.failures.expire(now):
            pass
        return [LockReleased(src, self.door) for src, _ in self.locks.expire(now)]

    def tables(self) -> list[Table]:
        return [self.failures, self.locks]

    def live(self, now: float) -> list[tuple[str, float]]:
        """Locked sources and seconds left."""
        return [(src, until - now) for src, until, _ in self.locks.items() if until > now]
