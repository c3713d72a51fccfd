"""Rotating sequences on a real kernel with the stock knock client: the sequence `nfknock otp`
prints opens the door; the same sequence replayed in its window does not; yesterday's does not."""

import time

import pytest
from conftest import connect, knock

from nfknock.doors.rotation import derive, window_of
from support.sandbox import nfknock_argv

pytestmark = pytest.mark.parametrize("server", ["legacy", "nft"], indirect=True)


def otp(server, client):
    result = server.sandbox.run(client.namespace, nfknock_argv("otp", "--door", "rotSSH", "--rules", str(server.rules)))
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_otp_sequence_opens_once_and_yesterdays_never(rotating, alice, bob):
    rotating.start()
    # the range is queued for its current steps (a set of ports the daemon refreshes: later_steps.py)
    assert any(
        "--dport 20000:29999 -m set --match-set nfknock-q7-rtcp20000-v4 dst -j NFQUEUE" in rule
        for rule in rotating.iptables()
    )
    ports = otp(rotating, alice)
    assert len(ports) == 3
    knock(rotating.sandbox, alice, *ports)
    attempt = connect(alice)
    assert attempt.connected and attempt.seconds < 0.5
    knock(rotating.sandbox, bob, *ports)  # a sniffed sequence, replayed in its window
    rotating.wait_log("10.199.2.2: rotSSH: sequence already used in this window")
    assert not connect(bob, timeout=1).connected
    yesterday = derive(b"r" * 32, "rotSSH", window_of(time.time() - 86400, 60), 3, 20000, 29999)
    knock(rotating.sandbox, bob, *map(str, yesterday))
    assert not connect(bob, timeout=1).connected
    assert rotating.log_text().count("OPEN SESAME") == 1


def test_our_client_knocks_the_current_sequence(rotating, alice):
    rotating.start()
    result = rotating.sandbox.run(
        alice.namespace, nfknock_argv("knock", alice.server_address, "--door", "rotSSH", "--rules", str(rotating.rules))
    )
    assert result.returncode == 0, result.stderr
    assert connect(alice).connected


def test_a_used_sequence_stays_used_across_a_restart(rotating, alice, bob, tmp_path):
    """The record of used sequences is kept in --state-dir with the SPA replay cache."""
    state = tmp_path / "state"
    rotating.start("--state-dir", str(state))
    ports = otp(rotating, alice)
    knock(rotating.sandbox, alice, *ports)
    assert connect(alice).connected
    assert rotating.stop() == 0
    rotating.start("--state-dir", str(state))
    knock(rotating.sandbox, bob, *ports)  # sniffed before the restart, replayed after it
    rotating.wait_log("10.199.2.2: rotSSH: sequence already used in this window")
    assert not connect(bob, timeout=1).connected


def test_a_flood_at_the_range_stays_in_the_kernel_but_for_the_current_steps(rotating, alice, mallory):
    """Goal 4 of issue 24: the current windows' steps are in the kernel (rotation_sets.py); a
    stranger's packet at any other port of the range never reaches the queue."""
    from support.sandbox import SynFlood, queue_counters

    rotating.start()
    listed = rotating.sandbox.run(rotating.sandbox.server, ["ipset", "list", "nfknock-q7-rtcp20000-v4"]).stdout
    ports = otp(rotating, alice)
    assert all(f"\n{port} timeout" in listed for port in ports), listed
    steps = {int(port) for port in listed.split("Members:")[1].split() if port.isdigit() and int(port) >= 20000}
    before = queue_counters(rotating.sandbox.server, 7).id_sequence
    spoofed = 0
    for port in range(20000, 30000, 7):  # a walk over the range from spoofed sources
        if port not in steps:
            flood = SynFlood(mallory.namespace, mallory.server_address, port)
            spoofed += flood.send(0x0B000000 + port, 3)
            flood.close()
    knock(rotating.sandbox, alice, *ports)
    rotating.wait_log("10.199.1.2: rotSSH: OPEN SESAME")
    assert connect(alice).connected
    assert queue_counters(rotating.sandbox.server, 7).id_sequence - before == 3, spoofed  # alice's three knocks
