"""One signed record per file, written so that a crash leaves the old file or the new one whole.

The fleet keeps what it must not forget across restarts (revocations, packets used on other
members) as files under --state-dir, each signed with the fleet key: a file edited by hand then
verifies as nothing and is ignored, never trusted."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def write_signed(path: Path, signed: bytes) -> None:
    """Write `signed` to `path` durably (fsynced, then renamed into place); OSError if it cannot.
    The temporary name is per process and thread: two writers never share one."""
    fresh = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        descriptor = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(descriptor, signed)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(fresh, path)
    except OSError:
        fresh.unlink(missing_ok=True)
        raise
