"""Records of what may be used once, wall-clock time written into the test."""

from nfknock.doors.events import Recorded
from nfknock.doors.replay import ReplayCache


def test_a_record_is_reported_and_kept_until_its_time():
    cache = ReplayCache(10)
    assert cache.record("spa:1", 100.0) == Recorded("spa:1", 100.0)
    cache.forget_expired(99.0)
    assert "spa:1" in cache
    cache.forget_expired(100.5)
    assert "spa:1" not in cache


def test_a_record_is_never_shortened():
    cache = ReplayCache(10)
    cache.record("k", 200.0)
    assert cache.record("k", 100.0).expires == 200.0


def test_the_oldest_record_goes_when_full():
    cache = ReplayCache(2)
    for key, expires in (("a", 10.0), ("b", 20.0), ("c", 30.0)):
        cache.record(key, expires)
    assert "a" not in cache and "b" in cache and "c" in cache and len(cache) == 2


def test_restore_drops_what_is_past_its_time():
    cache = ReplayCache(10)
    cache.restore({"old": 5.0, "young": 50.0}, wall=10.0)
    assert cache.snapshot() == {"young": 50.0}
