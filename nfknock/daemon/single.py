"""The daemon as one process: it owns the rules, binds the queues and judges every packet.

Fail closed, on every way out. The scaffolding sends protected-port SYNs to the queue and never
uses --queue-bypass, so whenever no process is bound to the queue the kernel drops them: the
daemon never removes the scaffolding itself. A clean stop (SIGTERM, SIGINT) leaves it in place
and says so; an unexpected error is logged with its traceback and ends the process non-zero with
the rules in place (exactly as after SIGKILL or the OOM killer); only a deliberate `nfknock down`
takes them away. A reload never stops the daemon (reload.py). Bad input (a packet, a control
request) never leaves its handler.

Start order: rules are validated before anything changes; the queue is bound before the
scaffolding sends packets to it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..doors.describe import as_line
from ..doors.first_steps import MarkHistory
from ..doors.rules import Ruleset
from ..errors import UsageError
from ..extras import FLEET, require, require_for_run
from ..firewall.backend import Firewall
from ..trust import why_unsafe
from .claims import SUBDIR, open_claims
from .config import CLOSED, STATS_EVERY, DaemonConfig, sd_notify
from .front import Front
from .heartbeat import heartbeat
from .judge import Judge
from .lastgood import ready_status
from .loop import Every, Loop, bind_queues
from .reload import Reloader, read
from .scaffold import ROTATION_EVERY, SESSIONS_EVERY, Scaffold
from .store import ReplayStore


def check_state_dir(config: DaemonConfig) -> None:
    if config.state_dir is not None and (unsafe := why_unsafe(config.state_dir)):
        # Whoever can write there can make used SPA packets usable again.
        raise UsageError(f"--state-dir {config.state_dir}: not trusted: {unsafe}")


class Single(Judge):
    def __init__(
        self,
        config: DaemonConfig,
        firewall: Firewall,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        ruleset: Ruleset | None = None,
        claims: Any = None,
        last_good: Any = None,
    ):
        log = logger or logging.getLogger("nfknock")
        ruleset = ruleset if ruleset is not None else read(config)  # RulesError: nothing touched yet
        check_state_dir(config)
        # The replay records of an earlier run with workers, if it left some: read and written
        # here too, so that none becomes usable again.
        if claims is None and config.state_dir is not None and (Path(config.state_dir) / SUBDIR).is_dir():
            claims = open_claims(Path(config.state_dir) / SUBDIR)
        store = ReplayStore(config.state_dir) if config.state_dir else None
        self.scaffold = Scaffold(config, firewall, log, clock)
        self.reloader = Reloader(config, ruleset, self.scaffold, log, clock)
        super().__init__(config, firewall, log, clock, wall_clock, ruleset, self.reloader.first_steps, claims, store)
        self.reloader.switch = self.adopt
        self.last_good = last_good  # lastgood.LastGood, or None (tests)
        if last_good is not None:
            self.reloader.installed.append(last_good.installed)
        self.loop = Loop(clock, log)
        self.wake = self.loop.wake
        self.front = Front(config, log, self.answer, self.snapshot, self.loop.wake)

    @property
    def mark_history(self) -> MarkHistory:
        return self.reloader.history

    def reload(self) -> bool:
        return self.reloader.reload()

    def run(self, ready: Callable[[], None] | None = None) -> None:
        # What the server and metrics extras bring, checked before a queue is bound or a rule
        # installed: a missing one is a single line (MissingExtra), not a traceback or a half start.
        require_for_run(self.config.metrics_port, self.firewall.name)
        if self.config.fleet is not None:
            require("redis", FLEET, "--cluster")
        self.survey_handshakes()
        # Rules left by an earlier run may still mark packets until ours replace them: keep to
        # what their mark bits mean (first_steps.py), before any queue is bound.
        plan = self.reloader.start(self.scaffold.marks_installed())
        self.first_steps = self.reloader.first_steps
        self.engine.use_first_steps(self.first_steps)
        queues = bind_queues(self.config, self.loop.callback(self.on_packet))

        def body() -> None:
            self.scaffold.warn_about_flavour()
            self.granted.create()  # before the rules that refer to the sets
            self.start_fleet(self.loop.wake)
            self.scaffold.watch(self.loop, self.granted, self._grants, self.reloader.protected_ports)
            self.scaffold.apply(plan, self.clock())
            self.scaffold.sync_rotation(self.ruleset.doors, self.wall_clock())  # rotating doors' current steps
            if self.last_good is not None:
                self.last_good.installed(self.ruleset)
            self.front.start(self.clock())
            self._log_ready()
            status = ready_status(self.last_good, len(self.ruleset.doors))
            sd_notify(f"READY=1\nSTATUS={status} on queue {self.config.queue_num}")
            if ready is not None:
                ready()
            self._hook_into(self.loop)
            self.loop.run(queues, self.config.queues)
            self.log.info("nfknock stopped by a signal; %s", CLOSED)

        shutdown = [self.front.close, self.log_totals, self.close, self.scaffold.close] + [
            queue.unbind for queue in queues
        ]
        self.loop.guarded(body, shutdown)

    def _hook_into(self, loop: Loop) -> None:
        self.hook_into(loop)
        loop.hooks += [
            self.front.serve_control,
            lambda now: self.granted.flush(),
            self.fleet_step,
            self._reload_step,
            self.expire,
            self.settle,
            Every(STATS_EVERY, lambda now: self.report_counters()),
            Every(SESSIONS_EVERY, self.scaffold.sync_sessions),
            Every(ROTATION_EVERY, lambda now: self.scaffold.sync_rotation(self.ruleset.doors, self.wall_clock())),
            self.front.serve_snapshot,
        ]
        # systemd's watchdog (WatchdogSec=): pinged from this loop's turns only (heartbeat.py).
        if (beat := heartbeat(os.environ, os.getpid(), sd_notify)) is not None:
            loop.hooks.append(beat)

    @property
    def guard(self):
        """The scaffolding watcher (guard.py), for status and the metrics."""
        return self.scaffold.guard

    def _grants(self) -> list[tuple[str, float]]:
        now = self.clock()
        return [(src, self.engine.grant_left(src, now)) for _, src, _ in self.engine.grants(now)]

    def _reload_step(self, now: float) -> None:
        if self.reloader.step(self.loop.hup, self.loop.wake):
            self.loop.hup = False

    def _log_ready(self) -> None:
        for door in self.ruleset.doors:
            self.log.info("%s", as_line(door))
        self.reloader.name_daemon_first_steps()
        self.log.info("ready: pid %d, queue %d, firewall %s", os.getpid(), self.config.queue_num, self.firewall.name)
