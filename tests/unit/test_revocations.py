"""A revocation is never undone (fleet/revocations.py, the order in fleet/records.py): not by a
grant that reaches a member after it, a member cut off, a restart or a join reading the stream
again, a key removed at a reload, a claim answered after its key left, or someone with the Redis
password but without the fleet key deleting entries. Members share a fake Redis (fakeredis) whose
link to one member can be cut; the real-kernel tests use a real redis-server."""

import logging
import time

import fakeredis
import pytest
import redis
from test_fleet import ALICE, KEY, Member, door, packet

from nfknock.doors.engine import Verdict
from nfknock.doors.events import ClaimNeeded, DoorOpened, SpaRefused
from nfknock.doors.rules import SpaDoor
from nfknock.doors.spa import encode, generate_keys
from nfknock.fleet import link as link_module
from nfknock.fleet.link import FleetConfig
from nfknock.fleet.member import FleetMember
from nfknock.fleet.records import Grant, Revoke, Signer
from nfknock.fleet.revocations import Revocations
from nfknock.loading import load_secrets
from support.decisions import fresh, fresh_engine

LOG = logging.getLogger("test-revocations")


class Cut:
    """A member's line to the fake Redis, which the test can cut and mend."""

    def __init__(self, server):
        self.server, self.cut = server, False
        self.evicted, self.policy = 0, "noeviction"  # what INFO and CONFIG GET say (fakeredis has neither)

    def __call__(self, *args, **kwargs):
        if self.cut:
            raise redis.ConnectionError("cut off")
        return _Guarded(fakeredis.FakeRedis(server=self.server), self)


def _cut_init(line, server, policy):
    line.server, line.cut, line.evicted, line.policy = server, False, 0, policy


class _Guarded:
    def __init__(self, client, line):
        self._client, self._line = client, line

    def info(self, section):
        return {"evicted_keys": self._line.evicted}

    def config_get(self, name):
        return {name: self._line.policy}

    def __getattr__(self, name):
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            if self._line.cut and name != "close":
                raise redis.ConnectionError("cut off")
            return attribute(*args, **kwargs)

        return call


@pytest.fixture
def fleet(monkeypatch):
    monkeypatch.setattr(link_module, "REASSERT", 0.2)
    server = fakeredis.FakeServer()
    members = []

    def make(name, doors=None, state_dir=None):
        line = Cut(server)
        member = Member(server, name, doors or (door(),))
        config = FleetConfig("redis://fake:6379/0", KEY, None, "nfknock", name)
        member.fleet = FleetMember(config, member.engine, LOG, lambda: None, connect=line, state_dir=state_dir)
        member.line = line
        member.fleet.start()
        members.append(member)
        member.until(lambda _: member.fleet.link.connected, "connected")
        return member

    make.server = server
    yield make
    for member in members:
        member.fleet.stop()


def knock(member, src=ALICE):
    for port in (40000, 50000, 60000):
        _, follow = member.handle(packet(port, src=src))


def revoke(member, **request):
    request = {"cmd": "revoke", "door": None, **request}
    member.fleet.on_control(request, {"revoked": []}, member.now, time.time())


def opens(member, src=ALICE) -> bool:
    member.step()
    return member.engine.handle(packet(22, src=src), member.now).verdict is Verdict.ACCEPT


def settle(member, seconds=0.6):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        member.step()
        time.sleep(0.01)


def cut(member):
    member.line.cut = True
    member.until(lambda _: not member.fleet.link.connected, "noticed the cut")


def mend(member):
    member.line.cut = False
    member.until(lambda _: member.fleet.link.connected, "reconnected")


def placed(member):
    member.until(lambda _: all(r.pos for r in member.fleet.revocations.entries.values()), "placed its revocations")


# -- order: a revocation wins over every grant issued before it ---------------------------------


def test_a_grant_that_reaches_a_member_after_its_revocation_stays_revoked(fleet):
    """Issue 23 item 1: b is cut off, alice knocks on a, the operator revokes on b; b back."""
    a, b = fleet("a"), fleet("b")
    cut(b)
    knock(a)
    assert opens(a)
    revoke(b, address=ALICE)
    mend(b)
    placed(b)
    a.until(lambda result: ALICE in result[1], "got the revocation")
    settle(b)
    assert not opens(b), "the grant issued before the revocation opened b"
    assert not opens(a)


def test_a_grant_published_late_by_a_member_cut_off_stays_revoked(fleet):
    """Item 1: a is cut off when alice knocks; a revocation issued later on b reaches Redis
    first; a's grant, published when a is back, is older than the revocation."""
    a, b = fleet("a"), fleet("b")
    cut(a)
    knock(a)
    revoke(b, address=ALICE)
    placed(b)
    mend(a)
    a.until(lambda _: a.fleet.link.published >= 1, "published its grant")
    b.until(lambda _: b.fleet.link.received >= 1, "read a's grant")
    settle(b)
    assert not opens(b)
    assert not opens(a)  # a read the revocation too


def test_a_grant_issued_after_a_revocation_is_applied(fleet):
    """Closed is not stuck: alice knocking again after the revocation opens the fleet again."""
    a, b = fleet("a"), fleet("b")
    knock(a)
    b.until(lambda result: ALICE in result[1], "got the grant")
    revoke(b, address=ALICE)
    placed(b)
    a.until(lambda _: not opens(a), "got the revocation")
    a.engine.revoke(ALICE)
    a.now += 1
    knock(a)
    b.until(lambda _: opens(b), "got the new grant")


def test_a_member_that_joins_or_restarts_never_reapplies_a_revoked_grant(fleet, tmp_path):
    """Item 2 and 4: the stream read from its start, even with the revocation deleted from the
    stream and from its second copy by someone with the Redis password (no fleet key)."""
    a, b = fleet("a", state_dir=tmp_path / "a"), fleet("b", state_dir=tmp_path / "b")
    knock(a)
    b.until(lambda result: ALICE in result[1], "got the grant")
    revoke(b, address=ALICE)
    placed(b)
    a.until(lambda _: not opens(a), "got the revocation")
    attacker = fakeredis.FakeRedis(server=fleet.server)
    signer = Signer(KEY, "nfknock")
    for entry_id, fields in attacker.xrange("nfknock:stream"):
        if isinstance(signer.verify(fields[b"e"]), Revoke):
            attacker.xdel("nfknock:stream", entry_id)
    attacker.delete("nfknock:revoked")
    # b restarts with its state directory: its own copy.
    b.fleet.stop()
    b2 = fleet("b", state_dir=tmp_path / "b")
    settle(b2)
    assert not opens(b2)
    # a puts the second copy back (it kept the revocation); c joins with nothing of its own.
    end = time.monotonic() + 10
    while not attacker.hlen("nfknock:revoked") and time.monotonic() < end:
        a.step()
        time.sleep(0.02)
    attacker.delete("nfknock:revoked")  # and again, just before c joins: a's copy on disk is read back
    a.fleet.stop()
    a2 = fleet("a", state_dir=tmp_path / "a")
    c = fleet("c")
    settle(c)
    settle(a2)
    assert not opens(a2)
    assert not opens(c)


# -- keys that leave a door ------------------------------------------------------------------


@pytest.fixture
def team(monkeypatch):
    """An SPA door with alice's and bob's keys, and the same door once alice's key is removed."""
    for person in ("ALICE", "BOB"):
        encryption, mac = generate_keys()
        monkeypatch.setenv(f"REV{person}_KEY_BASE64", encryption)
        monkeypatch.setenv(f"REV{person}_HMAC_KEY_BASE64", mac)

    def make(*people):
        keys = [{"name": person, "env": f"REV{person.upper()}"} for person in people]
        spa = SpaDoor.model_validate(dict(kind="spa", name="spaSSH", keys=keys, protect=["22/tcp"]))
        load_secrets(spa)
        return spa

    return make


def spa_open(member, spa, src=ALICE):
    payload = encode(spa.keyring[0].keys, src, [("tcp", 22)], time.time())
    member.handle(packet(62201, src=src, proto="udp", payload=payload))
    opened = member.until(lambda result: result[0], "got the claim's answer")[0]
    member.fleet.on_events(opened, member.now, time.time())
    return opened


def test_removing_a_key_is_a_revocation_no_restart_or_join_undoes(fleet, team, tmp_path):
    """Item 2: alice opens for an hour, her key is removed on every member (reload), then b
    restarts and c joins; c still has the key file (not reloaded yet): the revocation holds."""
    both, bob_only = team("alice", "bob"), team("bob")
    a, b = fleet("a", (both,)), fleet("b", (both,), state_dir=tmp_path / "b")
    assert isinstance(spa_open(a, both)[0], DoorOpened)
    b.until(lambda result: ALICE in result[1], "got alice's grant")
    for member in (a, b):
        member.engine.reload((bob_only,), fresh((bob_only,)))
        member.fleet.on_events(member.engine.rekeyed, member.now, time.time())
    placed(a)
    assert not opens(a) and not opens(b)
    b.fleet.stop()
    b2 = fleet("b", (bob_only,), state_dir=tmp_path / "b")
    c = fleet("c", (both,))
    settle(b2)
    settle(c)
    assert not opens(b2)
    assert not opens(c), "a member that still has the key re-granted alice from the stream"


def test_a_grant_under_a_key_this_member_no_longer_has_is_not_applied(team):
    """Item 2: whatever the stream says, a grant is applied only if its key is on the door."""
    bob_only = team("bob")
    engine = fresh_engine((bob_only,), shared=True)
    config = FleetConfig("redis://fake:6379/0", KEY, None, "nfknock", "b")
    member = FleetMember(config, engine, LOG, lambda: None, connect=lambda *a, **k: None)
    wall = time.time()
    grant = Grant("g1", "a", "i1", ALICE, "spaSSH", wall + 3600, frozenset({("tcp", 22)}), "alice")
    assert member._apply(grant, 1.0, wall) == set()
    assert engine.grant_of(ALICE, "spaSSH", 1.0) is None
    bobs = Grant("g2", "a", "i1", ALICE, "spaSSH", wall + 3600, frozenset({("tcp", 22)}), "bob")
    assert member._apply(bobs, 1.0, wall) == {ALICE}


def test_a_claim_answered_after_its_key_left_the_door_opens_nothing(team):
    """Item 3: the key is removed while the claim is in flight; "ours" arrives after."""
    both, bob_only = team("alice", "bob"), team("bob")
    engine = fresh_engine((both,), shared=True)
    payload = encode(both.keyring[0].keys, ALICE, [("tcp", 22)], time.time())
    decision = engine.handle(packet(62201, proto="udp", payload=payload), 1.0, time.time())
    claim = next(e for e in decision.events if isinstance(e, ClaimNeeded))
    engine.reload((bob_only,), fresh((bob_only,)))
    events = engine.claimed(claim, "ours", 1.1)
    assert [e.reason for e in events if isinstance(e, SpaRefused)] == ["key removed"]
    assert engine.handle(packet(22), 1.2).verdict is Verdict.DROP


# -- the durable copy ------------------------------------------------------------------------


def test_revocations_are_kept_signed_on_disk_and_a_changed_file_is_ignored(tmp_path, caplog):
    signer = Signer(KEY, "nfknock")
    wall = time.time()
    kept = Revocations(signer, LOG, tmp_path)
    kept.add(Revoke("r1", "a", "i1", ALICE, None, wall, None, "1000-0"))
    kept.add(Revoke("r1", "a", "i1", ALICE, None, wall, None, "9000-0"))  # re-added later: keeps its place
    kept.add(Revoke("r2", "a", "i1", "10.0.0.9", None, wall - 2 * 86400, None, "5-0"))  # over
    kept.flush()
    (next(tmp_path.iterdir())).write_bytes(b"junk")  # one file changed by hand
    again = Revocations(signer, LOG, tmp_path)
    with caplog.at_level(logging.WARNING):
        live = again.load(wall)
    assert live <= 1 and "not revocations signed with the fleet key" in caplog.text
    fresh_copy = Revocations(signer, LOG, tmp_path / "x")
    fresh_copy.add(Revoke("r1", "a", "i1", ALICE, None, wall, None, "1000-0"))
    early = Grant("g", "b", "i2", ALICE, "openSSH", wall + 60, None, None, "999-5")
    late = Grant("g", "b", "i2", ALICE, "openSSH", wall + 60, None, None, "1000-0")
    assert fresh_copy.covering(early) is not None and fresh_copy.covering(late) is None
    assert fresh_copy.sweep(wall + 2 * 86400) == 1 and len(fresh_copy) == 0


# -- Redis that forgets: restarted empty, evicting; a member's clock off ------------------------


@pytest.fixture
def spa(monkeypatch):
    encryption, mac = generate_keys()
    monkeypatch.setenv("REVSPA_KEY_BASE64", encryption)
    monkeypatch.setenv("REVSPA_HMAC_KEY_BASE64", mac)
    door = SpaDoor.model_validate(dict(kind="spa", name="spaSSH", keys_env="REVSPA", protect=["22/tcp"]))
    load_secrets(door)
    return door


def replay_refused(member, payload, reason="replay"):
    member.handle(packet(62201, proto="udp", payload=payload))
    events = member.until(lambda result: result[0], "got the claim's answer")[0]
    return [(e.reason, e.detail) for e in events if isinstance(e, SpaRefused)]


def test_a_packet_used_before_redis_lost_its_data_is_refused_after(fleet, spa, caplog):
    """Item 6: Redis restarted empty (FLUSHALL here): a notices (epoch marker), says so, and puts
    its live claim back; the captured packet replayed to b is refused as used on a."""
    a, b = fleet("a", (spa,)), fleet("b", (spa,))
    payload = encode(spa.keyring[0].keys, ALICE, [("tcp", 22)], time.time())
    a.handle(packet(62201, proto="udp", payload=payload))
    assert isinstance(a.until(lambda result: result[0], "got the claim's answer")[0][0], DoorOpened)
    fakeredis.FakeRedis(server=fleet.server).flushall()
    with caplog.at_level(logging.ERROR):
        a.until(lambda _: a.fleet.link.reasserted >= 1, "put its claim back")
        a.step()
    assert "Redis lost the fleet's data" in caplog.text
    time.sleep(link_module.RECOVERY)
    assert replay_refused(b, payload) == [("replay", "used on member a")]


def test_right_after_a_loss_claims_follow_the_offline_policy(fleet, spa):
    a = fleet("a", (spa,))
    a.fleet.config = a.fleet.link.config = FleetConfig("redis://fake:6379/0", KEY, None, "nfknock", "a", "refuse")
    fakeredis.FakeRedis(server=fleet.server).flushall()
    payload = encode(spa.keyring[0].keys, "10.0.0.7", [("tcp", 22)], time.time())
    a.handle(packet(62201, src="10.0.0.7", proto="udp", payload=payload))
    refused = a.until(lambda result: result[0], "got the claim's answer")[0]
    assert [e.reason for e in refused if isinstance(e, SpaRefused)] == ["fleet unreachable"]


def test_a_member_whose_clock_is_off_refuses_what_it_cannot_check(fleet, spa, caplog):
    """Item 9: more than MAX_SKEW off Redis's TIME: refused (whatever the offline policy), and said."""
    a = fleet("a", (spa,))
    a.fleet.link.wall = lambda: time.time() - 90
    with caplog.at_level(logging.ERROR):
        a.until(lambda _: abs(a.fleet.link.skew) > 60, "measured the skew")
        a.step()
    assert "clock is -90s off Redis's" in caplog.text
    payload = encode(spa.keyring[0].keys, ALICE, [("tcp", 22)], time.time() - 90)
    a.handle(packet(62201, proto="udp", payload=payload))
    events = a.until(lambda result: result[0], "got the claim's answer")[0]
    assert [e.reason for e in events if isinstance(e, SpaRefused)] == ["fleet unreachable"]
    assert a.engine.handle(packet(22), a.now).verdict is Verdict.DROP
    assert "alarm" not in a.fleet.status(a.now, time.time()) and a.fleet.status(a.now, time.time())["alarms"]["clock"]


def test_an_evicting_redis_is_an_alarm_and_evicted_claims_are_put_back(fleet, spa, caplog, monkeypatch):
    """Item 7: an evicting maxmemory-policy is said at connection; keys evicted (INFO stats) are
    put back by the member that holds them."""
    monkeypatch.setattr(Cut, "__init__", lambda self, server: _cut_init(self, server, "allkeys-lru"))
    with caplog.at_level(logging.ERROR):
        a = fleet("a", (spa,))
        a.until(lambda _: "evicting" in a.fleet.alarms, "said what the policy risks")
    assert "maxmemory-policy is allkeys-lru" in caplog.text
    assert a.fleet.status(a.now, time.time())["redis_policy"] == "allkeys-lru"
    payload = encode(spa.keyring[0].keys, ALICE, [("tcp", 22)], time.time())
    a.handle(packet(62201, proto="udp", payload=payload))
    a.until(lambda result: result[0], "got the claim's answer")
    client = fakeredis.FakeRedis(server=fleet.server)
    (name,) = client.keys("nfknock:used:*")
    client.delete(name)  # evicted (fakeredis does not evict: INFO says so below)
    a.line.evicted += 1
    with caplog.at_level(logging.ERROR):
        a.until(lambda _: client.exists(name), "put the evicted claim back")
        a.step()
    assert "Redis evicted 1 key(s)" in caplog.text


# -- rotating the fleet key ------------------------------------------------------------------


def test_a_used_packet_stays_used_through_a_rolling_fleet_key_rotation(fleet, spa, monkeypatch):
    """Item 8 (docs/fleet.md "Rotating the fleet key"): at every step of the rotation two kinds of member
    meet (old key only and new key added second; new key added and new key first; new key first
    and new key only): a packet used on one is a replay on the other, and grants go both ways."""
    new = b"n" * 32
    phases = {"old": (KEY, ()), "added": (KEY, (new,)), "first": (new, (KEY,)), "new": (new, ())}
    original = FleetMember.__init__

    def member(name, phase):
        key, older = phases[phase]

        def keyed(self, config, *args, **kwargs):
            from dataclasses import replace

            original(self, replace(config, key=key, older_keys=older), *args, **kwargs)

        monkeypatch.setattr(FleetMember, "__init__", keyed)
        try:
            return fleet(name, (spa,))
        finally:
            monkeypatch.setattr(FleetMember, "__init__", original)

    def both_ways(one, other, n):
        for used_on, replayed_to, src in ((one, other, f"10.0.{n}.1"), (other, one, f"10.0.{n}.2")):
            used_and_replayed(spa, used_on, replayed_to, src)

    a, b = member("a", "old"), member("b", "added")  # step 1 under way
    both_ways(a, b, 1)
    a.fleet.stop()
    c = member("c", "first")  # step 1 done everywhere, step 2 under way
    both_ways(b, c, 2)
    b.fleet.stop()
    marker = Signer(new, "nfknock")  # c signs the fleet's marker again with the new key by itself
    c.until(lambda _: _verifies(marker, fakeredis.FakeRedis(server=fleet.server).get("nfknock:epoch")), "signed")
    d = member("d", "new")  # step 2 done everywhere, step 3 under way
    both_ways(c, d, 3)
    assert c.fleet.rejected == 0  # (d, with the new key only, ignores what a and b signed with the old one)


def _verifies(signer, raw):
    try:
        return raw is not None and signer.verify_epoch(raw)
    except Exception:
        return False


def used_and_replayed(spa, used_on, replayed_to, src):
    """`src` uses an SPA packet on one member; replayed to the other, it is refused there."""
    payload = encode(spa.keyring[0].keys, src, [("tcp", 22)], time.time())
    used_on.handle(packet(62201, src=src, proto="udp", payload=payload))
    opened = used_on.until(lambda result: result[0], "answered")[0]
    assert isinstance(opened[0], DoorOpened)
    used_on.fleet.on_events(opened, used_on.now, time.time())  # as the daemon does: published
    replayed_to.handle(packet(62201, src=src, proto="udp", payload=payload))
    events = replayed_to.until(lambda result: result[0], "answered")[0]
    refused = [e.reason for e in events if isinstance(e, SpaRefused)]
    assert refused == ["replay"], (used_on.fleet.member, replayed_to.fleet.member, events)
    granted = replayed_to.until(lambda _: replayed_to.engine.grant_of(src, "spaSSH", replayed_to.now), "granted")
    assert granted is not None  # the grant itself, signed with the other's first key, applies


def test_the_fleet_key_file_takes_the_current_key_first_and_says_what_is_wrong_in_one_line():
    import base64

    from nfknock.fleet.records import FleetKeyError, parse_keys

    old, new = base64.b64encode(KEY).decode(), base64.b64encode(b"n" * 32).decode()
    assert parse_keys(f"# rotation, step 2\n{new}\n{old}\n", "fleet.key") == (b"n" * 32, KEY)
    for text, said in (("", "no key"), (f"{old}\n{old}\n", "the same key twice"), ("abc!\n", "key 1")):
        with pytest.raises(FleetKeyError) as caught:
            parse_keys(text, "fleet.key")
        assert said in str(caught.value) and "\n" not in str(caught.value) and old not in str(caught.value)


def test_the_alarms_reach_the_metrics(fleet, spa, monkeypatch):
    from nfknock.daemon.metrics import fleet_metrics

    a = fleet("a", (spa,))
    a.fleet.link.wall = lambda: time.time() - 90
    a.until(lambda _: "clock" in a.fleet.alarms, "raised the clock alarm")
    families = {family.name: family for family in fleet_metrics(a.fleet.status(a.now, time.time()))}
    assert [(s.labels, s.value) for s in families["nfknock_fleet_alarm"].samples] == [({"what": "clock"}, 1)]
    assert families["nfknock_fleet_clock_skew_seconds"].samples[0].value < -60
    a.fleet.link.wall = time.time
    a.until(lambda _: "clock" not in a.fleet.alarms, "cleared it once the clock is back")


def _brute_covering(kept, grant):
    return [revoke for revoke in kept if revoke.covers(grant)]


def test_whether_a_grant_is_revoked_is_answered_without_scanning_every_revocation_of_its_source(monkeypatch):
    """A source revoked 2,000 times (a close sequence per session, each kept a day): applying a
    grant looks at a few revocations, not all of them, and gives the answer a full scan gives,
    also after revocations seen again with an earlier place, unplaced ones, and sweeps."""
    import random

    from nfknock.fleet import records

    rng = random.Random(23)
    kept = Revocations(Signer(KEY, "nfknock"), LOG)
    for n in range(2000):
        door = rng.choice(["openSSH", "spaSSH", None])
        src, key = (ALICE, None) if rng.random() < 0.8 else (None, rng.choice(["alice", "bob"]))
        pos = f"{1000 + rng.randrange(5000)}-{rng.randrange(3)}"
        if n in (7, 1500):  # ours, not yet placed: covers every grant of bob's key on spaSSH
            src, key, door, pos = None, "bob", "spaSSH", None
        kept.add(Revoke(f"r{n}", "a", "i", src, door, 1000.0 + n, key, pos))
    truth = dict(kept.entries)
    for revoke_id in rng.sample(sorted(truth), 300):  # seen again, sometimes with an earlier place
        known = truth[revoke_id]
        if known.pos is not None:
            earlier = f"{records.stream_order(known.pos)[0] - rng.randrange(50)}-0"
            kept.add(Revoke(known.id, "a", "i", known.src, known.door, known.at, known.key, earlier))
    kept.sweep(1000.0 + 500 + records.MAX_GRANT_SECONDS)  # the first 500 are over
    calls = 0
    real = Revoke.covers

    def counting(self, grant):
        nonlocal calls
        calls += 1
        return real(self, grant)

    grants = [
        Grant(f"g{n}", "b", "j", ALICE, rng.choice(["openSSH", "spaSSH"]), 9e9, None, key, base)
        for n in range(300)
        for key, base in [(rng.choice([None, "alice", "bob"]), f"{5000 + rng.randrange(2000)}-{rng.randrange(3)}")]
    ]
    answers = []
    monkeypatch.setattr(Revoke, "covers", counting)
    for grant in grants:
        calls = 0
        answers.append(kept.covering(grant) is not None)
        assert calls <= 6, calls  # the newest per (source or key, door), and the one unplaced
    monkeypatch.setattr(Revoke, "covers", real)
    assert answers == [bool(_brute_covering(kept.entries.values(), grant)) for grant in grants]
    assert 0 < sum(answers) < len(answers)


def test_a_member_with_workers_confirms_a_revocation_once_every_worker_applied_it(fleet, monkeypatch):
    """b runs two workers (two instances of one member); the one cut off from Redis may hold the
    source's grant: b is not named as confirmed until both applied the revocation."""
    monkeypatch.setattr(link_module, "HEARTBEAT", 0.2)
    a, b0, b1 = fleet("a"), fleet("b"), fleet("b")
    a.until(lambda _: len(a.fleet.link.members) == 3, "saw both of b's workers")
    cut(b1)
    revoke(a, address=ALICE)
    b0.until(lambda _: any(r.src == ALICE for r in b0.fleet.revocations.entries.values()), "b0 applied it")
    settle(a, 1.0)  # b0's acknowledgement is in
    (row,) = a.fleet.status(a.now, time.time())["revokes"]
    assert row["confirmed"] == [] and "b" in row["missing"]
    mend(b1)
    b1.until(lambda _: any(r.src == ALICE for r in b1.fleet.revocations.entries.values()), "b1 applied it")
    a.until(lambda _: a.fleet.status(a.now, time.time())["revokes"][0]["confirmed"] == ["b"], "confirmed by b")
    assert a.fleet.status(a.now, time.time())["revokes"][0]["missing"] == {}


def test_a_member_joining_right_after_a_revocation_was_deleted_does_not_apply_the_grant(fleet, monkeypatch):
    """The join window: someone with the Redis password deletes the revocation's stream entry and
    its second copy, and c joins before a (which keeps it) puts the copy back. c holds the grants
    it catches up on until every member had its turn to put copies back and c read them again:
    it never opens, and a grant issued after the revocation still opens there."""
    monkeypatch.setattr(link_module, "REASSERT", 1.0)  # a puts the copy back within a second
    a, b = fleet("a"), fleet("b")
    knock(a)
    b.until(lambda result: ALICE in result[1], "got the grant")
    revoke(a, address=ALICE)
    placed(a)
    b.until(lambda _: not opens(b), "got the revocation")
    attacker = fakeredis.FakeRedis(server=fleet.server)
    signer = Signer(KEY, "nfknock")
    for entry_id, fields in attacker.xrange("nfknock:stream"):
        if isinstance(signer.verify(fields[b"e"]), Revoke):
            attacker.xdel("nfknock:stream", entry_id)
    attacker.delete("nfknock:revoked")
    c = fleet("c")
    end = time.monotonic() + 3.5  # past c's settling (REASSERT + its margin, then a read)
    while time.monotonic() < end:
        a.step()
        assert not opens(c)
        time.sleep(0.02)
    c.until(
        lambda _: c.fleet.link.settled and any(r.src == ALICE for r in c.fleet.revocations.entries.values()), "kept"
    )
    assert not opens(c)
    knock(a)  # a new grant, issued after the revocation: applied at once
    c.until(lambda _: opens(c), "the new grant")


def test_a_member_of_an_older_version_is_an_alarm_naming_it(fleet, monkeypatch):
    """Members before protocol 2 ignore the revocations' order: mixing is said at error, in
    status (and the metrics' alarm), naming the old member, until it is gone."""
    monkeypatch.setattr(link_module, "HEARTBEAT", 0.2)
    a = fleet("a")
    attacker = fakeredis.FakeRedis(server=fleet.server)
    old = Signer(KEY, "nfknock")._seal(
        "presence", {"member": "oldie", "instance": "0ld", "seen": time.time(), "grants": 0}
    )
    attacker.hset("nfknock:members", "0ld", old)
    a.until(lambda _: "version" in a.fleet.alarms, "the alarm")
    assert "oldie" in a.fleet.status(a.now, time.time())["alarms"]["version"]
    attacker.hdel("nfknock:members", "0ld")
    a.until(lambda _: "version" not in a.fleet.alarms, "the alarm cleared")


def test_the_second_copy_is_verified_again_only_where_it_changed(fleet, monkeypatch):
    """Checked every REASSERT seconds, the revocations' hash (up to a day of the fleet's
    revocations) costs one HMAC per entry once, not at every check; a copy changed in Redis is
    verified again (and, forged, rejected and removed)."""
    a = fleet("a")
    for n in range(20):
        revoke(a, address=f"10.0.0.{n + 1}")
    placed(a)
    a.until(lambda _: len(a.fleet.link._checked) == 20, "read its copies back")
    verified = []
    real = Signer.verify

    def counting(self, raw):
        verified.append(raw)
        return real(self, raw)

    monkeypatch.setattr(Signer, "verify", counting)
    settle(a, 0.7)  # three checks (REASSERT 0.2 here)
    assert verified == []
    attacker = fakeredis.FakeRedis(server=fleet.server)
    name = next(iter(attacker.hkeys("nfknock:revoked")))
    attacker.hset("nfknock:revoked", name, b"forged")
    a.until(lambda _: verified, "verified the changed copy")
    a.until(lambda _: attacker.hget("nfknock:revoked", name) != b"forged", "put its own back")
