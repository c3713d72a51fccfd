"""No way out of the daemon opens a protected port, on a real kernel.

Faults are injected by running nfknock through tests/support/faulty.py, which breaks one of its
functions. A fault in a reload or a control request is refused and the daemon goes on; any other
unexpected error ends the daemon non-zero with its rules in place, so the kernel drops what it
would have queued: a client that did not knock stays out while the daemon is dead, and the one
that knocks gets in once it runs again.
"""

import json
import signal
import socket
import time
import urllib.request

import pytest
from conftest import connect, knock

from support.sandbox import entered

SEQUENCE = ("40000", "50000", "60000")


def sighup(server):
    server.process.send_signal(signal.SIGHUP)


def status(server):
    return server.nfknock("status", "--json", "--control-socket", str(server.workdir / "nfknock.sock"))


def first_knock(server):
    """Starts an attempt whose timeout is the loop's next deadline (seq_timeout 1s below): the
    kernel records the first step, the second starts the daemon's attempt."""
    knock(server.sandbox, server.sandbox.clients[1], "40000", "50000")


def scrape(server):
    with entered(server.sandbox.server):
        try:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                "http://127.0.0.1:9475/metrics", timeout=5
            ).read()
        except OSError:
            pass  # the daemon may die before it answers


def wait_exit(server, timeout=20):
    try:
        return server.process.wait(timeout)
    except Exception:
        raise AssertionError(f"nfknock did not stop:\n{server.log_text()}") from None


def assert_closed_then_reopens(server, alice, bob):
    """The chain is still there, nobody gets in while no daemon runs, and a restart serves again."""
    rules = server.iptables()
    assert "-A INPUT -j NFKNOCK" in rules and any("NFQUEUE" in rule for rule in rules), rules
    assert not connect(bob, timeout=1).connected  # never knocked
    knock(server.sandbox, alice, *SEQUENCE)
    assert not connect(alice, timeout=1).connected  # no daemon: even a correct knock opens nothing
    server.start()
    assert not connect(bob, timeout=1).connected
    knock(server.sandbox, alice, *SEQUENCE)
    assert connect(alice).connected


@pytest.mark.parametrize(
    "target,call,trigger",
    [
        ("nfknock.doors.engine.Engine.expire", 1, first_knock),  # timers
        ("nfknock.daemon.judge.Judge.report_counters", 2, None),  # the counters, 5 s after the start
        ("nfknock.daemon.metrics.take", 2, scrape),  # the metrics snapshot (the first is taken at start)
    ],
)
def test_an_unexpected_error_stops_the_daemon_with_the_ports_closed(server, alice, bob, target, call, trigger):
    server.write_rules(server.rules.joinpath("doors.yaml").read_text().replace("seq_timeout: 15s", "seq_timeout: 1s"))
    server.start("--metrics-port", "9475", fault=(target, call))
    if trigger is not None:
        trigger(server)
    assert wait_exit(server) == 1
    assert f"injected fault in {target}" in server.log_text()
    assert "the rules stay in place: protected ports stay closed" in server.log_text()
    assert "stopped on an unexpected error" in server.process.stderr.read()
    assert_closed_then_reopens(server, alice, bob)


@pytest.mark.parametrize(
    "target,call,trigger,logged",
    [
        (
            "nfknock.daemon.reload.load_rules",
            1,
            sighup,
            "reload refused",
        ),  # reading the new rules (the start reads in lastgood.py)
        ("nfknock.daemon.reload.ReloadJob.__init__", 1, sighup, "reload refused"),  # starting the reload
        ("nfknock.daemon.reload.sd_notify", 1, sighup, "reload refused"),  # telling systemd the reload begins
        ("nfknock.firewall.backend.PerFamily.apply", 2, sighup, "reload refused"),  # installing the new rules
        ("nfknock.daemon.control.answer", 1, status, "control request status failed"),
    ],
)
def test_a_fault_in_a_reload_or_a_request_is_refused_and_the_daemon_goes_on(
    server, alice, bob, target, call, trigger, logged
):
    server.start(fault=(target, call))
    trigger(server)
    server.wait_log(logged)
    assert server.process.poll() is None
    assert not connect(bob, timeout=1).connected
    knock(server.sandbox, alice, *SEQUENCE)
    assert connect(alice).connected


BROKEN_ON_RELOAD = {
    "an invalid date": "doors: [{name: !!timestamp 2026-02-30, sequence: [1,2,3], protect: [22/tcp]}]\n",
    "nesting 600 deep": "doors: " + "[" * 600 + "]" * 600 + "\n",
    "a binary file": "\x00\xff\xfe not yaml",
    "an alias bomb": "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)),
}


@pytest.mark.parametrize("content", BROKEN_ON_RELOAD.values(), ids=BROKEN_ON_RELOAD.keys())
def test_sighup_with_a_broken_file_keeps_the_old_rules(server, alice, bob, content):
    server.start()
    path = server.write_rules(content, name="added.yaml")
    sighup(server)
    line = server.wait_log("reload refused")
    assert str(path) in line
    assert server.process.poll() is None
    assert not connect(bob, timeout=1).connected
    knock(server.sandbox, alice, *SEQUENCE)
    assert connect(alice).connected


def test_a_door_named_like_a_date_is_a_door(server, bob):
    """The file that used to kill the daemon on SIGHUP (PyYAML read the name as an invalid date)."""
    server.start()
    server.write_rules(
        "doors: [{name: 2026-02-30, sequence: [1111, 2222, 3333], protect: [22/tcp]}]\n", name="added.yaml"
    )
    sighup(server)
    assert "2 door(s)" in server.wait_log("reloaded")
    assert not connect(bob, timeout=1).connected
    knock(server.sandbox, bob, "1111", "2222", "3333")
    server.wait_log("10.199.2.2: 2026-02-30: OPEN SESAME")
    assert connect(bob).connected


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"[]\n",
        b'{"cmd": "revoke", "address": []}\n',
        b"\xff\xfe\n",
        b'{"cmd": "grant", "address": "10.199.2.2", "door": "openSSH", "seconds": 1e999}\n',
        b"x" * 70000,
    ],
)
def test_malformed_control_requests_are_answered_and_change_nothing(server, alice, bob, request_bytes):
    server.start()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(server.workdir / "nfknock.sock"))
        try:
            sock.sendall(request_bytes)
        except OSError:
            pass  # the daemon may stop reading an oversized request
        answer = json.loads(sock.makefile().readline())
    assert answer["error"].startswith("bad request: ")
    assert server.process.poll() is None
    assert not connect(bob, timeout=1).connected
    knock(server.sandbox, alice, *SEQUENCE)
    assert connect(alice).connected


def test_a_slow_control_client_does_not_delay_verdicts(server, alice):
    """One byte every 0.4 s used to hold the loop for as long as the client liked."""
    import threading

    server.start()
    answers = []

    def dribble():
        with socket.socket(socket.AF_UNIX) as slow:
            slow.connect(str(server.workdir / "nfknock.sock"))
            try:
                for _ in range(8):
                    slow.send(b" ")
                    time.sleep(0.4)
            except OSError:
                pass  # the daemon gave up on us
            answers.append(slow.makefile().readline())

    slow_client = threading.Thread(target=dribble)
    slow_client.start()
    try:
        got_in = []
        for _ in range(4):
            knock(server.sandbox, alice, *SEQUENCE)
            got_in.append(connect(alice, timeout=1).connected)
    finally:
        slow_client.join()
    assert got_in == [True] * 4
    assert "not complete within 1s" in json.loads(answers[0])["error"]


def test_ipv6_addresses_are_the_same_however_they_are_written(server, alice):
    server.start()
    sock = str(server.workdir / "nfknock.sock")
    spelled = alice.address6.upper().replace("::", ":0:0:0:0:")  # fd00:199:1::2 as FD00:199:1:0:0:0:0:2
    granted = server.nfknock("grant", spelled, "--door", "openSSH", "--for", "1m", "--control-socket", sock)
    assert granted.returncode == 0, granted.stderr
    assert connect(alice, family=6).connected
    revoked = server.nfknock("revoke", alice.address6, "--control-socket", sock)
    assert f"revoked {alice.address6} on openSSH" in revoked.stdout
    assert not connect(alice, family=6, timeout=1).connected


def test_sigterm_leaves_the_ports_closed_until_down(server, alice, bob):
    server.start()
    knock(server.sandbox, alice, *SEQUENCE)
    assert server.stop(signal.SIGTERM) == 0
    assert "the rules stay in place" in server.log_text()
    assert server.iptables() != []
    assert not connect(bob, timeout=1).connected
    assert not connect(alice, timeout=1).connected
    down = server.nfknock("down")
    assert down.returncode == 0 and "removed" in down.stdout
    assert server.iptables(4) == [] and server.iptables(6) == []
    assert connect(bob).connected  # only the deliberate act opened it


def test_a_stop_right_after_a_flood_is_prompt_and_closed(server, alice, mallory, tmp_path):
    """With the queue backed up, unbinding used to wait for an answer the kernel had lost: the
    stop hung for minutes (systemd would then SIGKILL it; closed, but a broken stop). The C
    sender of the bench: the Python one cannot overrun the daemon's socket."""
    import subprocess
    from pathlib import Path

    sender = tmp_path / "flood"
    source = Path(__file__).resolve().parents[2] / "bench" / "flood.c"
    subprocess.run(["gcc", "-O2", "-o", str(sender), str(source)], check=True)
    server.start("--queue-maxlen", "65536")
    flood = server.sandbox.spawn(
        mallory.namespace,
        [str(sender), mallory.server_address, "tcp", "40000", "4", "11.0.0.1", "1000000"],
        stdout=subprocess.PIPE,
    )
    assert flood.wait(30) == 0
    assert server.stop(timeout=20) == 0
    assert "the rules stay in place" in server.log_text()
    assert not connect(alice, timeout=1).connected
