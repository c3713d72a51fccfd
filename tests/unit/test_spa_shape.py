"""What the kernel lets through to the queue at an SPA port (firewall/spa_shape.py), checked
without root: the xt_u32 expressions are run here by a model of the kernel's xt_u32 (its
u32_match_it, a few lines) over real packets: every packet the stock fwknop client made
(tests/unit/spa_vectors) and our encoder makes passes, in IPv4 (with IP options too), IPv6, UDP
and TCP; random bytes and base64 that no Rijndael packet starts with do not. Then the plan (the
SPA port's rules, ports a knock door shares, workers) and the daemon's side: junk that fails a
shape check costs no HMAC, a team door's packet one per key at most."""

from __future__ import annotations

import base64
import json
import os
import re
import struct
from pathlib import Path

import pytest

from nfknock.doors import spa, spa_access
from nfknock.doors.rules import parse_door
from nfknock.doors.spa import Keys, encode, generate_keys
from nfknock.errors import SpaError
from nfknock.firewall.plan import spa_ports
from nfknock.firewall.shards import u32_match
from nfknock.firewall.spa_shape import MAX_U32_TESTS, joined, spa_shape
from support.decisions import fresh_plan

VECTORS = [
    json.loads(line) for line in (Path(__file__).parent / "spa_vectors" / "vectors.jsonl").read_text().splitlines()
]


def u32_matches(expression: str, packet: bytes) -> bool:
    """The kernel's xt_u32 (net/netfilter/xt_u32.c, u32_match_it) over `packet` (from its network
    header): every `&&` test must hold; a read past the end makes the match false."""

    def word(at: int) -> int | None:
        return struct.unpack_from("!I", packet, at)[0] if 0 <= at <= len(packet) - 4 else None

    for test in expression.split("&&"):
        location, _, values = test.partition("=")
        tokens = re.findall(r"(&|<<|>>|@)?(0x[0-9a-f]+)", location)
        at, value = 0, word(int(tokens[0][1], 16))
        for op, number in tokens[1:]:
            if value is None:
                return False
            n = int(number, 16)
            if op == "&":
                value &= n
            elif op == "<<":
                value = (value << n) & 0xFFFFFFFF
            elif op == ">>":
                value >>= n
            else:  # @: move by the value, read the word `n` bytes further
                at += value
                value = word(at + n)
        if value is None:
            return False
        ranges = [tuple(int(x, 16) for x in (r.split(":") * 2)[:2]) for r in values.split(",")]
        if not any(lo <= value <= hi for lo, hi in ranges):
            return False
    return True


def ip_packet(payload: bytes, proto: str = "udp", family: int = 4, options: bytes = b"") -> bytes:
    """A packet as the kernel's match sees it: network header, transport header, payload."""
    if proto == "udp":
        l4 = struct.pack("!HHHH", 40000, 62201, 8 + len(payload), 0) + payload
    else:  # a TCP segment with 12 bytes of options, as fwknop's tcpraw mode sends it
        l4 = struct.pack("!HHIIBBHHH", 40000, 62201, 1, 0, 8 << 4, 0x18, 512, 0, 0) + b"\x01" * 12 + payload
    number = 17 if proto == "udp" else 6
    if family == 6:
        return struct.pack("!IHBB", 6 << 28, len(l4), number, 64) + b"\x20" * 32 + l4
    ihl = 5 + len(options) // 4
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(l4), 0, 0, 64, number, 0, b"\x0a" * 4, b"\x0b" * 4
    )
    return header + options + l4


SHAPES = [
    ("udp", 4, b""),
    ("udp", 4, b"\x01" * 8),
    ("udp", 6, b""),
    ("tcp", 4, b""),
    ("tcp", 4, b"\x01" * 4),
    ("tcp", 6, b""),
]


def real_packets() -> list[bytes]:
    made = [vector["wire"].encode() for vector in VECTORS]
    for digest in ("sha1", "sha256", "sha384", "sha512"):
        encryption, mac = generate_keys()
        keys = Keys(base64.b64decode(encryption), base64.b64decode(mac), digest)
        for _ in range(50):  # the salt decides the first character: all four of them show up
            made.append(encode(keys, "10.0.0.2", [("tcp", 22)], 1_800_000_000))
        # about the longest fwknop sends: a 64-character user, a 256-character access message
        made.append(encode(keys, "10.0.0.2", [("tcp", p) for p in range(1000, 1025)], 1_800_000_000, user="u" * 64))
    return made


@pytest.mark.parametrize("proto,family,options", SHAPES)
def test_every_real_packet_passes_the_kernel(proto, family, options):
    expression = spa_shape(proto, family)
    packets = real_packets()
    assert {packet[:1] for packet in packets} == {b"8", b"9", b"+", b"/"}
    for packet in packets:
        assert u32_matches(expression, ip_packet(packet, proto, family, options)), packet[:16]


@pytest.mark.parametrize("proto,family,options", SHAPES)
def test_junk_does_not(proto, family, options):
    expression = spa_shape(proto, family)
    length = len(real_packets()[0])
    b64 = base64.b64encode(os.urandom(400)).rstrip(b"=")
    junk = (
        [os.urandom(length) for _ in range(200)]
        + [
            b"",
            b"8" * 139,  # too short for any fwknop packet
            b"A" + b64[: length - 1],  # base64 that no Rijndael packet starts with
            b"hQ" + b64[: length - 2],  # fwknop's GPG mode, not stripped
            spa.SALTED_B64.encode() + b64[:length],  # the prefix fwknop strips
            b"8" + b64[:110] + b"\x00" + b64[: length - 112],  # a non-base64 byte at a tested place (111)
        ]
    )
    if proto == "udp":
        junk.append(b"8" * 1501)
    passed = [packet for packet in junk if u32_matches(expression, ip_packet(packet, proto, family, options))]
    assert passed == []


def test_every_expression_leaves_room_for_a_workers_shard():
    for proto in ("udp", "tcp"):
        for family in (4, 6):
            combined = joined(u32_match(family, 0, 127), spa_shape(proto, family))
            assert combined.count("&&") + 1 <= MAX_U32_TESTS
    with pytest.raises(ValueError, match="xt_u32 tests"):
        joined(spa_shape("udp", 4), spa_shape("udp", 6))


def spa_door(name="s", port="62201/udp", **fields):
    return parse_door({"name": name, "kind": "spa", "keys_env": "K", "port": port, "protect": ["22/tcp"], **fields})


def test_the_spa_port_queues_only_what_has_the_shape_and_drops_the_rest():
    doors = (spa_door(), spa_door("t", "62202/tcp", family="ipv4"))
    plan = fresh_plan(doors, 3)
    for family, proto, port in ((4, "udp", 62201), (6, "udp", 62201), (4, "tcp", 62202)):
        rules = [s for s in plan[family] if s.dport == port and s.target in ("NFQUEUE", "DROP")]
        assert [(s.target, s.u32) for s in rules] == [("NFQUEUE", spa_shape(proto, family)), ("DROP", None)]
        noted = [s for s in plan[family] if s.dport == port and s.add_set]
        assert [s.u32 for s in noted] == [spa_shape(proto, family)]  # junk never fills the recent set
    assert not [s for s in plan[6] if s.dport == 62202 and s.target == "NFQUEUE"]


def test_a_port_a_knock_door_also_listens_on_is_not_shaped():
    knock = parse_door({"name": "k", "sequence": ["62201/udp", 50000], "protect": ["22/tcp"], "tripwire": 0})
    near = parse_door({"name": "n", "sequence": ["62190/udp", 50001], "protect": ["22/tcp"], "tripwire": 20})
    assert spa_ports((spa_door(), knock)) == frozenset()
    assert spa_ports((spa_door(), near)) == frozenset()  # inside its tripwire range
    assert spa_ports((spa_door(), spa_door("t", "62202/udp"))) == {("udp", 62201), ("udp", 62202)}


def test_with_workers_each_copy_tests_its_shard_and_the_shape():
    plan = fresh_plan((spa_door(),), 3, workers=2)
    queued = [s for s in plan[4] if s.dport == 62201 and s.target == "NFQUEUE"]
    assert [s.u32 for s in queued] == [
        joined(u32_match(4, lo, hi), spa_shape("udp", 4)) for lo, hi in ((0, 127), (128, 255))
    ]


class Counting:
    """spa._mac_state, counting the HMACs a packet costs."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = spa._mac_state

        def counted(key, digest):
            self.calls += 1
            return real(key, digest)

        monkeypatch.setattr(spa, "_mac_state", counted)


def team(n: int):
    """A door with a keys_dir of `n` keys, k00..k(n-1), as loading.py would fill it."""
    from nfknock.doors.rules import DoorKey

    door = parse_door({"name": "team", "kind": "spa", "keys_dir": "/nonexistent", "protect": ["22/tcp"]})
    ring = []
    for i in range(n):
        encryption, mac = generate_keys()
        ring.append(DoorKey(f"k{i:02d}", Keys(base64.b64decode(encryption), base64.b64decode(mac)), 30.0, 30.0))
    door._keyring = tuple(ring)
    return door


def test_junk_that_fails_a_shape_check_costs_no_hmac(monkeypatch):
    door = team(20)
    counting = Counting(monkeypatch)
    real = encode(door.keyring[0].keys, "10.0.0.2", [("tcp", 22)], 1_800_000_000)
    tag = spa.TAG_LENGTHS["sha256"]
    stray = real[:-1] + bytes([real[-1] + 1])  # the tag in a spelling fwknop never writes
    assert base64.b64decode(stray[-tag:] + b"=") == base64.b64decode(real[-tag:] + b"=")
    for junk in (
        b"A" + real[1:],  # the first character no Rijndael packet has
        real[:100] + b"*" + real[101:],  # not base64
        real[:-tag] + b"xy" + real[-tag:],  # a ciphertext of a length AES-CBC does not make
        stray,
    ):
        with pytest.raises(SpaError) as info:
            spa_access.identify(door, junk)
        assert info.value.reason == "bad hmac"
    assert counting.calls == 0
    spa_access.identify(door, real)
    assert counting.calls == 1


def test_well_formed_junk_costs_one_hmac_per_key_and_the_last_key_is_found(monkeypatch):
    door = team(20)
    counting = Counting(monkeypatch)
    forged = encode(Keys(b"e" * 32, b"m" * 64), "10.0.0.2", [("tcp", 22)], 1_800_000_000)
    with pytest.raises(SpaError, match="none of the door's 20 keys"):
        spa_access.identify(door, forged)
    assert counting.calls == 20
    last = door.keyring[-1]
    key, _ = spa_access.identify(door, encode(last.keys, "10.0.0.2", [("tcp", 22)], 1_800_000_000))
    assert key.name == "k19"
