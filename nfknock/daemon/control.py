"""The control socket: a root-only unix socket on which `nfknock status/revoke/grant` talk to the
running daemon, one JSON request and one JSON answer per connection.

Nothing a control client does may delay a verdict. The socket is served by a thread of its own:
it reads a request (one line, at most MAX_REQUEST bytes, within REQUEST_DEADLINE seconds in all,
however slowly the client writes), checks its shape, and only then hands it to the daemon's loop,
which answers it between two batches of packets (the engine is only ever touched by the loop).
A malformed request gets an error answer and changes nothing.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import queue
import re
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NfknockError, UsageError

# In a directory of its own: the systemd unit makes the file system read-only but for its
# RuntimeDirectory (/run/nfknock, 0700, removed when the daemon stops); run by hand, the daemon
# makes the directory itself. Earlier versions used /run/nfknock.sock: `call` still finds a
# daemon started by one of them.
DEFAULT_SOCKET = "/run/nfknock/nfknock.sock"
OLD_DEFAULT_SOCKET = "/run/nfknock.sock"
MAX_REQUEST = 4096  # bytes; a request is a few dozen
REQUEST_DEADLINE = 1.0  # seconds for a client to send its whole request
ANSWER_DEADLINE = 5.0  # seconds the thread waits for the loop's answer
COMMANDS = ("status", "revoke", "grant")
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")  # as rules.KeyName


def parse_request(raw: bytes) -> dict[str, Any]:
    """A checked request, or ValueError saying what is wrong with it."""
    try:
        request = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ValueError(f"expected a JSON object, got {type(request).__name__}")
    verb = request.get("cmd")
    if verb not in COMMANDS:
        raise ValueError(f"unknown command {verb!r} ({', '.join(COMMANDS)})")
    checked: dict[str, Any] = {"cmd": verb}
    if verb == "revoke" and request.get("key") is not None:
        key = request["key"]
        if not isinstance(key, str) or not KEY_NAME.fullmatch(key):
            raise ValueError(f"key must be a key name, got {key!r}")
        if request.get("address") is not None:
            raise ValueError("revoke takes an address or a key, not both")
        checked["key"] = key
    if verb in ("revoke", "grant"):
        if "key" not in checked:
            checked["address"] = canonical_address(request.get("address"))
        door = request.get("door")
        if door is not None and not isinstance(door, str):
            raise ValueError(f"door must be a name, got {door!r}")
        if verb == "grant" and door is None:
            raise ValueError("grant needs a door")
        checked["door"] = door
    if verb == "grant":
        seconds = request.get("seconds")
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not math.isfinite(seconds)
            or not 0 < seconds <= 86400
        ):
            raise ValueError(f"seconds must be a number in (0, 86400], got {seconds!r}")
        checked["seconds"] = float(seconds)
    return checked


def canonical_address(value: Any) -> str:
    """The one spelling the engine keys on (`FD00:251:2:0:0:0:0:2` is `fd00:251:2::2`)."""
    if not isinstance(value, str):
        raise ValueError(f"address must be an IP address, got {value!r}")
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        raise ValueError(f"address must be an IP address, got {value!r}") from None
    # Addresses no packet comes from: a grant for them could never be used (and the kernel's
    # set refuses them); a scope (`%eth0`) is not part of a packet's source either.
    scope = getattr(address, "scope_id", None)
    if scope:
        raise ValueError(f"address must not carry a scope (%{scope}), got {value!r}")
    if address.is_unspecified or address.is_multicast or (address.version == 4 and address == _BROADCAST):
        raise ValueError(f"{address} is not the address of a host")
    return str(address)


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


@dataclass
class Pending:
    """A checked request waiting for the loop's answer."""

    request: dict[str, Any]
    answer: dict[str, Any] | None = None
    done: threading.Event = field(default_factory=threading.Event)


class ControlServer:
    """Reads requests in a thread; `answer_pending(handler)` is called by the daemon's loop."""

    def __init__(self, path: str | Path, wake: Callable[[], None]):
        self.path = Path(path)
        self.wake = wake  # tells the loop a request is waiting
        self.pending: queue.SimpleQueue[Pending] = queue.SimpleQueue()
        self._closed = threading.Event()
        if not self.path.parent.exists():
            self.path.parent.mkdir(mode=0o700)  # root's alone, as the socket (the default's /run/nfknock)
        if self.path.is_socket():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                if probe.connect_ex(str(self.path)) == 0:
                    raise OSError(f"another nfknock answers on {self.path}")
            self.path.unlink()  # left by a killed daemon
        old_umask = os.umask(0o177)
        try:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, stat.S_IRUSR | stat.S_IWUSR)
        self.sock.listen(8)
        self.sock.settimeout(0.2)  # so the thread notices close()
        self._thread = threading.Thread(target=self._serve, name="nfknock-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            with conn:
                try:
                    self._serve_one(conn)
                except Exception:  # noqa: BLE001 - whatever one request does, the next is served
                    pass

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            raw = read_request(conn, time.monotonic() + REQUEST_DEADLINE)
            request = parse_request(raw)
        except (OSError, ValueError) as exc:
            answer: dict[str, Any] = {"error": f"bad request: {exc}"}
        except RecursionError:  # JSON nested deeper than the parser goes
            answer = {"error": "bad request: nested too deeply"}
        else:
            pending = Pending(request)
            self.pending.put(pending)
            self.wake()
            if pending.done.wait(ANSWER_DEADLINE) and pending.answer is not None:
                answer = pending.answer
            else:
                answer = {"error": "the daemon did not answer in time"}
        try:
            conn.settimeout(REQUEST_DEADLINE)
            conn.sendall(json.dumps(answer).encode() + b"\n")
        except OSError:
            pass

    def answer_pending(self, handler: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        """Answer every waiting request (from the loop, between batches of packets)."""
        while True:
            try:
                pending = self.pending.get_nowait()
            except queue.Empty:
                return
            try:
                pending.answer = handler(pending.request)
            finally:
                pending.done.set()

    def close(self) -> None:
        self._closed.set()
        self.sock.close()
        self._thread.join(timeout=2 * REQUEST_DEADLINE + ANSWER_DEADLINE)
        try:
            self.path.unlink()
        except OSError:
            pass


def read_request(conn: socket.socket, deadline: float, limit: int = MAX_REQUEST) -> bytes:
    """One line, within `deadline` (time.monotonic) in all and `limit` bytes; else ValueError."""
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise ValueError(f"request not complete within {REQUEST_DEADLINE:g}s")
        conn.settimeout(left)
        try:
            chunk = conn.recv(limit + 1 - len(data))
        except TimeoutError:
            raise ValueError(f"request not complete within {REQUEST_DEADLINE:g}s") from None
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            raise ValueError(f"request longer than {limit} bytes")
    return data


def _read_answer(conn: socket.socket, limit: int = 1 << 24) -> bytes:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def call(path: str | Path, request: dict) -> dict:
    """Ask the daemon; raise a one-line error when it cannot be reached or refuses."""
    if str(path) == DEFAULT_SOCKET and not Path(path).exists() and Path(OLD_DEFAULT_SOCKET).is_socket():
        path = OLD_DEFAULT_SOCKET  # a daemon of an older version, until it is restarted
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(ANSWER_DEADLINE + 2)
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            answer = json.loads(_read_answer(sock))
    except FileNotFoundError:
        raise NfknockError(
            f"no daemon listens on {path} (is nfknock running? --control-socket names another path)"
        ) from None
    except (OSError, ValueError) as exc:
        raise NfknockError(f"{path}: {exc}") from None
    if not isinstance(answer, dict):
        raise NfknockError(f"{path}: unexpected answer {answer!r:.80}")
    if "error" in answer:
        raise UsageError(answer["error"])
    return answer


# -- the answers (called by the daemon's loop, never concurrently with a packet) ---------------


def answer(daemon: Any, request: dict[str, Any], now: float) -> dict[str, Any]:
    """The answer to a request `parse_request` accepted."""
    verb = request["cmd"]
    if verb == "status":
        return status(daemon, now)
    door = request["door"]
    if door is not None and door not in daemon.engine.doors:
        return {"error": f"no door named {door!r} (doors: {', '.join(daemon.engine.doors)})"}
    if "key" in request:
        pairs = daemon.engine.revoke_key(request["key"], door)
        sources = sorted({src for _, src in pairs})
        daemon.log.log(
            _quiet_if(not pairs, daemon),
            "key %s: revoked by the operator (%s)",
            request["key"],
            ", ".join(f"{src} on {name}" for name, src in pairs) or "no grant",
        )
        # `addresses`: the sources whose kernel routing the daemon brings up to date.
        return {"revoked": sorted({name for name, _ in pairs}), "key": request["key"], "addresses": sources}
    address = request["address"]
    if verb == "revoke":
        doors = daemon.engine.revoke(address, door)
        daemon.log.log(
            _quiet_if(not doors, daemon), "%s: revoked by the operator (%s)", address, ", ".join(doors) or "no grant"
        )
        return {"revoked": doors, "address": address}
    until = daemon.engine.grant(address, door, request["seconds"], now)
    daemon.log.warning("%s: %s: break-glass grant for %gs by the operator", address, door, request["seconds"])
    return {"granted": door, "address": address, "seconds": until - now}


def _quiet_if(nothing: bool, daemon: Any) -> int:
    """Every worker is asked to revoke: the ones that held nothing say so only at debug level."""
    return logging.DEBUG if nothing and getattr(daemon, "channel", None) is not None else logging.INFO


def status(daemon: Any, now: float) -> dict[str, Any]:
    from .stats import read_queue_drops

    engine = daemon.engine
    drops = read_queue_drops(daemon.config.queues[0])
    return {
        "queue": daemon.config.queue_num,
        "firewall": daemon.firewall.name,
        "doors": [
            {
                "name": d.name,
                "kind": d.kind,
                "protect": [str(p) for p in d.protect],
                "forward": [str(dest) for dest in d.forward],
                "publish": [f"{entry.port} -> {entry.to}" for entry in d.publish],
            }
            for d in daemon.ruleset.doors
        ],
        "grants": [
            {
                "door": row.door,
                "source": row.source,
                "seconds_left": round(row.seconds_left, 1),
                **({} if row.key is None else {"key": row.key, "granted_for": row.seconds}),
            }
            for row in engine.grant_rows(now)
        ],
        "locked": [
            {"door": door, "source": src, "seconds_left": round(left, 1)} for door, src, left in engine.locked(now)
        ],
        "tracked_attempts": engine.tracked,
        "packets": {verdict.value: count for verdict, count in daemon.handled.items()},
        "unparsable": dict(daemon.unparsable),
        "internal_errors": daemon.errors,
        "evicted": engine.evicted,
        "kernel_queue_drops": drops.total if drops else 0,
        "fleet": None if daemon.fleet is None else daemon.fleet.status(now, daemon.wall_clock()),
        **process_status(daemon),
    }


def process_status(daemon: Any) -> dict[str, Any]:
    """What the process that owns the rules knows (a single process, or the supervisor): what the
    scaffolding watcher did (guard.py), and whether it runs on its last good rules (lastgood.py).
    None where there is no such thing (a worker, a test's fake)."""
    guard, last_good = getattr(daemon, "guard", None), getattr(daemon, "last_good", None)
    return {
        "scaffolding": None if guard is None else guard.status(),
        "degraded": None if last_good is None else last_good.status(),
    }
