"""The replay cache on disk, so a restart (or an upgrade) never re-enables a captured SPA packet
or a rotating sequence already used in its window.

One JSON object, key -> expiry (wall-clock seconds), written to a temporary file, fsynced and
renamed over the old one: a crash mid-write leaves the previous cache, never half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import NfknockError

FILE_NAME = "replay.json"


class ReplayStore:
    def __init__(self, state_dir: str | Path):
        self.path = Path(state_dir) / FILE_NAME

    def load(self) -> dict[str, float]:
        """The saved records; an unreadable cache stops the start (it must not silently empty)."""
        if not self.path.exists():
            return {}
        try:
            entries = json.loads(self.path.read_text())
            if not isinstance(entries, dict):
                raise ValueError(f"expected an object, got {type(entries).__name__}")
            return {str(key): float(expires) for key, expires in entries.items()}
        except (OSError, ValueError, TypeError) as exc:
            raise NfknockError(
                f"{self.path}: cannot read the replay cache: {exc} (move it away to start with an empty "
                "cache; captured SPA packets younger than max_age then work once)"
            ) from None

    def save(self, entries: dict[str, float]) -> None:
        """Replace the file atomically; OSError is the caller's to report."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as out:
            json.dump(entries, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
