"""Used records on the fleet's stream (fleet/used.py, issue 23), without a kernel: a packet used on
one member is refused on another even when its claim was deleted from Redis by hand, the store
survives a restart and is bounded, entries are numbered so that a deletion from the stream is
seen, and a member puts back its claims that someone deleted."""

import logging
import time

import fakeredis
import pytest
import test_fleet
from test_fleet import ALICE, KEY, Member, packet

from nfknock.doors.events import DoorOpened, SpaRefused
from nfknock.doors.spa import encode
from nfknock.fleet import used as used_module
from nfknock.fleet.records import Forged, Signer, Used
from nfknock.fleet.used import UsedElsewhere

LOG = logging.getLogger("test-fleet-used")
spa_door = test_fleet.spa_door  # the fixture: an SPA door with fresh keys
WALL = 1_800_000_000.0


def names(signer, record="a-packet"):
    return tuple(signer.claim_names(record))


@pytest.fixture
def fleet(tmp_path):
    server = fakeredis.FakeServer()
    members = []

    def make(name, doors, offline="accept", state=True):
        member = Member(server, name, doors, offline)
        if state:  # a state directory of its own, as --state-dir gives
            fleet_member = member.fleet
            directory = tmp_path / name / used_module.SUBDIR
            fleet_member.used = UsedElsewhere(fleet_member.signer, LOG, directory)
        member.fleet.start()
        members.append(member)
        member.until(lambda _: member.fleet.link.connected, "connected")
        return member

    make.server = server
    yield make
    for member in members:
        member.fleet.stop()


def redis(fleet):
    return fakeredis.FakeRedis(server=fleet.server)


def spa(door, wall=None):
    return packet(62201, proto="udp", payload=encode(door.keyring[0].keys, ALICE, [("tcp", 22)], wall or time.time()))


def used_once(a, b, door):
    """a accepts a packet; b has read its used entry (it comes before a's grant)."""
    pkt = spa(door)
    a.handle(pkt)
    opened = a.until(lambda result: result[0], "got the claim's answer")[0]
    assert isinstance(opened[0], DoorOpened)
    a.fleet.on_events(opened, a.now, time.time())  # as the daemon does: the grant is published
    b.until(lambda _: len(b.fleet.used) == 1, "read the used entry")
    return pkt


def refused(member, pkt):
    _, follow = member.handle(pkt)
    events = follow or member.until(lambda result: result[0], "answered")[0]
    return [(e.reason, e.detail) for e in events if isinstance(e, SpaRefused)]


# -- records ---------------------------------------------------------------------------------


def test_used_entries_name_the_claim_never_the_record_and_verify_only_with_the_key():
    signer = Signer(KEY, "nfknock")
    entry = Used("u1", "a", "i1", names(signer), WALL + 120)
    raw = signer.sign(entry)
    assert signer.verify(raw) == entry and b"a-packet" not in raw
    with pytest.raises(Forged):
        Signer(b"f" * 32, "nfknock").verify(raw)
    other_fleet = Signer(KEY, "other")
    with pytest.raises(Forged, match="not a claim name of this fleet"):
        signer.verify(signer.sign(Used("u1", "a", "i1", names(other_fleet), WALL)))


def test_sequence_numbers_are_bound_to_their_entry_and_instance():
    signer = Signer(KEY, "nfknock")
    raw = signer.sign_seq("i1", 7, "entry-1")
    assert signer.verify_seq(raw, "entry-1") == ("i1", 7)
    with pytest.raises(Forged, match="another entry"):
        signer.verify_seq(raw, "entry-2")
    with pytest.raises(Forged):
        Signer(b"f" * 32, "nfknock").verify_seq(raw, "entry-1")


# -- the store -------------------------------------------------------------------------------


def test_the_store_refuses_until_expiry_plus_margin_and_survives_a_restart(tmp_path):
    signer = Signer(KEY, "nfknock")
    store = UsedElsewhere(signer, LOG, tmp_path / "fleet-used")
    assert store.add(Used("u1", "a", "i1", names(signer), WALL + 120), WALL)
    assert not store.add(Used("u1", "a", "i1", names(signer), WALL + 120), WALL)  # applied once
    assert store.holder(list(names(signer)), WALL) == "a"
    assert store.holder(list(names(signer, "another")), WALL) is None
    store.flush()
    again = UsedElsewhere(signer, LOG, tmp_path / "fleet-used")
    assert again.load(WALL + 150) == 1 and again.holder(list(names(signer)), WALL + 150) == "a"
    assert again.holder(list(names(signer)), WALL + 120 + used_module.CLAIM_MARGIN + 1) is None
    assert again.sweep(WALL + 200) == 1
    again.flush()
    assert UsedElsewhere(signer, LOG, tmp_path / "fleet-used").load(WALL) == 0  # swept from the disk too


def test_a_file_changed_by_hand_is_ignored(tmp_path, caplog):
    signer = Signer(KEY, "nfknock")
    store = UsedElsewhere(signer, LOG, tmp_path / "fleet-used")
    store.add(Used("u1", "a", "i1", names(signer), WALL + 120), WALL)
    store.flush()
    (path,) = (tmp_path / "fleet-used").iterdir()
    path.write_bytes(path.read_bytes().replace(b'"a"', b'"z"'))
    assert UsedElsewhere(signer, LOG, tmp_path / "fleet-used").load(WALL) == 0
    assert "not used records signed with the fleet key" in caplog.text


def test_the_store_is_bounded_against_a_flood(monkeypatch, caplog):
    monkeypatch.setattr(used_module, "MAX_USED", 3)
    signer = Signer(KEY, "nfknock")
    store = UsedElsewhere(signer, LOG)
    for n in range(5):
        store.add(Used(f"u{n}", "a", "i1", names(signer, f"r{n}"), WALL + 100 + n), WALL)
    assert len(store) == 3 and store.dropped == 2
    assert store.holder(list(names(signer, "r0")), WALL) is None  # the ones that end first went
    assert store.holder(list(names(signer, "r4")), WALL) == "a"
    assert "a member floods the stream" in caplog.text
    far = Used("far", "a", "i1", names(signer, "far"), WALL + 10 * 86400)
    store.add(far, WALL)
    assert store.holder(list(names(signer, "far")), WALL + 86400 + used_module.CLAIM_MARGIN + 1) is None


# -- members ---------------------------------------------------------------------------------


def test_a_claim_deleted_by_hand_leaves_the_packet_a_replay_on_another_member(fleet, spa_door):
    a, b = fleet("a", (spa_door,)), fleet("b", (spa_door,))
    pkt = used_once(a, b, spa_door)
    client = redis(fleet)
    claims = list(client.scan_iter("nfknock:used:*"))
    assert claims and client.delete(*claims) == len(claims)  # someone with the Redis password
    assert refused(b, pkt) == [("replay", "used on member a")]
    assert b.fleet.status(b.now, time.time())["used_elsewhere"] == 1


def test_a_member_puts_back_its_claims_that_were_deleted_and_says_so(fleet, spa_door):
    a, b = fleet("a", (spa_door,)), fleet("b", (spa_door,))
    used_once(a, b, spa_door)
    client = redis(fleet)
    claims = sorted(client.scan_iter("nfknock:used:*"))
    client.delete(*claims)
    a.until(lambda _: "claims deleted" in a.fleet.alarms, "noticed")
    assert sorted(client.scan_iter("nfknock:used:*")) == claims
    assert "before their time" in a.fleet.alarms["claims deleted"]


def test_a_members_entries_are_numbered_one_after_the_other(fleet, spa_door):
    a, b = fleet("a", (spa_door,)), fleet("b", (spa_door,))
    used_once(a, b, spa_door)  # a's used entry, then its grant
    a.until(lambda _: len(redis(fleet).xrange("nfknock:stream")) == 2, "published the grant")
    signer = Signer(KEY, "nfknock")
    numbers = []
    for _, fields in redis(fleet).xrange("nfknock:stream"):
        entry = signer.verify(fields[b"e"])
        numbers.append(signer.verify_seq(fields[b"n"], entry.id))
    assert [type(signer.verify(f[b"e"])).__name__ for _, f in redis(fleet).xrange("nfknock:stream")] == [
        "Used",
        "Grant",
    ]
    assert numbers == [(a.fleet.instance, 1), (a.fleet.instance, 2)]


def test_a_deleted_stream_entry_is_seen_as_a_skipped_number(fleet, spa_door):
    signer = Signer(KEY, "nfknock")
    client = redis(fleet)
    for seq in (1, 3):  # a's second entry was deleted (XDEL) before c read the stream
        entry = Used(f"u{seq}", "a", "ia", names(signer, f"r{seq}"), time.time() + 120)
        client.xadd("nfknock:stream", {"e": signer.sign(entry), "n": signer.sign_seq("ia", seq, entry.id)})
    c = fleet("c", (spa_door,), offline="refuse")
    c.until(lambda _: "stream gap" in c.fleet.alarms, "saw the skip")
    assert "1 stream entry of member a (numbers 2..2) missing" in c.fleet.alarms["stream gap"]
    ((reason, detail),) = refused(c, spa(spa_door))
    assert reason == "fleet unreachable" and "entries were deleted from the fleet's stream" in detail


def test_without_a_skip_nothing_is_alarmed_and_claims_are_asked(fleet, spa_door):
    signer = Signer(KEY, "nfknock")
    client = redis(fleet)
    for seq in (4, 5):  # the first entries c sees of a: nothing to compare before them (trimmed)
        entry = Used(f"u{seq}", "a", "ia", names(signer, f"r{seq}"), time.time() + 120)
        client.xadd("nfknock:stream", {"e": signer.sign(entry), "n": signer.sign_seq("ia", seq, entry.id)})
    c = fleet("c", (spa_door,), offline="refuse")
    c.until(lambda _: len(c.fleet.used) == 2, "read both")
    pkt = spa(spa_door)
    c.handle(pkt)
    assert isinstance(c.until(lambda result: result[0], "answered")[0][0], DoorOpened)
    assert "stream gap" not in c.fleet.alarms


def test_a_claim_another_member_held_that_ends_is_put_back_without_an_alarm(fleet, spa_door):
    """b is told of a record a claimed (a copy b refused after its HMAC): a's claim ending is no
    deletion; b puts its own in place, quietly."""
    a, b = fleet("a", (spa_door,)), fleet("b", (spa_door,))
    used_once(a, b, spa_door)
    client = redis(fleet)
    claims = sorted(client.scan_iter("nfknock:used:*"))
    (record,) = a.engine.replays.snapshot()
    b.fleet.link.record(record, time.time() + 120)
    a.until(lambda _: len(a.fleet.used) == 1, "read b's used entry")  # b's SET NX found a's claim
    a.fleet.stop()  # a puts back nothing now
    client.delete(*claims)  # as when a's claim ends before b's would
    b.until(lambda _: sorted(client.scan_iter("nfknock:used:*")) == claims, "put its claim in place")
    assert "claims deleted" not in b.fleet.alarms


def test_a_members_last_entries_deleted_are_seen_from_its_presence(fleet, spa_door, monkeypatch):
    """Nothing of a follows its deleted entries (no skip to see): its presence says the number
    of its last entry, and one still unread after LAGGING seconds is an alarm."""
    from nfknock.fleet import link

    monkeypatch.setattr(link, "LAGGING", 0.5)
    signer = Signer(KEY, "nfknock")
    client = redis(fleet)
    for seq in (1, 2):  # a appended 1..4; 3 and 4 were deleted (XDEL)
        entry = Used(f"u{seq}", "a", "ia", names(signer, f"r{seq}"), time.time() + 120)
        client.xadd("nfknock:stream", {"e": signer.sign(entry), "n": signer.sign_seq("ia", seq, entry.id)})
    client.hset("nfknock:members", "ia", signer.sign_presence("a", "ia", time.time() + 8, 0, 4))
    c = fleet("c", (spa_door,), offline="refuse")
    c.until(lambda _: "stream gap" in c.fleet.alarms, "saw the last entries missing")
    assert "the last 2 stream entries of member a (numbers 3..4)" in c.fleet.alarms["stream gap"]


def test_a_member_whose_last_entries_are_read_is_no_alarm(fleet, spa_door, monkeypatch):
    from nfknock.fleet import link

    monkeypatch.setattr(link, "LAGGING", 0.5)
    signer = Signer(KEY, "nfknock")
    client = redis(fleet)
    for seq in (1, 2):
        entry = Used(f"u{seq}", "a", "ia", names(signer, f"r{seq}"), time.time() + 120)
        client.xadd("nfknock:stream", {"e": signer.sign(entry), "n": signer.sign_seq("ia", seq, entry.id)})
    client.hset("nfknock:members", "ia", signer.sign_presence("a", "ia", time.time() + 8, 0, 2))
    c = fleet("c", (spa_door,), offline="refuse")
    c.until(lambda _: len(c.fleet.used) == 2, "read both")
    end = time.monotonic() + 5  # two heartbeats and more than LAGGING
    while time.monotonic() < end:
        c.step()
        time.sleep(0.05)
    assert "stream gap" not in c.fleet.alarms
