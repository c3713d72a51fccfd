"""What an SPA door grants for one packet: the door's policy over the codec. Pure, wall-clock
time passed in.

A door holds one key per person (rules.DoorKey). The packet is matched to its person by the
HMAC key it was made with: the first key whose HMAC verifies is the sender's (HMAC keys are
unique within a door), and from then on every refusal names that key.

Order matters for replays: once a packet passes its HMAC it is genuine, and it is recorded in
the replay cache before anything else can refuse it (fwknopd does the same). A packet refused
now as "from the future" can then never be replayed once its time has come, and one refused
for its ports, its inner address, its key's expiry, sources or username cannot be sent again
from elsewhere, or after the operator changes the key's settings.

What counts against the source (lockout): only a refusal that someone without the key cannot
produce. UDP sources are free to forge, so a packet that fails before its HMAC verifies (junk,
wrong size, bad HMAC) proves nothing about its source and never counts; neither do "replay" and
"too old": anyone who has seen one genuine packet can send copies of it from any address, during
its replay record's life and after it. What is left is a fresh packet made with a door's key and
refused on its merits (its ports, its inner address, its key's expiry, sources or username, a
timestamp ahead): only a key holder makes one (`counts_against_source`).

How long a grant lasts: the time the client asked for (fwknop -f N, a message of type 3), at
most the key's max_open_for (the door's, by default its open_for: no client extends its own
access unless the operator allows it); the key's open_for when the packet asks for none.
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

from ..errors import SpaError
from . import spa
from .events import Event
from .packet import Packet
from .replay import ReplayCache
from .rules import DoorKey, SpaDoor, describe_expiry


class SpaGrant(NamedTuple):
    """What one accepted packet grants: the ports it asked for, whose key it was, for how long."""

    ports: frozenset[tuple[str, int]]
    key: str
    seconds: float
    dests: frozenset[tuple[str, str, int]] = frozenset()  # (proto, address, port) behind this host


class KeyRefused(SpaError):
    """A refusal after the HMAC matched a key: `key` names it (for logs and metrics)."""

    def __init__(self, reason: str, detail: str, key: str):
        super().__init__(reason, detail)
        self.key = key


# Refusals of an authenticated packet that a copy of any genuine packet, sent from a forged
# source, also gets: they say nothing about who sent it.
FORGEABLE = frozenset({"replay", "too old"})


def counts_against_source(exc: SpaError) -> bool:
    """Whether a refusal is a failure of the packet's source for its lockout: a fresh packet
    made with one of the door's keys and refused on its merits (see the module's docstring)."""
    return isinstance(exc, KeyRefused) and exc.reason not in FORGEABLE


def identify(door: SpaDoor, wire: bytes) -> tuple[DoorKey, str]:
    """The key whose HMAC the packet carries, and the authenticated data; SpaError otherwise.

    The packet's shape is checked once for all keys (spa.Shape): junk that no key can have made
    costs no HMAC at all, and a well-formed packet one HMAC per key, from a precomputed state."""
    ring = door.keyring
    if not ring:
        raise SpaError("bad hmac", "the door has no keys (its keys_dir is empty)")
    shape = spa.Shape(spa.wire_text(wire))
    shape.check_length({key.keys.digest for key in ring} if len(ring) > 1 else (ring[0].keys.digest,))
    for key in ring:
        data = shape.verified(key.keys)
        if data is not None:
            return key, data
    if len(shape.text) > spa.GPG_MIN_LENGTH and any(shape.is_gpg(key.keys) for key in ring):
        raise spa.gpg_error()
    if len(ring) > 1:
        raise SpaError("bad hmac", f"HMAC matches none of the door's {len(ring)} keys (or a forged packet)")
    raise SpaError("bad hmac", "HMAC does not match (wrong HMAC key or digest, or a forged packet)")


def authorize(door: SpaDoor, packet: Packet, wall: float, replays: ReplayCache, events: list[Event]) -> SpaGrant:
    """What the packet opens for its sender, or SpaError (KeyRefused once a key is known)."""
    key, data = identify(door, packet.payload)
    identity = spa.packet_id(data)
    replays.forget_expired(wall)
    if identity in replays:
        raise KeyRefused("replay", f"this packet was seen before (key {key.name})", key.name)
    try:
        request = spa.decrypt(data, key.keys)
    except SpaError as exc:
        events.append(replays.record(identity, wall + door.max_age))
        raise KeyRefused(exc.reason, f"{exc.detail} (key {key.name})", key.name) from None
    events.append(replays.record(identity, max(wall, request.timestamp) + door.max_age))
    return _grant(door, key, packet, request, wall)


def _grant(door: SpaDoor, key: DoorKey, packet: Packet, request: spa.SpaRequest, wall: float) -> SpaGrant:
    name = key.name

    def refuse(reason: str, detail: str) -> KeyRefused:
        return KeyRefused(reason, detail, name)

    age = wall - request.timestamp
    if abs(age) > door.max_age:
        raise refuse(
            "too old" if age > 0 else "from the future",
            f"key {name}: timestamp {abs(age):.0f}s {'old' if age > 0 else 'ahead'}, max_age {door.max_age:g}s",
        )
    if key.expires is not None and wall >= key.expires:
        raise refuse("key expired", f"key {name} expired on {describe_expiry(key.expires)}")
    if key.sources:
        address = ipaddress.ip_address(packet.src)
        if not any(address in network for network in key.sources):
            networks = " ".join(map(str, key.sources))
            raise refuse("source not allowed", f"{packet.src} is not in key {name}'s sources ({networks})")
    if key.username is not None and request.user != key.username:
        raise refuse(
            "username mismatch", f"key {name} requires username {key.username!r}, the packet has {request.user!r}"
        )
    if not door.trust_inner_address and request.address != packet.src:
        raise refuse("source mismatch", f"key {name}: the packet asks access for {request.address}")
    asked = request.client_timeout
    seconds = key.open_for if not asked or asked <= 0 else min(float(asked), key.max_open_for)
    forced = key.force_nat or door.force_nat
    if forced is not None:
        # fwknop's FORCE_NAT: whatever the packet asks for, its sender gets this one destination.
        return SpaGrant(frozenset(), name, seconds, frozenset({forced.key}))
    if request.nat is not None:
        return SpaGrant(frozenset(), name, seconds, frozenset({_nat_destination(door, key, request)}))
    wanted = frozenset(request.ports)
    allowed = {p.key for p in door.protect} if key.ports is None else key.ports
    if not wanted <= allowed:
        refused = ", ".join(f"{port}/{proto}" for proto, port in sorted(wanted - allowed))
        raise refuse("port not allowed", f"key {name} may not open {refused}")
    return SpaGrant(wanted, name, seconds)


def _nat_destination(door: SpaDoor, key: DoorKey, request: spa.SpaRequest) -> tuple[str, str, int]:
    """The destination a NAT access message (fwknop -N host:port) asks for, if the key may reach
    it (its `destinations`, by default all the door's: forward, and publish's `to`), in the
    protocol of the packet's access port; KeyRefused otherwise."""
    assert request.nat is not None
    name = key.name
    host, port = request.nat
    proto = request.ports[0][0] if request.ports else "tcp"
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        detail = f"key {name}: NAT access to {host[:64]!r}, not an address"
        raise KeyRefused("destination not allowed", detail, name) from None
    wanted = (proto, address, port)
    allowed = {d.key for d in door.destinations} if key.destinations is None else key.destinations
    if wanted not in allowed:
        shown = f"[{address}]" if ":" in address else address
        where = "the door's forward or publish" if key.destinations is None else "the key's destinations"
        detail = f"key {name} may not reach {shown}:{port}/{proto} (not in {where})"
        raise KeyRefused("destination not allowed", detail, name)
    return wanted
