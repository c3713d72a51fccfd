"""A door as a person reads it: `nfknock check` prints these lines, and the daemon logs them
when it starts, so both say the same thing in the same words."""

from __future__ import annotations

from .rules import Door, KnockDoor, RotatingDoor, SpaDoor


def _ports(ports) -> str:
    return " ".join(map(str, ports))


def describe(door: Door) -> list[tuple[str, str]]:
    """(field, value) pairs, in the order a reader wants them."""
    if isinstance(door, SpaDoor):
        keys = door.keys_file or f"${door.keys_env}_*"
        return [
            ("spa port", f"{door.port}   hmac {door.hmac_digest}   keys from {keys}"),
            ("protect", _ports(door.protect)),
            (
                "open_for",
                f"{door.open_for:g}s   max_age {door.max_age:g}s   trust_inner_address "
                f"{str(door.trust_inner_address).lower()}",
            ),
        ]
    lines = []
    if isinstance(door, RotatingDoor):
        rotate = door.rotate
        lines.append(
            (
                "rotate",
                f"{rotate.length} steps from {rotate.ports}/{rotate.proto}, a new sequence every "
                f"{rotate.window:g}s (nfknock otp --door {door.name} prints it)",
            )
        )
    elif isinstance(door, KnockDoor):
        lines.append(("sequence", _ports(door.sequence)))
        if door.close_sequence:
            lines.append(("close_sequence", _ports(door.close_sequence)))
    lines += [
        ("protect", _ports(door.protect)),
        ("seq_timeout", f"{door.seq_timeout:g}s   open_for {door.open_for:g}s   tcp_flags {door.tcp_flags}"),
        ("sources", _ports(door.sources) or "any"),
    ]
    return lines


def as_block(door: Door) -> list[str]:
    """For `check`: one indented line per field."""
    return [f"  {field:<14} {value}" for field, value in describe(door)]


def as_line(door: Door) -> str:
    """For the log: the whole door on one line."""
    return f"door {door.name}: " + "; ".join(f"{field} {value}" for field, value in describe(door))
