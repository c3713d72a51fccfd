"""Events rendered as knockd-style text lines, and the logging set-up that carries them.

knockd's users grep for `<ip>: <door>: Stage N`, `OPEN SESAME`, `sequence timeout (stage N)` and
`command timeout`; those lines keep their exact wording. Lines knockd never had (resets, close
sequences, accepted connections) follow the same `<ip>: <door>: ...` shape.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys

from .events import (
    ConnectionAccepted,
    ConnectionRefused,
    DoorClosed,
    DoorOpened,
    Event,
    GrantExpired,
    KnockAdvanced,
    LockedOut,
    LockReleased,
    Sequence,
    SequenceReset,
    SequenceTimeout,
)

LOGGER_NAME = "nfknock"
TIME_FORMAT = "%Y-%m-%d %H:%M"


def _closing(sequence: Sequence) -> str:
    return "close " if sequence is Sequence.CLOSE else ""


RENDERERS = {
    KnockAdvanced: lambda e: f"{e.src}: {e.door}: {_closing(e.sequence)}Stage {e.stage}",
    DoorOpened: lambda e: f"{e.src}: {e.door}: OPEN SESAME",
    DoorClosed: lambda e: f"{e.src}: {e.door}: closed" + ("" if e.was_open else " (was not open)"),
    SequenceReset: lambda e: (
        f"{e.src}: {e.door}: {_closing(e.sequence)}sequence reset at stage {e.stage} by a knock on {e.port}"
    ),
    SequenceTimeout: lambda e: f"{e.src}: {e.door}: {_closing(e.sequence)}sequence timeout (stage {e.stage})",
    GrantExpired: lambda e: f"{e.src}: {e.door}: command timeout (open_for over, new connections refused)",
    LockedOut: lambda e: f"{e.src}: {e.door}: locked out after {e.failures} failed attempts; knocks ignored",
    LockReleased: lambda e: f"{e.src}: {e.door}: lockout over",
    ConnectionAccepted: lambda e: f"{e.src}: {e.door}: accepted new connection to {e.port}",
    ConnectionRefused: lambda e: f"{e.src}: refused new connection to {e.port} (no open door)",
}

# Refused connections are what every scanner produces: kept out of the normal log.
LEVELS = {ConnectionRefused: logging.DEBUG}


def render(event: Event) -> str:
    return RENDERERS[type(event)](event)


def log_events(logger: logging.Logger, events) -> None:
    for event in events:
        level = LEVELS.get(type(event), logging.INFO)
        if logger.isEnabledFor(level):
            logger.log(level, render(event))


def setup_logging(log_file: str | None = None, syslog: bool = False, verbose: bool = False) -> logging.Logger:
    """stderr by default; a file and/or syslog when asked. Lines look like knockd's log file."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    stamped = logging.Formatter("[%(asctime)s] %(message)s", TIME_FORMAT)
    handlers: list[logging.Handler] = []
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    else:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(stamped)
    if syslog:
        handler = logging.handlers.SysLogHandler(address="/dev/log", facility="daemon")
        handler.setFormatter(logging.Formatter("nfknock: %(message)s"))
        handlers.append(handler)
    for handler in handlers:
        logger.addHandler(handler)
    return logger
