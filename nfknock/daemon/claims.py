"""Replay records shared by the worker processes of one daemon, as files in one directory.

With `--workers N` each worker has its own engine, and a replayed SPA packet or rotating sequence
sent from another address reaches another worker: what one worker used, all must refuse. A
record is claimed by creating a file named after it with O_CREAT|O_EXCL: the kernel makes that
atomic across processes, it needs no broker and no round trip, so a claim is answered within the
packet that needs it (an SPA client's first SYN does not wait for anyone). The file's mtime is the
record's expiry (wall clock); an expired file is taken over by the next claim and swept by the
supervisor. Under --state-dir the directory survives restarts, as the replay cache does.

Every SPA packet that passed its HMAC is written here, not only those that open something: a
packet refused (for its ports, "from the future", ...) by one worker must stay used for the others
and after a restart, or the operator widening the door, or the packet's time coming, would let a
captured copy in through another worker (`record`). A claim is on disk (fsynced, file and
directory) before it is answered, so a crash right after a grant cannot make the packet usable again.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from ..errors import NfknockError

SUBDIR = "used"
MAX_RECORD = 4096  # bytes of a record kept in its file (records are digests and door names)


class ReplayClaims:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        found = os.lstat(self.directory)
        if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.geteuid():
            # A link or someone else's directory: what is claimed there could be taken away.
            raise NotADirectoryError(f"{self.directory} is not a directory of this user's (a symlink?)")
        os.chmod(self.directory, 0o700)

    def _path(self, record: str) -> Path:
        # Records are the engine's keys (digests, door names); hashing keeps the name a plain file name.
        return self.directory / hashlib.sha256(record.encode()).hexdigest()

    def claim(self, record: str, expires: float, wall: float, durable: bool = True) -> bool:
        """True if no live claim on `record` existed and this one is now recorded until `expires`.
        `durable`: on disk before the answer (False only for records already kept elsewhere)."""
        path = self._path(record)
        # Written aside with its expiry, then linked into place: link() fails if the name exists,
        # and no other worker ever sees a claim without its expiry.
        fresh = self.directory / f".{path.name}.{os.getpid()}"
        descriptor = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            # The record itself (not secret: a digest or a door's counter), so that a fleet member
            # can put it back in Redis after a restart when Redis lost it (`live`).
            os.write(descriptor, record.encode()[:MAX_RECORD])
            os.utime(descriptor, (expires, expires))
            if durable:
                os.fsync(descriptor)  # the expiry (the file's inode) before the name that points to it
        finally:
            os.close(descriptor)
        try:
            for _ in range(2):
                try:
                    os.link(fresh, path)
                    if durable:
                        self._sync_directory()
                    return True
                except FileExistsError:
                    try:
                        if path.stat().st_mtime > wall:
                            return False
                        path.unlink()  # expired: the record may be used again, as the engine's cache says
                    except FileNotFoundError:
                        pass
            return False  # another worker took it over in between: it is used
        finally:
            fresh.unlink(missing_ok=True)

    def record(self, record: str, expires: float, wall: float) -> None:
        """Keep `record` used until `expires` although it opened nothing (an SPA packet refused
        after its HMAC): whoever claims it later is refused. A live claim already there stays as
        it is: it lasts as long, since a packet's record ends when the packet would be too old
        anyway, whoever saw it. OSError is the caller's to report."""
        self.claim(record, expires, wall)

    def _sync_directory(self) -> None:
        descriptor = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def sweep(self, wall: float) -> int:
        """Remove expired claims; returns how many."""
        removed = 0
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue  # a claim being written
                try:
                    if entry.stat().st_mtime <= wall:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed


def live_records(claims: ReplayClaims, wall: float, limit: int = 65536) -> dict[str, float]:
    """The records claimed in `claims` that are still live, with their expiries: what every
    worker of this daemon used before, for the fleet to put back in Redis when Redis lost it
    (fleet/link.py hold_records). A file whose content is not the record its name says (written
    by a version that kept no content, or changed) is left out: it still refuses locally."""
    found: dict[str, float] = {}
    with os.scandir(claims.directory) as entries:
        for entry in entries:
            if entry.name.startswith(".") or len(found) >= limit:
                continue
            try:
                expires = entry.stat(follow_symlinks=False).st_mtime
                if expires <= wall or not entry.is_file(follow_symlinks=False):
                    continue
                with open(entry.path, "rb") as file:
                    record = file.read(MAX_RECORD + 1)
            except OSError:
                continue
            if record and hashlib.sha256(record).hexdigest() == entry.name:
                found[record.decode(errors="replace")] = expires
    return found


def open_claims(directory: Path) -> ReplayClaims:
    """The claims directory, or one line saying why it cannot be used (before anything is touched)."""
    try:
        return ReplayClaims(directory)
    except OSError as exc:
        raise NfknockError(f"cannot keep the replay records in {directory}: {exc.strerror or exc}") from None
