"""Metrics name the key (the person) that opened an SPA door, and the key of a refused packet."""

import re
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


def test_what_status_knows_is_exported():
    snapshot = Snapshot(
        0, {}, {}, {}, {}, 0, errors=2, evicted=7, granted_failed=1, granted_dropped=3, reload=(False, 1.8e9)
    )
    found = samples_of(snapshot)
    assert found[("nfknock_internal_errors_total", ())] == 2
    assert found[("nfknock_evicted_total", ())] == 7
    assert found[("nfknock_granted_set_failures_total", ())] == 1
    assert found[("nfknock_granted_set_dropped_total", ())] == 3
    assert found[("nfknock_last_reload_successful", ())] == 0
    assert found[("nfknock_last_reload_success_timestamp_seconds", ())] == 1.8e9
    from nfknock import __version__

    assert [labels for (name, labels) in found if name == "nfknock_build_info"][0][-1] == ("version", __version__)


def samples_of(snapshot):
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in Collector(lambda: snapshot).collect()
        for sample in family.samples
    }


def test_worker_snapshots_add_up():
    from nfknock.daemon.merge import merge_snapshots

    one = Snapshot(0, {}, {}, {}, {}, 0, errors=1, evicted=2, granted_failed=3)
    two = Snapshot(0, {}, {}, {}, {}, 0, errors=10, evicted=20, granted_dropped=5)
    merged = merge_snapshots([one, two])
    assert (merged.errors, merged.evicted, merged.granted_failed, merged.granted_dropped) == (11, 22, 3, 5)


def test_resident_memory_of_a_live_process_and_of_one_that_is_gone(tmp_path):
    import os

    from nfknock.daemon.metrics import resident_bytes

    assert resident_bytes(os.getpid()) > 1 << 20
    assert resident_bytes(999_999_999) is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:9474", ("127.0.0.1", 9474)),
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        ("[::1]:9474", ("::1", 9474)),
        ("[::]:9474", ("::", 9474)),
    ],
)
def test_listen_addresses_as_exporters_take_them(text, expected):
    from nfknock.daemon.metrics import parse_listen

    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text, says",
    [
        ("9474", "expected ADDR:PORT"),
        (":9474", "expected ADDR:PORT"),
        ("localhost:9474", "'localhost' in 'localhost:9474' is not an IP address"),
        ("::1:9474", "an IPv6 address goes in brackets"),
        ("[127.0.0.1]:9474", "only IPv6 addresses go in brackets"),
        ("127.0.0.1:0", "port must be in 1..65535"),
        ("127.0.0.1:70000", "port must be in 1..65535"),
        ("127.0.0.1:http", "port must be in 1..65535"),
    ],
)
def test_bad_listen_addresses_say_what_is_wrong(text, says):
    from nfknock.daemon.metrics import parse_listen

    with pytest.raises(ValueError, match=re.escape(says)):
        parse_listen(text)


def test_run_takes_metrics_listen_and_refuses_a_bad_one(capsys):
    from nfknock.cli import _metrics_listen, build_parser, main

    args = build_parser().parse_args(["run", "--metrics-listen", "[::1]:9475"])
    assert _metrics_listen(args) == {"metrics_addr": "::1", "metrics_port": 9475}
    args = build_parser().parse_args(["run", "--metrics-port", "9476"])
    assert _metrics_listen(args) == {"metrics_port": 9476}
    with pytest.raises(SystemExit) as exited:
        main(["run", "--metrics-listen", "::1:9474"])
    assert exited.value.code == 2
    assert "--metrics-listen: an IPv6 address goes in brackets" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--metrics-listen", "127.0.0.1:9474", "--metrics-port", "9474"])
    assert "not allowed with argument" in capsys.readouterr().err
