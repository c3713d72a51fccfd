"""Lines to journald through its native protocol, so that each event's fields are journal fields.

Under the systemd unit stderr is journald's stream already, which carries a line and its
priority; the native socket also carries fields: `journalctl -t nfknock NFKNOCK_SRC=10.0.0.2`,
`NFKNOCK_DOOR=openSSH`, `NFKNOCK_EVENT=LockedOut`. The protocol (systemd's "Native Journal
Protocol") is one datagram per entry to /run/systemd/journal/socket: `NAME=value` lines, and
for a value with a newline (a traceback) `NAME`, newline, its length as 64-bit little-endian,
the bytes, newline. No library is needed (python3-systemd is not a dependency).

An event's fields are its dataclass fields, named as in the JSON lines (`--log-format json`),
upper-cased after `NFKNOCK_`: NFKNOCK_EVENT, NFKNOCK_SRC, NFKNOCK_DOOR, NFKNOCK_PORT, NFKNOCK_STAGE,
NFKNOCK_REASON, NFKNOCK_KEY (a key's name, never key material: events hold none).

The send never waits: a datagram journald cannot take now (its queue full, the socket gone, an
entry too large) is written to the stream instead, the way it would have gone without this
handler, so no line is lost to the switch and the verdict loop never blocks on the socket.
"""

from __future__ import annotations

import logging
import socket
import struct

SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "nfknock"  # the unit's SyslogIdentifier: the stream's lines carry it, these must too
FACILITY = 3  # daemon
PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
MAX_DATAGRAM = 200_000  # below the default socket buffer; larger entries go to the stream


def _field(name: str, value: str) -> bytes:
    data = value.encode("utf-8", "replace")
    if b"\n" in data:
        return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return name.encode() + b"=" + data + b"\n"


def _text(value) -> str:
    if hasattr(value, "value"):  # an enum (Sequence)
        return str(value.value)
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def entry(record: logging.LogRecord, message: str) -> bytes:
    """One journal entry: the message, its priority, the identifier, the event's fields."""
    parts = [
        _field("MESSAGE", message),
        _field("PRIORITY", str(PRIORITY.get(record.levelno, 6))),
        _field("SYSLOG_IDENTIFIER", IDENTIFIER),
        _field("SYSLOG_FACILITY", str(FACILITY)),
    ]
    event = getattr(record, "event", None)
    if event is not None:
        parts.append(_field("NFKNOCK_EVENT", type(event).__name__))
        for name in event.__dataclass_fields__:
            value = getattr(event, name)
            if value is not None:
                parts.append(_field(f"NFKNOCK_{name.upper()}", _text(value)))
    return b"".join(parts)


class JournalHandler(logging.Handler):
    """Sends each record to journald's native socket; what it cannot send goes to `fallback`
    (the stream handler this one replaces)."""

    def __init__(self, fallback: logging.Handler, address: str = SOCKET):
        super().__init__()
        self.fallback, self.address = fallback, address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = entry(record, self.format(record))
            if len(data) > MAX_DATAGRAM:
                raise OSError("entry too large for one datagram")
            self.sock.sendto(data, self.address)
        except OSError:
            self.fallback.handle(record)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        self.fallback.close()
        super().close()


def available(address: str = SOCKET) -> bool:
    """Whether journald's native socket takes an entry (checked once, at start)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(address)
        return True
    except OSError:
        return False
    finally:
        probe.close()
