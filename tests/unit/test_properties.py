"""Properties over packet.parse + engine + the verdict callback, for any input hypothesis finds."""

import socket

import dpkt
from hypothesis import given, settings
from hypothesis import strategies as st

from nfknock.daemon import Daemon, DaemonConfig
from nfknock.doors.engine import Verdict
from nfknock.doors.events import DoorClosed, DoorOpened
from nfknock.doors.packet import Packet
from nfknock.doors.rules import KnockDoor
from support.decisions import fresh_engine
from support.fakes import FakeFirewall, Queued

DOOR = KnockDoor.model_validate(
    dict(
        name="d",
        sequence=[1000, "2000/udp", 3000],
        close_sequence=[3000, 1000],
        protect=["22/tcp"],
        seq_timeout="5s",
        open_for="10s",
        tripwire=4,
        lockout={"failures": 3, "window": "30s", "lock_for": "20s"},
    )
)
PORTS = st.sampled_from([22, 999, 1000, 1001, 1003, 1999, 2000, 2001, 2999, 3000, 3004, 3005, 8080])
SOURCES = st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3"])


def build(src, dport, proto, flags, ip_opts, tcp_opts, payload):
    if proto == "tcp":
        l4 = dpkt.tcp.TCP(sport=4444, dport=dport, flags=flags, opts=tcp_opts, data=payload)
        l4.off = (20 + len(tcp_opts)) // 4
        p = dpkt.ip.IP_PROTO_TCP
    else:
        l4 = dpkt.udp.UDP(sport=4444, dport=dport, data=payload)
        l4.ulen = len(l4)
        p = dpkt.ip.IP_PROTO_UDP
    ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton("10.0.0.9"), p=p, data=l4, opts=ip_opts)
    ip.hl = 5 + len(ip_opts) // 4
    ip.len = len(ip)
    return bytes(ip)


packets = st.builds(
    build,
    SOURCES,
    PORTS,
    st.sampled_from(["tcp", "udp"]),
    st.integers(0, 0x3F),
    st.sampled_from([b"", b"\x01\x01\x01\x00", b"\x07\x07\x04" + bytes(5)]),
    st.sampled_from([b"", b"\x02\x04\x05\xb4", b"\x01\x01\x08\x0a" + bytes(8)]),
    st.binary(max_size=16),
)
mangled = st.tuples(packets, st.integers(0, 80), st.binary(max_size=8)).map(
    lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + len(t[2]) :]
)


def daemon(tmp_path_factory):
    rules = tmp_path_factory.mktemp("rules")
    (rules / "d.yaml").write_text(
        "doors:\n  - {name: d, sequence: [1000, 2000/udp, 3000], close_sequence: [3000, 1000], protect: [22]}\n"
    )
    return Daemon(DaemonConfig(rules), FakeFirewall(), clock=lambda: 0.0)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(packets, mangled, st.binary(max_size=80)), max_size=40))
def test_every_queued_packet_gets_exactly_one_verdict(tmp_path_factory, payloads):
    d = daemon(tmp_path_factory)
    for payload in payloads:
        queued = Queued(payload)
        d.on_packet(queued)
        assert len(queued.verdicts) == 1
    assert d.errors == 0


knocks = st.tuples(
    SOURCES, PORTS, st.sampled_from(["tcp", "udp"]), st.sampled_from([0x02, 0x12, 0x10, 0x03]), st.floats(0, 12)
)


@settings(max_examples=400, deadline=None)
@given(st.lists(knocks, max_size=60), st.integers(1, 4))
def test_only_a_live_grant_ever_accepts(steps, cap):
    engine, now = fresh_engine((DOOR,), max_sources=cap), 0.0
    granted: dict[str, float] = {}  # what the events say: source -> open until
    for src, port, proto, flags, gap in steps:
        now += gap
        decision = engine.handle(Packet(src, "10.0.0.9", proto, 4444, port, flags if proto == "tcp" else 0), now)
        for event in decision.events:
            if isinstance(event, DoorOpened):
                granted[event.src] = event.until
            elif isinstance(event, DoorClosed):
                granted.pop(event.src, None)
        if decision.verdict is Verdict.ACCEPT:
            assert (proto, port) == ("tcp", 22)
            assert granted.get(src, 0) > now
        if (proto, port) in {p.key for p in DOOR.knock_ports}:
            assert decision.verdict is Verdict.DROP
        assert engine.tracked <= cap
        engine.expire(now)
