"""What an SPA door grants for one packet: the door's policy over the codec. Pure, wall-clock
time passed in.

Order matters for replays: once a packet passes its HMAC it is genuine, and it is recorded in
the replay cache before anything else can refuse it (fwknopd does the same). A packet refused
now as "from the future" can then never be replayed once its time has come, and one refused
for its ports or its inner address cannot be sent again from elsewhere.
"""

from __future__ import annotations

from . import spa
from .errors import SpaError
from .events import Event
from .packet import Packet
from .replay import ReplayCache
from .rules import SpaDoor


def authorize(
    door: SpaDoor, packet: Packet, wall: float, replays: ReplayCache, events: list[Event]
) -> frozenset[tuple[str, int]]:
    """The (proto, port)s the packet opens for its sender, or SpaError naming the reason."""
    data = spa.authenticate(packet.payload, door.keys)
    identity = spa.packet_id(data)
    replays.forget_expired(wall)
    if identity in replays:
        raise SpaError("replay", "this packet was seen before")
    try:
        request = spa.decrypt(data, door.keys)
    except SpaError:
        events.append(replays.record(identity, wall + door.max_age))
        raise
    events.append(replays.record(identity, max(wall, request.timestamp) + door.max_age))
    age = wall - request.timestamp
    if abs(age) > door.max_age:
        raise SpaError(
            "too old" if age > 0 else "from the future",
            f"timestamp {abs(age):.0f}s {'old' if age > 0 else 'ahead'}, max_age {door.max_age:g}s",
        )
    if not door.trust_inner_address and request.address != packet.src:
        raise SpaError("source mismatch", f"the packet asks access for {request.address}")
    allowed = {p.key for p in door.protect}
    wanted = frozenset(request.ports)
    if not wanted <= allowed:
        refused = ", ".join(f"{port}/{proto}" for proto, port in sorted(wanted - allowed))
        raise SpaError("port not allowed", f"requested {refused}")
    return wanted
