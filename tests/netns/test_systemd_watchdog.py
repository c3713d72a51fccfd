"""systemd's watchdog (WatchdogSec=) against a real daemon: a notify socket of the test's own and
WATCHDOG_USEC, as systemd passes them. The pings come from the process systemd started, only while
its loop turns (and, with workers, only while every worker answers), so that a wedged daemon is
restarted by systemd; meanwhile the ports stay closed. (deploy/systemd/checks.sh has the restart
itself, by the real systemd.)"""

import os
import signal
import socket
import struct
import time
from pathlib import Path

import pytest
from conftest import connect, knock

from support.sandbox import queue_counters

SEQUENCE = ("40000", "50000", "60000")
WATCHDOG_USEC = "1000000"  # WatchdogSec=1: a ping every 0.5 s


class NotifySocket:
    """systemd's end of sd_notify: a datagram socket that reads who sent each message."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.path = path

    def receive(self, seconds: float) -> list[tuple[int, str]]:
        """(sender pid, message) of what comes within `seconds`."""
        got = []
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                break
            pid = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
            got.append((pid, data.decode()))
        return got

    def drain(self) -> None:
        self.receive(0.2)

    def wait(self, text: str, seconds: float = 20) -> int:
        """The pid that sent `text`."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for pid, message in self.receive(0.5):
                if text in message.split("\n"):
                    return pid
        raise TimeoutError(f"no {text!r} on the notify socket within {seconds}s")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(monkeypatch, tmp_path):
    sock = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock.path))
    monkeypatch.setenv("WATCHDOG_USEC", WATCHDOG_USEC)
    yield sock
    sock.close()


def pings(messages: list[tuple[int, str]]) -> list[int]:
    return [pid for pid, message in messages if message == "WATCHDOG=1"]


def test_a_running_daemon_pings_the_watchdog_and_a_stopped_one_does_not(server, notify, alice):
    server.start()
    daemon = server.process.pid
    assert notify.wait("READY=1") == daemon
    seen = pings(notify.receive(2.0))
    assert len(seen) >= 2 and set(seen) == {daemon}  # every 0.5 s, from the loop of the daemon
    os.kill(daemon, signal.SIGSTOP)  # a wedged loop: nothing turns
    try:
        notify.drain()  # a ping sent before the stop
        assert pings(notify.receive(3.0)) == []  # six intervals: systemd would restart it by now
        knock(server.sandbox, alice, *SEQUENCE)  # held in the queue, never judged
        assert not connect(alice, timeout=1).connected  # and closed meanwhile
        assert queue_counters(server.sandbox.server, server.queue_num).queue_total > 0
    finally:
        os.kill(daemon, signal.SIGCONT)
    assert set(pings(notify.receive(2.0))) == {daemon}


def test_with_workers_the_supervisor_pings_only_while_every_worker_answers(server, notify):
    from test_worker_processes import worker_pids

    server.start("--workers", "2")
    supervisor = server.process.pid
    assert notify.wait("READY=1") == supervisor
    workers = worker_pids(server)
    assert set(pings(notify.receive(2.0))) == {supervisor}  # the workers never speak to systemd
    os.kill(workers[1], signal.SIGSTOP)
    try:
        server.wait_log(f"worker 1 (pid {workers[1]}, queues 9-10) has not answered", timeout=60)
        assert "systemd's watchdog (WatchdogSec=1s) restarts nfknock" in server.log_text()
        notify.drain()
        assert pings(notify.receive(3.0)) == []  # the supervisor turns, but does not ping
    finally:
        os.kill(workers[1], signal.SIGCONT)
    server.wait_log(f"worker 1 (pid {workers[1]}, queues 9-10) answers again", timeout=60)
    assert set(pings(notify.receive(2.0))) == {supervisor}


def test_without_watchdog_sec_no_ping(server, notify, monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC")
    server.start()
    assert notify.wait("READY=1") == server.process.pid
    assert pings(notify.receive(2.0)) == []
