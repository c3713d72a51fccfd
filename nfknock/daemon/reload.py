"""Rules, read and switched: at start, and on SIGHUP while the daemon runs.

A reload never stops the daemon: new rules are read and checked in a thread (a large rules
directory never holds up a verdict), the loop installs them, and on any problem at all the old
rules stay (the firewall put back as it was) and the log says why, one line per problem.

This module is the one owner of the first-step history (doors/first_steps.py MarkHistory):
what each (second port, mark bit) has meant in rules this daemon installed or found installed.
A packet marked under the old rules may still wait in a queue when new ones go in, so a bit
never comes to mean another door's first step while such a packet can be judged; every
decision about first steps is made here, once per start or reload (first_steps.decide), from
this history, and handed to the plan, the engine and the workers as one FirstSteps value. The
history is retired at each reload's start, and stamped once the rules and every engine are
switched: a meaning leaves GRACE seconds after the last rule that marked with it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..doors.first_steps import FirstSteps, MarkHistory, decide
from ..doors.rules import Ruleset
from ..errors import NfknockError, RulesError
from ..firewall.plan import Plan
from ..loading import load_rules
from .config import DaemonConfig, sd_notify
from .scaffold import Scaffold

Switch = Callable[[Ruleset, FirstSteps], list[str]]  # -> doors whose state was reset


def read(config: DaemonConfig) -> Ruleset:
    """The rules on disk, strictly checked (RulesError: nothing is touched)."""
    return load_rules(config.rules_path, strict=True)


class ReloadJob:
    """New rules read and checked in a thread; the loop applies the result. Any error at all is
    kept for the loop to report."""

    def __init__(self, config: DaemonConfig, wake: Callable[[], None], history: MarkHistory):
        self.config = config
        self.history = history  # the reloader's, retired at the job's start (a value: nothing shared)
        self.ruleset: Ruleset | None = None
        self.first_steps: FirstSteps | None = None
        self.plan: Plan | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._wake = wake
        threading.Thread(target=self._read, name="nfknock-reload", daemon=True).start()

    def _read(self) -> None:
        try:
            self.ruleset = read(self.config)
            self.first_steps = decide(self.ruleset.doors, self.history)
            self.plan = self.config.plan(self.ruleset.doors, self.first_steps)
        except BaseException as exc:  # noqa: BLE001 - reported by the loop, whatever it is
            self.error = exc
        finally:
            self.done.set()
            self._wake()


class Reloader:
    """The rules in force, their first steps and the history of mark meanings; reloads."""

    def __init__(
        self,
        config: DaemonConfig,
        ruleset: Ruleset,
        scaffold: Scaffold,
        log: logging.Logger,
        clock: Callable[[], float],
        reraise: tuple[type[BaseException], ...] = (),
    ):
        self.config, self.scaffold, self.log, self.clock = config, scaffold, log, clock
        self.ruleset = ruleset
        # Until start() reads the rules in place: an engine built before it (a role's) must have a
        # decision, and this one is made with the history explicitly empty; start() decides again
        # before any queue is bound or any rule installed.
        self.history = MarkHistory()
        self.first_steps: FirstSteps = decide(ruleset.doors, self.history)
        self.switch: Switch = lambda ruleset, groups: []  # the role's: hand the rules to its engine(s)
        self.installed: list[Callable[[Ruleset], None]] = []  # told of every ruleset now in force
        self.reraise = reraise  # errors that must stop the daemon (a worker that cannot take the rules)
        self._named_in_daemon: set[str] = set()
        self._job: ReloadJob | None = None
        # For the metrics: whether the last reload took the rules on disk, and when rules were
        # last taken (Unix time; the start counts as one).
        self.last_ok, self.last_success = True, time.time()

    def start(self, in_place: MarkHistory) -> Plan:
        """At start, before any queue is bound: keep to what the rules in place mean (`in_place`,
        Scaffold.marks_installed), decide the first steps, and return the plan to install. (Their
        meanings are stamped as gone at the first reload, which comes after the install.)"""
        self.first_steps = decide(self.ruleset.doors, in_place)
        self.history = self.first_steps.history
        return self.config.plan(self.ruleset.doors, self.first_steps)

    def step(self, requested: bool, wake: Callable[[], None]) -> bool:
        """The loop's hook: start a job on request, finish one that is done. Returns whether the
        request was taken."""
        try:
            taken = requested and self._job is None
            if taken:
                sd_notify("RELOADING=1")
                self._job = ReloadJob(self.config, wake, self.history.retire(self.clock()))
            if self._job is not None and self._job.done.is_set():
                job, self._job = self._job, None
                self.finish(job.ruleset, job.plan, job.error, job.first_steps)
                sd_notify("READY=1")
            return taken
        except self.reraise:
            raise
        except Exception as exc:  # a reload never stops the daemon
            self._job = None
            self.refuse(exc)
            return True

    def reload(self) -> bool:
        """Read and apply the rules on disk now (in the caller's thread)."""
        try:
            ruleset = read(self.config)
            first_steps = decide(ruleset.doors, self.history.retire(self.clock()))
            return self.finish(ruleset, self.config.plan(ruleset.doors, first_steps), None, first_steps)
        except BaseException as exc:  # noqa: BLE001 - the same report as from the reload thread
            return self.finish(None, None, exc)

    def finish(
        self,
        ruleset: Ruleset | None,
        new_plan: Plan | None,
        error: BaseException | None,
        first_steps: FirstSteps | None = None,
    ) -> bool:
        """Switch to rules read by a reload (`first_steps`: what `new_plan` has the kernel
        record); on any problem keep the old rules and say why."""
        if error is None and ruleset is not None and new_plan is not None and first_steps is not None:
            try:
                # Before the rules go in: from then on packets may carry these meanings.
                self.history = first_steps.history
                self.scaffold.apply(new_plan, self.clock())
            except Exception as exc:
                error = exc
                # Whichever rules the kernel holds now may mark: both decisions' meanings stay.
                self.history = first_steps.history.installed(self.first_steps.groups + first_steps.groups)
                self._restore_firewall()
        if error is not None or ruleset is None or first_steps is None:
            self.refuse(error)
            return False
        self.first_steps = first_steps
        self.ruleset = ruleset
        self.last_ok, self.last_success = True, time.time()
        dropped = self.switch(ruleset, first_steps)
        for installed in self.installed:
            installed(ruleset)
        # The rules and every engine switched: the meanings only the old rules marked with leave now.
        self.history = self.history.retire(self.clock())
        self.log.info(
            "reloaded %s: %d door(s)%s",
            self.config.rules_path,
            len(ruleset.doors),
            f"; state reset for changed door(s): {', '.join(dropped)}" if dropped else "",
        )
        self.name_daemon_first_steps()
        return True

    def protected_ports(self) -> set[tuple[str, int]]:
        """(proto, port) of every port the rules in force protect."""
        return {(port.proto, port.port) for door in self.ruleset.doors for port in door.protect}

    def refuse(self, error: BaseException | None) -> None:
        self.last_ok = False
        if isinstance(error, RulesError):
            lines = list(error.lines)
        elif isinstance(error, NfknockError):
            lines = str(error).splitlines()
        else:
            lines = [f"{self.config.rules_path}: unexpected {type(error).__name__} while reading: {str(error)[:200]}"]
        for line in lines:
            self.log.error("reload refused, keeping the current rules: %s", line)

    def name_daemon_first_steps(self) -> None:
        """Warn about knock doors whose first knocks reach the queue (a flood there competes with
        clients' knocks; first_steps.py): all of them at start, and after a reload those that
        were not there before it (new doors included)."""
        now = self.first_steps.in_daemon
        for name, reason in sorted(now.items()):
            if name not in self._named_in_daemon:
                self.log.warning("door %s: its first knocks go to the daemon, not the kernel: %s", name, reason)
        self._named_in_daemon = set(now)

    def _restore_firewall(self) -> None:
        try:
            self.scaffold.apply(self.config.plan(self.ruleset.doors, self.first_steps), self.clock())
        except Exception as exc:
            self.log.error("could not put the previous rules back after a failed reload: %s", exc)
