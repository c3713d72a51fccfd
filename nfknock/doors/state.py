"""Bounded, expiring per-source tables for the engine.

Entries are kept in deadline order: most tables have one lifetime (a door's seq_timeout,
open_for, lockout window or lock time), so a new or renewed entry goes at the end; one with a
shorter life (an SPA grant for the time its client asked, a break-glass grant) is put before
those that end later. Expiry looks only at the front, and the oldest entry anywhere is the
front of one table. Tables of one kind share
a `Pool` with one cap; when it is full, the entry with the earliest deadline in the pool goes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any


class Pool:
    """A cap shared by several tables."""

    def __init__(self, cap: int):
        if cap < 1:
            raise ValueError("a pool needs room for at least one entry")
        self.cap = cap
        self.size = 0
        self.evicted = 0
        self.tables: list[Table] = []

    def table(self) -> Table:
        table = Table(self)
        self.tables.append(table)
        return table

    def forget(self, table: Table) -> None:
        self.size -= len(table.entries)
        table.entries.clear()
        self.tables.remove(table)

    def _make_room(self) -> None:
        fullest = min((t for t in self.tables if t.entries), key=lambda t: next(iter(t.entries.values()))[0])
        fullest.entries.popitem(last=False)
        self.size -= 1
        self.evicted += 1


class Table:
    """source -> (deadline, value), in deadline order."""

    __slots__ = ("pool", "entries")

    def __init__(self, pool: Pool):
        self.pool = pool
        self.entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, src: str) -> bool:
        return src in self.entries

    def live(self, src: str, now: float) -> tuple[float, Any] | None:
        """The entry if its deadline is still ahead (an overdue one is left for `expire`)."""
        entry = self.entries.get(src)
        if entry is None or entry[0] <= now:
            return None
        return entry

    def put(self, src: str, deadline: float, value: Any = None) -> None:
        """Insert or replace, keeping deadline order. Usually the new deadline is the latest
        (constant lifetimes: an append); a shorter one (an SPA client's -f, a break-glass
        grant) goes before the entries that end after it, which costs a step per such entry."""
        entries = self.entries
        if src in entries:
            del entries[src]
        else:
            if self.pool.size >= self.pool.cap:
                self.pool._make_room()
            self.pool.size += 1
        later = []
        for other in reversed(entries):
            if entries[other][0] <= deadline:
                break
            later.append(other)
        entries[src] = (deadline, value)
        for other in reversed(later):
            entries.move_to_end(other)

    def update(self, src: str, value: Any) -> None:
        """Change the value, keep deadline and place."""
        deadline, _ = self.entries[src]
        self.entries[src] = (deadline, value)

    def pop(self, src: str) -> tuple[float, Any] | None:
        entry = self.entries.pop(src, None)
        if entry is not None:
            self.pool.size -= 1
        return entry

    def expire(self, now: float) -> Iterator[tuple[str, Any]]:
        """Remove and yield (source, value) of every entry whose deadline has come."""
        entries = self.entries
        while entries:
            src, (deadline, value) = next(iter(entries.items()))
            if deadline > now:
                return
            del entries[src]
            self.pool.size -= 1
            yield src, value

    def next_deadline(self) -> float | None:
        if not self.entries:
            return None
        return next(iter(self.entries.values()))[0]

    def items(self):
        return ((src, deadline, value) for src, (deadline, value) in self.entries.items())
