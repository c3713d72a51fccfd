"""Metrics name the key (the person) that opened an SPA door, and the key of a refused packet."""

from collections import Counter

import pytest

from nfknock.daemon.metrics import Collector, Snapshot, tally
from nfknock.doors.events import DoorOpened, SpaRefused

pytest.importorskip("prometheus_client")


def samples(counter):
    snapshot = Snapshot(0, {}, {}, dict(counter), {"team": 1}, 0)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in Collector(lambda: snapshot).collect()
        for sample in family.samples
    }


def test_spa_openings_by_key_and_knock_doors_unchanged():
    counter: Counter = Counter()
    tally(
        counter,
        [
            DoorOpened("10.0.0.2", "team", 1.0, "alice", 30.0),
            DoorOpened("10.0.0.3", "team", 1.0, "alice", 30.0),
            DoorOpened("10.0.0.4", "team", 1.0, "bob", 30.0),
            DoorOpened("10.0.0.5", "openSSH", 1.0),
            SpaRefused("10.0.0.9", "team", "key expired", "...", "carol"),
            SpaRefused("10.0.0.9", "team", "bad hmac", "..."),
        ],
    )
    found = samples(counter)
    assert found[("nfknock_spa_opened_total", (("door", "team"), ("key", "alice")))] == 2
    assert found[("nfknock_spa_opened_total", (("door", "team"), ("key", "bob")))] == 1
    assert found[("nfknock_doors_opened_total", (("door", "openSSH"),))] == 1
    assert found[("nfknock_doors_opened_total", (("door", "team"),))] == 3
    refused = (("door", "team"), ("key", "carol"), ("reason", "key expired"))
    assert found[("nfknock_spa_refused_total", refused)] == 1
    assert found[("nfknock_spa_refused_total", (("door", "team"), ("key", ""), ("reason", "bad hmac")))] == 1


def test_a_worker_that_does_not_answer_is_down():
    snapshot = Snapshot(0, {}, {}, {}, {}, 0, workers_up=((0, True), (1, False)))
    up = {
        sample.labels["worker"]: sample.value
        for family in Collector(lambda: snapshot).collect()
        if family.name == "nfknock_worker_up"
        for sample in family.samples
    }
    assert up == {"0": 1, "1": 0}
    assert not [f for f in Collector(lambda: Snapshot(0, {}, {}, {}, {}, 0)).collect() if f.name == "nfknock_worker_up"]
