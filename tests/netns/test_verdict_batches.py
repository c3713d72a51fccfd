"""Batch drop verdicts (daemon/drops.py) on a real kernel: the one message takes every packet it
names out of the queue, and drops them; under a flood the daemon leaves nothing waiting."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from conftest import SEED, connect, knock

from nfknock.daemon.drops import DeferredDrops
from support.sandbox import SynFlood, entered, queue_counters

QUEUE = 21
PORT = 9999


def waiting(namespace: str, queue: int) -> int:
    counters = queue_counters(namespace, queue)
    assert counters is not None, f"queue {queue} is not bound"
    return counters.queue_total


def test_one_batch_verdict_drops_every_packet_it_names_and_only_those(sandbox):
    from netfilterqueue import NetfilterQueue

    alice = sandbox.clients[0]
    with entered(sandbox.server):
        queue = NetfilterQueue()
        queue.bind(QUEUE, lambda packet: defer(packet))
        listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with entered(alice.namespace):
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        listener.bind((alice.server_address, PORT))
        listener.setblocking(False)
        rule = ["iptables", "-w", "-I", "INPUT", "-p", "udp", "--dport", str(PORT), "-j", "NFQUEUE"]
        sandbox.run(sandbox.server, [*rule, "--queue-num", str(QUEUE)], check=True)
        drops = DeferredDrops(logging.getLogger("test-nfknock"))
        fd = queue.get_fd()
        seen: list = []

        def defer(packet) -> None:
            seen.append(packet)
            if len(seen) <= 50:
                drops.pending.append(packet)  # as Verdicts.on_packet does while the loop runs the queue
            else:
                packet.accept()  # the 51st: a later id, given its own verdict

        def serve(count: int) -> None:
            deadline = time.monotonic() + 5
            while len(seen) < count and time.monotonic() < deadline:
                drops.serve(fd, QUEUE)
                queue.run(block=False)
                time.sleep(0.01)
            assert len(seen) == count

        for n in range(50):
            sender.sendto(b"knock %d" % n, (alice.server_address, PORT))
        serve(50)
        assert waiting(sandbox.server, QUEUE) == 50  # deferred: still in the kernel's queue
        drops.flush()
        assert drops.batches == 1 and drops.failures == 0
        assert waiting(sandbox.server, QUEUE) == 0  # one message took all fifty
        sender.sendto(b"accepted", (alice.server_address, PORT))
        serve(51)
        time.sleep(0.2)
        received = []
        while True:
            try:
                received.append(listener.recv(64))
            except BlockingIOError:
                break
        assert received == [b"accepted"]  # the fifty were dropped, not let through
    finally:
        queue.unbind()
        listener.close()
        sender.close()


@pytest.mark.parametrize("server", ["legacy", "nft"], indirect=True)
def test_after_a_flood_nothing_waits_in_the_queue_and_the_client_gets_in(server, alice, mallory):
    server.write_rules(SEED)
    server.start()
    before = queue_counters(server.sandbox.server, 7)
    assert before is not None
    flood = SynFlood(mallory.namespace, mallory.server_address, 22)  # strangers' SYNs: the daemon drops them
    try:
        sent = flood.send(0x0B000000, 5000)
    finally:
        flood.close()
    deadline = time.monotonic() + 5
    while waiting(server.sandbox.server, 7) and time.monotonic() < deadline:
        time.sleep(0.05)
    after = queue_counters(server.sandbox.server, 7)
    assert after is not None
    assert after.id_sequence - before.id_sequence > 50, (sent, after)  # the daemon was asked: a burst
    assert after.queue_total == 0  # and each one got its verdict
    knock(server.sandbox, alice, "40000", "50000", "60000")
    server.wait_log(f"{alice.address}: openSSH: OPEN SESAME")
    assert connect(alice).connected
    assert not connect(mallory, timeout=1).connected
