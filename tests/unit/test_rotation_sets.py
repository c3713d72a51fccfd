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
    for port in derive(SECRET, "rot", w, 3, 20000, 20999):
        assert any(line.startswith(f"add nfknock-q0-rtcp20000-v4 {port} ") for line in written)
        assert any(line.startswith(f"add nfknock-q0-rtcp20000-v6 {port} ") for line in written)
    calls = len(fake.inputs)
    assert sets.sync(plan, doors, WALL + 50) == 0 and len(fake.inputs) == calls  # the same window
    assert sets.sync(plan, doors, WALL + 61) > 0  # the next one
    later = fake.inputs[-1]
    assert all(f" {port} " in later for port in derive(SECRET, "rot", w + 2, 3, 20000, 20999))


def test_a_refused_write_is_an_error_and_is_tried_again(doors):
    sets = RotationSets(FakeIpset(returncode=1))
    with pytest.raises(FirewallError, match="cannot write the rotating doors' current steps"):
        sets.sync(fresh_plan(doors, 0), doors, WALL)
    sets.runner = FakeIpset()
    assert sets.sync(fresh_plan(doors, 0), doors, WALL) > 0
