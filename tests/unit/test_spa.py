"""SPA codec against packets made by the stock fwknop client 2.6.10 (tests/unit/spa_vectors),
round trips through our encoder, and every refusal reason."""

import base64
import json
from pathlib import Path

import pytest

from nfknock.doors.spa import SALTED_B64, Keys, decode, encode, generate_keys
from nfknock.errors import SpaError

VECTORS = [
    json.loads(line) for line in (Path(__file__).parent / "spa_vectors" / "vectors.jsonl").read_text().splitlines()
]


def keys_of(vector, **override):
    fields = dict(
        encryption=base64.b64decode(vector["key"]), hmac=base64.b64decode(vector["hmac_key"]), digest=vector["hmac"]
    )
    fields.update(override)
    return Keys(**fields)


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"{v['hmac']}-type{v['type']}")
def test_packets_from_the_stock_fwknop_client_decode(vector):
    request = decode(vector["wire"].encode(), keys_of(vector))
    address, _, ports = vector["message"].partition(",")
    assert request.address == address
    assert [f"{p}/{n}" for p, n in request.ports] == ports.split(",")
    assert request.timestamp == vector["timestamp"]
    assert request.message_type == vector["type"]
    assert request.client_timeout == vector.get("timeout")
    assert request.user == "root" and request.version == "3.0.0"


def test_vectors_cover_every_hmac_digest_the_client_offers():
    assert {v["hmac"] for v in VECTORS} == {"sha1", "sha256", "sha384", "sha512"}


@pytest.mark.parametrize("digest", ["sha1", "sha256", "sha384", "sha512"])
def test_round_trip(digest):
    encryption, mac = generate_keys()
    keys = Keys(base64.b64decode(encryption), base64.b64decode(mac), digest)
    wire = encode(keys, "10.0.0.2", [("tcp", 22), ("udp", 53)], now=1_800_000_000.7)
    assert not wire.startswith(SALTED_B64.encode())
    request = decode(wire, keys)
    assert (request.address, request.ports, request.timestamp) == (
        "10.0.0.2",
        (("tcp", 22), ("udp", 53)),
        1_800_000_000,
    )
    assert request.digest != decode(encode(keys, "10.0.0.2", [("tcp", 22)], now=1_800_000_000), keys).digest


def test_wrong_hmac_key_is_refused_before_decrypting():
    vector = VECTORS[0]
    with pytest.raises(SpaError) as info:
        decode(vector["wire"].encode(), keys_of(vector, hmac=b"x" * 64))
    assert info.value.reason == "bad hmac"


def test_wrong_encryption_key_is_refused():
    vector = VECTORS[0]
    with pytest.raises(SpaError) as info:
        decode(vector["wire"].encode(), keys_of(vector, encryption=b"y" * 32))
    assert info.value.reason == "bad key"


WRONG_DIGESTS = [
    pytest.param(vector, configured, id=f"{vector['hmac']}-type{vector['type']}-as-{configured}")
    for vector in VECTORS
    for configured in ("sha1", "sha256", "sha384", "sha512")
    if configured != vector["hmac"]
]


@pytest.mark.parametrize("vector,configured", WRONG_DIGESTS)
def test_wrong_hmac_digest_type_is_refused_as_a_bad_hmac(vector, configured):
    """A server configured with another digest than the client's sees an HMAC that does not
    match, whatever the tag lengths: the log line then names the digest as a suspect."""
    with pytest.raises(SpaError) as info:
        decode(vector["wire"].encode(), keys_of(vector, digest=configured))
    assert info.value.reason == "bad hmac"
    assert info.value.detail == "HMAC does not match (wrong HMAC key or digest, or a forged packet)"


@pytest.mark.parametrize(
    "wire,reason",
    [
        (b"", "malformed"),
        (b"\xff" * 100, "malformed"),
        ((SALTED_B64 + "A" * 150).encode(), "malformed"),
        (b"A" * 150, "bad hmac"),
    ],
)
def test_junk_is_refused_with_a_reason(wire, reason):
    with pytest.raises(SpaError) as info:
        decode(wire, keys_of(VECTORS[0]))
    assert info.value.reason == reason
    assert VECTORS[0]["key"] not in str(info.value) and VECTORS[0]["hmac_key"] not in str(info.value)


def test_flipped_bit_anywhere_is_refused():
    vector = VECTORS[0]
    wire = bytearray(vector["wire"].encode())
    for at in range(0, len(wire), 7):
        mangled = bytearray(wire)
        mangled[at] = ord("A") if mangled[at] != ord("A") else ord("B")
        with pytest.raises(SpaError):
            decode(bytes(mangled), keys_of(vector))


@pytest.mark.parametrize("message_type, kind", [(5, "local NAT access"), (0, "command")])
def test_local_nat_and_command_messages_are_refused_by_type(message_type, kind):
    from nfknock.doors import spa

    keys = keys_of(VECTORS[0])
    original = spa.ACCESS
    try:
        spa.ACCESS = message_type  # make the encoder emit that type
        wire = encode(keys, "10.0.0.2", [("tcp", 22)], now=1)
    finally:
        spa.ACCESS = original
    with pytest.raises(SpaError) as info:
        decode(wire, keys)
    assert info.value.reason == "refused type" and kind in info.value.detail


@pytest.mark.parametrize("timeout", [None, 60])
def test_a_nat_access_message_carries_its_destination(timeout):
    keys = keys_of(VECTORS[0])
    wire = encode(keys, "10.0.0.2", [("tcp", 22)], now=1, client_timeout=timeout, nat=("10.0.0.5", 2200))
    request = decode(wire, keys)
    assert request.message_type == (2 if timeout is None else 4)
    assert request.nat == ("10.0.0.5", 2200) and request.ports == (("tcp", 22),)
    assert request.client_timeout == timeout


def test_a_nat_access_message_without_its_destination_is_malformed():
    from nfknock.doors import spa

    keys = keys_of(VECTORS[0])
    original = spa.ACCESS
    try:
        spa.ACCESS = 2  # a NAT-access type, but no NAT field
        wire = encode(keys, "10.0.0.2", [("tcp", 22)], now=1)
    finally:
        spa.ACCESS = original
    with pytest.raises(SpaError) as info:
        decode(wire, keys)
    assert info.value.reason == "malformed"


def test_a_key_pair_never_shows_its_keys_in_a_repr():
    """A repr ends up in exception messages and debug lines: a DoorKey's, a keyring's too."""
    from nfknock.doors.rules import DoorKey

    encryption, mac = generate_keys()
    keys = Keys(base64.b64decode(encryption), base64.b64decode(mac))
    shown = repr((keys, DoorKey("alice", keys, 30.0, 30.0)))
    assert "digest='sha256'" in shown and "alice" in shown
    for secret in (keys.encryption, keys.hmac):
        assert repr(secret)[2:20] not in shown and base64.b64encode(secret).decode()[:16] not in shown
