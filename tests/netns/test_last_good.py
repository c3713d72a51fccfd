"""Closed from boot, on a real kernel: when the rules do not load at start, the daemon starts on
the last rules that did (daemon/lastgood.py), and with none it leaves the ports of the broken
file closed. Each start here begins as a boot does: no nfknock rule in the kernel."""

import json
import signal
import time

import pytest
from conftest import connect, knock

pytestmark = pytest.mark.parametrize("server", ["legacy", "nft"], indirect=True)

SEQUENCE = ("40000", "50000", "60000")
# yesterday's edit, never reloaded: the sequence list is not closed
BROKEN = "doors:\n  - name: openSSH\n    sequence: [40000, 50000, 60000\n    protect: [22/tcp]\n"


def status(server):
    result = server.nfknock("status", "--json", "--control-socket", str(server.workdir / "nfknock.sock"))
    return result.returncode, json.loads(result.stdout) if result.stdout else None


def wait_for(path, timeout=10):
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


def as_at_boot(server):
    """The daemon gone and the kernel without nfknock's rules, as after a reboot."""
    server.stop()
    assert server.nfknock("down", "--firewall", server.firewall).returncode == 0
    assert server.iptables() == []


def test_broken_rules_start_on_the_last_good_doors(server, alice, bob):
    server.start()
    wait_for(server.workdir / "state" / "last-good.json")
    as_at_boot(server)
    assert connect(bob).connected  # nothing guards 22 now: the test can tell closed from open
    server.write_rules(BROKEN)

    server.start()  # ready, on the last good rules
    assert "STARTING ON THE LAST GOOD RULES" in server.log_text()
    assert "invalid YAML" in server.log_text()
    assert not connect(bob, timeout=1).connected  # a stranger
    knock(server.sandbox, alice, *SEQUENCE)
    assert connect(alice).connected
    code, answer = status(server)
    assert code == 3 and answer["degraded"]["running_on"] == "last good rules"
    assert "doors.yaml" in answer["degraded"]["reason"]

    # The admin fixes the file and reloads: the rules on disk are in force again.
    server.write_rules(BROKEN.replace("60000\n", "60000]\n"))
    server.process.send_signal(signal.SIGHUP)
    server.wait_log("no longer running on the last good rules")
    code, answer = status(server)
    assert code == 0 and answer["degraded"] is None
    assert not connect(bob, timeout=1).connected


def test_broken_rules_and_no_last_good_keep_22_closed(server, alice, bob):
    assert connect(bob).connected  # before nfknock: open
    server.write_rules(BROKEN)
    server.start(expect_ready=False)
    assert server.process.wait(30) == 2
    assert "installed rules that keep 22/tcp closed" in server.process.stderr.read()
    rules = server.iptables()
    assert "-A INPUT -j NFKNOCK" in rules and not any("NFQUEUE" in rule for rule in rules), rules
    assert not connect(bob, timeout=1).connected
    knock(server.sandbox, alice, *SEQUENCE)
    assert not connect(alice, timeout=1).connected  # no door: nothing opens
