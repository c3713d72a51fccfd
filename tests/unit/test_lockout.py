"""Failures and lockouts of one door, time written into the test."""

from nfknock.doors.events import LockedOut, LockReleased
from nfknock.doors.lockout import Lockouts
from nfknock.doors.rules import Lockout
from nfknock.doors.state import Pool


def test_failures_within_the_window_lock_the_source_out_until_lock_for_ends():
    lockouts = Lockouts("door", Lockout(failures=3, window=60, lock_for=300), Pool(10))
    assert lockouts.fail("a", 0.0) is None and lockouts.fail("a", 10.0) is None
    assert lockouts.fail("a", 20.0) == LockedOut("a", "door", 3, 320.0)
    assert lockouts.locked("a", 319.0) and not lockouts.locked("b", 319.0)
    assert lockouts.live(20.0) == [("a", 300.0)]
    assert lockouts.expire(320.0) == [LockReleased("a", "door")]
    assert not lockouts.locked("a", 320.0)


def test_failures_older_than_the_window_are_forgotten():
    lockouts = Lockouts("door", Lockout(failures=2, window=60, lock_for=300), Pool(10))
    lockouts.fail("a", 0.0)
    assert lockouts.fail("a", 61.0) is None  # the first one is out of the window
    assert lockouts.fail("a", 62.0) is not None


def test_lockout_off_never_locks():
    lockouts = Lockouts("door", None, Pool(10))
    assert all(lockouts.fail("a", float(t)) is None for t in range(100))
    assert not lockouts.locked("a", 100.0)
