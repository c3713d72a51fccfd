"""Replay records other members used, kept by this member (issue 23): the local word on "was this
packet used elsewhere?", asked before Redis.

A claim in Redis (`NAME:used:<hmac>`) is one key that anyone with the Redis password can delete;
a packet captured on its way to member A could then be replayed to member B. So a member that
claims a record also appends a signed `Used` entry to the fleet's stream (link.py), and every
member keeps what it reads here: B refuses the packet from this store, whatever happened to the
claim. Kept by claim name (the keyed name Redis sees, never the record): what is kept here says
as little as Redis does.

Durable under --state-dir (`fleet-used/`, one file per entry, signed with the fleet key as the
stream's entries are; the workers of one daemon write the same file), so a restart, or a stream
entry deleted (XDEL) while this member was down, loses nothing that was read once. Written by a
thread of its own: the verdict loop never waits for a disk.

Bounded against a writer that holds the fleet key and floods: each entry is kept until its
expiry plus CLAIM_MARGIN (members' clocks), at most MAX_USED live entries (the one that ends
first goes, said at error level), none longer than MAX_LIFE.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from pathlib import Path

from .link import CLAIM_MARGIN  # kept beyond an entry's expiry, as its claim is: members' clocks differ
from .records import MAX_GRANT_SECONDS, Forged, Signer, Used
from .signed_files import write_signed

SUBDIR = "fleet-used"
MAX_USED = 65536  # live entries kept; only fleet-key holders can make one, a bound all the same
MAX_LIFE = MAX_GRANT_SECONDS  # kept at most a day, whatever expiry an entry says


class UsedElsewhere:
    def __init__(self, signer: Signer, log: logging.Logger, directory: Path | None = None):
        self.signer, self.log, self.directory = signer, log, directory
        self.entries: dict[str, tuple[Used, float]] = {}  # entry id -> (the entry, kept until)
        self._names: dict[str, list[str]] = {}  # claim name -> ids of the entries naming it, first first
        self.dropped = 0  # live entries forgotten because the store was full
        self._writes: queue.SimpleQueue[tuple[str, Used | None]] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        if directory is not None:
            try:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                self.directory = None  # this run still keeps them in memory
                log.error("fleet: cannot keep used records in %s: %s (a restart may forget them)", directory, exc)

    def __len__(self) -> int:
        return len(self.entries)

    def holder(self, names: list[str], wall: float) -> str | None:
        """The member that used the record claimed under any of `names`, if one did (and it is
        not over)."""
        for name in names:
            for entry_id in self._names.get(name, ()):
                used, until = self.entries[entry_id]
                if until >= wall:
                    return used.member  # the first to say so (others may have refused a copy)
        return None

    def add(self, used: Used, wall: float) -> bool:
        """Keep `used` (durably when there is a state directory); True if it is new and live."""
        until = min(used.expires, wall + MAX_LIFE) + CLAIM_MARGIN
        if until < wall or used.id in self.entries:
            return False
        if len(self.entries) >= MAX_USED:
            self.sweep(wall)
        if len(self.entries) >= MAX_USED:
            first = min(self.entries, key=lambda entry_id: self.entries[entry_id][1])
            self._drop(first)
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                self.log.error(
                    "fleet: more than %d live used records from other members (%d forgotten so far): a member "
                    "floods the stream; a packet used elsewhere may open here if its claim is deleted too",
                    MAX_USED,
                    self.dropped,
                )
        self._keep(used, until)
        self._queue(used.id, used)
        return True

    def _keep(self, used: Used, until: float) -> None:
        self.entries[used.id] = (used, until)
        for name in used.names:
            self._names.setdefault(name, []).append(used.id)

    def _drop(self, entry_id: str) -> None:
        gone = self.entries.pop(entry_id, None)
        if gone is not None:
            for name in gone[0].names:
                ids = self._names.get(name, [])
                if entry_id in ids:
                    ids.remove(entry_id)
                if not ids:
                    self._names.pop(name, None)
        self._queue(entry_id, None)

    def sweep(self, wall: float) -> int:
        over = [entry_id for entry_id, (_, until) in self.entries.items() if until < wall]
        for entry_id in over:
            self._drop(entry_id)
        return len(over)

    def load(self, wall: float) -> int:
        """Read what an earlier run (or another worker) kept; returns how many are live."""
        if self.directory is None:
            return 0
        bad = 0
        found: list[tuple[Used, float]] = []
        for path in sorted(self.directory.iterdir()):
            if path.name.startswith("."):
                continue
            try:
                with open(path, "rb") as file:
                    raw = file.read(4096)
                used = self.signer.verify(raw)
                if not isinstance(used, Used):
                    raise Forged("not a used record")
            except (OSError, Forged):
                bad += 1
                continue
            until = min(used.expires, wall + MAX_LIFE) + CLAIM_MARGIN
            if until < wall:
                path.unlink(missing_ok=True)
            else:
                found.append((used, until))
        for used, until in sorted(found, key=lambda item: item[0].expires):  # the first user first
            if used.id not in self.entries and len(self.entries) < MAX_USED:
                self._keep(used, until)
        if bad:
            self.log.warning(
                "fleet: %d file(s) in %s are not used records signed with the fleet key (ignored)", bad, self.directory
            )
        return len(self.entries)

    # -- the disk (a thread of its own) --------------------------------------------------------

    def flush(self) -> None:
        """Wait until what was kept is on disk (at a stop, and in tests)."""
        if self._writer is not None:
            self._writes.put(("", None))
            self._writer.join(timeout=10)
            self._writer = None

    def _queue(self, entry_id: str, used: Used | None) -> None:
        if self.directory is None:
            return
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_all, name="nfknock-fleet-used", daemon=True)
            self._writer.start()
        self._writes.put((entry_id, used))

    def _write_all(self) -> None:
        while True:
            entry_id, used = self._writes.get()
            if not entry_id:
                return
            assert self.directory is not None
            path = self.directory / hashlib.sha256(entry_id.encode()).hexdigest()[:40]
            if used is None:
                path.unlink(missing_ok=True)
            else:
                self._write_file(path, used)

    def _write_file(self, path: Path, used: Used) -> None:
        try:
            write_signed(path, self.signer.sign(used))
        except OSError as exc:
            # Kept in memory: this run still refuses it; a restart might not.
            self.log.error(
                "fleet: cannot keep a used record in %s: %s (a restart may forget it)",
                self.directory,
                exc.strerror or exc,
            )
