"""The rotating doors' current steps in the kernel (rotation_sets.py), with a fake ipset."""

import base64
import subprocess

import pytest

from nfknock.doors.rotation import derive, window_of
from nfknock.doors.rules import parse_door
from nfknock.errors import FirewallError
from nfknock.firewall.rotation_sets import RotationSets, create_rotation_sets, rotation_sets
from nfknock.loading import load_secrets
from support.decisions import fresh_plan

SECRET = b"s" * 32
WALL = 1_800_000_000.0  # a window starts here (60 s windows)


class FakeIpset:
    def __init__(self, returncode=0, listed=""):
        self.inputs: list[str] = []
        self.returncode, self.listed = returncode, listed

    def __call__(self, argv, input=None, **kwargs):
        if argv[1:] == ["list", "-t"]:
            return subprocess.CompletedProcess(argv, 0, self.listed, "")
        self.inputs.append(input)
        return subprocess.CompletedProcess(argv, self.returncode, "", "ipset v7.17: boom\n")


@pytest.fixture
def doors(monkeypatch):
    monkeypatch.setenv("ROT", base64.b64encode(SECRET).decode())
    door = parse_door(dict(name="rot", protect=["22/tcp"], rotate={"secret_env": "ROT", "ports": "20000-20999"}))
    load_secrets(door)
    return (door,)


def test_the_plan_names_one_set_per_gated_range_and_family(doors):
    assert rotation_sets(fresh_plan(doors, 0)) == {
        "nfknock-q0-rtcp20000-v4": (20000, 20999),
        "nfknock-q0-rtcp20000-v6": (20000, 20999),
        # the door is its range's only one: its first steps are recorded (later_steps.py)
        "nfknock-q0-rftcp20000-v4": (20000, 20999),
        "nfknock-q0-rftcp20000-v6": (20000, 20999),
    }
    fake = FakeIpset()
    create_rotation_sets(fresh_plan(doors, 0), fake)
    assert "create nfknock-q0-rtcp20000-v4 bitmap:port range 20000-20999 timeout 3 -exist" in fake.inputs[-1]


def test_a_set_of_another_range_is_swapped_in_place(doors):
    listed = "Name: nfknock-q0-rtcp20000-v4\nHeader: range 20000-29999 timeout 3\n"
    fake = FakeIpset(listed=listed)
    create_rotation_sets(fresh_plan(doors, 0), fake)
    lines = fake.inputs[-1].splitlines()
    assert "swap nfknock-q0-rtcp20000-v4 nfknock-q0-rtcp20000-v4-new" in lines


def test_the_current_steps_are_written_once_a_window(doors):
    fake, plan = FakeIpset(), fresh_plan(doors, 0)
    sets = RotationSets(fake)
    assert sets.sync(plan, doors, WALL + 5) > 0
    written = fake.inputs[-1].splitlines()
    w = window_of(WALL + 5, 60)
    first, second, third = derive(SECRET, "rot", w, 3, 20000, 20999)
    for family in (4, 6):
        # the door is its range's only one: first and second steps go to their own sets, and a
        # later step to none (only a source mid-attempt gets past it)
        assert any(line.startswith(f"add nfknock-q0-rftcp20000-v{family} {first} ") for line in written)
        assert any(line.startswith(f"add nfknock-q0-rtcp20000-v{family} {second} ") for line in written)
        assert not any(line.startswith(f"add nfknock-q0-rtcp20000-v{family} {third} ") for line in written)
    calls = len(fake.inputs)
    assert sets.sync(plan, doors, WALL + 50) == 0 and len(fake.inputs) == calls  # the same window
    assert sets.sync(plan, doors, WALL + 61) > 0  # the next one
    later = fake.inputs[-1]
    assert all(f" {port} " in later for port in derive(SECRET, "rot", w + 2, 3, 20000, 20999)[:2])
    assert "flush" not in later


def test_a_first_step_goes_only_to_the_first_steps_set_unless_another_window_has_it_second():
    door = parse_door(dict(name="rot", protect=["22/tcp"], rotate={"secret_env": "ROT", "ports": "20000-20029"}))
    door.rotate._secret = SECRET
    fake, plan = FakeIpset(), fresh_plan((door,), 0)
    RotationSets(fake).sync(plan, (door,), WALL)
    w = window_of(WALL, 60)
    seqs = [derive(SECRET, "rot", index, 3, 20000, 20029) for index in (w - 1, w, w + 1)]
    written = fake.inputs[-1]
    firsts = {int(line.split()[2]) for line in written.splitlines() if line.startswith("add nfknock-q0-rftcp20000-v4")}
    seconds = {int(line.split()[2]) for line in written.splitlines() if line.startswith("add nfknock-q0-rtcp20000-v4")}
    assert firsts == {seq[0] for seq in seqs}
    assert seconds == {seq[1] for seq in seqs}


def test_doors_sharing_a_range_have_every_current_step_in_its_one_set(doors, monkeypatch):
    other = parse_door(dict(name="rot2", protect=["23/tcp"], rotate={"secret_env": "ROT", "ports": "20000-20999"}))
    load_secrets(other)
    both = (*doors, other)
    fake = FakeIpset()
    RotationSets(fake).sync(fresh_plan(both, 0), both, WALL)
    written = fake.inputs[-1]
    assert "rftcp" not in written
    for name in ("rot", "rot2"):
        for port in derive(SECRET, name, window_of(WALL, 60), 3, 20000, 20999):
            assert f"add nfknock-q0-rtcp20000-v4 {port} " in written


def test_a_reload_that_changes_what_a_set_holds_flushes_it_in_the_same_write(doors, monkeypatch):
    """A new secret within the window: the old sequence's ports leave at once, the new ones come."""
    fake = FakeIpset()
    sets = RotationSets(fake)
    sets.sync(fresh_plan(doors, 0), doors, WALL)
    monkeypatch.setenv("ROT", base64.b64encode(b"t" * 32).decode())
    changed = parse_door(dict(name="rot", protect=["22/tcp"], rotate={"secret_env": "ROT", "ports": "20000-20999"}))
    load_secrets(changed)
    assert sets.sync(fresh_plan((changed,), 0), (changed,), WALL + 1) > 0
    lines = fake.inputs[-1].splitlines()
    for name in ("nfknock-q0-rtcp20000-v4", "nfknock-q0-rftcp20000-v6"):
        adds = [i for i, line in enumerate(lines) if line.startswith(f"add {name} ")]
        assert adds and lines.index(f"flush {name}") < adds[0]
    first = derive(b"t" * 32, "rot", window_of(WALL, 60), 3, 20000, 20999)[0]
    assert any(line.startswith(f"add nfknock-q0-rftcp20000-v4 {first} ") for line in lines)


def test_a_refused_write_is_an_error_and_is_tried_again(doors):
    sets = RotationSets(FakeIpset(returncode=1))
    with pytest.raises(FirewallError, match="cannot write the rotating doors' current steps"):
        sets.sync(fresh_plan(doors, 0), doors, WALL)
    sets.runner = FakeIpset()
    assert sets.sync(fresh_plan(doors, 0), doors, WALL) > 0
