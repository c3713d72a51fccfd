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
    # the range's current first steps are recorded in a set of sources, the other current steps
    # queued from a source the kernel marked (sets of ports the daemon refreshes: later_steps.py)
    rules = rotating.iptables()
    assert any(
        "--dport 20000:29999 --tcp-flags SYN,ACK SYN -m set --match-set nfknock-q7-rftcp20000-v4 dst "
        "-j SET --add-set nfknock-q7-tcp20000-v4 src" in rule
        for rule in rules
    ), rules
    assert any(
        "-m mark --mark 0x1000000/0x1000000 -m set --match-set nfknock-q7-rtcp20000-v4 dst -j NFQUEUE" in rule
        for rule in rules
    ), rules
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
    listed = {}
    for name in ("nfknock-q7-rftcp20000-v4", "nfknock-q7-rtcp20000-v4"):  # first steps, second steps
        text = rotating.sandbox.run(rotating.sandbox.server, ["ipset", "list", name]).stdout
        listed[name] = {
            int(port) for port in text.split("Members:")[1].split() if port.isdigit() and int(port) >= 20000
        }
    ports = otp(rotating, alice)
    assert int(ports[0]) in listed["nfknock-q7-rftcp20000-v4"] and int(ports[1]) in listed["nfknock-q7-rtcp20000-v4"]
    steps = set().union(*listed.values())  # a later step is in no set: only a source mid-attempt passes
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
    # alice's second and third knocks: her first is recorded in the kernel, never queued
    assert queue_counters(rotating.sandbox.server, 7).id_sequence - before == 2, spoofed


def test_a_strangers_knock_on_the_current_first_step_never_reaches_the_queue(rotating, alice, bob, mallory):
    """Goal 4 of issue 24: the current first step is recorded in the kernel (a set of sources),
    never queued; the second step is queued only, marked, from a source the kernel recorded. A
    flood at the first step costs the daemon nothing, a source that skips the first step does
    not open, and the client knocking the current sequence does."""
    from support.sandbox import SynFlood, queue_counters

    rotating.start()
    ports = otp(rotating, alice)
    before = queue_counters(rotating.sandbox.server, 7).id_sequence
    flood = SynFlood(mallory.namespace, mallory.server_address, int(ports[0]))
    spoofed = flood.send(0x0B000000, 300)
    flood.close()
    recorded = rotating.sandbox.run(rotating.sandbox.server, ["ipset", "list", "-t", "nfknock-q7-tcp20000-v4"]).stdout
    assert f"Number of entries: {spoofed}" in recorded, recorded  # each spoofed source, in the kernel
    knock(rotating.sandbox, bob, *ports[1:])  # only the second and third steps
    assert queue_counters(rotating.sandbox.server, 7).id_sequence - before == 0  # none of it was queued
    assert not connect(bob, timeout=1).connected  # (its SYN to 22 is queued, and refused)
    before = queue_counters(rotating.sandbox.server, 7).id_sequence
    knock(rotating.sandbox, alice, *ports)
    rotating.wait_log("10.199.1.2: rotSSH: OPEN SESAME")
    assert queue_counters(rotating.sandbox.server, 7).id_sequence - before == 2  # her second and third
    assert connect(alice).connected
    assert "10.199.2.2: rotSSH" not in rotating.log_text()  # bob's knocks never reached the daemon


def test_over_ipv6_the_first_step_is_recorded_and_the_sequence_opens(rotating, alice, bob):
    """The same in the other family: the IPv6 sets, the same mark."""
    from support.sandbox import queue_counters

    rotating.start()
    ports = otp(rotating, alice)
    before = queue_counters(rotating.sandbox.server, 7).id_sequence

    def recorded():
        return rotating.sandbox.run(rotating.sandbox.server, ["ipset", "list", "nfknock-q7-tcp20000-v6"]).stdout

    result = rotating.sandbox.run(bob.namespace, ["knock", "-6", bob.server_address6, ports[0]])
    assert result.returncode == 0, result.stderr
    assert bob.address6 in recorded()
    result = rotating.sandbox.run(bob.namespace, ["knock", "-6", bob.server_address6, ports[2]])
    assert result.returncode == 0, result.stderr  # the third step, not the second: forgotten, as a reset
    assert bob.address6 not in recorded()
    assert queue_counters(rotating.sandbox.server, 7).id_sequence - before == 0
    result = rotating.sandbox.run(alice.namespace, ["knock", "-6", alice.server_address6, *ports])
    assert result.returncode == 0, result.stderr
    rotating.wait_log(f"{alice.address6}: rotSSH: OPEN SESAME")
    assert queue_counters(rotating.sandbox.server, 7).id_sequence - before == 2
    assert connect(alice, family=6).connected
    assert not connect(bob, family=6, timeout=1).connected


def members(server, name):
    text = server.sandbox.run(server.sandbox.server, ["ipset", "list", name]).stdout
    return {int(line.split()[0]) for line in text.split("Members:")[1].splitlines() if line.strip()}


def eventually(check, timeout=10.0, what=lambda: ""):
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, f"not within the time: {what()}"
        time.sleep(0.1)


def test_a_reload_rewrites_the_first_steps_and_gives_the_range_back_when_a_second_door_shares_it(
    rotating, alice, bob, tmp_path
):
    """A new secret: the old sequence's first step leaves the kernel's set, the new one opens.
    A second door in the range: the kernel no longer records first steps there (whose would
    it be?), its steps are queued for everyone again, and both doors open."""
    import base64
    import signal

    from support.sandbox import queue_counters

    rotating.start()
    old = otp(rotating, alice)
    (tmp_path / "rot.key").write_text(base64.b64encode(b"n" * 32).decode() + "\n")
    rotating.process.send_signal(signal.SIGHUP)
    rotating.wait_log("reloaded")
    new = otp(rotating, alice)
    assert new != old
    firsts = "nfknock-q7-rftcp20000-v4"
    # the new first step is in the kernel's set, the old one is gone (flushed, not left to expire)
    eventually(
        lambda: int(new[0]) in members(rotating, firsts) and int(old[0]) not in members(rotating, firsts),
        what=lambda: (old, new, members(rotating, firsts), rotating.log_text()),
    )
    knock(rotating.sandbox, bob, *old)  # the old secret's sequence: its first step is not recorded
    assert not connect(bob, timeout=1).connected
    knock(rotating.sandbox, alice, *new)
    rotating.wait_log("10.199.1.2: rotSSH: OPEN SESAME")
    assert connect(alice).connected

    rules = (rotating.rules / "doors.yaml").read_text() + (
        f"  - name: rotTwo\n    rotate: {{secret_file: {tmp_path / 'rot.key'}, window: 60s, ports: 20000-29999}}\n"
        "    protect: [2222/tcp]\n"
    )
    rotating.write_rules(rules)
    rotating.process.send_signal(signal.SIGHUP)
    rotating.wait_log("reloaded", after=1)
    assert not any("rftcp20000" in rule for rule in rotating.iptables())
    two = rotating.sandbox.run(
        bob.namespace, nfknock_argv("otp", "--door", "rotTwo", "--rules", str(rotating.rules))
    ).stdout.split()
    eventually(
        lambda: {int(p) for p in new + two} <= members(rotating, "nfknock-q7-rtcp20000-v4"),
        what=lambda: (new, two, members(rotating, "nfknock-q7-rtcp20000-v4"), rotating.log_text()),
    )
    before = queue_counters(rotating.sandbox.server, 7).id_sequence
    knock(rotating.sandbox, bob, *two)
    rotating.wait_log("10.199.2.2: rotTwo: OPEN SESAME")
    assert queue_counters(rotating.sandbox.server, 7).id_sequence - before == 3  # every step queued again
