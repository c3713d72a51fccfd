"""The supervisor's merging of its workers' answers: one daemon's status and metrics."""

from nfknock.metrics import Snapshot
from nfknock.workers import merge_snapshots, merge_status


def answer(grants, locked, packets, tracked):
    return {
        "queue": 7,
        "grants": grants,
        "locked": locked,
        "tracked_attempts": tracked,
        "packets": packets,
        "unparsable": {"short": 1},
        "internal_errors": 0,
        "evicted": 2,
        "kernel_queue_drops": 3,
        "fleet": None,
    }


def test_status_of_workers_reads_as_one_daemon():
    first = answer(
        [{"door": "ssh", "source": "10.0.0.2", "seconds_left": 10.0}],
        [{"door": "ssh", "source": "10.0.0.66", "seconds_left": 5.0}],
        {"accept": 1, "drop": 5},
        4,
    )
    second = answer(
        [
            {"door": "ssh", "source": "10.0.0.200", "seconds_left": 20.0},
            {"door": "ssh", "source": "10.0.0.2", "seconds_left": 12.0},  # a fleet grant every worker holds
        ],
        [],
        {"drop": 7},
        1,
    )
    merged = merge_status([first, second])
    assert merged["workers"] == 2 and merged["queue"] == 7
    assert [(row["source"], row["seconds_left"]) for row in merged["grants"]] == [
        ("10.0.0.2", 12.0),
        ("10.0.0.200", 20.0),
    ]
    assert [row["source"] for row in merged["locked"]] == ["10.0.0.66"]
    assert merged["packets"] == {"accept": 1, "drop": 12}
    assert merged["unparsable"] == {"short": 2}
    assert (merged["tracked_attempts"], merged["evicted"], merged["kernel_queue_drops"]) == (5, 4, 6)


def test_metrics_of_workers_are_summed():
    tallies = {("doors_opened", ("ssh",)): 1}
    one = Snapshot(7, {"accept": 1}, {}, tallies, {"ssh": 1}, 3, drops=(1, 0))
    two = Snapshot(7, {"accept": 2, "drop": 5}, {"short": 1}, tallies, {"ssh": 2}, 1, drops=(0, 4))
    merged = merge_snapshots([one, two])
    assert merged.handled == {"accept": 3, "drop": 5}
    assert merged.tallies == {("doors_opened", ("ssh",)): 2}
    assert merged.grants_per_door == {"ssh": 3} and merged.tracked == 4 and merged.drops == (1, 4)


def test_a_control_request_that_reaches_a_worker_after_its_deadline_is_not_carried_out():
    """The supervisor told the operator it failed: a late grant must not happen anyway."""
    import logging
    import time

    from nfknock.workers import serve

    class Worker:
        log = logging.getLogger("test")
        sent: list = []

        class channel:
            @staticmethod
            def send(message):
                Worker.sent.append(message)

        @staticmethod
        def answer(request):
            Worker.sent.append(("carried out", request))
            return {}

    grant = {"cmd": "grant", "address": "10.0.0.200", "door": "ssh", "seconds": 600.0}
    serve(Worker, ("control", 1, time.monotonic() - 0.1, grant))
    assert Worker.sent == []
    serve(Worker, ("control", 2, time.monotonic() + 5, grant))
    assert Worker.sent == [("carried out", grant), ("reply", 2, {})]
