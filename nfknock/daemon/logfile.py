"""The `--log-file` handler: it follows logrotate, by itself, in every process.

logrotate renames the file (or removes it) and makes a new one. Before each line this handler
looks at the path (one stat): when the file there is no longer the one it writes to, it closes
its stream and opens the path again, so the first line after a rotation already lands in the
new file and every line before it is in the rotated one: nothing is lost, no signal is needed
and the daemon is not disturbed. A SIGHUP (knockd's postrotate habit) is not needed: nfknock's
SIGHUP reloads the rules, which a log rotation should not do. The check is per process, so the
worker processes of `--workers N` (forked with a copy of this handler) follow a rotation as the
supervisor does: a reopen at a signal would reach the supervisor only.

A file that cannot be opened again (its directory gone, a full or read-only disk) never stops
the daemon: one line on stderr says so, the lines are counted and dropped, each later line tries
again, and the first line that gets through is preceded by how many were lost.
"""

from __future__ import annotations

import logging
import os
import sys


class ReopeningFileHandler(logging.FileHandler):
    """Appends to `path`; reopens it whenever the file at `path` is not the one open (rotated,
    removed) or could not be opened."""

    def __init__(self, path: str):
        super().__init__(path, mode="a", encoding="utf-8")  # opens now: a bad --log-file fails at start
        self._identity = self._opened()
        self.lost = 0  # lines dropped since the file could last be written

    def _opened(self) -> tuple[int, int] | None:
        if self.stream is None:
            return None
        stat = os.fstat(self.stream.fileno())
        return stat.st_dev, stat.st_ino

    def _current(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.baseFilename)
        except OSError:
            return None
        return stat.st_dev, stat.st_ino

    def reopen(self) -> None:
        """Close the stream and open the path again (made if it is missing). OSError if it
        cannot be opened: the handler then has no stream and tries again at the next line."""
        if self.stream is not None:
            stream, self.stream = self.stream, None
            try:
                stream.flush()
            except OSError:
                pass  # the old file's disk: what it could not take is lost with it
            finally:
                stream.close()
        self.stream = self._open()
        self._identity = self._opened()

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None or self._identity is None or self._current() != self._identity:
            try:
                self.reopen()
            except OSError as exc:
                self._lose(exc)
                return
        if self.lost:
            lost, self.lost = self.lost, 0
            message = f"{lost} log line(s) lost while {self.baseFilename} could not be opened"
            super().emit(
                logging.makeLogRecord(
                    {"name": record.name, "levelno": logging.WARNING, "levelname": "WARNING", "msg": message}
                )
            )
        super().emit(record)

    def _lose(self, exc: OSError) -> None:
        if not self.lost:
            try:
                print(
                    f"nfknock: cannot open the log file {self.baseFilename}: {exc.strerror or exc}; "
                    "its lines are dropped until it can be opened again",
                    file=sys.stderr,
                    flush=True,
                )
            except (OSError, ValueError):
                pass  # no stderr either: the count says it later
        self.lost += 1
