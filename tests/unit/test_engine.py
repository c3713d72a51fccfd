"""Engine behaviour with time written into each test (no sleeps, no I/O)."""

import pytest

from nfknock.doors.engine import Verdict
from nfknock.doors.events import (
    ConnectionAccepted,
    ConnectionRefused,
    DoorClosed,
    DoorOpened,
    GrantExpired,
    KnockAdvanced,
    LockedOut,
    LockReleased,
    Sequence,
    SequenceReset,
    SequenceTimeout,
)
from nfknock.doors.packet import Packet
from nfknock.doors.rules import KnockDoor
from support.decisions import fresh as decided
from support.decisions import fresh_engine

ALICE, BOB = "10.0.0.2", "10.0.0.3"
SYN, SYNACK, ACK = 0x02, 0x12, 0x10


def seed(**overrides):
    fields = dict(
        name="openSSH",
        sequence=[40000, 50000, 60000],
        close_sequence=[60000, 50000, 40000],
        protect=["22/tcp"],
        seq_timeout="10s",
        open_for="30s",
    )
    fields.update(overrides)
    return KnockDoor.model_validate(fields)


def knock(port, src=ALICE, proto="tcp", flags=SYN):
    return Packet(src=src, dst="10.0.0.1", proto=proto, sport=33333, dport=port, flags=flags if proto == "tcp" else 0)


def ssh(src=ALICE):
    return knock(22, src=src)


class Clock:
    def __init__(self, engine):
        self.engine, self.now = engine, 1000.0

    def send(self, *ports, src=ALICE, proto="tcp", flags=SYN, gap=0.1):
        events = []
        for port in ports:
            self.now += gap
            decision = self.engine.handle(knock(port, src, proto, flags), self.now)
            events.extend(decision.events)
        return events

    def connect(self, src=ALICE):
        self.now += 0.01
        return self.engine.handle(ssh(src), self.now)


@pytest.fixture
def clock():
    return Clock(fresh_engine((seed(),)))


def test_protected_port_is_dropped_before_any_knock(clock):
    decision = clock.connect()
    assert decision.verdict is Verdict.DROP
    assert decision.events == (ConnectionRefused(ALICE, "22/tcp"),)


def test_seed_sequence_opens_for_the_knocker_only(clock):
    events = clock.send(40000, 50000, 60000)
    assert [type(e) for e in events] == [KnockAdvanced, KnockAdvanced, DoorOpened]
    assert [e.stage for e in events[:2]] == [1, 2]
    decision = clock.connect()
    assert decision.verdict is Verdict.ACCEPT
    assert decision.events == (ConnectionAccepted(ALICE, "openSSH", "22/tcp"),)
    assert clock.connect(src=BOB).verdict is Verdict.DROP


def test_knock_packets_are_always_dropped(clock):
    for port in (40000, 50000, 60000, 60000, 50000, 40000):
        clock.now += 0.1
        assert clock.engine.handle(knock(port), clock.now).verdict is Verdict.DROP


def test_last_open_step_does_not_start_the_close_sequence(clock):
    clock.send(40000, 50000, 60000)
    assert clock.engine.tracked == 0


def test_reverse_sequence_closes(clock):
    clock.send(40000, 50000, 60000)
    events = clock.send(60000, 50000, 40000)
    assert events[-1] == DoorClosed(ALICE, "openSSH", was_open=True)
    assert [e.sequence for e in events[:-1]] == [Sequence.CLOSE, Sequence.CLOSE]
    assert clock.connect().verdict is Verdict.DROP


def test_close_without_grant_is_reported_as_such(clock):
    events = clock.send(60000, 50000, 40000)
    assert events[-1] == DoorClosed(ALICE, "openSSH", was_open=False)


def test_wrong_port_of_the_door_resets(clock):
    events = clock.send(40000, 60000, 50000, 60000)
    assert SequenceReset(ALICE, "openSSH", Sequence.OPEN, 1, "60000/tcp") in events
    assert not any(isinstance(e, DoorOpened) for e in events)
    assert clock.connect().verdict is Verdict.DROP


def test_first_step_restarts_at_once(clock):
    # 40000 50000 (stray) 40000 50000 60000: the second 40000 begins a new attempt.
    events = clock.send(40000, 50000, 40000, 50000, 60000)
    assert isinstance(events[-1], DoorOpened)
    assert clock.connect().verdict is Verdict.ACCEPT


def test_duplicated_knocks_are_tolerated(clock):
    events = clock.send(40000, 40000, 50000, 50000, 60000)
    assert not any(isinstance(e, SequenceReset) for e in events)
    assert isinstance(events[-1], DoorOpened)


def test_knocks_of_two_sources_do_not_mix(clock):
    clock.send(40000, src=ALICE)
    clock.send(50000, src=BOB)  # resets nothing of Alice's
    events = clock.send(50000, 60000, src=ALICE)
    assert isinstance(events[-1], DoorOpened)
    assert clock.connect(src=BOB).verdict is Verdict.DROP


def test_unrelated_port_is_dropped_without_touching_state(clock):
    clock.send(40000)
    decision = clock.engine.handle(knock(12345), clock.now)
    assert decision.verdict is Verdict.DROP and decision.events == ()
    assert isinstance(clock.send(50000, 60000)[-1], DoorOpened)


def test_sequence_timeout_counts_from_the_first_knock(clock):
    clock.send(40000, 50000, gap=4.0)  # first knock at +4, second at +8
    clock.now += 6.0  # +14: 10 s after the first knock
    events = clock.send(60000, gap=0)
    assert events[0] == SequenceTimeout(ALICE, "openSSH", Sequence.OPEN, 2)
    assert clock.connect().verdict is Verdict.DROP


def test_expire_reports_timeouts_and_forgets_them(clock):
    clock.send(40000)
    assert clock.engine.next_deadline() == pytest.approx(clock.now + 10)
    assert clock.engine.expire(clock.now + 9.9) == []
    assert clock.engine.expire(clock.now + 10) == [SequenceTimeout(ALICE, "openSSH", Sequence.OPEN, 1)]
    assert clock.engine.tracked == 0 and clock.engine.next_deadline() is None


def test_grant_expires_after_open_for(clock):
    clock.send(40000, 50000, 60000)
    opened = clock.now
    clock.now = opened + 29.9
    assert clock.connect().verdict is Verdict.ACCEPT
    assert clock.engine.expire(opened + 30) == [GrantExpired(ALICE, "openSSH")]
    clock.now = opened + 30
    assert clock.connect().verdict is Verdict.DROP


def test_expired_grant_refuses_even_before_expire_runs(clock):
    clock.send(40000, 50000, 60000)
    clock.now += 31
    assert clock.connect().verdict is Verdict.DROP


def test_knocking_again_extends_the_grant(clock):
    clock.send(40000, 50000, 60000)
    clock.now += 20
    clock.send(40000, 50000, 60000)
    clock.now += 20
    assert clock.connect().verdict is Verdict.ACCEPT
    assert len(clock.engine.grants(clock.now)) == 1


def test_tcp_knock_without_syn_is_ignored_not_reset(clock):
    clock.send(40000, 50000)
    assert clock.send(40000, flags=ACK) == []
    assert clock.send(60000, flags=SYNACK) == []
    assert isinstance(clock.send(60000)[-1], DoorOpened)


def test_udp_steps_need_udp_packets():
    clock = Clock(fresh_engine((seed(sequence=["1000/udp", "2000/tcp", "3000/udp"], close_sequence=None),)))
    assert clock.send(1000, proto="tcp") == []  # 1000/tcp is not a port of this door
    clock.send(1000, proto="udp")
    clock.send(2000, proto="tcp")
    assert isinstance(clock.send(3000, proto="udp")[-1], DoorOpened)


def test_sources_limit_who_may_knock():
    clock = Clock(fresh_engine((seed(sources=["10.0.0.0/30"]),)))
    assert clock.send(40000, 50000, 60000, src="10.0.0.9") == []
    assert clock.connect(src="10.0.0.9").verdict is Verdict.DROP
    assert isinstance(clock.send(40000, 50000, 60000, src=ALICE)[-1], DoorOpened)


def test_two_doors_sharing_ports_progress_independently():
    a = seed(name="a", sequence=[1000, 2000], close_sequence=None, protect=["22/tcp"])
    b = seed(name="b", sequence=[2000, 1000], close_sequence=None, protect=["80/tcp"])
    clock = Clock(fresh_engine((a, b)))
    events = clock.send(1000, 2000)
    assert DoorOpened(ALICE, "a", clock.now + 30) in events
    assert not any(isinstance(e, DoorOpened) and e.door == "b" for e in events)
    assert clock.engine.handle(knock(80), clock.now).verdict is Verdict.DROP
    assert clock.connect().verdict is Verdict.ACCEPT


def test_attempts_are_bounded_and_the_oldest_goes():
    clock = Clock(fresh_engine((seed(),), max_sources=3))
    for i in range(5):
        clock.send(40000, src=f"10.1.0.{i}")
    assert clock.engine.tracked == 3
    assert clock.engine.evicted == 2
    evicted_source = clock.send(50000, 60000, src="10.1.0.0")  # its 40000 was forgotten
    assert not any(isinstance(e, DoorOpened) for e in evicted_source)
    assert isinstance(clock.send(50000, 60000, src="10.1.0.4")[-1], DoorOpened)


def test_spoofed_first_knocks_do_not_evict_grants():
    clock = Clock(fresh_engine((seed(),), max_sources=10))
    clock.send(40000, 50000, 60000)
    for i in range(1000):
        clock.send(40000, src=f"10.2.{i // 250}.{i % 250}", gap=0.001)
    assert clock.connect().verdict is Verdict.ACCEPT
    assert clock.engine.tracked == 10


def both(doors):
    """(doors, their first steps): what Engine.reload takes."""
    return doors, decided(doors)


def test_reload_keeps_state_of_unchanged_doors_only():
    keep, change = seed(name="keep"), seed(name="change", sequence=[1, 2], close_sequence=None, protect=["80/tcp"])
    clock = Clock(fresh_engine((keep, change)))
    clock.send(40000, 50000, 60000)
    clock.send(1, 2)
    dropped = clock.engine.reload(*both((keep, change.model_copy(update={"open_for": 5.0}))))
    assert dropped == ["change"]
    assert clock.connect().verdict is Verdict.ACCEPT
    assert clock.engine.handle(knock(80), clock.now).verdict is Verdict.DROP


def test_reload_that_removes_a_door_forgets_its_grants(clock):
    clock.send(40000, 50000, 60000)
    other = seed(name="other", sequence=[1, 2], close_sequence=None, protect=["80/tcp"])
    assert clock.engine.reload(*both((other,))) == ["openSSH"]
    assert clock.connect().verdict is Verdict.DROP
    assert clock.engine.grants(clock.now) == []


# -- tripwires and lockout -------------------------------------------------------------


def test_tripwire_resets_and_the_packet_is_passed_on(clock):
    clock.send(40000, 50000)
    clock.now += 0.1
    decision = clock.engine.handle(knock(50001), clock.now)
    assert decision.verdict is Verdict.PASS
    assert decision.events == (SequenceReset(ALICE, "openSSH", Sequence.OPEN, 2, "50001/tcp"),)
    assert not any(isinstance(e, DoorOpened) for e in clock.send(60000))


def test_ports_beyond_the_tripwire_are_not_ours(clock):
    assert clock.engine.handle(knock(40017), clock.now).verdict is Verdict.DROP
    assert clock.engine.handle(knock(40016), clock.now).verdict is Verdict.PASS


def test_ascending_and_descending_walks_never_open(clock):
    for ports in (range(39000, 61001), range(61000, 38999, -1)):
        events = clock.send(*ports, src=BOB, gap=0.0001)
        assert not any(isinstance(e, DoorOpened) for e in events)
        assert clock.connect(src=BOB).verdict is Verdict.DROP


def test_a_random_scan_of_every_port_opens_nothing():
    import random

    rng = random.Random(7)
    clock = Clock(fresh_engine((seed(),)))
    for trial in range(20):
        ports = list(range(1, 65536))
        rng.shuffle(ports)
        src = f"10.9.0.{trial}"
        events = clock.send(*ports, src=src, gap=0.00001)
        assert not any(isinstance(e, DoorOpened) for e in events)
        assert clock.connect(src=src).verdict is Verdict.DROP


def test_failures_lock_the_source_out_and_the_lock_ends():
    clock = Clock(fresh_engine((seed(lockout={"failures": 3, "window": "60s", "lock_for": "5m"}),)))
    clock.send(40000, 40001, 40000, 40002)  # two tripwire hits: two failures
    events = clock.send(39990)
    locked = [e for e in events if isinstance(e, LockedOut)]
    assert locked == [LockedOut(ALICE, "openSSH", 3, clock.now + 300)]
    assert clock.send(40000, 50000, 60000) == []  # ignored while locked
    assert clock.connect().verdict is Verdict.DROP
    assert isinstance(clock.send(40000, 50000, 60000, src=BOB)[-1], DoorOpened)  # others unaffected
    released = clock.engine.expire(clock.now + 301)
    assert LockReleased(ALICE, "openSSH") in released
    clock.now += 301
    assert isinstance(clock.send(40000, 50000, 60000)[-1], DoorOpened)


def test_wrong_door_port_counts_as_a_failure_but_restarts_do_not():
    clock = Clock(fresh_engine((seed(close_sequence=None, lockout={"failures": 2}),)))
    clock.send(40000, 40000, 50000, 40000, 50000)  # duplicate and restart: no failure
    assert clock.engine.locked(clock.now) == []
    clock.send(40000, 60000, 40000, 60000)  # two resets
    assert [lock[:2] for lock in clock.engine.locked(clock.now)] == [("openSSH", ALICE)]


def test_failures_outside_the_window_do_not_add_up():
    clock = Clock(fresh_engine((seed(lockout={"failures": 2, "window": "10s"}),)))
    clock.send(40001)
    clock.now += 11
    clock.send(40001)
    assert clock.engine.locked(clock.now) == []


def test_a_locked_source_keeps_its_grant(clock):
    clock.send(40000, 50000, 60000)
    for port in range(40001, 40007):
        clock.send(port)
    assert clock.engine.locked(clock.now)
    assert clock.connect().verdict is Verdict.ACCEPT


def test_lockout_can_be_switched_off():
    clock = Clock(fresh_engine((seed(lockout=False),)))
    clock.send(*range(40001, 40016))
    assert clock.engine.locked(clock.now) == []
    assert isinstance(clock.send(40000, 50000, 60000)[-1], DoorOpened)


# -- SPA doors --------------------------------------------------------------------------

import base64  # noqa: E402

from nfknock.doors.events import SpaRefused  # noqa: E402
from nfknock.doors.rules import SpaDoor  # noqa: E402
from nfknock.doors.spa import Keys, encode, generate_keys  # noqa: E402
from nfknock.loading import load_secrets  # noqa: E402

WALL = 1_800_000_000.0


@pytest.fixture
def spa_door(tmp_path, monkeypatch):
    encryption, mac = generate_keys()
    monkeypatch.setenv("TESTSPA_KEY_BASE64", encryption)
    monkeypatch.setenv("TESTSPA_HMAC_KEY_BASE64", mac)
    door = SpaDoor.model_validate(
        dict(kind="spa", name="spaSSH", keys_env="TESTSPA", protect=["22/tcp", "2222/tcp"], lockout={"failures": 3})
    )
    load_secrets(door)
    return door


def spa_packet(door, src=ALICE, address=None, ports=(("tcp", 22),), at=WALL, keys=None):
    payload = encode(keys or door.keyring[0].keys, address or src, list(ports), at)
    return Packet(src, "10.0.0.1", "udp", 40000, 62201, 0, payload)


def refusals(decision):
    return [(e.reason, e.detail) for e in decision.events if isinstance(e, SpaRefused)]


def test_spa_packet_opens_the_requested_port_for_its_source(spa_door):
    engine = fresh_engine((spa_door,))
    decision = engine.handle(spa_packet(spa_door), 10.0, WALL + 1)
    assert decision.verdict is Verdict.DROP
    recorded, opened = decision.events
    assert opened == DoorOpened(ALICE, "spaSSH", 40.0, "default", 30.0)
    assert recorded.key in engine.replays and recorded.expires == WALL + 1 + 120
    assert engine.handle(knock(22), 11.0).verdict is Verdict.ACCEPT
    assert engine.handle(knock(2222), 11.0).verdict is Verdict.DROP  # not requested
    assert engine.handle(knock(22, src=BOB), 11.0).verdict is Verdict.DROP


def test_spa_replay_is_refused_also_after_a_restart(spa_door):
    engine = fresh_engine((spa_door,))
    packet = spa_packet(spa_door)
    engine.handle(packet, 10.0, WALL)
    assert refusals(engine.handle(packet, 11.0, WALL + 1))[0][0] == "replay"
    restarted = fresh_engine((spa_door,))
    restarted.restore_replays(engine.replays.snapshot(), WALL + 2)
    assert refusals(restarted.handle(packet, 0.0, WALL + 2))[0][0] == "replay"
    assert restarted.handle(knock(22), 1.0).verdict is Verdict.DROP


def test_a_packet_from_the_future_is_remembered_until_it_is_too_old(spa_door):
    """Refused now as 'from the future', it must not open the door once its time has come."""
    engine = fresh_engine((spa_door,))
    packet = spa_packet(spa_door, at=WALL + 500)
    assert refusals(engine.handle(packet, 10.0, WALL))[0][0] == "from the future"
    for i, later in enumerate((WALL + 400, WALL + 500, WALL + 619)):  # within max_age of its timestamp
        replayer = packet._replace(src=f"10.0.1.{i}")  # a captured copy, from anywhere
        assert refusals(engine.handle(replayer, 11.0, later))[0][0] == "replay"
    assert engine.handle(knock(22), 12.0).verdict is Verdict.DROP
    restarted = fresh_engine((spa_door,))
    restarted.restore_replays(engine.replays.snapshot(), WALL + 450)
    assert refusals(restarted.handle(packet, 0.0, WALL + 450))[0][0] == "replay"


@pytest.mark.parametrize("change", [dict(address="10.9.9.9"), dict(ports=(("tcp", 80),)), dict(keys="wrong key")])
def test_every_packet_that_passes_the_hmac_is_remembered(spa_door, change):
    if change.get("keys") == "wrong key":
        change["keys"] = Keys(b"k" * 32, spa_door.keyring[0].keys.hmac)
    engine = fresh_engine((spa_door,))
    packet = spa_packet(spa_door, **change)
    assert refusals(engine.handle(packet, 10.0, WALL))[0][0] != "replay"
    assert refusals(engine.handle(packet, 11.0, WALL + 1))[0][0] == "replay"


def test_a_forged_packet_is_not_remembered(spa_door):
    engine = fresh_engine((spa_door,))
    forged = spa_packet(spa_door, keys=Keys(spa_door.keyring[0].keys.encryption, b"h" * 64))
    engine.handle(forged, 10.0, WALL)
    assert len(engine.replays) == 0


@pytest.mark.parametrize(
    "change,reason",
    [
        (dict(at=WALL - 121), "too old"),
        (dict(at=WALL + 121), "from the future"),
        (dict(address="10.9.9.9"), "source mismatch"),
        (dict(ports=(("tcp", 80),)), "port not allowed"),
        (dict(keys="wrong hmac"), "bad hmac"),
        (dict(keys="wrong key"), "bad key"),
    ],
)
def test_every_spa_refusal_has_its_reason(spa_door, change, reason):
    if change.get("keys") == "wrong hmac":
        change["keys"] = Keys(spa_door.keyring[0].keys.encryption, b"h" * 64)
    elif change.get("keys") == "wrong key":
        change["keys"] = Keys(b"k" * 32, spa_door.keyring[0].keys.hmac)
    engine = fresh_engine((spa_door,))
    decision = engine.handle(spa_packet(spa_door, **change), 10.0, WALL)
    assert refusals(decision)[0][0] == reason
    for secret in (spa_door.keyring[0].keys.encryption, spa_door.keyring[0].keys.hmac):
        assert base64.b64encode(secret).decode() not in str(decision.events)
    assert engine.handle(knock(22), 11.0).verdict is Verdict.DROP


def test_trusting_the_inner_address_is_an_option(spa_door):
    trusting = spa_door.model_copy(update={"trust_inner_address": True})
    trusting._keyring = spa_door.keyring
    engine = fresh_engine((trusting,))
    engine.handle(spa_packet(trusting, address="0.0.0.0"), 10.0, WALL)
    assert engine.handle(knock(22), 11.0).verdict is Verdict.ACCEPT  # the grant still goes to the sender


def locked_out(events):
    return [e for e in events if isinstance(e, LockedOut)]


@pytest.mark.parametrize(
    "forged",
    [
        "junk",
        "short",
        "not ascii",
        "bad hmac",
        "replay",
        "too old",
    ],
)
def test_spa_packets_anyone_can_forge_never_lock_the_source_out(spa_door, forged):
    """UDP sources are free to forge: a stranger without the key sends junk, wrong sizes, bad
    HMACs, or copies of a packet it saw, in Alice's name. None of it counts: Alice still gets in."""
    engine = fresh_engine((spa_door,))
    seen = spa_packet(spa_door, src=BOB, address=BOB, at=WALL - 200)  # Bob's packet, used long ago
    engine.handle(seen, 0.0, WALL - 200)
    payloads = {
        "junk": b"junk" * 40,
        "short": b"x" * 10,
        "not ascii": bytes(range(256)),
        "bad hmac": spa_packet(spa_door, keys=Keys(spa_door.keyring[0].keys.encryption, b"h" * 64)).payload,
        "too old": seen.payload,  # its replay record is gone: refused as too old
    }
    if forged == "replay":
        recent = spa_packet(spa_door, src=BOB, address=BOB, at=WALL - 1)
        engine.handle(recent, 0.5, WALL - 1)
        payloads["replay"] = recent.payload
    events = []
    for i in range(10):  # more than the door's 3 failures
        decision = engine.handle(Packet(ALICE, "10.0.0.1", "udp", 1, 62201, 0, payloads[forged]), 1.0 + i, WALL + i)
        assert decision.verdict is Verdict.DROP
        events += decision.events
    assert [e for e in events if isinstance(e, SpaRefused)], "each forged packet is refused (and logged)"
    assert locked_out(events) == []
    assert opened_by(engine.handle(spa_packet(spa_door, at=WALL + 10), 12.0, WALL + 10))


def opened_by(decision):
    return [e for e in decision.events if isinstance(e, DoorOpened)]


@pytest.mark.parametrize(
    "change",
    [
        dict(ports=(("tcp", 80),)),  # a port the key may not open
        dict(address="10.9.9.9"),  # an inner address that is not the source
        dict(at="ahead"),  # a clock far ahead
    ],
)
def test_fresh_authenticated_spa_refusals_lock_the_source_out(spa_door, change):
    """Only a key holder makes a fresh packet that passes the HMAC: those refusals count."""
    engine = fresh_engine((spa_door,))
    events = []
    for i in range(3):
        at = WALL + 500 + i if change.get("at") == "ahead" else WALL + i
        packet = spa_packet(spa_door, **{**change, "at": at})
        events += engine.handle(packet, float(i), WALL + i).events
    assert [(e.src, e.door, e.failures) for e in locked_out(events)] == [(ALICE, "spaSSH", 3)]
    assert engine.handle(spa_packet(spa_door, at=WALL + 4), 4.0, WALL + 4).events == ()  # ignored while locked


def test_an_spa_packet_used_on_another_member_is_no_failure_of_its_sender(spa_door):
    """The fleet's 'taken' is a replay: a copy anyone could send from this source."""
    engine = fresh_engine((spa_door,), shared=True)
    events = []
    for i in range(5):
        decision = engine.handle(spa_packet(spa_door, at=WALL + i), float(i), WALL + i)
        claim = next(e for e in decision.events if type(e).__name__ == "ClaimNeeded")
        events += engine.claimed(claim, "taken", float(i))
    assert [e.reason for e in events if isinstance(e, SpaRefused)] == ["replay"] * 5
    assert locked_out(events) == []


def test_every_step_sent_three_times_opens_the_door(clock):
    """What `nfknock knock --repeat 3` sends: each step several times, back to back. The copies
    of 60000 after the door opened start the close sequence (60000 50000 40000), as a single
    60000 would: knockd's semantics; that attempt times out or closes."""
    events = clock.send(40000, 40000, 40000, 50000, 50000, 50000, 60000, 60000, 60000, gap=0.0001)
    assert [type(e) for e in events][:3] == [KnockAdvanced, KnockAdvanced, DoorOpened]
    assert clock.connect().verdict is Verdict.ACCEPT
    closing = clock.send(50000, 50000, 40000, 40000, gap=0.0001)  # 60000 already counted as its first step
    assert DoorClosed(ALICE, "openSSH", was_open=True) in closing


# -- SPA doors for a team: a key per person ------------------------------------------------

from nfknock.doors.events import GrantsRevoked  # noqa: E402
from nfknock.doors.rules import SpaKey  # noqa: E402

CAROL = "10.0.2.7"


def person(door, name, **settings):
    encryption, mac = generate_keys()
    spec = SpaKey.model_validate({"name": name, "env": "UNUSED", **settings})
    return door.resolve(spec, Keys(base64.b64decode(encryption), base64.b64decode(mac)))


def team_door(max_open_for="2m", **people):
    door = SpaDoor.model_validate(
        dict(kind="spa", name="team", keys_dir="/nonexistent", protect=["22/tcp", "80/tcp"], max_open_for=max_open_for)
    )
    door._keyring = tuple(person(door, name, **settings) for name, settings in (people or {"alice": {}}).items())
    return door


def key_of(door, name):
    return next(key for key in door.keyring if key.name == name)


def team_packet(door, name, src=ALICE, ports=(("tcp", 22),), at=WALL, user="root", timeout=None):
    payload = encode(key_of(door, name).keys, src, list(ports), at, user=user, client_timeout=timeout)
    return Packet(src, "10.0.0.1", "udp", 40000, 62201, 0, payload)


def opened(decision):
    return [e for e in decision.events if isinstance(e, DoorOpened)]


def test_each_person_opens_the_door_with_their_own_key_and_is_named():
    door = team_door(alice={}, bob={})
    engine = fresh_engine((door,))
    assert opened(engine.handle(team_packet(door, "alice"), 10.0, WALL)) == [
        DoorOpened(ALICE, "team", 40.0, "alice", 30.0)
    ]
    assert opened(engine.handle(team_packet(door, "bob", src=BOB), 10.0, WALL)) == [
        DoorOpened(BOB, "team", 40.0, "bob", 30.0)
    ]
    assert {(row.source, row.key) for row in engine.grant_rows(11.0)} == {(ALICE, "alice"), (BOB, "bob")}
    assert engine.handle(knock(22), 11.0).verdict is Verdict.ACCEPT
    assert engine.handle(knock(22, src=BOB), 11.0).verdict is Verdict.ACCEPT


@pytest.mark.parametrize(
    "settings,change,reason,detail",
    [
        (
            dict(expires="2027-01-31"),
            dict(at=1_801_353_600.0),  # 2027-01-31 00:00 UTC: expired from then on
            "key expired",
            "key carol expired on 2027-01-31 00:00 UTC",
        ),
        (
            dict(sources=["10.0.1.0/24"]),
            dict(src=CAROL),
            "source not allowed",
            "10.0.2.7 is not in key carol's sources (10.0.1.0/24)",
        ),
        (
            dict(username="carol"),
            dict(user="root"),
            "username mismatch",
            "key carol requires username 'carol', the packet has 'root'",
        ),
        (dict(ports=["22/tcp"]), dict(ports=(("tcp", 80),)), "port not allowed", "key carol may not open 80/tcp"),
    ],
)
def test_a_key_is_refused_with_a_reason_naming_it(settings, change, reason, detail):
    wall = change.pop("at", WALL)
    door = team_door(alice={}, carol=settings)
    engine = fresh_engine((door,))
    packet = team_packet(door, "carol", at=wall, **change)
    decision = engine.handle(packet, 10.0, wall)
    refused = [e for e in decision.events if isinstance(e, SpaRefused)]
    assert [(e.reason, e.detail, e.key) for e in refused] == [(reason, detail, "carol")]
    assert not opened(decision) and engine.grant_rows(10.0) == []
    # Recorded before it was refused: the same packet is a replay, even once the key is fixed.
    assert refusals(engine.handle(packet, 11.0, wall + 1))[0][0] == "replay"


def test_a_key_is_fine_before_its_expiry_and_with_its_username_from_its_network():
    door = team_door(carol=dict(expires="2027-01-31", username="carol", sources=["10.0.0.0/24"], ports=["22/tcp"]))
    engine = fresh_engine((door,))
    wall = 1_801_353_599.0  # 2027-01-30 23:59:59 UTC
    decision = engine.handle(team_packet(door, "carol", user="carol", at=wall), 10.0, wall)
    assert opened(decision)[0].key == "carol"


@pytest.mark.parametrize(
    "max_open_for,timeout,seconds",
    [
        ("2m", 5, 5.0),  # fwknop -f 5
        ("2m", 100000, 120.0),  # cut to the maximum
        ("2m", None, 30.0),  # no -f: open_for
        (None, 100000, 30.0),  # no max_open_for: open_for is the maximum
        (None, 5, 5.0),  # asking for less is always fine
    ],
)
def test_client_timeouts_up_to_max_open_for(max_open_for, timeout, seconds):
    door = team_door(max_open_for=max_open_for, alice={})
    engine = fresh_engine((door,))
    decision = engine.handle(team_packet(door, "alice", timeout=timeout), 10.0, WALL)
    assert opened(decision) == [DoorOpened(ALICE, "team", 10.0 + seconds, "alice", seconds)]
    assert engine.handle(knock(22), 10.0 + seconds - 0.01).verdict is Verdict.ACCEPT
    assert engine.handle(knock(22), 10.0 + seconds + 0.01).verdict is Verdict.DROP


def test_a_short_grant_expires_on_time_behind_longer_ones():
    door = team_door(alice={}, bob={})
    engine = fresh_engine((door,))
    engine.handle(team_packet(door, "alice", timeout=100), 10.0, WALL)
    engine.handle(team_packet(door, "bob", src=BOB, timeout=5), 11.0, WALL)
    assert engine.next_deadline() == 16.0
    assert engine.expire(16.0) == [GrantExpired(BOB, "team", "bob")]
    assert [row.source for row in engine.grant_rows(16.0)] == [ALICE]


def test_per_key_open_for_and_max_open_for():
    door = team_door(max_open_for=None, alice=dict(open_for="10s", max_open_for="1h"), bob={})
    engine = fresh_engine((door,))
    assert opened(engine.handle(team_packet(door, "alice"), 0.0, WALL))[0].seconds == 10.0
    assert opened(engine.handle(team_packet(door, "alice", timeout=7200), 0.0, WALL))[0].seconds == 3600.0
    assert opened(engine.handle(team_packet(door, "bob", src=BOB, timeout=7200), 0.0, WALL))[0].seconds == 30.0


def test_revoke_key_ends_that_persons_grants_only():
    door = team_door(alice={}, bob={})
    engine = fresh_engine((door,))
    engine.handle(team_packet(door, "alice"), 10.0, WALL)
    engine.handle(team_packet(door, "alice", src=CAROL), 10.0, WALL)  # alice from another host
    engine.handle(team_packet(door, "bob", src=BOB), 10.0, WALL)
    assert sorted(engine.revoke_key("alice")) == [("team", ALICE), ("team", CAROL)]
    assert engine.handle(knock(22), 11.0).verdict is Verdict.DROP
    assert engine.handle(knock(22, src=BOB), 11.0).verdict is Verdict.ACCEPT
    assert engine.revoke_key("alice") == []


def test_reload_without_a_key_ends_its_grants_and_keeps_everyone_elses():
    door = team_door(alice={}, bob={})
    engine = fresh_engine((door,))
    alice_packet = team_packet(door, "alice")
    engine.handle(alice_packet, 10.0, WALL)
    engine.handle(team_packet(door, "bob", src=BOB), 10.0, WALL)
    without_alice = door.model_copy()
    without_alice._keyring = (key_of(door, "bob"),)
    assert engine.reload(*both((without_alice,))) == []  # the door's state is kept
    assert engine.rekeyed == (GrantsRevoked("team", "alice", (ALICE,)),)
    assert engine.handle(knock(22), 11.0).verdict is Verdict.DROP
    assert engine.handle(knock(22, src=BOB), 11.0).verdict is Verdict.ACCEPT
    fresh = team_packet(door, "alice", at=WALL + 2)
    assert refusals(engine.handle(fresh, 12.0, WALL + 2))[0][0] == "bad hmac"
    assert opened(engine.handle(team_packet(door, "bob", src=BOB, at=WALL + 2), 12.0, WALL + 2))


def test_changing_a_door_setting_still_resets_it():
    door = team_door(alice={})
    engine = fresh_engine((door,))
    engine.handle(team_packet(door, "alice"), 10.0, WALL)
    longer = door.model_copy(update={"open_for": 60.0})
    longer._keyring = door.keyring
    assert engine.reload(*both((longer,))) == ["team"]
    assert engine.handle(knock(22), 11.0).verdict is Verdict.DROP


def test_a_door_with_no_keys_opens_for_nobody():
    door = team_door(alice={})
    door._keyring = ()
    decision = fresh_engine((door,)).handle(
        spa_packet(team_door(alice={}), src=ALICE, keys=Keys(b"k" * 32, b"h" * 64)), 1, WALL
    )
    assert refusals(decision) == [("bad hmac", "the door has no keys (its keys_dir is empty)")]


def test_a_gpg_packet_gets_its_own_refusal(spa_door):
    """fwknop's GPG mode strips 'hQ' and HMACs it back on; nfknock says why it refuses it."""
    import hashlib
    import hmac as hmac_module
    import os

    data = base64.b64encode(b"\x85\x02" + os.urandom(600)).decode().rstrip("=")[2:]
    key = spa_door.keyring[0].keys.hmac
    tag = base64.b64encode(hmac_module.new(key, ("hQ" + data).encode(), hashlib.sha256).digest()).decode().rstrip("=")
    packet = Packet(ALICE, "10.0.0.1", "udp", 40000, 62201, 0, (data + tag).encode())
    assert refusals(fresh_engine((spa_door,)).handle(packet, 1.0, WALL))[0][0] == "gpg"


def test_a_shared_claim_that_cannot_be_written_refuses_without_blaming_the_source(spa_door):
    """Workers: the replay record could not be written down for the others; closed, and the
    client is not counted a failure (it did nothing wrong)."""
    from nfknock.doors.events import ClaimNeeded

    engine = fresh_engine((spa_door,), shared=True)
    decision = engine.handle(spa_packet(spa_door), 10.0, WALL)
    (claim,) = [e for e in decision.events if isinstance(e, ClaimNeeded)]
    for _ in range(3):  # the door locks out after 3 failures
        follow = engine.claimed(claim, "unrecorded", 10.0, "cannot write to /x: No space left on device")
    assert [(e.reason, e.detail) for e in follow] == [
        ("replay record not written", "cannot write to /x: No space left on device")
    ]
    assert engine.locked(11.0) == []
    assert engine.handle(knock(22), 11.0).verdict is Verdict.DROP
    engine.claimed(claim, "ours", 12.0)
    assert engine.handle(knock(22), 12.0).verdict is Verdict.ACCEPT


def test_a_strangers_later_step_is_dropped_after_one_lookup(monkeypatch):
    """The lean path (engine._route_strangers): a source with no attempt at a port that is only
    a later step is dropped without an admission check; one with an attempt is judged in full."""
    from nfknock.doors import engine as engine_module

    door = seed(close_sequence=None, tripwire=0)
    engine = fresh_engine((door,))
    clock = Clock(engine)
    assert clock.send(40000, 50000, src=BOB)  # bob is mid-attempt
    judged = []
    original = engine_module._DoorState.admits
    monkeypatch.setattr(engine_module._DoorState, "admits", lambda self, *a: judged.append(a) or original(self, *a))
    assert engine.handle(knock(60000), clock.now) == (Verdict.DROP, ())
    assert judged == []  # alice: no attempt, nothing to judge
    assert any(isinstance(e, DoorOpened) for e in clock.send(60000, src=BOB)) and len(judged) == 1


def test_the_lean_path_leaves_first_steps_and_tripwires_to_the_full_path():
    engine = fresh_engine((seed(close_sequence=[60000, 50000, 40000], tripwire=4, lockout={"failures": 1}),))
    clock = Clock(engine)
    # 60000 also starts the close sequence: a stranger's knock there is a step like any other
    assert clock.send(60000) == [KnockAdvanced(ALICE, "openSSH", Sequence.CLOSE, 1)]
    # 60002 is a tripwire: the stranger's hit still counts against it
    assert [type(e) for e in clock.send(60002, src=BOB)] == [LockedOut]
