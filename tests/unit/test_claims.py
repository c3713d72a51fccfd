"""Replay records shared by worker processes: a record is used once, by whoever claims it first,
until it expires; expired claims are swept."""

import multiprocessing
import os

from nfknock.daemon.claims import ReplayClaims


def test_a_record_is_claimed_once_until_it_expires(tmp_path):
    claims = ReplayClaims(tmp_path / "used")
    assert claims.claim("spa:abc", expires=1100.0, wall=1000.0)
    assert not claims.claim("spa:abc", expires=1100.0, wall=1050.0)
    assert claims.claim("spa:other", expires=1100.0, wall=1050.0)
    assert claims.claim("spa:abc", expires=1300.0, wall=1200.0)  # expired: usable again, as in the engine
    assert not claims.claim("spa:abc", expires=1300.0, wall=1250.0)


def test_expired_claims_are_swept_and_nothing_else(tmp_path):
    claims = ReplayClaims(tmp_path / "used")
    claims.claim("old", expires=1100.0, wall=1000.0)
    claims.claim("new", expires=2000.0, wall=1000.0)
    assert claims.sweep(1500.0) == 1
    assert not claims.claim("new", expires=2000.0, wall=1600.0)
    assert claims.claim("old", expires=2000.0, wall=1600.0)


def test_the_directory_is_private(tmp_path):
    claims = ReplayClaims(tmp_path / "used")
    assert os.stat(claims.directory).st_mode & 0o777 == 0o700


def _race(directory, record, results):
    results.put(ReplayClaims(directory).claim(record, expires=4e9, wall=1e9))


def test_of_processes_claiming_the_same_record_at_once_exactly_one_wins(tmp_path):
    context = multiprocessing.get_context("fork")
    for round_ in range(20):
        results = context.Queue()
        racers = [context.Process(target=_race, args=(tmp_path / "used", f"r{round_}", results)) for _ in range(4)]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join()
        assert sorted(results.get() for _ in racers) == [False, False, False, True]


def test_a_claims_directory_that_is_a_symlink_is_refused(tmp_path):
    import pytest

    from nfknock.daemon.claims import open_claims
    from nfknock.errors import NfknockError

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    (tmp_path / "used").symlink_to(elsewhere)
    with pytest.raises(NfknockError, match="not a directory of this user's"):
        open_claims(tmp_path / "used")
    assert os.stat(elsewhere).st_mode & 0o777 == 0o755  # not chmod-ed through the link


def test_a_record_of_a_refused_packet_makes_any_later_claim_a_replay_until_it_expires(tmp_path):
    """What a worker refused after the HMAC (its ports, its time) is used for every worker."""
    claims = ReplayClaims(tmp_path / "used")
    claims.record("spa:refused", expires=1100.0, wall=1000.0)
    assert not claims.claim("spa:refused", expires=1100.0, wall=1050.0)
    assert not ReplayClaims(tmp_path / "used").claim("spa:refused", expires=1100.0, wall=1099.0)  # a restart
    claims.record("spa:refused", expires=1100.0, wall=1060.0)  # refused again elsewhere: still used
    assert not claims.claim("spa:refused", expires=1100.0, wall=1070.0)
    claims.record("spa:refused", expires=1300.0, wall=1200.0)  # expired: recorded afresh
    assert not claims.claim("spa:refused", expires=1300.0, wall=1250.0)


def test_a_claim_is_on_disk_before_it_is_answered(tmp_path, monkeypatch):
    """Its file (with the expiry) and then the directory entry are fsynced: a crash right after a
    grant leaves the packet used. Records another file keeps (replay.json, at a start) are not."""
    synced = []
    real_fsync = os.fsync

    def fsync(descriptor):
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr("nfknock.daemon.claims.os.fsync", fsync)
    claims = ReplayClaims(tmp_path / "used")
    assert claims.claim("spa:abc", expires=1100.0, wall=1000.0)
    assert len(synced) == 2 and synced[0].startswith(str(claims.directory / ".")) and synced[1] == str(claims.directory)
    synced.clear()
    assert claims.claim("spa:seeded", expires=1100.0, wall=1000.0, durable=False)
    assert synced == []


def test_the_live_records_can_be_read_back_for_the_fleet_to_put_back(tmp_path):
    """What the workers used is kept with its record (not only its digest), so that a fleet
    member restarted can put it back in Redis; an expired claim, or a file of an earlier version
    (empty) or changed by hand, is left out."""
    from nfknock.daemon.claims import ReplayClaims, live_records

    claims = ReplayClaims(tmp_path / "used")
    claims.claim("spa:digest-1", expires=2000.0, wall=1000.0)
    claims.claim("rotating:door:42", expires=1500.0, wall=1000.0)
    claims.claim("spa:over", expires=1100.0, wall=1000.0)
    claims.claim("spa:changed", expires=3000.0, wall=1000.0)
    (tmp_path / "used" / ("0" * 64)).write_bytes(b"")  # an earlier version's claim: no content
    changed = next(p for p in (tmp_path / "used").iterdir() if p.read_bytes() == b"spa:changed")
    changed.write_bytes(b"spa:forged")
    assert live_records(claims, wall=1200.0) == {"spa:digest-1": 2000.0, "rotating:door:42": 1500.0}
