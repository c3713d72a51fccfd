"""The revocations a member has seen, kept until the grants they cover are over, on disk under
--state-dir, so that nothing that happens to Redis undoes one: a restart, a join, a stream read
again from its start, a stream trimmed, or a writer without the fleet key deleting the entry
(XDEL) all meet this member's own copy. The copies are signed like the stream's entries (a file
changed by hand verifies no more and is ignored, with a warning).

One file per revocation (named after a hash of its id; the workers of one daemon, each a member,
share the directory: the same revocation written twice is the same file). A revocation covers
grants issued before its place in the stream (records.py); those last at most MAX_GRANT_SECONDS,
so it is kept that long after it was issued, then swept.

The files are written (and fsynced) by a thread of their own, after the revocation took effect
in memory: closing never waits for a disk, and the packet loop never waits for an fsync.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from dataclasses import replace
from pathlib import Path

from .records import MAX_GRANT_SECONDS, Forged, Grant, Revoke, Signer, stream_order
from .signed_files import write_signed

SUBDIR = "fleet-revoked"
MAX_REVOCATIONS = 65536  # only members (the fleet key) can make one; a bound all the same


class Revocations:
    def __init__(self, signer: Signer, log: logging.Logger, directory: Path | None = None):
        self.signer, self.log, self.directory = signer, log, directory
        self.entries: dict[str, Revoke] = {}  # revocation id -> the revocation (with its place)
        self._by: dict[str, set[str]] = {}  # its source, or "key:" + its key -> revocation ids
        # What `covering` looks at, so that applying a grant costs the same however often its
        # source was revoked (a close sequence per session is a revocation each, kept a day):
        # per (source or key, door) the placed revocation with the latest place (it covers
        # whatever an earlier one covers), and the unplaced ones (they cover everything).
        self._newest: dict[tuple[str, str | None], Revoke] = {}
        self._unplaced: dict[str, set[str]] = {}
        self._writes: queue.SimpleQueue[tuple[str, Revoke | None]] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        if directory is not None:
            try:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                self.directory = None  # this run still keeps them in memory
                log.error("fleet: cannot keep revocations in %s: %s (a restart may forget them)", directory, exc)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, revoke_id: str) -> bool:
        return revoke_id in self.entries

    def flush(self) -> None:
        """Wait until what was kept is on disk (at a stop, and in tests)."""
        if self._writer is not None:
            self._writes.put(("", None))
            self._writer.join(timeout=10)
            self._writer = None

    def _write(self, revoke: Revoke) -> None:
        self._queue(revoke.id, revoke)

    def _drop(self, revoke_id: str) -> None:
        gone = self.entries.pop(revoke_id, None)
        if gone is not None:
            index = _index(gone)
            self._by.get(index, set()).discard(revoke_id)
            self._unplaced.get(index, set()).discard(revoke_id)
            newest = self._newest.get((index, gone.door))
            if newest is not None and newest.id == revoke_id:
                self._find_newest(index, gone.door)
        self._queue(revoke_id, None)

    def _queue(self, revoke_id: str, revoke: Revoke | None) -> None:
        """In order, by the writer thread: a file written, or (None) removed."""
        if self.directory is None:
            return
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_all, name="nfknock-fleet-revoked", daemon=True)
            self._writer.start()
        self._writes.put((revoke_id, revoke))

    def _write_all(self) -> None:
        while True:
            revoke_id, revoke = self._writes.get()
            if not revoke_id:
                return
            self._write_all_now(revoke_id, revoke)

    def _write_all_now(self, revoke_id: str, revoke: Revoke | None) -> None:
        path = self._path(revoke_id)
        if path is None:
            return
        if revoke is None:
            path.unlink(missing_ok=True)
        else:
            self._write_file(path, revoke)

    def covering(self, grant: Grant) -> Revoke | None:
        """A revocation that ends `grant` (issued before it), if this member has seen one."""
        for index in (grant.src, f"key:{grant.key}"):
            for revoke_id in self._unplaced.get(index, ()):
                revoke = self.entries[revoke_id]
                if revoke.covers(grant):
                    return revoke
            for door in (grant.door, None):
                newest = self._newest.get((index, door))
                if newest is not None and newest.covers(grant):
                    return newest
        return None

    def _keep(self, revoke: Revoke) -> None:
        index = _index(revoke)
        self.entries[revoke.id] = revoke
        self._by.setdefault(index, set()).add(revoke.id)
        if revoke.pos is None:
            self._unplaced.setdefault(index, set()).add(revoke.id)
            return
        self._unplaced.get(index, set()).discard(revoke.id)
        newest = self._newest.get((index, revoke.door))
        if newest is not None and newest.id == revoke.id:
            self._find_newest(index, revoke.door)  # its place changed (an earlier one was seen)
        elif newest is None or stream_order(revoke.pos) > stream_order(newest.pos or "0-0"):
            self._newest[(index, revoke.door)] = revoke

    def _find_newest(self, index: str, door: str | None) -> None:
        placed = [
            revoke
            for revoke in (self.entries[revoke_id] for revoke_id in self._by.get(index, ()))
            if revoke.door == door and revoke.pos is not None
        ]
        if placed:
            self._newest[(index, door)] = max(placed, key=lambda revoke: stream_order(revoke.pos or "0-0"))
        else:
            self._newest.pop((index, door), None)

    def add(self, revoke: Revoke) -> bool:
        """Keep `revoke` (durably when there is a state directory); True if it is new here. A
        revocation seen again keeps its earliest place: re-added later by whoever can write to
        Redis, it must not cover grants it never covered (nor less)."""
        known = self.entries.get(revoke.id)
        if known is not None:
            if known.pos is not None and (revoke.pos is None or stream_order(known.pos) <= stream_order(revoke.pos)):
                return False
            if known.pos is None and revoke.pos is None:
                return False
            revoke = replace(known, pos=revoke.pos)  # placed at last (ours, or read back)
        if known is None and len(self.entries) >= MAX_REVOCATIONS:
            oldest = min(self.entries.values(), key=lambda entry: entry.at)
            self.log.error(
                "fleet: more than %d live revocations; the oldest (%s) is forgotten", MAX_REVOCATIONS, oldest.id
            )
            self._drop(oldest.id)
        self._keep(revoke)
        self._write(revoke)
        return known is None

    def placed(self, revoke_id: str, pos: str) -> None:
        """Our own revocation got its place in the stream."""
        known = self.entries.get(revoke_id)
        if known is not None and known.pos is None:
            self.add(replace(known, pos=pos))

    def sweep(self, wall: float) -> int:
        over = [key for key, revoke in self.entries.items() if revoke.at + MAX_GRANT_SECONDS < wall]
        for key in over:
            self._drop(key)
        return len(over)

    def load(self, wall: float) -> int:
        """Read what an earlier run (or another worker) kept; returns how many are live."""
        if self.directory is None:
            return 0
        bad = 0
        for path in sorted(self.directory.iterdir()):
            if path.name.startswith("."):
                continue
            try:
                with open(path, "rb") as file:
                    raw = file.read(4096)
                revoke = self.signer.verify(raw)
                if not isinstance(revoke, Revoke):
                    raise Forged("not a revocation")
            except (OSError, Forged):
                bad += 1
                continue
            if revoke.at + MAX_GRANT_SECONDS >= wall and revoke.id not in self.entries:
                self._keep(revoke)
                self._write(revoke)  # signed again with the current key: a rotated-out key loses none
        if bad:
            self.log.warning(
                "fleet: %d file(s) in %s are not revocations signed with the fleet key (ignored)", bad, self.directory
            )
        return len(self.entries)

    def _path(self, revoke_id: str) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / hashlib.sha256(revoke_id.encode()).hexdigest()[:40]

    def _write_file(self, path: Path, revoke: Revoke) -> None:
        try:
            write_signed(path, self.signer.sign(revoke))
        except OSError as exc:
            # Kept in memory: this run still refuses what it covers; a restart might not.
            self.log.error(
                "fleet: cannot keep revocation %s in %s: %s (a restart may forget it)",
                revoke.id,
                self.directory,
                exc.strerror or exc,
            )


def _index(revoke: Revoke) -> str:
    return revoke.src or f"key:{revoke.key}"
