"""Later steps and tripwires on a real kernel (later_steps.py): a stranger's packets there stay in
the kernel, a real knocker still gets in, a tripwire still voids an attempt in progress, and the
sequence carries on across a reload. Queue counters are the kernel's own (ids handed out plus
packets dropped at a full queue): what the daemon was asked to judge."""

from __future__ import annotations

import signal
import time

import pytest
from conftest import SEED, connect, knock

from nfknock.firewall.plan import TRIPWIRE_LIMIT
from support.sandbox import SynFlood, queue_counters

pytestmark = pytest.mark.parametrize("server", ["legacy", "nft"], indirect=True)
SEQUENCE = ("40000", "50000", "60000")
SPOOFED = 20_000


def reached(server, queues=(7,)) -> int:
    """Packets the kernel handed (or tried to hand) to the daemon's main queue(s) so far."""
    total = 0
    for queue in queues:
        counters = queue_counters(server.sandbox.server, queue)
        if counters is None:
            raise AssertionError(f"queue {queue} is not bound")
        total += counters.id_sequence + counters.dropped + counters.user_dropped
    return total


def flood(mallory, port: int, count: int = SPOOFED) -> tuple[int, float]:
    """SYNs to `port` from `count` spoofed sources (11.0.0.0 upwards); (sent, seconds taken)."""
    sender = SynFlood(mallory.namespace, mallory.server_address, port)
    started = time.monotonic()
    try:
        sent = sender.send(0x0B000000, count)
    finally:
        sender.close()
    assert sent > 0.9 * count
    return sent, time.monotonic() - started


def ipset_has(server, name: str, address: str) -> bool:
    return server.sandbox.run(server.sandbox.server, ["ipset", "test", name, address]).returncode == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_strangers_at_a_later_step_stay_in_the_kernel_and_the_client_gets_in(server, alice, mallory, workers):
    queues = (7,) if workers == 1 else (7, 9)
    server.start(*(("--workers", "2") if workers == 2 else ()))
    before = reached(server, queues)
    sent, _ = flood(mallory, 60000)
    knock(server.sandbox, alice, *SEQUENCE)
    server.wait_log(f"{alice.address}: openSSH: OPEN SESAME")
    assert connect(alice).connected
    # alice's second and third knocks (a retransmit at most): none of the spoofed third steps
    assert reached(server, queues) - before <= 4, (sent, reached(server, queues) - before)
    assert ipset_has(server, "nfknock-q7-midway-v4", alice.address)  # the kernel entered her at 50000
    assert not ipset_has(server, "nfknock-q7-midway-v4", "11.0.0.1")
    assert not connect(mallory, timeout=1).connected


def test_a_tripwire_flood_reaches_the_daemon_only_within_its_bucket(server, alice, mallory):
    server.start()
    before = reached(server)
    sent, took = flood(mallory, 60005)  # openSSH's tripwire range: 59984-60016
    knock(server.sandbox, alice, *SEQUENCE)
    server.wait_log(f"{alice.address}: openSSH: OPEN SESAME")
    assert connect(alice).connected
    rate, burst = int(TRIPWIRE_LIMIT[0].split("/")[0]), TRIPWIRE_LIMIT[1]
    bound = burst + rate * (took + 5) + 4  # the bucket, however long the flood and the knock took
    assert 0 < reached(server) - before <= bound < sent / 4, (reached(server) - before, bound, sent)


def test_a_strangers_tripwire_hit_still_counts_toward_its_lockout(server, mallory):
    server.write_rules(
        SEED.replace("    tcp_flags: syn,!ack", "    tcp_flags: syn,!ack\n    lockout: {failures: 3, lock_for: 30s}")
    )
    server.start()
    for port in (59990, 59991, 59992):
        connect(mallory, port=port, timeout=0.2)
    server.wait_log(f"{mallory.address}: openSSH: locked out after 3 failed attempts")


def test_a_tripwire_hit_after_the_second_step_still_voids_the_attempt(server, alice):
    server.start()
    knock(server.sandbox, alice, "40000", "50000")
    connect(alice, port=60010, timeout=0.2)  # a tripwire between the second and third step
    server.wait_log(f"{alice.address}: openSSH: sequence reset at stage 2 by a knock on 60010/tcp")
    knock(server.sandbox, alice, "60000")
    assert not connect(alice, timeout=1).connected
    assert "OPEN SESAME" not in server.log_text()
    knock(server.sandbox, alice, *SEQUENCE)
    assert connect(alice).connected


def test_the_sequence_carries_on_across_a_reload_and_strangers_stay_out_after_it(server, alice, mallory):
    server.start()
    knock(server.sandbox, alice, "40000", "50000")
    server.wait_log(f"{alice.address}: openSSH: Stage 2")
    server.write_rules(SEED + "  - name: other\n    sequence: [41000, 51000, 61000]\n    protect: [2222/tcp]\n")
    server.process.send_signal(signal.SIGHUP)
    server.wait_log("reloaded")
    knock(server.sandbox, alice, "60000")
    server.wait_log(f"{alice.address}: openSSH: OPEN SESAME")
    assert connect(alice).connected
    before = reached(server)
    flood(mallory, 61000, 5000)  # the new door's later step
    knock(server.sandbox, alice, "41000", "51000", "61000")
    server.wait_log(f"{alice.address}: other: OPEN SESAME")
    assert reached(server) - before <= 4


def test_over_ipv6_a_strangers_later_step_stays_in_the_kernel(server, alice, bob):
    server.start()
    before = reached(server)
    result = server.sandbox.run(bob.namespace, ["knock", "-6", bob.server_address6, "60000", "60000", "60000"])
    assert result.returncode == 0, result.stderr
    result = server.sandbox.run(alice.namespace, ["knock", "-6", alice.server_address6, *SEQUENCE])
    assert result.returncode == 0, result.stderr
    server.wait_log(f"{alice.address6}: openSSH: OPEN SESAME")
    assert reached(server) - before == 2  # alice's 50000 and 60000; none of bob's
    assert connect(alice, family=6).connected
    assert not connect(bob, family=6, timeout=1).connected
