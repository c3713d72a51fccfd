"""packet.parse: real headers in, a Packet or one PacketError out, never anything else."""

import socket
import struct

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfknock.doors.packet import Packet, parse
from nfknock.errors import PacketError


def ipv4(l4, p, src="10.0.0.2", dst="10.0.0.1", **kw):
    ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=p, data=l4, **kw)
    ip.hl = 5 + len(ip.opts) // 4
    ip.len = len(ip)
    return bytes(ip)


def tcp(dport, flags=dpkt.tcp.TH_SYN, sport=40001, data=b""):
    return ipv4(dpkt.tcp.TCP(sport=sport, dport=dport, flags=flags, data=data), dpkt.ip.IP_PROTO_TCP)


def udp(dport, data=b"x"):
    u = dpkt.udp.UDP(sport=5000, dport=dport, data=data)
    u.ulen = len(u)
    return ipv4(u, dpkt.ip.IP_PROTO_UDP)


def test_tcp_syn():
    assert parse(tcp(40000)) == Packet("10.0.0.2", "10.0.0.1", "tcp", 40001, 40000, dpkt.tcp.TH_SYN)


def test_udp_datagram_keeps_payload():
    packet = parse(udp(62201, b"hello"))
    assert (packet.proto, packet.dport, packet.flags, packet.payload) == ("udp", 62201, 0, b"hello")


def test_tcp_options_and_ip_options_are_read_past():
    seg = dpkt.tcp.TCP(sport=1, dport=40000, flags=dpkt.tcp.TH_SYN, opts=b"\x02\x04\x05\xb4\x01\x01\x04\x02")
    seg.off = (20 + len(seg.opts)) // 4
    data = ipv4(seg, dpkt.ip.IP_PROTO_TCP, opts=b"\x01\x01\x01\x00")
    assert parse(data).dport == 40000


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty"),
        (b"\x50" + bytes(39), "not ip"),
        (b"\x45\x00\x00", "bad ipv4 header"),
        (b"\x44" + bytes(19), "bad ipv4 header"),  # header length 16 < 20
        (tcp(40000)[:25], "bad transport header"),  # TCP header cut short
        (ipv4(dpkt.icmp.ICMP(type=8, data=dpkt.icmp.ICMP.Echo()), dpkt.ip.IP_PROTO_ICMP), "not tcp or udp"),
        (ipv4(b"\x00" * 8, 132), "not tcp or udp"),  # SCTP
    ],
)
def test_unusable_packets_raise_one_named_error(data, reason):
    with pytest.raises(PacketError) as info:
        parse(data)
    assert info.value.reason == reason


def test_dpkt_failure_inside_an_inner_protocol_is_a_packet_error():
    # Found by bench/fuzz.py: IPv4 carrying IPv6 (protocol 41) whose extension headers confuse
    # dpkt's fragment check, which then raises AttributeError instead of UnpackError.
    inner = bytes.fromhex(
        "608a9848f0fc2c54bf583697a54b3f601c2c0a7a14f841299142243c4ec7557d87d5c193ef5cd16933c20b90b39a"
        "1753259ad47eadcdc7c256fcd7bb573f4652510f"
    )
    with pytest.raises(PacketError) as info:
        parse(ipv4(inner, 41))
    assert info.value.reason in ("undecodable inner protocol", "not tcp or udp")


def test_non_first_fragment_never_counts():
    data = bytearray(tcp(40000))
    data[6:8] = (0x0010).to_bytes(2, "big")  # fragment offset 16*8 bytes
    data[10:12] = b"\0\0"
    with pytest.raises(PacketError, match="non-first fragment"):
        parse(bytes(data))


def test_first_fragment_is_marked():
    data = bytearray(tcp(40000))
    data[6] |= 0x20  # more fragments
    assert parse(bytes(data)).fragment is True


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=120))
def test_arbitrary_bytes_give_a_packet_or_packet_error(data):
    try:
        result = parse(data)
    except PacketError as exc:
        assert exc.reason
    else:
        assert result.proto in ("tcp", "udp") and 0 <= result.dport <= 65535


# Every reason parse() may give; a new one is a decision, made here on purpose.
REASONS = {
    "empty",
    "not ip",
    "bad ipv4 header",
    "bad ipv6 header",
    "non-first fragment",
    "undecodable inner protocol",
    "bad transport header",
    "not tcp or udp",
}


def assert_read_from_the_bytes(packet, data):
    """A packet parse() returns says what its bytes say: corruption is never misread."""
    assert packet.proto in ("tcp", "udp") and 0 <= packet.sport <= 65535 and 0 <= packet.dport <= 65535
    if packet.family == 4:
        ihl = (data[0] & 0x0F) * 4
        assert data[0] >> 4 == 4 and ihl >= 20
        assert (packet.src, packet.dst) == (socket.inet_ntoa(data[12:16]), socket.inet_ntoa(data[16:20]))
        assert packet.proto == {6: "tcp", 17: "udp"}[data[9]]
        assert (packet.sport, packet.dport) == struct.unpack_from("!HH", data, ihl)
        if packet.proto == "tcp":
            assert packet.flags == struct.unpack_from("!H", data, ihl + 12)[0] & 0x1FF
    else:
        assert packet.family == 6 and data[0] >> 4 == 6
        assert packet.src == socket.inet_ntop(socket.AF_INET6, data[8:24])
        assert packet.dst == socket.inet_ntop(socket.AF_INET6, data[24:40])


REAL = [
    tcp(40000, data=b"payload"),
    tcp(22),
    udp(62201, b"x" * 20),
    ipv4(dpkt.tcp.TCP(sport=1, dport=50000, flags=dpkt.tcp.TH_SYN), dpkt.ip.IP_PROTO_TCP, opts=b"\x01" * 8),
]


@settings(max_examples=2000, deadline=None)
@given(
    st.sampled_from(REAL),
    st.binary(max_size=60),
    st.integers(0, 59),
    st.lists(st.tuples(st.integers(0, 46), st.integers(1, 255)), max_size=3),
)
def test_corrupted_real_packets_give_a_packet_or_packet_error(real, noise, at, flips):
    """Bytes overwritten (or appended), bits flipped: either one named PacketError, or a Packet
    that says exactly what the (corrupted) headers say."""
    data = bytearray(real)
    data[at : at + len(noise)] = noise
    for position, mask in flips:
        if position < len(data):
            data[position] ^= mask
    data = bytes(data)
    try:
        packet = parse(data)
    except PacketError as exc:
        assert exc.reason in REASONS
        assert str(exc) == exc.reason
    else:
        assert_read_from_the_bytes(packet, data)


# -- the fast path must agree with dpkt ---------------------------------------------------

from nfknock.doors.packet import parse_with_dpkt  # noqa: E402


def outcome(parser, data):
    try:
        return parser(data)
    except PacketError as exc:
        return ("error", exc.reason)


def well_formed(proto, dport, flags, ip_opts, tcp_opts, payload, frag):
    if proto == "tcp":
        seg = dpkt.tcp.TCP(sport=1234, dport=dport, flags=flags, opts=tcp_opts, data=payload)
        seg.off = (20 + len(tcp_opts)) // 4
        data = ipv4(seg, dpkt.ip.IP_PROTO_TCP, opts=ip_opts)
    else:
        dgram = dpkt.udp.UDP(sport=1234, dport=dport, data=payload)
        dgram.ulen = len(dgram)
        data = ipv4(dgram, dpkt.ip.IP_PROTO_UDP, opts=ip_opts)
    data = bytearray(data)
    data[6:8] = frag.to_bytes(2, "big")
    return bytes(data)


shapes = st.builds(
    well_formed,
    st.sampled_from(["tcp", "udp"]),
    st.integers(0, 65535),
    st.integers(0, 0x1FF),
    st.sampled_from([b"", b"\x01\x01\x01\x00", b"\x94\x04\x00\x00" * 2]),
    st.sampled_from([b"", b"\x02\x04\x05\xb4", b"\x01" * 12]),
    st.binary(max_size=24),
    st.sampled_from([0, 0x2000, 0x4000, 0x0001, 0x2005]),
)


@settings(max_examples=3000, deadline=None)
@given(shapes)
def test_fast_path_equals_dpkt_on_well_formed_packets(data):
    assert outcome(parse, data) == outcome(parse_with_dpkt, data)


@settings(max_examples=3000, deadline=None)
@given(shapes, st.lists(st.tuples(st.integers(0, 79), st.integers(0, 255)), min_size=1, max_size=4), st.integers(0, 90))
def test_fast_path_equals_dpkt_on_mangled_packets(data, changes, cut):
    mangled = bytearray(data)
    for at, value in changes:
        if at < len(mangled):
            mangled[at] = value
    mangled = bytes(mangled[:cut] if cut < len(mangled) else mangled)
    assert outcome(parse, mangled) == outcome(parse_with_dpkt, mangled)


@settings(max_examples=2000, deadline=None)
@given(shapes, st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4))
def test_fast_path_writes_any_source_and_destination_as_dpkt_and_inet_ntoa_do(data, src, dst):
    """The fast path writes addresses from tables and a cache of destinations, not inet_ntoa."""
    data = data[:12] + src + dst + data[20:]
    assert outcome(parse, data) == outcome(parse_with_dpkt, data)
    packet = outcome(parse, data)
    if isinstance(packet, Packet):
        assert (packet.src, packet.dst) == (socket.inet_ntoa(src), socket.inet_ntoa(dst))


def test_many_destinations_never_grow_the_cache_without_bound():
    from nfknock.doors import packet as module

    for n in range(3 * module._DESTINATIONS_MAX):
        data = bytearray(well_formed("udp", 7000, 0, b"", b"", b"x", 0))
        data[16:20] = n.to_bytes(4, "big")
        assert parse(bytes(data)).dst == socket.inet_ntoa(n.to_bytes(4, "big"))
    assert len(module._DESTINATIONS) <= module._DESTINATIONS_MAX


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=80))
def test_fast_path_equals_dpkt_on_random_bytes(data):
    assert outcome(parse, data) == outcome(parse_with_dpkt, data)


# -- IPv6 -------------------------------------------------------------------------------

SRC6, DST6 = "2001:db8::2", "2001:db8::1"


def ipv6(next_header, body):
    header = struct.pack("!IHBB", 6 << 28, len(body), next_header, 64)
    return header + socket.inet_pton(socket.AF_INET6, SRC6) + socket.inet_pton(socket.AF_INET6, DST6) + body


def tcp_header(dport, flags=dpkt.tcp.TH_SYN):
    return struct.pack("!HHIIBBHHH", 5555, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)


def options_header(nxt):  # hop-by-hop or destination options: 8 bytes, a PadN
    return bytes([nxt, 0, 1, 4, 0, 0, 0, 0])


def routing_header(nxt):
    return bytes([nxt, 0, 4, 0, 0, 0, 0, 0])  # type 4 (segment routing), nothing left


def fragment_header(nxt, offset=0, more=False):
    return bytes([nxt, 0]) + struct.pack("!H", offset << 3 | more) + b"\0\0\0\x01"


def test_ipv6_tcp_syn():
    packet = parse(ipv6(6, tcp_header(40000)))
    assert (packet.family, packet.src, packet.proto, packet.dport, packet.flags) == (6, SRC6, "tcp", 40000, 2)


@pytest.mark.parametrize(
    "first,chain",
    [
        (0, options_header(6)),  # hop-by-hop
        (0, options_header(43) + routing_header(6)),  # hop-by-hop, routing
        (0, options_header(60) + options_header(6)),  # hop-by-hop, destination options
        (44, fragment_header(6)),  # an atomic fragment
        (0, options_header(43) + routing_header(44) + fragment_header(60) + options_header(6)),
    ],
    ids=["hbh", "hbh-routing", "hbh-dstopts", "fragment", "all"],
)
def test_knock_behind_extension_headers_is_read_at_the_right_place(first, chain):
    packet = parse(ipv6(first, chain + tcp_header(50000)))
    assert (packet.proto, packet.dport, packet.sport, packet.fragment) == ("tcp", 50000, 5555, False)


def test_udp_behind_hop_by_hop():
    data = ipv6(0, options_header(17) + struct.pack("!HHHH", 5555, 7000, 9, 0) + b"x")
    packet = parse(data)
    assert (packet.proto, packet.dport, packet.payload) == ("udp", 7000, b"x")


def test_ipv6_later_fragment_is_refused():
    with pytest.raises(PacketError, match="non-first fragment"):
        parse(ipv6(44, fragment_header(6, offset=100) + tcp_header(40000)))


def test_ipv6_first_fragment_is_marked():
    assert parse(ipv6(44, fragment_header(6, more=True) + tcp_header(40000))).fragment is True


@pytest.mark.parametrize(
    "data,reason",
    [
        (ipv6(0, bytes([6, 5, 1, 4, 0, 0, 0, 0]) + tcp_header(40000)), None),  # length claims 48 bytes
        (ipv6(6, tcp_header(40000)[:12]), "bad transport header"),
        (ipv6(58, bytes(8)), "not tcp or udp"),  # ICMPv6
        (ipv6(6, b"")[:30], "bad ipv6 header"),
    ],
)
def test_broken_ipv6_is_refused_never_misread(data, reason):
    with pytest.raises(PacketError) as info:
        parse(data)
    if reason:
        assert info.value.reason == reason


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=64))
def test_any_ipv6_body_gives_a_packet_or_packet_error(body):
    try:
        packet = parse(ipv6(body[0] if body else 59, body[1:]))
    except PacketError:
        return
    assert packet.family == 6 and packet.proto in ("tcp", "udp")
