"""The knocking side: one SYN per TCP step, one datagram per UDP step, like knockd's `knock`."""

from __future__ import annotations

import errno
import socket
import time
from dataclasses import dataclass

from ..doors.rules import Port
from ..errors import UsageError


@dataclass(frozen=True)
class KnockResult:
    step: Port
    sent: bool
    error: str = ""


FAMILIES = {0: socket.AF_UNSPEC, 4: socket.AF_INET, 6: socket.AF_INET6}


def resolve(host: str, family: int = 0) -> tuple[int, str]:
    """(address family, address) for a name or literal; 4 or 6 forces a family. A knock over
    IPv4 opens the door for the IPv4 address only, so the family matters."""
    try:
        infos = socket.getaddrinfo(host, None, FAMILIES[family], socket.SOCK_STREAM)
    except socket.gaierror as exc:
        wanted = f" (IPv{family})" if family else ""
        raise UsageError(f"cannot resolve {host!r}{wanted}: {exc.strerror}") from None
    return infos[0][0], str(infos[0][4][0])


def send_knock(family: int, address: str, step: Port) -> KnockResult:
    """A non-blocking connect puts exactly one SYN on the wire; closing at once means no
    retransmit and no handshake, which is what the door expects."""
    try:
        if step.proto == "tcp":
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setblocking(False)
                code = sock.connect_ex((address, step.port))
                if code not in (0, errno.EINPROGRESS):
                    return KnockResult(step, False, errno.errorcode.get(code, str(code)))
        else:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.sendto(b"\0", (address, step.port))
    except OSError as exc:
        return KnockResult(step, False, exc.strerror or str(exc))
    return KnockResult(step, True)


DEFAULT_REPEAT = 1  # copies of every knock (--repeat): nfknock takes repeats of a step as one knock


def knock(
    host: str, steps: list[Port], delay_ms: int = 0, family: int = 0, repeat: int = DEFAULT_REPEAT, sleep=time.sleep
) -> list[KnockResult]:
    """One result per step: sent when every copy of it was."""
    address_family, address = resolve(host, family)
    results = []
    for i, step in enumerate(steps):
        if i and delay_ms:
            sleep(delay_ms / 1000)
        copies = [send_knock(address_family, address, step) for _ in range(repeat)]
        results.append(next((copy for copy in copies if not copy.sent), copies[0]))
    return results


def send_spa(
    host: str,
    keys,
    spa_port: int,
    ports: list[tuple[str, int]],
    allow_ip: str | None = None,
    now: float | None = None,
    user: str = "nfknock",
    timeout: int | None = None,
    copies: int = 1,
    sleep=time.sleep,
) -> str:
    """One SPA datagram to `host`; the address put inside is `allow_ip` or, as fwknop's `-R`
    would, this host's source address towards `host`. `user` and `timeout` are fwknop's -U and
    -f. `copies`: the same datagram that many times, COPY_SPACING apart (the server takes the
    first that arrives and refuses the others as replays, which count against nobody; under a
    junk flood that fills its queue, each copy is another chance). Returns the address put inside."""
    from ..doors.spa import encode

    family, address = resolve(host)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((address, spa_port))
        allow = allow_ip or sock.getsockname()[0]
        packet = encode(keys, allow, ports, time.time() if now is None else now, user, timeout)
        for i in range(copies):
            if i:
                sleep(COPY_SPACING)
            sock.send(packet)
    return allow


COPY_SPACING = 0.1  # seconds between copies of an SPA packet (send_spa)
