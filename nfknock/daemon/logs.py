"""Events rendered as knockd-style text lines, and the logging set-up that carries them.

knockd's users grep for `<ip>: <door>: Stage N`, `OPEN SESAME`, `sequence timeout (stage N)` and
`command timeout`; those lines keep their exact wording. Lines knockd never had (resets, close
sequences, accepted connections) follow the same `<ip>: <door>: ...` shape.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys

from ..doors.events import (
    ClaimNeeded,
    ConnectionAccepted,
    ConnectionRefused,
    DoorClosed,
    DoorOpened,
    Event,
    GrantExpired,
    GrantsRevoked,
    KnockAdvanced,
    LockedOut,
    LockReleased,
    Recorded,
    Sequence,
    SequenceReset,
    SequenceReused,
    SequenceTimeout,
    SpaRefused,
)
from . import journal
from .logfile import ReopeningFileHandler

LOGGER_NAME = "nfknock"
SYSLOG_ADDRESS = "/dev/log"  # --syslog; tests point it at their own socket
JOURNAL_SOCKET = journal.SOCKET  # journald's native protocol (journal.py); tests point it elsewhere
TIME_FORMAT = "%Y-%m-%d %H:%M"


def _closing(sequence: Sequence) -> str:
    return "close " if sequence is Sequence.CLOSE else ""


def _by_key(event: DoorOpened) -> str:
    # After OPEN SESAME, so that what greps knockd's lines still finds them.
    if event.key is None:
        return ""
    return f" (key {event.key}, {event.seconds:g}s)" if event.seconds is not None else f" (key {event.key})"


RENDERERS = {
    KnockAdvanced: lambda e: f"{e.src}: {e.door}: {_closing(e.sequence)}Stage {e.stage}",
    DoorOpened: lambda e: f"{e.src}: {e.door}: OPEN SESAME" + _by_key(e),
    DoorClosed: lambda e: f"{e.src}: {e.door}: closed" + ("" if e.was_open else " (was not open)"),
    SequenceReset: lambda e: (
        f"{e.src}: {e.door}: {_closing(e.sequence)}sequence reset at stage {e.stage} by a knock on {e.port}"
    ),
    SequenceTimeout: lambda e: f"{e.src}: {e.door}: {_closing(e.sequence)}sequence timeout (stage {e.stage})",
    GrantExpired: lambda e: (
        f"{e.src}: {e.door}: command timeout (open_for over, new connections refused)"
        + (f" (key {e.key})" if e.key else "")
    ),
    LockedOut: lambda e: f"{e.src}: {e.door}: locked out after {e.failures} failed attempts; knocks ignored",
    LockReleased: lambda e: f"{e.src}: {e.door}: lockout over",
    SequenceReused: lambda e: f"{e.src}: {e.door}: sequence already used in this window; not opened",
    SpaRefused: lambda e: f"{e.src}: {e.door}: SPA packet refused: {e.reason} ({e.detail})",
    GrantsRevoked: lambda e: (
        f"{e.door}: key {e.key} removed or changed: grants ended for {', '.join(e.sources) or 'nobody'}"
    ),
    ConnectionAccepted: lambda e: f"{e.src}: {e.door}: accepted new connection to {e.port}",
    ConnectionRefused: lambda e: f"{e.src}: refused new connection to {e.port} (no open door)",
    Recorded: lambda e: f"replay cache: recorded {e.key}",
    ClaimNeeded: lambda e: f"{e.src}: {e.door}: accepted here; asking the fleet whether another member used it",
}

# Refused connections are what every scanner produces: kept out of the normal log.
LEVELS = {ConnectionRefused: logging.DEBUG, Recorded: logging.DEBUG, ClaimNeeded: logging.DEBUG}


def render(event: Event) -> str:
    return RENDERERS[type(event)](event)


class RateLimit:
    """A token bucket per event type, so a flood of spoofed knocks cannot fill the disk while
    the rare lines (OPEN SESAME among a million `Stage 1`) still get through. What is held back
    is counted and reported in one line by `held_back()`."""

    def __init__(self, per_second: float = 20.0, burst: int = 200):
        self.per_second, self.burst = per_second, burst
        self._buckets: dict[type, list[float]] = {}  # type -> [tokens, last refill]
        self._held: dict[type, int] = {}

    def allow(self, kind: type, now: float) -> bool:
        bucket = self._buckets.get(kind)
        if bucket is None:
            bucket = self._buckets[kind] = [float(self.burst), now]
        bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.per_second)
        bucket[1] = now
        if bucket[0] >= 1:
            bucket[0] -= 1
            return True
        self._held[kind] = self._held.get(kind, 0) + 1
        return False

    def held_back(self) -> list[str]:
        """One line per event type whose lines were held back since the last call."""
        lines = [
            f"{count} '{kind.__name__}' log lines held back (more than {self.per_second:g}/s)"
            for kind, count in sorted(self._held.items(), key=lambda item: item[0].__name__)
        ]
        self._held.clear()
        return lines


def log_events(logger: logging.Logger, events, limit: RateLimit | None = None, now: float = 0.0) -> None:
    for event in events:
        level = LEVELS.get(type(event), logging.INFO)
        if logger.isEnabledFor(level) and (limit is None or limit.allow(type(event), now)):
            logger.log(level, render(event), extra={"event": event})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: the event's type and fields (plus the knockd-style text), or
    the level and message of a daemon line."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        event = getattr(record, "event", None)
        if event is not None:
            line["event"] = type(event).__name__
            for name in event.__dataclass_fields__:
                value = getattr(event, name)
                line[name] = value.value if hasattr(value, "value") else value
        return json.dumps(line)


# syslog priorities (sd-daemon(3)): journald reads a "<N>" prefix on each line of a stream
JOURNAL_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def to_journal() -> bool:
    """Whether stderr is journald's stream for this service (systemd sets JOURNAL_STREAM to its
    device:inode): then each line carries its priority and no timestamp of ours."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{stat.st_dev}:{stat.st_ino}"


class JournalFormatter(logging.Formatter):
    """`<priority>message` for journald: `journalctl -p warning` shows warnings and worse, and the
    journal's own timestamp is the only one. Every line of a traceback carries the priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{JOURNAL_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines() or [""])


def setup_logging(
    log_file: str | None = None, syslog: bool = False, verbose: bool = False, log_format: str = "text"
) -> logging.Logger:
    """stderr by default; a file and/or syslog when asked. Lines look like knockd's log file."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    stamped = JsonFormatter() if log_format == "json" else logging.Formatter("[%(asctime)s] %(message)s", TIME_FORMAT)
    handlers: list[logging.Handler] = []
    if log_file:
        handlers.append(ReopeningFileHandler(log_file))  # follows logrotate (logfile.py)
        handlers[0].setFormatter(stamped)
    elif log_format == "text" and to_journal():
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(JournalFormatter())
        if journal.available(JOURNAL_SOCKET):  # the event's fields as journal fields
            handlers.append(journal.JournalHandler(stream, JOURNAL_SOCKET))
        else:
            handlers.append(stream)
    else:
        handlers.append(logging.StreamHandler(sys.stderr))
        handlers[0].setFormatter(stamped)
    if syslog:
        to_syslog = logging.handlers.SysLogHandler(address=SYSLOG_ADDRESS, facility="daemon")
        to_syslog.setFormatter(logging.Formatter("nfknock: %(message)s"))
        handlers.append(to_syslog)
    for handler in handlers:
        logger.addHandler(handler)
    return logger
