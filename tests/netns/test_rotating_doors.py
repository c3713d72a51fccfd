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
    assert any("--dport 20000:29999 -j NFQUEUE" in rule for rule in rotating.iptables())
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
