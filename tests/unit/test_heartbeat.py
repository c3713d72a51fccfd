"""systemd's watchdog pings (heartbeat.py), with time written into the test: when systemd watches,
how often the loop pings, and that a turn the daemon is not healthy sends nothing."""

import logging
import os
import socket
from multiprocessing.connection import Connection
from types import SimpleNamespace

import pytest

from nfknock.daemon.heartbeat import PING, Heartbeat, heartbeat, interval


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),  # no WatchdogSec=
        ({"WATCHDOG_USEC": "0"}, None),  # WatchdogSec=0: off
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),  # not microseconds: not guessed
        ({"WATCHDOG_USEC": "30000000"}, 15.0),  # half of WatchdogSec=30
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "4242"}, 1.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "4243"}, None),  # inherited: another process's
    ],
)
def test_systemd_watches_only_the_process_it_named_with_a_whole_number_of_microseconds(environ, expected):
    assert interval(environ, 4242) == expected


def test_no_watchdog_no_hook():
    assert heartbeat({}, 1, print) is None
    assert heartbeat({"WATCHDOG_USEC": "2000000"}, 1, print).every == 1.0


def test_the_loop_pings_at_once_then_every_half_watchdog_interval():
    sent: list[str] = []
    beat = heartbeat({"WATCHDOG_USEC": "10000000"}, 1, sent.append)
    now = 1000.0
    beat(now)  # the first turn after READY
    assert sent == [PING]
    for _ in range(4):  # the loop turns at least once a second
        now += 1.0
        beat(now)
    assert sent == [PING]
    now += 1.0  # 5 s: half of WatchdogSec=10
    beat(now)
    assert sent == [PING, PING]


def test_no_turn_no_ping():
    """The ping comes from the loop's turns only: a loop that stops turning (wedged, SIGSTOP)
    sends nothing however much time passes, and the first turn afterwards pings at once."""
    sent: list[str] = []
    beat = Heartbeat(every=5.0, send=sent.append)
    beat(0.0)
    assert len(sent) == 1
    # ... 120 s in which the hook is not called: nothing can be sent meanwhile ...
    beat(120.0)
    assert len(sent) == 2


def test_an_unhealthy_turn_sends_nothing_and_the_next_healthy_one_pings_at_once():
    sent: list[str] = []
    healthy = [True]
    beat = Heartbeat(every=5.0, send=sent.append, healthy=lambda now: healthy[0])
    beat(0.0)
    healthy[0] = False
    for now in range(1, 60):  # a stuck worker: a minute of turns, no ping (systemd restarts)
        beat(float(now))
    assert len(sent) == 1
    healthy[0] = True
    beat(60.5)
    assert len(sent) == 2 and beat.next == 65.5


def test_the_supervisor_pings_only_while_every_worker_answers(tmp_path):
    """The supervisor's health is its workers' answers to its pings (watchdog.py): one that leaves
    a ping unanswered for STUCK_AFTER stops the heartbeat; its answer brings it back."""
    from nfknock.daemon.watchdog import PING_EVERY, STUCK_AFTER, _Worker
    from nfknock.daemon.workers import WorkerPool

    now = [100.0]
    config = SimpleNamespace(workers=2, queue_num=7, state_dir=tmp_path)
    pool = WorkerPool(config, logging.getLogger("test-heartbeat"), lambda: now[0])
    sent: list[str] = []
    beat = Heartbeat(every=1.0, send=sent.append, healthy=pool.answering)
    try:
        ours, theirs = socket.socketpair()
        worker_end = Connection(theirs.detach())
        pool.workers = [_Worker(1, os.getpid(), Connection(ours.detach()), (9, 10))]
        pool.count = 2

        def turn(seconds: float) -> None:  # the supervisor's hooks, in their order
            now[0] += seconds
            pool.pump()
            pool.watch(now[0])
            beat(now[0])

        turn(0.0)
        assert worker_end.recv() == ("ping",) and len(sent) == 1
        turn(STUCK_AFTER - 0.1)  # not answered yet, but not stuck either
        assert len(sent) == 2
        turn(0.1)  # STUCK_AFTER without an answer
        turn(1.0)
        turn(30.0)
        assert len(sent) == 2
        worker_end.send(("pong",))
        turn(0.0)
        assert len(sent) == 3
        turn(PING_EVERY)
        assert worker_end.recv() == ("ping",) and len(sent) == 4
        pool.workers[0].alive = False  # collected: it ended (check() stops the daemon too)
        turn(1.0)
        assert len(sent) == 4
    finally:
        pool.workers = []
        pool._remove_private()


def test_a_stuck_worker_line_says_systemd_restarts_the_daemon_when_it_watches(tmp_path, caplog):
    from nfknock.daemon.watchdog import STUCK_AFTER, _Worker
    from nfknock.daemon.workers import WorkerPool

    config = SimpleNamespace(workers=2, queue_num=7, state_dir=tmp_path)
    pool = WorkerPool(config, logging.getLogger("test-heartbeat"), lambda: 0.0)
    pool.watchdog.restarted_after = 30.0
    try:
        ours, theirs = socket.socketpair()
        keep = Connection(theirs.detach())
        pool.workers = [_Worker(1, os.getpid(), Connection(ours.detach()), (9, 10))]
        with caplog.at_level(logging.WARNING, logger="test-heartbeat"):
            pool.watch(0.0)
            pool.watch(STUCK_AFTER)
        (line,) = [r.getMessage() for r in caplog.records if "has not answered" in r.getMessage()]
        assert "systemd's watchdog (WatchdogSec=30s) restarts nfknock" in line
        assert "neither kills nor restarts" not in line
        keep.close()
    finally:
        pool.workers = []
        pool._remove_private()
