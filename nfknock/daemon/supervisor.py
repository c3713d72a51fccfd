"""The supervisor of `nfknock run --workers N`: it owns the rules, the control socket, the metrics
exporter and reloads, and never sees a packet; each worker (worker.py) judges its shard.

Fail closed: a worker that dies leaves its queues unbound, so the kernel drops its share of the
packets, and the supervisor then stops the others and exits non-zero with the rules in place
(workers.py)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any

from ..doors.describe import as_line
from ..doors.first_steps import FirstSteps
from ..doors.rules import Ruleset
from ..errors import NfknockError
from ..extras import FLEET, require, require_for_run
from ..firewall.backend import Firewall
from ..firewall.granted import GrantedSets
from . import control, metrics
from .config import CLOSED, STATS_EVERY, DaemonConfig, sd_notify
from .front import Front
from .heartbeat import heartbeat
from .lastgood import ready_status
from .loop import Every, Loop
from .reload import Reloader, read
from .scaffold import ROTATION_EVERY, SESSIONS_EVERY, Scaffold
from .single import check_state_dir
from .store import ReplayStore
from .worker import WorkerSeed, main
from .workers import WorkerDied, WorkerPool


class Supervisor:
    def __init__(
        self,
        config: DaemonConfig,
        firewall: Firewall,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        ruleset: Ruleset | None = None,
        last_good: Any = None,
    ):
        self.config, self.firewall, self.clock, self.wall_clock = config, firewall, clock, wall_clock
        self.log = logger or logging.getLogger("nfknock")
        ruleset = ruleset if ruleset is not None else read(config)  # RulesError: nothing touched yet
        check_state_dir(config)
        self.scaffold = Scaffold(config, firewall, self.log, clock)
        self.reloader = Reloader(config, ruleset, self.scaffold, self.log, clock, reraise=(WorkerDied,))
        self.reloader.switch = self._hand_over
        self.last_good = last_good  # lastgood.LastGood, or None (tests)
        if last_good is not None:
            self.reloader.installed.append(last_good.installed)
        self.granted = GrantedSets(config.queue_num, self.log)  # created here, filled by the workers
        self.pool: WorkerPool | None = None
        self.loop = Loop(clock, self.log)
        self.front = Front(config, self.log, self.answer, self._snapshot, self.loop.wake)

    @property
    def ruleset(self) -> Ruleset:
        return self.reloader.ruleset

    @property
    def first_steps(self) -> FirstSteps:
        return self.reloader.first_steps

    def run(self, ready: Callable[[], None] | None = None) -> None:
        require_for_run(self.config.metrics_port, self.firewall.name)
        if self.config.fleet is not None:
            require("redis", FLEET, "--cluster")
        # Rules left by an earlier run may still mark packets until ours replace them: keep to
        # what their mark bits mean, before any worker is forked (they get this decision).
        plan = self.reloader.start(self.scaffold.marks_installed())
        # The workers bind their queues before any rule sends packets there.
        self.pool = pool = WorkerPool(self.config, self.log, self.clock)
        seed = WorkerSeed(
            self.config, self.firewall, self.log, self.clock, self.wall_clock, self.ruleset, self.first_steps
        )

        def spawn(shard: int, channel: Connection, claims: Any) -> None:
            main(seed, shard, channel, claims)

        pool.start(spawn, ReplayStore(self.config.state_dir).load() if self.config.state_dir else None)

        def body() -> None:
            self.scaffold.warn_about_flavour()
            self.granted.create()  # before the rules that refer to the sets
            # The grants live in the workers: a granted set destroyed by someone is not refilled
            # here (their sources' SYNs then take the main queue, judged by their worker as before).
            self.scaffold.watch(self.loop, self.granted, list, self.reloader.protected_ports)
            self.scaffold.apply(plan, self.clock())
            self.scaffold.sync_rotation(self.ruleset.doors, self.wall_clock())  # rotating doors' current steps
            if self.last_good is not None:
                self.last_good.installed(self.ruleset)
            self.front.start(self.clock())
            self._log_ready(pool)
            status = ready_status(self.last_good, len(self.ruleset.doors))
            sd_notify(f"READY=1\nSTATUS={status} on queue {self.config.queue_num}")
            if ready is not None:
                ready()
            self.loop.readers.append(pool.fds)
            self.loop.hooks += [
                self._serve_pool,
                self.front.serve_control,
                self._reload_step,
                Every(STATS_EVERY, lambda now: pool.sweep(self.wall_clock())),  # each worker reports its own
                Every(SESSIONS_EVERY, self.scaffold.sync_sessions),
                Every(ROTATION_EVERY, lambda now: self.scaffold.sync_rotation(self.ruleset.doors, self.wall_clock())),
                self.front.serve_snapshot,
            ]
            # systemd's watchdog: pinged from this loop, and only while every worker answers
            # (heartbeat.py): a stuck worker gets the daemon restarted, closed meanwhile.
            if (beat := heartbeat(os.environ, os.getpid(), sd_notify, pool.answering)) is not None:
                pool.watchdog.restarted_after = 2 * beat.every
                self.loop.hooks.append(beat)
            self.loop.run([])
            self.log.info("nfknock stopped by a signal; %s", CLOSED)

        self.loop.guarded(body, [self.front.close, self.granted.close, self.scaffold.close, pool.stop])

    @property
    def guard(self):
        """The scaffolding watcher (guard.py), for status and the metrics."""
        return self.scaffold.guard

    def _serve_pool(self, now: float) -> None:
        """What the workers sent, and whether they all live and answer."""
        assert self.pool is not None
        self.pool.pump()
        if not self.loop.stopping:  # under systemd a stop signals the workers too: they may go first
            self.pool.check()
            self.pool.watch(self.clock())

    def _reload_step(self, now: float) -> None:
        if self.reloader.step(self.loop.hup, self.loop.wake):
            self.loop.hup = False

    def _hand_over(self, ruleset: Ruleset, first_steps: FirstSteps) -> list[str]:
        """Every worker takes the rules just installed, with the first steps decided here."""
        assert self.pool is not None
        return self.pool.reload(ruleset, first_steps)

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """A control request for all workers as one daemon. A failure is the request's, not the
        daemon's; a worker that died stops the daemon (closed)."""
        assert self.pool is not None
        try:
            answer = self.pool.answer(request)
            if request["cmd"] == "status" and "error" not in answer:
                answer.update(control.process_status(self))  # what the supervisor alone knows
            if request["cmd"] == "revoke" and answer.get("revoked") == []:  # no worker said it
                who = request.get("address") or f"key {request.get('key')}"
                self.log.info("%s: revoked by the operator (no grant)", who)
            return answer
        except WorkerDied:
            raise
        except NfknockError as exc:
            self.log.warning("control request %s: %s", request.get("cmd"), exc)
            return {"error": str(exc)}
        except Exception as exc:
            self.log.exception("control request %s failed", request.get("cmd"))
            return {"error": f"internal error: {type(exc).__name__}"}

    def _snapshot(self, now: float) -> metrics.Snapshot | None:
        """A slow worker costs a scrape its freshness, not the daemon: the last snapshot serves."""
        assert self.pool is not None
        try:
            snapshot = metrics.of_process(self, self.pool.snapshot())
            rss = [(worker.shard, metrics.resident_bytes(worker.pid)) for worker in self.pool.workers]
            return replace(snapshot, worker_rss=tuple((shard, size) for shard, size in rss if size is not None))
        except WorkerDied:
            raise
        except NfknockError as exc:
            self.log.warning("metrics: %s; the last snapshot is served", exc)
            return self.front.snapshot

    def _log_ready(self, pool: WorkerPool) -> None:
        for door in self.ruleset.doors:
            self.log.info("%s", as_line(door))
        self.reloader.name_daemon_first_steps()
        queues = self.config.all_queues
        self.log.info(
            "ready: pid %d, %d workers (pids %s) on queues %d-%d, firewall %s",
            os.getpid(),
            self.config.workers,
            " ".join(map(str, pool.pids)),
            queues[0],
            queues[-1],
            self.firewall.name,
        )
