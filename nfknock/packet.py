"""The edge where bytes from the queue become a `Packet`; nothing else reads headers.

dpkt does the parsing. dpkt keeps going when an inner header is broken (`ip.data` stays raw
bytes), so every layer's type is checked here and anything unusable becomes one PacketError
whose `reason` is a short, stable label for counters.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import dpkt

from .errors import PacketError

IPPROTO_TCP = 6
IPPROTO_UDP = 17


@dataclass(frozen=True, slots=True)
class Packet:
    """What a decision needs from one queued packet, and nothing more."""

    src: str
    dst: str
    proto: str  # "tcp" or "udp"
    sport: int
    dport: int
    flags: int = 0  # TCP flags; 0 for UDP
    payload: bytes = b""
    fragment: bool = False  # a first fragment (more fragments follow)
    family: int = 4

    @property
    def key(self) -> tuple[str, int]:
        return (self.proto, self.dport)


def parse(data: bytes) -> Packet:
    """Parse an IPv4 packet as handed over by NFQUEUE (no link-layer header)."""
    if not data:
        raise PacketError("empty")
    if data[0] >> 4 != 4:
        raise PacketError("not ipv4")
    try:
        ip = dpkt.ip.IP(data)
    except (dpkt.UnpackError, IndexError, ValueError):
        raise PacketError("bad ipv4 header") from None
    except Exception:
        # dpkt decodes inner protocols eagerly and some decoders fail in their own ways
        # (found by fuzzing: IPv6-in-IPv4 with a bad extension header raises AttributeError).
        raise PacketError("undecodable inner protocol") from None
    if ip.offset:
        raise PacketError("non-first fragment")
    layer4 = ip.data
    if isinstance(layer4, dpkt.tcp.TCP):
        proto, flags = "tcp", layer4.flags
    elif isinstance(layer4, dpkt.udp.UDP):
        proto, flags = "udp", 0
    elif ip.p in (IPPROTO_TCP, IPPROTO_UDP):
        raise PacketError("bad transport header")
    else:
        raise PacketError("not tcp or udp")
    return Packet(
        src=socket.inet_ntoa(ip.src),
        dst=socket.inet_ntoa(ip.dst),
        proto=proto,
        sport=layer4.sport,
        dport=layer4.dport,
        flags=flags,
        payload=bytes(layer4.data),
        fragment=bool(ip.mf),
    )
