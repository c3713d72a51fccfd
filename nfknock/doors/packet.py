"""The edge where bytes from the queue become a `Packet`; nothing else reads headers.

dpkt is the parser of record (`parse_with_dpkt`). dpkt keeps going when an inner header is
broken (`ip.data` stays raw bytes), so every layer's type is checked and anything unusable
becomes one PacketError whose `reason` is a short, stable label for counters.

`parse` first tries a fast path for the one shape a knock or a new connection has: a plain,
unfragmented IPv4 packet carrying a complete TCP or UDP header. The benchmark showed dpkt's
object construction to be half of the per-packet cost (bench/run.py, throughput); the fast
path reads six fixed-offset fields with `struct` and hands every other shape to dpkt.
tests/unit/test_packet.py checks, over generated and mangled packets, that both give the same
answer.
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

import dpkt

from ..errors import PacketError

IPPROTO_TCP = 6
IPPROTO_UDP = 17

# version/IHL, total length, flags/offset, protocol, the source's four octets, destination
_IPV4 = struct.Struct("!BxHxxHxB2xBBBB4s")
_PORTS = struct.Struct("!HH")
_TCP = struct.Struct("!HH8xH")  # ports, data offset + flags
_inet_ntoa = socket.inet_ntoa
# A source written from its octets by table: half the time of inet_ntoa's snprintf, which was a
# tenth of the loop's CPU under a flood from spoofed sources (py-spy, bench/run.py later_rate).
_OCTET = tuple(str(i) for i in range(256))
_DOTTED = tuple(f"{i}." for i in range(256))
# Destinations are this host's few addresses (a gateway's few destinations): each written once.
_DESTINATIONS: dict[bytes, str] = {}
_DESTINATIONS_MAX = 256


def _destination(dst: bytes) -> str:
    name = _DESTINATIONS.get(dst)
    if name is None:
        if len(_DESTINATIONS) >= _DESTINATIONS_MAX:
            _DESTINATIONS.clear()
        name = _DESTINATIONS[dst] = _inet_ntoa(dst)
    return name


class Packet(NamedTuple):
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
    first_seen: int = 0  # marked by the kernel: bit i = the group with first-step mark bit i saw this source
    forwarded: bool = False  # queued on the FORWARD hook: for a destination behind this host (gateway doors)


# Every field in order, without the Python-level __new__ a NamedTuple's constructor runs (a
# tenth of the fast path); test_packet.py checks the result against dpkt's, field by field.
_new = tuple.__new__


def parse(data: bytes) -> Packet:
    """Parse an IPv4 packet as handed over by NFQUEUE (no link-layer header)."""
    if len(data) >= 20:
        version_ihl, total, frag, proto, s1, s2, s3, s4, dst = _IPV4.unpack_from(data)
        ihl = (version_ihl & 0x0F) << 2
        if version_ihl >> 4 == 4 and ihl >= 20 and not frag & 0x1FFF and total <= len(data):
            if proto == IPPROTO_TCP and ihl + 20 <= total:
                sport, dport, off_flags = _TCP.unpack_from(data, ihl)
                offset = (off_flags >> 12) << 2
                if offset >= 20 and ihl + offset <= total:
                    return _new(
                        Packet,
                        (
                            _DOTTED[s1] + _DOTTED[s2] + _DOTTED[s3] + _OCTET[s4],
                            _DESTINATIONS.get(dst) or _destination(dst),
                            "tcp",
                            sport,
                            dport,
                            off_flags & 0x1FF,
                            data[ihl + offset : total],
                            bool(frag & 0x2000),
                            4,
                            0,
                            False,
                        ),
                    )
            elif proto == IPPROTO_UDP and ihl + 8 <= total:
                sport, dport = _PORTS.unpack_from(data, ihl)
                return _new(
                    Packet,
                    (
                        _DOTTED[s1] + _DOTTED[s2] + _DOTTED[s3] + _OCTET[s4],
                        _DESTINATIONS.get(dst) or _destination(dst),
                        "udp",
                        sport,
                        dport,
                        0,
                        data[ihl + 8 : total],
                        bool(frag & 0x2000),
                        4,
                        0,
                        False,
                    ),
                )
    return parse_with_dpkt(data)


def parse_with_dpkt(data: bytes) -> Packet:
    """The reference parser: every shape, every error, through dpkt (IPv6 always comes here)."""
    if not data:
        raise PacketError("empty")
    version = data[0] >> 4
    if version == 6:
        return _parse_ipv6(data)
    if version != 4:
        raise PacketError("not ip")
    ip = _decode(dpkt.ip.IP, data, "bad ipv4 header")
    if ip.offset:
        raise PacketError("non-first fragment")
    return _transport(ip.data, ip.p, socket.inet_ntoa(ip.src), socket.inet_ntoa(ip.dst), bool(ip.mf), 4)


def _parse_ipv6(data: bytes) -> Packet:
    """dpkt walks the extension headers (hop-by-hop, routing, fragment, destination options);
    `ip6.p` is the protocol after the last of them. Only an unfragmented packet or a first
    fragment can carry a knock; a later fragment has no transport header to read."""
    ip6 = _decode(dpkt.ip6.IP6, data, "bad ipv6 header")
    fragment = ip6.extension_hdrs.get(dpkt.ip.IP_PROTO_FRAGMENT)
    first_fragment = False
    if fragment is not None:
        if fragment.frag_off:
            raise PacketError("non-first fragment")
        first_fragment = bool(fragment.m_flag)
    src = socket.inet_ntop(socket.AF_INET6, ip6.src)
    dst = socket.inet_ntop(socket.AF_INET6, ip6.dst)
    # dpkt leaves `p` unset when the header chain ends in something without a next-header field.
    return _transport(ip6.data, getattr(ip6, "p", None), src, dst, first_fragment, 6)


def _decode(header, data: bytes, bad: str):
    try:
        return header(data)
    except (dpkt.UnpackError, IndexError, ValueError):
        raise PacketError(bad) from None
    except Exception:
        # dpkt decodes inner protocols eagerly and some decoders fail in their own ways
        # (found by fuzzing: IPv6-in-IPv4 with a bad extension header raises AttributeError).
        raise PacketError("undecodable inner protocol") from None


def _transport(layer4, proto: int | None, src: str, dst: str, fragment: bool, family: int) -> Packet:
    if isinstance(layer4, dpkt.tcp.TCP):
        name, flags = "tcp", layer4.flags
    elif isinstance(layer4, dpkt.udp.UDP):
        name, flags = "udp", 0
    elif proto in (IPPROTO_TCP, IPPROTO_UDP):
        raise PacketError("bad transport header")
    else:
        raise PacketError("not tcp or udp")
    return Packet(src, dst, name, layer4.sport, layer4.dport, flags, bytes(layer4.data), fragment, family)
