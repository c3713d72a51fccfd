"""Slow disk work off the verdict path: the replay cache is written and fsynced by a thread.

The loop hands over the latest snapshot and goes on; writes coalesce (one write covers every
snapshot handed over before it started), and the loop learns which were durable, or failed, at
its next turn. What waits for a write (a claim, and the SYNs held behind it) is answered then:
the record is durable before the grant exists (sinks.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class DurableWriter:
    def __init__(self, save: Callable[[Any], None], wake: Callable[[], None]):
        self._save, self._wake = save, wake
        self._cond = threading.Condition()
        self._latest: tuple[int, Any] | None = None  # (generation, snapshot) not yet being written
        self._writing = False
        self._handed = 0  # generations handed over so far
        self._finished: list[tuple[int, Exception | None]] = []  # (last generation covered, error)
        self._thread: threading.Thread | None = None
        self._stopping = False

    def submit(self, snapshot: Any) -> int:
        """Hand over a snapshot; returns its generation (see `finished`)."""
        with self._cond:
            self._handed += 1
            self._latest = (self._handed, snapshot)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nfknock-replay-writer", daemon=True)
                self._thread.start()
            self._cond.notify()
            return self._handed

    def finished(self) -> list[tuple[int, Exception | None]]:
        """Writes done since the last call: (every generation up to this one, error or None)."""
        with self._cond:
            done, self._finished = self._finished, []
            return done

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until everything handed over is written (tests; a stop)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._latest is None and not self._writing, timeout)

    def stop(self) -> None:
        self.wait_idle()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._latest is not None or self._stopping)
                if self._latest is None:
                    return
                (generation, snapshot), self._latest = self._latest, None
                self._writing = True
            error: Exception | None = None
            try:
                self._save(snapshot)
            except Exception as exc:  # noqa: BLE001 - any failure means not durable
                error = exc
            with self._cond:
                self._writing = False
                self._finished.append((generation, error))
                self._cond.notify_all()
            self._wake()
