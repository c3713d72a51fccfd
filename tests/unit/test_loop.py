"""The loop's turns (daemon/loop.py), with queues that are socket pairs: a flood's short turns let
the main queue gather, a lone packet never waits, and while the main queue gathers everything
else (the grant queue, signals, control) is still watched."""

import logging
import socket

import pytest

from nfknock.daemon.loop import BUSY, FEW, GATHER, Loop
from support.fakes import Numbered


class FakeQueue:
    """A NetfilterQueue stand-in: each datagram written to `feed` is one queued packet."""

    def __init__(self):
        self.r, self.feed = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.r.setblocking(False)
        self.callback = None
        self.seen = []
        self.ids = 0

    def get_fd(self):
        return self.r.fileno()

    def run(self, block=True):
        while True:
            try:
                data = self.r.recv(64)
            except BlockingIOError:
                return
            self.ids += 1
            packet = Numbered(data, self.ids)
            self.seen.append(packet)
            self.callback(packet)

    def close(self):
        self.r.close()
        self.feed.close()


@pytest.fixture
def rig():
    clock = [100.0]
    loop = Loop(lambda: clock[0], logging.getLogger("test-nfknock"))
    main, grant = FakeQueue(), FakeQueue()
    callback = loop.callback(lambda packet: packet.drop())
    main.callback = grant.callback = callback
    gathered = []
    loop.gather = lambda fds, seconds: gathered.append((sorted(fds), seconds))
    yield loop, clock, main, grant, gathered
    main.close()
    grant.close()


def turns(loop, clock, main, grant, script):
    """Run the loop; before each turn, `script` (a list of (packets for the main queue, seconds
    the clock moves)) feeds the main queue; the loop stops when the script is done."""
    steps = iter(script)

    def next_step(now):
        step = next(steps, None)
        if step is None:
            loop.stopping = True
            return
        packets, seconds = step
        for n in range(packets):
            main.feed.send(b"p%d" % n)
        clock[0] += seconds

    loop.hooks.append(next_step)
    next_step(0.0)
    loop.guarded(lambda: loop.run([main, grant]), [])


def test_a_floods_short_turns_let_the_main_queue_gather_while_the_rest_is_watched(rig):
    loop, clock, main, grant, gathered = rig
    turns(loop, clock, main, grant, [(3, BUSY / 10)] * 5)
    assert len(main.seen) == 15 and all(p.verdicts == ["drop"] for p in main.seen)
    # Turns 2 to 4: short, each less than BUSY after one with packets (the first had none
    # before it; the fifth is the one whose hook stops the loop).
    assert len(gathered) == 3
    for fds, seconds in gathered:
        assert seconds == GATHER
        assert main.get_fd() not in fds and grant.get_fd() in fds
        assert len(fds) == 2  # the grant queue and the wake-up socket (signals, wake-ups)


def test_a_lone_packet_or_a_full_turn_never_waits(rig):
    loop, clock, main, grant, gathered = rig
    # packets seconds apart (a knock now and then), then a turn that is not short
    turns(loop, clock, main, grant, [(1, 2 * BUSY), (2, 2 * BUSY), (1, 5.0), (FEW, BUSY / 10), (FEW, BUSY / 10)])
    assert len(main.seen) == 4 + 2 * FEW
    assert gathered == []


def test_packets_of_the_grant_queue_alone_never_make_it_wait(rig):
    loop, _, main, grant, gathered = rig
    steps = iter(range(5))

    def connects(now):
        if next(steps, None) is None:
            loop.stopping = True
        else:
            grant.feed.send(b"syn")

    loop.hooks.append(connects)
    connects(0.0)
    loop.guarded(lambda: loop.run([main, grant]), [])
    assert len(grant.seen) == 5 and gathered == []
