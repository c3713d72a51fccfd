"""The supervisor's merging of its workers' answers: one daemon's status and metrics."""

from nfknock.daemon.merge import merge_snapshots, merge_status
from nfknock.daemon.metrics import Snapshot


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

    from nfknock.daemon.worker import serve

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


def test_a_worker_that_leaves_a_ping_unanswered_is_named_until_it_answers_again(tmp_path, caplog):
    """The supervisor's watch, with time written into the test: a ping every PING_EVERY seconds
    after an answer, a warning once one waits STUCK_AFTER, again every STUCK_REPEAT, and a line
    when the worker answers; status names it meanwhile. It is never killed."""
    import logging
    import os
    import socket
    from multiprocessing.connection import Connection
    from types import SimpleNamespace

    from nfknock.daemon.watchdog import PING_EVERY, STUCK_AFTER, STUCK_REPEAT, _Worker
    from nfknock.daemon.workers import WorkerPool

    now = [100.0]
    config = SimpleNamespace(workers=2, queue_num=7, state_dir=tmp_path)
    daemon = SimpleNamespace(config=config, log=logging.getLogger("test-workers"), clock=lambda: now[0])
    pool = WorkerPool(config, daemon.log, daemon.clock)
    try:
        ours, theirs = socket.socketpair()
        worker_end = Connection(theirs.detach())
        pool.workers = [_Worker(1, os.getpid(), Connection(ours.detach()), (9, 10))]
        pool.count = 2
        with caplog.at_level(logging.INFO, logger="test-workers"):
            pool.watch(now[0])
            assert worker_end.recv() == ("ping",)
            now[0] += STUCK_AFTER - 0.1
            pool.watch(now[0])
            assert "has not answered" not in caplog.text
            now[0] += 0.1
            pool.watch(now[0])
            (warning,) = [r.getMessage() for r in caplog.records if "has not answered" in r.getMessage()]
            assert warning.startswith(f"worker 1 (pid {os.getpid()}, queues 9-10) has not answered for 5s")
            assert "Sources whose address ends in byte 128-255 cannot knock or connect" in warning
            assert "closed, not open" in warning and "neither kills nor restarts it" in warning
            assert [row["worker"] for row in [pool.watchdog.stuck_row(w, now[0]) for w in pool.workers]] == [1]
            now[0] += STUCK_REPEAT
            pool.watch(now[0])
            assert sum("has not answered" in r.getMessage() for r in caplog.records) == 2
            assert not worker_end.poll()  # one ping at a time: nothing piles up in its socket
            worker_end.send(("pong",))
            pool.pump(0.5)
            assert (
                f"worker 1 (pid {os.getpid()}, queues 9-10) answers again after {STUCK_AFTER + STUCK_REPEAT:.0f}s"
                in (caplog.text)
            )
            pool.watch(now[0] + PING_EVERY - 0.1)
            assert not worker_end.poll()
            pool.watch(now[0] + PING_EVERY)
            assert worker_end.recv() == ("ping",)
    finally:
        pool.workers = []
        pool._remove_private()


def test_revoke_confirmations_are_every_workers_not_worker_0s():
    """Each worker follows the operator's revocation (one id for all); worker 0 cut off from
    Redis sees nobody confirm, worker 1 sees b and c: the daemon's status says b and c."""
    from nfknock.daemon.merge import merge_revokes

    cut_off = {"revokes": [{"id": "r1", "confirmed": [], "missing": {"b": 1.0, "c": 1.5}}]}
    reading = {"revokes": [{"id": "r1", "confirmed": ["b", "c"], "missing": {"d": 40.0}}]}
    (row,) = merge_revokes([cut_off, reading])
    assert row == {"id": "r1", "confirmed": ["b", "c"], "missing": {"d": 40.0}}
