"""A door as a person reads it: `nfknock check` prints these lines, and the daemon logs them
when it starts, so both say the same thing in the same words."""

from __future__ import annotations

from .rules import Door, KnockDoor, RotatingDoor, SpaDoor


def _ports(ports) -> str:
    return " ".join(map(str, ports))


def describe(door: Door) -> list[tuple[str, str]]:
    """(field, value) pairs, in the order a reader wants them; a gateway door's destinations
    (docs/gateway.md) follow its own ports."""
    lines = _describe(door)
    at = next((i + 1 for i, (field, _) in enumerate(lines) if field == "protect"), len(lines))
    extra = []
    if door.forward:
        extra.append(("forward", _ports(door.forward)))
    if door.publish:
        extra.append(("publish", " ".join(f"{entry.port}->{entry.to}" for entry in door.publish)))
    if isinstance(door, SpaDoor) and door.force_nat is not None:
        extra.append(("force_nat", f"{door.force_nat} (every grant of the door goes there, and only there)"))
    lines = lines[:at] + extra + lines[at:]
    return [(field, value) for field, value in lines if field != "protect" or value]  # a gateway-only door


def _describe(door: Door) -> list[tuple[str, str]]:
    if isinstance(door, SpaDoor):
        where = []
        if door.keys_file or door.keys_env:
            where.append(str(door.keys_file or f"${door.keys_env}_*"))
        if door.keys:
            where.append(f"{len(door.keys)} in keys")
        if door.keys_dir:
            where.append(f"{door.keys_dir}/*.keys")
        most = door.max_open_for if door.max_open_for is not None else door.open_for
        lines = [
            ("spa port", f"{door.port}   hmac {door.hmac_digest}   keys from {', '.join(where)}"),
            ("protect", _ports(door.protect)),
            (
                "open_for",
                f"{door.open_for:g}s   max_open_for {most:g}s (fwknop -f)   max_age {door.max_age:g}s   "
                f"trust_inner_address {str(door.trust_inner_address).lower()}",
            ),
        ]
        if door._keyring is not None:  # loaded: name each person's key and what it may do
            ring = door.keyring
            lines.append(("keys", ", ".join(key.describe() for key in ring) if ring else "none: nobody can open it"))
        return lines
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
