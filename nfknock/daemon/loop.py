"""The process's loop: select over the queues, a wake-up socket and whatever a role adds; then
the role's hooks, in order, once per turn.

Signals only set flags (and wake the select through the wake-up socket). The queue callback
leaves `NetfilterQueue.run()` after BATCH packets, or at once when a signal came, so that a
flood never starves signals, timers, control requests or reloads. Whatever ends the loop, the
rules stay (fail closed, daemon/roles): `guarded` logs why and stops everything but the rules.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import NfknockError, QueueError
from .config import CLOSED, DaemonConfig, DaemonFailed, sd_notify
from .drops import DeferredDrops

BATCH = 256  # packets handled before signals, timers and control requests are looked at again
MAX_SLEEP = 1.0
# Interrupt moderation, as NAPI does for NICs. A flood the loop keeps up with wakes it every few
# packets, and each wake-up (the select, the scheduler, the turn's hooks, the batch verdict) cost
# more than the packets it found (bench/run.py later_rate: ~10 packets a turn, half the loop's CPU
# per verdict). So after a short turn on the main queue that follows another turn with packets
# within BUSY, the loop lets the main queue gather for up to GATHER while it still watches
# everything else (the grant queue: a granted client's SYN; signals; control; the fleet). A lone
# packet, or a knock sequence's, is never held back: only one arriving in the middle of a flood.
GATHER = 0.0002
FEW = 64  # a turn with fewer main-queue packets is short
BUSY = 0.001

Hook = Callable[[float], None]


class _YieldLoop(Exception):
    """Raised by the queue callback, after the verdict, to leave NetfilterQueue.run() (it returns
    only when the socket is empty). netfilterqueue propagates callback exceptions out of run();
    one netlink message is one packet, so no other packet is left without a verdict."""


class Every:
    """A hook that runs `hook` every `seconds` (the first time on the loop's first turn)."""

    def __init__(self, seconds: float, hook: Hook):
        self.seconds, self.hook, self.next = seconds, hook, float("-inf")

    def __call__(self, now: float) -> None:
        if now >= self.next:
            self.next = now + self.seconds
            self.hook(now)


class Loop:
    def __init__(self, clock: Callable[[], float], log: logging.Logger):
        self.clock, self.log = clock, log
        self.stopping = False
        self.hup = False  # SIGHUP came and has not been taken yet (reload.py takes it)
        self.hooks: list[Hook] = []  # after every turn, in order
        self.first: list[Callable[[list], None]] = []  # right after the select, before the packets (readable fds)
        self.timers: list[Callable[[float], float]] = []  # seconds until each wants a turn without a wake-up
        self.readers: list[Callable[[], list[int]]] = []  # fds a role waits on besides the queues
        self.deadline: Callable[[], float | None] = lambda: None  # the engine's next timer
        self.turn_deadline: float | None = None  # what `deadline` said at the top of this turn
        self.gather: Callable[[list, float], object] = lambda fds, seconds: select.select(fds, [], [], seconds)
        self.drops: DeferredDrops | None = None  # the judge's deferred drops, sent after each queue's run
        self._budget = 0
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None

    def wake(self) -> None:
        try:
            if self._wake_w is not None:
                self._wake_w.send(b"w")
        except OSError:
            pass  # the loop is already awake (buffer full) or gone

    def callback(self, on_packet: Callable[[Any], None]) -> Callable[[Any], None]:
        """The queue callback: the verdict, then out of run() when the batch is spent."""

        def on_queued(queued) -> None:
            on_packet(queued)
            self._budget -= 1
            if self._budget <= 0 or self.stopping or self.hup:
                raise _YieldLoop

        return on_queued

    def guarded(self, body: Callable[[], None], shutdown: list[Callable[[], None]], hup: bool = True) -> None:
        """Run `body` with the signals handled; whatever ends it, run `shutdown` (every step,
        whatever fails) and leave the rules in place. A worker ignores SIGHUP (`hup=False`):
        reloading is the supervisor's."""
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        previous = self._install_signals(hup)
        try:
            body()
        except NfknockError as exc:
            self.log.error("nfknock stopped: %s; %s", exc, CLOSED)
            raise
        except Exception as exc:
            self.log.critical("nfknock stopped on an unexpected error; %s", CLOSED, exc_info=True)
            raise DaemonFailed(f"stopped on an unexpected error ({type(exc).__name__}: {exc}); {CLOSED}") from exc
        finally:
            sd_notify("STOPPING=1")
            for step in [lambda: _restore_signals(previous), *shutdown]:
                try:
                    step()
                except Exception:
                    self.log.exception("while stopping (ignored; %s)", CLOSED)
            self._wake_r.close()
            self._wake_w.close()

    def run(self, queues: list, numbers: Sequence[int] = ()) -> None:
        """Turn until a stop. The grant queue first, every time round: its packets are the ones
        users wait for. `numbers`: the queues' numbers, which a batch verdict names (drops.py);
        without them every drop is sent on its own."""
        served = [(queue.get_fd(), queue) for queue in reversed(queues)]
        batched = dict(zip([fd for fd, _ in reversed(served)], numbers, strict=False))
        drops = self.drops if len(batched) == len(served) else None
        main = served[-1][0] if served else None  # knocks and strangers: what a flood fills
        last_busy = float("-inf")  # when a turn last found packets in the main queue
        wake_r = self._wake_r
        assert wake_r is not None  # guarded made it
        while not self.stopping:
            taken = 0
            deadline = self.turn_deadline = self.deadline()
            now = self.clock()
            sleep = MAX_SLEEP if deadline is None else min(MAX_SLEEP, max(0.0, deadline - now))
            sleep = min([sleep, *(timer(now) for timer in self.timers)])
            waited = [fd for fd, _ in served] + [wake_r.fileno()] + [fd for fds in self.readers for fd in fds()]
            readable, _, _ = select.select(waited, [], [], sleep)
            for first in self.first:
                first(readable)
            for fd, queue in served:
                if fd in readable:
                    self._budget = BATCH
                    if drops is not None:
                        drops.serve(fd, batched[fd])
                    try:
                        queue.run(block=False)
                    except _YieldLoop:
                        pass
                    finally:
                        if drops is not None:
                            drops.flush()  # before anything else: the packets wait in the kernel's queue
                    if fd == main:
                        taken = BATCH - self._budget
            if wake_r.fileno() in readable:
                _drain(wake_r)
            now = self.clock()
            for hook in self.hooks:
                hook(now)
            if taken:
                if taken < FEW and now - last_busy < BUSY and not (self.stopping or self.hup):
                    self.gather([fd for fd in waited if fd != main], GATHER)  # see GATHER
                last_busy = now

    def _install_signals(self, hup: bool) -> dict:
        def stop(signum, frame):
            self.stopping = True

        def reload(signum, frame):
            self.hup = True

        previous = {}
        for signum, handler in ((signal.SIGTERM, stop), (signal.SIGINT, stop), (signal.SIGHUP, reload)):
            previous[signum] = signal.signal(signum, handler if signum != signal.SIGHUP or hup else signal.SIG_IGN)
        assert self._wake_w is not None
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        return previous


def bind_queues(config: DaemonConfig, callback: Callable[[Any], None]) -> list:
    """The main queue (knocks, and new connections from sources not in the granted set) and the
    grant queue after it (new connections from granted sources: no flood reaches it)."""
    from netfilterqueue import NetfilterQueue

    queues: list[Any] = []
    for number in config.queues:
        queue = NetfilterQueue()
        try:
            queue.bind(number, callback, max_len=config.queue_maxlen)
        except OSError as exc:
            for bound in queues:
                bound.unbind()
            raise QueueError(
                f"cannot bind NFQUEUE {number}: {exc} (nfknock uses queues {config.queue_num} to "
                f"{config.all_queues[-1]}; is another nfknock or NFQUEUE listener using one? pick others with "
                "--queue-num)"
            ) from None
        # Non-blocking, so that unbinding at the end never waits: after a flood the socket is
        # full and the kernel's answer to the unbind can be lost (measured: a stop hung for
        # minutes). The loop reads with select and run(block=False) anyway.
        os.set_blocking(queue.get_fd(), False)
        queues.append(queue)
    return queues


def _restore_signals(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    signal.set_wakeup_fd(-1)


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(512):
            pass
    except BlockingIOError:
        pass
