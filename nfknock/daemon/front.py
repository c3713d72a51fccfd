"""What the operator talks to: the control socket and the metrics exporter, served by the process
that owns the rules (a single process, or the supervisor of workers), between batches."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from . import control, metrics
from .config import DaemonConfig

SNAPSHOT_WAIT = 1.0  # seconds a scrape waits for the loop's snapshot before it takes the last one


class Front:
    def __init__(
        self,
        config: DaemonConfig,
        log: logging.Logger,
        answer: Callable[[dict[str, Any]], dict[str, Any]],
        take_snapshot: Callable[[float], metrics.Snapshot | None],
        wake: Callable[[], None],
    ):
        self.config, self.log, self.answer, self.take_snapshot, self.wake = config, log, answer, take_snapshot, wake
        self.control: control.ControlServer | None = None
        self.snapshot: metrics.Snapshot | None = None
        self._snapshot_wanted = False
        self._snapshot_taken = threading.Event()

    def start(self, now: float) -> None:
        if self.config.control_socket:
            try:
                self.control = control.ControlServer(self.config.control_socket, self.wake)
            except OSError as exc:
                self.log.error(
                    "no control socket at %s: %s (status/revoke/grant will not work)", self.config.control_socket, exc
                )
        if self.config.metrics_port:
            self.snapshot = self.take_snapshot(now)
            where = metrics.url(self.config.metrics_addr, self.config.metrics_port)
            try:
                metrics.serve(self._fresh_snapshot, self.config.metrics_port, self.config.metrics_addr)
                self.log.info("metrics on %s", where)
            except OSError as exc:
                self.log.error("no metrics on %s: %s", where, exc)

    def serve_control(self, now: float) -> None:
        if self.control is not None:
            self.control.answer_pending(self.answer)

    def serve_snapshot(self, now: float) -> None:
        if self._snapshot_wanted:
            self._snapshot_wanted = False
            self.snapshot = self.take_snapshot(now)
            self._snapshot_taken.set()

    def _fresh_snapshot(self) -> metrics.Snapshot | None:
        """For the exporter's thread: ask the loop for a snapshot and wait a moment for it."""
        self._snapshot_taken.clear()
        self._snapshot_wanted = True
        self.wake()
        self._snapshot_taken.wait(SNAPSHOT_WAIT)
        return self.snapshot

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
