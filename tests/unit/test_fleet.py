"""Fleet mode without a kernel: signed records (records.py), the engine holding SPA grants until
the fleet's answer, and members sharing grants, revocations and claims through a fake Redis
(fakeredis; the real-kernel tests use a real redis-server)."""

import base64
import json
import logging
import time

import fakeredis
import pytest
import redis

from nfknock.doors.engine import Verdict
from nfknock.doors.events import ClaimNeeded, DoorOpened, SpaRefused
from nfknock.doors.packet import Packet
from nfknock.doors.rules import KnockDoor, SpaDoor
from nfknock.doors.spa import encode, generate_keys
from nfknock.errors import UsageError
from nfknock.fleet.config import fleet_config
from nfknock.fleet.link import FleetConfig, check_url
from nfknock.fleet.member import FleetMember
from nfknock.fleet.records import Forged, Grant, Revoke, Signer, parse_key
from nfknock.loading import load_secrets
from support.decisions import fresh_engine

KEY = b"k" * 32
ALICE = "10.0.0.2"
WALL = 1_800_000_000.0
LOG = logging.getLogger("test-fleet")


def door():
    return KnockDoor.model_validate(
        dict(name="openSSH", sequence=[40000, 50000, 60000], protect=["22/tcp"], open_for="30s")
    )


@pytest.fixture
def spa_door(monkeypatch):
    encryption, mac = generate_keys()
    monkeypatch.setenv("FLEETSPA_KEY_BASE64", encryption)
    monkeypatch.setenv("FLEETSPA_HMAC_KEY_BASE64", mac)
    spa = SpaDoor.model_validate(dict(kind="spa", name="spaSSH", keys_env="FLEETSPA", protect=["22/tcp"]))
    load_secrets(spa)
    return spa


def packet(port, src=ALICE, proto="tcp", payload=b""):
    return Packet(src, "10.0.0.1", proto, 33333, port, 0x02 if proto == "tcp" else 0, payload)


INNER_SSH = ("tcp", "10.0.0.5", 22)


# -- records -------------------------------------------------------------------------------


def test_entries_verify_only_with_the_key_and_the_fleet_they_were_signed_for():
    signer = Signer(KEY, "nfknock")
    grant = Grant("id1", "a", "i1", ALICE, "openSSH", WALL + 30, frozenset({("tcp", 22)}))
    revoke = Revoke("id2", "a", "i1", ALICE, None, WALL)
    assert signer.verify(signer.sign(grant)) == grant
    assert signer.verify(signer.sign(revoke)) == revoke
    for other in (Signer(b"x" * 32, "nfknock"), Signer(KEY, "other-fleet")):
        with pytest.raises(Forged):
            other.verify(signer.sign(grant))
    raw = signer.sign(grant)
    with pytest.raises(Forged):
        signer.verify(raw.replace(b"10.0.0.2", b"10.0.0.9"))
    for junk in (b"", b"{}", b"abc.def", b'x.{"kind":"grant"}', b"A" * 5000):
        with pytest.raises(Forged):
            signer.verify(junk)


def test_claim_names_hide_the_record_and_claims_are_bound_to_it():
    signer = Signer(KEY, "nfknock")
    name = signer.claim_name("spa:abc")
    assert name.startswith("nfknock:used:") and "abc" not in name
    assert name != Signer(b"x" * 32, "nfknock").claim_name("spa:abc")
    from nfknock.fleet.records import Claim

    raw = signer.sign_claim("spa:abc", Claim("a", "i1", WALL))
    assert signer.verify_claim("spa:abc", raw).member == "a"
    with pytest.raises(Forged):
        signer.verify_claim("spa:other", raw)


def test_fleet_key_and_url_checks(tmp_path):
    with pytest.raises(UsageError, match="at least 32"):
        parse_key(base64.b64encode(b"short").decode(), "k")
    with pytest.raises(UsageError, match="base64"):
        parse_key("not base64!", "k")
    with pytest.raises(UsageError, match="password-file"):
        check_url("redis://:secret@10.0.0.1:6379/0")
    with pytest.raises(UsageError, match="redis://"):
        check_url("http://10.0.0.1")
    key_file = tmp_path / "fleet.key"
    key_file.write_text(base64.b64encode(KEY).decode())
    key_file.chmod(0o644)
    with pytest.raises(UsageError, match="readable by group or others"):
        fleet_config("redis://10.0.0.1:6379/0", str(key_file))
    key_file.chmod(0o600)
    password = tmp_path / "redis.pw"
    password.write_text("s3cret\n")
    password.chmod(0o600)
    config = fleet_config("rediss://10.0.0.1:6380/2", str(key_file), str(password), "east")
    assert (config.key, config.password, config.name) == (KEY, "s3cret", "east")
    assert "s3cret" not in repr(config) and config.where == "rediss://10.0.0.1:6380/2"


# -- the engine in a fleet -----------------------------------------------------------------


def test_a_shared_engine_grants_spa_only_when_the_fleet_says_it_is_ours(spa_door):
    engine = fresh_engine((spa_door,), shared=True)
    payload = encode(spa_door.keyring[0].keys, ALICE, [("tcp", 22)], WALL)
    decision = engine.handle(packet(62201, proto="udp", payload=payload), 10.0, WALL)
    claims = [e for e in decision.events if isinstance(e, ClaimNeeded)]
    assert len(claims) == 1 and not any(isinstance(e, DoorOpened) for e in decision.events)
    assert engine.handle(packet(22), 10.1).verdict is Verdict.HOLD  # not before the answer: held
    assert engine.handle(packet(22, src="10.0.0.3"), 10.1).verdict is Verdict.DROP  # only the claimant's
    assert isinstance(engine.claimed(claims[0], "ours", 10.2)[0], DoorOpened)
    assert engine.handle(packet(22), 10.3).verdict is Verdict.ACCEPT

    other = fresh_engine((spa_door,), shared=True)  # another member, to which the packet was replayed
    decision = other.handle(packet(62201, proto="udp", payload=payload), 10.0, WALL + 1)
    claim = next(e for e in decision.events if isinstance(e, ClaimNeeded))
    refused = other.claimed(claim, "taken", 10.1, "used on member a")
    assert [(e.reason, e.detail) for e in refused if isinstance(e, SpaRefused)] == [("replay", "used on member a")]
    assert other.handle(packet(22), 10.2).verdict is Verdict.DROP


def test_a_claim_never_answered_holds_connections_for_hold_seconds_then_refuses(spa_door):
    from nfknock.doors.engine import HOLD_SECONDS

    engine = fresh_engine((spa_door,), shared=True)
    payload = encode(spa_door.keyring[0].keys, ALICE, [("tcp", 22)], WALL)
    engine.handle(packet(62201, proto="udp", payload=payload), 10.0, WALL)
    assert engine.next_deadline() == 10.0 + HOLD_SECONDS
    assert engine.handle(packet(22), 10.0 + HOLD_SECONDS - 0.01).verdict is Verdict.HOLD
    engine.expire(10.0 + HOLD_SECONDS)
    assert engine.handle(packet(22), 10.0 + HOLD_SECONDS).verdict is Verdict.DROP
    assert engine.pending == {}


def test_knock_doors_need_no_claim():
    engine = fresh_engine((door(),), shared=True)
    events = [e for port in (40000, 50000, 60000) for e in engine.handle(packet(port), 1.0).events]
    assert any(isinstance(e, DoorOpened) for e in events) and not any(isinstance(e, ClaimNeeded) for e in events)


# -- members through a fake Redis ------------------------------------------------------------


class Member:
    def __init__(self, server, name, doors, offline="accept"):
        self.engine = fresh_engine(doors, shared=True)
        config = FleetConfig("redis://fake:6379/0", KEY, None, "nfknock", name, offline)
        self.fleet = FleetMember(config, self.engine, LOG, lambda: None, connect=lambda *a, **k: _client(server))
        self.now = 1.0

    def step(self):
        self.now += 0.01
        return self.fleet.step(self.now, time.time())

    def until(self, condition, what):
        end = time.monotonic() + 10
        while time.monotonic() < end:
            result = self.step()
            if condition(result):
                return result
            time.sleep(0.01)
        raise AssertionError(f"{self.fleet.member}: never {what}")

    def handle(self, pkt):
        self.now += 0.01
        decision = self.engine.handle(pkt, self.now, time.time())
        follow = self.fleet.on_events(decision.events, self.now, time.time())
        return decision, follow


def _client(server):
    if server is None:
        raise redis.ConnectionError("Connection refused")
    return fakeredis.FakeRedis(server=server)


@pytest.fixture
def fleet():
    server = fakeredis.FakeServer()
    members = []

    def make(name, doors=None, offline="accept", on=server):
        member = Member(on, name, doors or (door(),), offline)
        member.fleet.start()
        members.append(member)
        member.until(lambda _: member.fleet.link.connected or on is None, "connected")
        return member

    make.server = server
    yield make
    for member in members:
        member.fleet.stop()


def test_a_knock_on_one_member_opens_the_others_and_a_revoke_closes_them(fleet):
    a, b = fleet("a"), fleet("b")
    for port in (40000, 50000, 60000):
        a.handle(packet(port))
    b.until(lambda result: ALICE in result[1], "got the grant")
    assert b.engine.handle(packet(22), b.now).verdict is Verdict.ACCEPT
    status = b.fleet.status(b.now, time.time())
    assert status["shared_grants"][0]["source"] == ALICE and status["shared_grants"][0]["from"] == "a"
    assert status["reachable"]
    b.fleet.on_control({"cmd": "revoke", "address": ALICE, "door": None}, {"revoked": []}, b.now, time.time())
    a.until(lambda result: ALICE in result[1], "got the revocation")
    assert a.engine.handle(packet(22), a.now).verdict is Verdict.DROP


def test_an_spa_packet_is_used_once_across_the_fleet(fleet, spa_door):
    a, b = fleet("a", (spa_door,)), fleet("b", (spa_door,))
    payload = encode(spa_door.keyring[0].keys, ALICE, [("tcp", 22)], time.time())
    a.handle(packet(62201, proto="udp", payload=payload))
    opened = a.until(lambda result: result[0], "got the claim's answer")[0]
    assert isinstance(opened[0], DoorOpened)
    b.handle(packet(62201, proto="udp", payload=payload))  # replayed to b (UDP: any source can be spoofed)
    refused = b.until(lambda result: any(isinstance(e, SpaRefused) for e in result[0]), "was refused")[0]
    assert any(e.reason == "replay" and "member a" in e.detail for e in refused if isinstance(e, SpaRefused))


def test_entries_not_signed_with_the_fleet_key_open_nothing(fleet):
    b = fleet("b")
    forger = Signer(b"f" * 32, "nfknock")
    raw = forger.sign(Grant("x", "a", "i9", ALICE, "openSSH", time.time() + 600))
    client = fakeredis.FakeRedis(server=fleet.server)
    client.xadd("nfknock:stream", {"e": raw})
    client.xadd("nfknock:stream", {"e": b"garbage"})
    b.until(lambda _: b.fleet.rejected == 2, "rejected both")
    assert b.engine.handle(packet(22), b.now).verdict is Verdict.DROP


def test_a_replayed_signed_grant_is_applied_once(fleet):
    a, b = fleet("a"), fleet("b")
    for port in (40000, 50000, 60000):
        a.handle(packet(port))
    b.until(lambda result: ALICE in result[1], "got the grant")
    client = fakeredis.FakeRedis(server=fleet.server)
    ((entry_id, fields),) = client.xrange("nfknock:stream")
    b.fleet.on_control({"cmd": "revoke", "address": ALICE, "door": None}, {"revoked": []}, b.now, time.time())
    b.engine.revoke(ALICE)
    client.xadd("nfknock:stream", fields)  # someone with write access re-adds the genuine grant
    b.until(lambda _: b.fleet.link.received >= 2, "read the copy")
    b.step()
    assert b.engine.handle(packet(22), b.now).verdict is Verdict.DROP


def test_without_redis_members_serve_locally_by_their_policy(fleet, spa_door):
    accepting = fleet("a", (spa_door,), on=None)
    refusing = fleet("b", (spa_door,), offline="refuse", on=None)
    assert not accepting.fleet.link.connected
    for member in (accepting, refusing):
        payload = encode(spa_door.keyring[0].keys, ALICE, [("tcp", 22)], time.time())
        _, follow = member.handle(packet(62201, proto="udp", payload=payload))
        member.follow = follow
    assert isinstance(accepting.follow[0], DoorOpened)
    assert accepting.engine.handle(packet(22), accepting.now).verdict is Verdict.ACCEPT
    assert [e.reason for e in refusing.follow if isinstance(e, SpaRefused)] == ["fleet unreachable"]
    assert refusing.engine.handle(packet(22), refusing.now).verdict is Verdict.DROP


# -- the daemon's glue ---------------------------------------------------------------------


def test_the_daemon_publishes_its_grants_and_operator_revokes(tmp_path, monkeypatch):
    from test_daemon import syn

    from nfknock.daemon import Daemon, DaemonConfig
    from support.fakes import FakeFirewall, Queued

    server = fakeredis.FakeServer()
    monkeypatch.setattr("nfknock.fleet.link._redis_client", lambda *a, **k: fakeredis.FakeRedis(server=server))
    (tmp_path / "doors.yaml").write_text(
        "doors:\n  - name: openSSH\n    sequence: [40000, 50000, 60000]\n    protect: [22/tcp]\n"
    )
    config = FleetConfig("redis://fake:6379/0", KEY, None, "nfknock", "a")
    daemon = Daemon(DaemonConfig(tmp_path, fleet=config), FakeFirewall(), logger=LOG)
    daemon.start_fleet(lambda: None)
    try:
        peer = Signer(KEY, "nfknock")
        stream = fakeredis.FakeRedis(server=server)
        for port in (40000, 50000, 60000):
            daemon.on_packet(Queued(syn(port)))
        answer = daemon.answer({"cmd": "revoke", "address": "10.0.0.2", "door": None})
        assert answer["revoked"] == ["openSSH"]
        end = time.monotonic() + 10
        while len(stream.xrange("nfknock:stream")) < 2 and time.monotonic() < end:
            time.sleep(0.01)
        entries = [peer.verify(fields[b"e"]) for _, fields in stream.xrange("nfknock:stream")]
        assert [type(e).__name__ for e in entries] == ["Grant", "Revoke"]
        assert entries[0].src == "10.0.0.2" and entries[0].member == "a"
        assert daemon.answer({"cmd": "status"})["fleet"]["published"] == 2
    finally:
        daemon.fleet.stop()


def test_a_remote_grant_never_narrows_or_shortens_a_local_one():
    engine = fresh_engine((door(),), shared=True)
    config = FleetConfig("redis://fake:6379/0", KEY, None, "nfknock", "b")
    member = FleetMember(config, engine, LOG, lambda: None, connect=lambda *a, **k: None)
    engine.grant(ALICE, "openSSH", 300, now=1.0)  # all the door's ports, for 5 minutes
    narrow = Grant("g1", "a", "i1", ALICE, "openSSH", WALL + 30, frozenset({("tcp", 22)}))
    assert not member._apply(narrow, 1.0, WALL)
    assert engine.grant_of(ALICE, "openSSH", 1.0) == (301.0, None)
    longer = Grant("g2", "a", "i1", ALICE, "openSSH", WALL + 600, frozenset({("tcp", 22)}))
    assert member._apply(longer, 1.0, WALL)
    assert engine.grant_of(ALICE, "openSSH", 1.0) == (601.0, None)
    assert not member._apply(longer, 1.0, WALL)  # the same entry again: applied once


def test_run_refuses_bad_fleet_options_in_one_line_before_touching_anything(tmp_path, capsys):
    from nfknock.cli import main

    rules = str(tmp_path)
    key_file = tmp_path / "fleet.key"
    key_file.write_text(base64.b64encode(KEY).decode())
    key_file.chmod(0o600)
    cases = [
        (["--cluster", "redis://:hunter2@10.0.0.5:6379/0", "--cluster-key-file", str(key_file)], "password-file"),
        (["--cluster", "redis://10.0.0.5:6379/0"], "needs --cluster-key-file"),
        (["--cluster-key-file", str(key_file)], "need --cluster URL"),
        (["--cluster", "redis://10.0.0.5/0", "--cluster-key-file", str(key_file), "--cluster-name", "a b"], "name"),
    ]
    for extra, said in cases:
        assert main(["run", "--rules", rules, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0] and "hunter2" not in err[0], err


def test_a_grant_signs_its_destinations_only_when_it_has_some():
    """An SPA NAT grant carries its destinations (docs/gateway.md); any other grant signs as it
    did before destinations existed, so a member of an older version reads it as it always did,
    and reads an NAT grant as one with no port: it opens nothing there."""
    signer = Signer(KEY, "nfknock")
    plain = Grant("id1", "a", "i1", ALICE, "spaSSH", WALL + 30, frozenset({("tcp", 22)}), "alice")
    assert b"dests" not in signer.sign(plain)
    nat = Grant("id2", "a", "i1", ALICE, "spaSSH", WALL + 30, frozenset(), "alice", dests=frozenset({INNER_SSH}))
    raw = signer.sign(nat)
    assert signer.verify(raw) == nat and b'"dests":[["tcp","10.0.0.5",22]]' in raw
    for bad in ([["tcp", "10.0.0.0/8", 22]], [["icmp", "10.0.0.5", 22]], [["tcp", "10.0.0.5", 0]], "x"):
        forged = signer._seal("entry", {**json.loads(raw.partition(b".")[2]), "dests": bad})
        with pytest.raises(Forged):
            signer.verify(forged)


def test_an_spa_nat_grant_opens_its_destination_on_every_member(fleet, monkeypatch):
    encryption, mac = generate_keys()
    monkeypatch.setenv("FLEETNAT_KEY_BASE64", encryption)
    monkeypatch.setenv("FLEETNAT_HMAC_KEY_BASE64", mac)
    gateway = SpaDoor.model_validate(
        dict(kind="spa", name="spaGW", keys_env="FLEETNAT", forward=["10.0.0.5:22/tcp", "10.0.0.6:22/tcp"])
    )
    load_secrets(gateway)
    a, b = fleet("a", (gateway,)), fleet("b", (gateway,))
    payload = encode(gateway.keyring[0].keys, ALICE, [("tcp", 22)], time.time(), nat=("10.0.0.5", 22))
    a.handle(packet(62201, proto="udp", payload=payload))
    opened = a.until(lambda result: result[0], "got the claim's answer")[0]
    a.fleet.on_events(opened, a.now, time.time())
    b.until(lambda result: ALICE in result[1], "got the grant")
    to = Packet(ALICE, "10.0.0.5", "tcp", 33333, 22, 0x02, forwarded=True)
    assert b.engine.handle(to, b.now).verdict is Verdict.ACCEPT  # the destination it asked for
    assert b.engine.handle(to._replace(dst="10.0.0.6"), b.now).verdict is Verdict.DROP  # not another
    assert b.engine.handle(packet(22), b.now).verdict is Verdict.DROP  # nor a port of the host


def test_spa_grants_travel_with_their_key_and_a_key_revoke_reaches_every_member(fleet, spa_door):
    a, b = fleet("a", (spa_door,)), fleet("b", (spa_door,))
    person = spa_door.keyring[0]
    payload = encode(person.keys, ALICE, [("tcp", 22)], time.time())
    a.handle(packet(62201, proto="udp", payload=payload))
    opened = a.until(lambda result: result[0], "got the claim's answer")[0]
    a.fleet.on_events(opened, a.now, time.time())  # as the daemon does with what step() returned
    b.until(lambda result: ALICE in result[1], "got the grant")
    row = next(row for row in b.engine.grant_rows(b.now) if row.source == ALICE)
    assert row.key == person.name
    request = {"cmd": "revoke", "key": person.name, "door": None}
    a.fleet.on_control(request, {"revoked": ["spaSSH"], "addresses": [ALICE]}, a.now, time.time())
    b.until(lambda result: ALICE in result[1], "got the key's revocation")
    assert b.engine.handle(packet(22), b.now).verdict is Verdict.DROP


def test_an_spa_packet_refused_on_one_member_is_a_replay_on_another_whose_door_is_wider(fleet, spa_door):
    """Refused on a for its ports, the packet is recorded in Redis too: replayed to b, whose door
    opens those ports, it is refused as used on member a."""
    wide = SpaDoor.model_validate(dict(kind="spa", name="spaSSH", keys_env="FLEETSPA", protect=["22/tcp", "2222/tcp"]))
    load_secrets(wide)
    a, b = fleet("a", (spa_door,)), fleet("b", (wide,))
    payload = encode(spa_door.keyring[0].keys, ALICE, [("tcp", 22), ("tcp", 2222)], time.time())
    decision, _ = a.handle(packet(62201, proto="udp", payload=payload))
    assert [e.reason for e in decision.events if isinstance(e, SpaRefused)] == ["port not allowed"]
    redis_client = fakeredis.FakeRedis(server=fleet.server)
    end = time.monotonic() + 10
    while not redis_client.keys("nfknock:used:*") and time.monotonic() < end:
        time.sleep(0.01)
    b.handle(packet(62201, proto="udp", payload=payload))  # replayed to b
    refused = b.until(lambda result: any(isinstance(e, SpaRefused) for e in result[0]), "was refused")[0]
    assert [(e.reason, e.detail) for e in refused if isinstance(e, SpaRefused)] == [("replay", "used on member a")]
    assert b.engine.handle(packet(22), b.now).verdict is Verdict.DROP
