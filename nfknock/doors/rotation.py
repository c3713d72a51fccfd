"""Rotating knock sequences: the sequence of a time window is derived from a shared secret
(HMAC-SHA256, as TOTP derives its codes), so a sniffed sequence is worthless once its window has
passed. Pure: secret, door name and window index in, ports out."""

from __future__ import annotations

import math

from cryptography.hazmat.primitives import hashes, hmac


def window_of(wall: float, window: float) -> int:
    return int(wall // window)


def derive(secret: bytes, door: str, index: int, length: int, first: int, last: int) -> tuple[int, ...]:
    """`length` distinct ports in first..last for window `index`. Ports are drawn from an HMAC
    stream (counter mode) and rejection-sampled, so every port of the range is equally likely."""
    span = last - first + 1
    limit = (1 << 32) - (1 << 32) % span  # reject the top to avoid modulo bias
    ports: list[int] = []
    counter = 0
    while len(ports) < length:
        mac = hmac.HMAC(secret, hashes.SHA256())
        mac.update(f"nfknock-rotate:{door}:{index}:{counter}".encode())
        block = mac.finalize()
        counter += 1
        for at in range(0, len(block), 4):
            value = int.from_bytes(block[at : at + 4], "big")
            port = first + value % span
            if value < limit and port not in ports:
                ports.append(port)
                if len(ports) == length:
                    break
    return tuple(ports)


def accepted_windows(wall: float, window: float) -> tuple[int, int]:
    """The windows whose sequences open the door now: the current one and the one before it
    (a client whose clock is a little behind, or who knocked just before the change)."""
    current = window_of(wall, window)
    return current, current - 1


def steps_of(
    secret: bytes, door: str, index: int, length: int, proto: str, first: int, last: int
) -> tuple[tuple[str, int], ...]:
    """Window `index`'s sequence as (proto, port) steps."""
    return tuple((proto, port) for port in derive(secret, door, index, length, first, last))


def current_steps(rotate, door: str, wall: float) -> tuple[tuple[str, int], ...]:
    """The sequence a client knocks now on a rotating door (`rotate`: its Rotation settings)."""
    proto, first, last = rotate.range
    current, _ = accepted_windows(wall, rotate.window)
    return steps_of(rotate.secret, door, current, rotate.length, proto, first, last)


def kernel_ports(rotate, door: str, wall: float, margin: float = 2.0) -> dict[int, int]:
    """The ports the kernel lets through to the daemon for a rotating door (later_steps.py), each
    with the whole seconds it stays there: every step of the windows whose sequences open the door
    now (the current and the previous one), and of the next window, so that the kernel has them
    before it begins whenever the daemon refreshes within a window. A step leaves when its window
    stops opening the door (the end of the window after it), `margin` seconds later."""
    proto, first, last = rotate.range
    current = window_of(wall, rotate.window)
    ports: dict[int, int] = {}
    for index in (current - 1, current, current + 1):
        seconds = math.ceil((index + 2) * rotate.window - wall + margin)
        for port in derive(rotate.secret, door, index, rotate.length, first, last):
            ports[port] = max(ports.get(port, 0), seconds)
    return ports


def kernel_steps(rotate, door: str, wall: float, margin: float = 2.0) -> tuple[dict[int, int], dict[int, int]]:
    """For a door whose first steps the kernel records (later_steps.py): the first steps and the
    second steps of the windows `kernel_ports` covers, each port with its whole seconds. The
    later steps need no set: only a source mid-attempt gets past them. A port that is the first
    step of one window and the second of another is in both."""
    proto, first, last = rotate.range
    current = window_of(wall, rotate.window)
    firsts: dict[int, int] = {}
    seconds: dict[int, int] = {}
    for index in (current - 1, current, current + 1):
        until = math.ceil((index + 2) * rotate.window - wall + margin)
        ports = derive(rotate.secret, door, index, rotate.length, first, last)
        for into, port in ((firsts, ports[0]), (seconds, ports[1])):
            into[port] = max(into.get(port, 0), until)
    return firsts, seconds
