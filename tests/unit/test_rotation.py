"""Rotating sequences: derivation, and the engine accepting the current and previous window only,
each sequence once."""

import base64

import pytest

from nfknock.doors.engine import Verdict
from nfknock.doors.events import DoorOpened, SequenceReused
from nfknock.doors.first_steps import ROTATING_BIT
from nfknock.doors.packet import Packet
from nfknock.doors.rotation import derive, window_of
from nfknock.doors.rules import RotatingDoor
from nfknock.loading import load_secrets
from support.decisions import fresh_engine

SECRET = b"s" * 32
WALL = 1_800_000_000.0  # a multiple of 60: window 30,000,000 starts here


def test_derivation_is_deterministic_distinct_and_in_range():
    ports = derive(SECRET, "d", 42, 5, 20000, 20099)
    assert ports == derive(SECRET, "d", 42, 5, 20000, 20099)
    assert len(set(ports)) == 5 and all(20000 <= p <= 20099 for p in ports)
    assert ports != derive(SECRET, "d", 43, 5, 20000, 20099)
    assert ports != derive(SECRET, "e", 42, 5, 20000, 20099)
    assert ports != derive(b"t" * 32, "d", 42, 5, 20000, 20099)


def test_ports_spread_over_the_whole_range():
    seen = {p for index in range(400) for p in derive(SECRET, "d", index, 3, 1000, 1029)}
    assert seen == set(range(1000, 1030))


def test_window_of():
    assert window_of(WALL + 59.9, 60) == window_of(WALL, 60) == int(WALL // 60)


@pytest.fixture
def door(monkeypatch):
    monkeypatch.setenv("ROT_SECRET", base64.b64encode(SECRET).decode())
    door = RotatingDoor.model_validate(
        dict(
            name="rot",
            protect=["22/tcp"],
            seq_timeout="10s",
            rotate={"secret_env": "ROT_SECRET", "window": "60s", "ports": "20000-20999"},
        )
    )
    load_secrets(door)
    return door


def knock_all(engine, ports, at, src="10.0.0.2"):
    events = []
    for i, port in enumerate(ports):
        events += engine.handle(
            Packet(src, "10.0.0.1", "tcp", 1, port, 0x02), 100.0 + at + i * 0.1, WALL + at + i * 0.1
        ).events
    return events


def sequence(door, index):
    return derive(SECRET, "rot", index, 3, 20000, 20999)


def test_current_window_opens_once(door):
    engine = fresh_engine((door,))
    ports = sequence(door, window_of(WALL, 60))
    assert isinstance(knock_all(engine, ports, 1)[-1], DoorOpened)
    assert engine.handle(Packet("10.0.0.2", "10.0.0.1", "tcp", 1, 22, 0x02), 102.0).verdict is Verdict.ACCEPT
    again = knock_all(engine, ports, 5, src="10.0.0.3")  # a sniffed copy, same window
    assert again[-1] == SequenceReused("10.0.0.3", "rot")
    assert engine.handle(Packet("10.0.0.3", "10.0.0.1", "tcp", 1, 22, 0x02), 106.0).verdict is Verdict.DROP


def test_a_used_sequence_stays_used_after_a_restart(door):
    """The record of used sequences goes with the replay cache the daemon keeps on disk."""
    engine = fresh_engine((door,))
    ports = sequence(door, window_of(WALL, 60))
    assert isinstance(knock_all(engine, ports, 1)[-1], DoorOpened)
    restarted = fresh_engine((door,))
    restarted.restore_replays(engine.replays.snapshot(), WALL + 2)
    assert knock_all(restarted, ports, 3, src="10.0.0.3")[-1] == SequenceReused("10.0.0.3", "rot")
    # Records end once the window can no longer be used: the cache stays bounded.
    after = fresh_engine((door,))
    after.restore_replays(engine.replays.snapshot(), (window_of(WALL, 60) + 2) * 60 + 1)
    assert len(after.replays) == 0


def test_previous_window_still_opens_older_ones_do_not(door):
    engine = fresh_engine((door,))
    previous = sequence(door, window_of(WALL, 60) - 1)
    assert isinstance(knock_all(engine, previous, 1)[-1], DoorOpened)
    yesterday = sequence(door, window_of(WALL - 86400, 60))
    assert not any(isinstance(e, DoorOpened) for e in knock_all(engine, yesterday, 2, src="10.0.0.4"))


def test_next_window_brings_a_fresh_sequence(door):
    engine = fresh_engine((door,))
    knock_all(engine, sequence(door, window_of(WALL, 60)), 1)
    later = sequence(door, window_of(WALL, 60) + 1)
    assert isinstance(knock_all(engine, later, 61)[-1], DoorOpened)


@pytest.mark.parametrize(
    "rotate,message",
    [
        ({"secret_env": "ROT_SECRET", "ports": "20000-20010"}, "too small"),
        ({"secret_env": "ROT_SECRET", "ports": "2-1"}, "not a range"),
        ({"secret_env": "NOT_SET_ANYWHERE"}, "is not set"),
        ({"secret_file": "/nonexistent/rot.key"}, "cannot read"),
        ({"secret_env": "ROT_SECRET", "secret_file": "/x"}, "exactly one"),
    ],
)
def test_bad_rotation_settings(door, rotate, message):
    with pytest.raises(ValueError, match=message):
        load_secrets(RotatingDoor.model_validate(dict(name="rot", protect=["22/tcp"], rotate=rotate)))


def test_protected_port_inside_the_range_is_refused(door):
    with pytest.raises(ValueError, match="inside the rotating range"):
        RotatingDoor.model_validate(
            dict(name="rot", protect=["20500/tcp"], rotate={"secret_env": "ROT_SECRET", "ports": "20000-20999"})
        )


def test_the_kernel_gets_the_steps_of_the_windows_that_open_the_door_now_and_next(door):
    """rotation.kernel_ports (later_steps.py): every step of the previous, current and next window,
    each until its window stops opening the door (the end of the window after it)."""
    from nfknock.doors.rotation import kernel_ports

    at = WALL + 15  # 15 s into window w
    w = window_of(at, 60)
    ports = kernel_ports(door.rotate, "rot", at)
    for index, left in ((w - 1, 45), (w, 105), (w + 1, 165)):
        for port in derive(SECRET, "rot", index, 3, 20000, 20999):
            assert ports[port] >= left + 2  # with its margin (a port in two windows keeps the later end)
    assert len(ports) <= 9 and max(ports.values()) == 165 + 2
    # a sequence the engine no longer accepts (two windows back) is not there
    accepted = {p for i in (w - 1, w, w + 1) for p in derive(SECRET, "rot", i, 3, 20000, 20999)}
    assert set(ports) == accepted
    assert not (set(derive(SECRET, "rot", w - 2, 3, 20000, 20999)) - accepted) & set(ports)


# -- first steps the kernel records (later_steps.py rotating_first_steps) -----------------------

ROTATING = 1 << ROTATING_BIT  # Packet.first_seen as verdicts.py reads the rotating mark


def knock_at(engine, port, at, src="10.0.0.2", seen=0):
    return engine.handle(Packet(src, "10.0.0.1", "tcp", 1, port, 0x02, first_seen=seen), 100.0 + at, WALL + at).events


def test_a_second_step_the_kernel_marked_counts_the_first_step_as_done(door):
    """The kernel recorded the first step and never queued it: the marked second step and the
    third open the door, as the client's three knocks did."""
    engine = fresh_engine((door,))
    first, second, third = sequence(door, window_of(WALL, 60))
    knock_at(engine, second, 1, seen=ROTATING)
    assert isinstance(knock_at(engine, third, 1.1)[-1], DoorOpened)


def test_a_second_step_without_the_mark_opens_nothing(door):
    """A source that did only the second and third steps (its first was never recorded)."""
    engine = fresh_engine((door,))
    _, second, third = sequence(door, window_of(WALL, 60))
    knock_at(engine, second, 1)
    assert not any(isinstance(e, DoorOpened) for e in knock_at(engine, third, 1.1))
    # nor does a mark of a knock door's group (bits 0..MARK_BITS-1)
    knock_at(engine, second, 2, src="10.0.0.3", seen=(1 << ROTATING_BIT) - 1)
    assert not any(isinstance(e, DoorOpened) for e in knock_at(engine, third, 2.1, src="10.0.0.3"))


def test_the_mark_counts_only_on_a_second_step(door):
    engine = fresh_engine((door,))
    first, second, third = sequence(door, window_of(WALL, 60))
    knock_at(engine, third, 1, seen=ROTATING)  # marked, but not a second step: no attempt
    assert not any(isinstance(e, DoorOpened) for e in knock_at(engine, third, 1.1))


def test_a_first_step_recorded_in_the_last_moment_of_a_window_goes_on_in_the_next(door):
    """The kernel's first step of window w, the second and third arriving in window w + 1: the
    engine still accepts window w's sequence (the previous window), so the marked second step
    of w counts."""
    engine = fresh_engine((door,))
    w = window_of(WALL, 60)
    _, second, third = sequence(door, w)
    knock_at(engine, second, 60.2, seen=ROTATING)  # w + 1 began at 60
    assert isinstance(knock_at(engine, third, 60.3)[-1], DoorOpened)


def test_a_rotating_door_sharing_its_range_takes_no_mark(door, monkeypatch):
    """Two doors of one range: the kernel queues their steps for everyone and marks nothing, so
    a mark (another rule's) is not read as a first step (later_steps.rotating_first_steps)."""
    other = RotatingDoor.model_validate(
        dict(name="rot2", protect=["23/tcp"], rotate={"secret_env": "ROT_SECRET", "ports": "20000-20999"})
    )
    load_secrets(other)
    engine = fresh_engine((door, other))
    _, second, third = sequence(door, window_of(WALL, 60))
    knock_at(engine, second, 1, seen=ROTATING)
    assert not any(isinstance(e, DoorOpened) for e in knock_at(engine, third, 1.1))
    # the daemon still sees first steps itself there
    assert isinstance(knock_all(engine, sequence(door, window_of(WALL, 60)), 2, src="10.0.0.5")[-1], DoorOpened)
