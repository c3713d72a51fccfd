"""One worker process of `nfknock run --workers N` (workers.py has the supervisor's side): it
binds its shard's pair of queues and judges the packets the scaffolding sends there; the
supervisor owns the rules, the control socket, the metrics and reloads, and talks to it over
its channel between batches. A worker is seeded with data (the rules and first steps the
supervisor installed), never with the supervisor's object."""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

from ..doors.first_steps import FirstSteps
from ..doors.rules import Ruleset
from ..firewall.backend import Firewall
from .config import STATS_EVERY, DaemonConfig
from .judge import Judge
from .loop import Every, Loop, bind_queues

PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerSeed:
    """What a worker starts from: the supervisor's settings and the rules it installed."""

    config: DaemonConfig
    firewall: Firewall
    log: logging.Logger
    clock: Callable[[], float]
    wall_clock: Callable[[], float]
    ruleset: Ruleset
    first_steps: FirstSteps


class Worker(Judge):
    def __init__(self, seed: WorkerSeed, shard: int, claims: Any, channel: Connection | None = None):
        config = replace(seed.config, shard=shard)
        super().__init__(
            config, seed.firewall, seed.log, seed.clock, seed.wall_clock, seed.ruleset, seed.first_steps, claims
        )
        self.channel = channel  # the supervisor's end
        self.loop = Loop(seed.clock, seed.log)

    @property
    def stopping(self) -> bool:
        return self.loop.stopping

    @stopping.setter
    def stopping(self, value: bool) -> None:
        self.loop.stopping = value

    def run(self, bound: Callable[[], None]) -> None:
        """Its queues, its loop; the supervisor does the rest."""
        self.survey_handshakes()
        queues = bind_queues(self.config, self.loop.callback(self.on_packet))

        def body() -> None:
            self.granted.connect()  # the supervisor created the sets
            self.start_fleet(self.loop.wake)
            bound()
            self.hook_into(self.loop)
            assert self.channel is not None
            channel = self.channel
            self.loop.readers.append(lambda: [channel.fileno()])
            self.loop.hooks += [
                self._serve_channel,
                self.fleet_step,
                self.expire,
                self.settle,
                Every(STATS_EVERY, lambda now: self.report_counters()),
            ]
            self.loop.run(queues, self.config.queues)

        shutdown = [self.log_totals, self.close] + [queue.unbind for queue in queues]
        self.loop.guarded(body, shutdown, hup=False)

    def _serve_channel(self, now: float) -> None:
        """What the supervisor asked; its end of file means the supervisor is gone: stop."""
        assert self.channel is not None
        try:
            while self.channel.poll():
                serve(self, self.channel.recv())
        except (EOFError, OSError):
            self.loop.stopping = True
        self.granted.flush()


def serve(worker: Any, message: tuple) -> None:
    """One message from the supervisor, in the worker's loop between batches."""
    kind = message[0]
    if kind == "stop":
        worker.stopping = True
    elif kind == "ping":  # the supervisor's check that this loop turns (WorkerPool.watch)
        worker.channel.send(("pong",))
    elif kind == "control":
        _, rid, deadline, request = message
        if time.monotonic() > deadline:  # the supervisor has answered "did not answer": so be it
            worker.log.warning("control request %s came too late to this worker: not carried out", request["cmd"])
            return
        worker.channel.send(("reply", rid, worker.answer(request)))
    elif kind == "snapshot":
        worker.channel.send(("reply", message[1], worker.snapshot(worker.clock())))
    elif kind == "reload":
        with open(message[3], "rb") as file:
            ruleset, first_steps = pickle.load(file)  # written by the supervisor, root-only  # noqa: S301
        worker.channel.send(("reply", message[1], worker.adopt(ruleset, first_steps)))


def main(seed: WorkerSeed, shard: int, conn: Connection, claims: Any) -> None:
    """The body of a forked worker. Never returns."""
    code = 1
    try:
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(name, None)  # only the supervisor speaks to systemd
        _die_with_parent()
        Worker(seed, shard, claims, conn).run(lambda: conn.send(("bound", shard)))
        code = 0
    except BaseException as exc:  # noqa: BLE001 - logged by run; the supervisor says why
        try:
            conn.send(("failed", str(exc).split("; the rules stay")[0] or type(exc).__name__))
        except OSError:
            pass
    finally:
        os._exit(code)


def _die_with_parent() -> None:
    """SIGTERM this worker when the supervisor dies, however it dies."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before the call
        os.kill(os.getpid(), signal.SIGTERM)
