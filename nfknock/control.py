"""The control socket: a root-only unix socket on which `nfknock status/revoke/grant` talk to the
running daemon, one JSON request and one JSON answer per connection.

It is served from the daemon's own loop (no thread touches the engine), with short timeouts so
that a stuck client cannot hold the verdict loop for long.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

from .errors import NfknockError, UsageError

DEFAULT_SOCKET = "/run/nfknock.sock"
CLIENT_TIMEOUT = 0.5


class ControlServer:
    def __init__(self, path: str | Path, handler):
        self.path = Path(path)
        self.handler = handler  # request dict -> answer dict
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
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def serve_one(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(CLIENT_TIMEOUT)
            try:
                request = json.loads(_read_line(conn))
                answer = self.handler(request)
            except (OSError, ValueError) as exc:
                answer = {"error": f"bad request: {exc}"}
            try:
                conn.sendall(json.dumps(answer).encode() + b"\n")
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()
        try:
            self.path.unlink()
        except OSError:
            pass


def _read_line(conn: socket.socket, limit: int = 65536) -> bytes:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def call(path: str | Path, request: dict) -> dict:
    """Ask the daemon; raise a one-line error when it cannot be reached or refuses."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            answer = json.loads(_read_line(sock))
    except FileNotFoundError:
        raise NfknockError(f"no daemon listens on {path} (is nfknock running? --socket names another path)") from None
    except (OSError, ValueError) as exc:
        raise NfknockError(f"{path}: {exc}") from None
    if "error" in answer:
        raise UsageError(answer["error"])
    return answer
