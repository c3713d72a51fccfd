"""The knocking side: one SYN per TCP step, one datagram per UDP step, like knockd's `knock`."""

from __future__ import annotations

import errno
import socket
import time
from dataclasses import dataclass

from .errors import UsageError
from .rules import Port


@dataclass(frozen=True)
class KnockResult:
    step: Port
    sent: bool
    error: str = ""


def resolve(host: str) -> str:
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET)
    except socket.gaierror as exc:
        raise UsageError(f"cannot resolve {host!r}: {exc.strerror}") from None
    return infos[0][4][0]


def send_knock(address: str, step: Port) -> KnockResult:
    """A non-blocking connect puts exactly one SYN on the wire; closing at once means no
    retransmit and no handshake, which is what the door expects."""
    try:
        if step.proto == "tcp":
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.setblocking(False)
                code = sock.connect_ex((address, step.port))
                if code not in (0, errno.EINPROGRESS):
                    return KnockResult(step, False, errno.errorcode.get(code, str(code)))
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(b"\0", (address, step.port))
    except OSError as exc:
        return KnockResult(step, False, exc.strerror or str(exc))
    return KnockResult(step, True)


def knock(host: str, steps: list[Port], delay_ms: int = 0, sleep=time.sleep) -> list[KnockResult]:
    address = resolve(host)
    results = []
    for i, step in enumerate(steps):
        if i and delay_ms:
            sleep(delay_ms / 1000)
        results.append(send_knock(address, step))
    return results
