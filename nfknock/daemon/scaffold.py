"""The daemon's side of the firewall: install a plan (its sessions sets filled first), prune the
sets it no longer uses, keep the sessions sets following the host's sockets, and read what rules
in place mean before replacing them. Owned by the process that installs the rules: the single
process, or the supervisor of workers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from ..doors.first_steps import MarkHistory
from ..doors.rules import Door
from ..errors import FirewallError
from ..firewall import FLAVOURS
from ..firewall.backend import Firewall, PerFamily
from ..firewall.granted import GrantedSets, prune_first_step_sets
from ..firewall.host import iptables_flavour, marks_installed, other_flavour_chain, saved_chain
from ..firewall.plan import CHAIN, Plan
from ..firewall.rotation_sets import RotationSets
from ..firewall.sessions import SYNC_EVERY, SessionSets, prune_session_sets
from .config import DaemonConfig
from .guard import Guard, start_guard
from .loop import Loop
from .stats import QUEUE_PROC, parse_queue_table

SESSIONS_EVERY = SYNC_EVERY
ROTATION_EVERY = 2.0  # seconds between looks at the rotating doors' windows (rotation_sets.py)


class Scaffold:
    def __init__(self, config: DaemonConfig, firewall: Firewall, log: logging.Logger, clock: Callable[[], float]):
        self.config, self.firewall, self.log, self.clock = config, firewall, log, clock
        self.real = firewall if isinstance(firewall, PerFamily) else None  # a test's fake has no sets
        self.sessions: SessionSets | None = None
        self.sessions_failed = 0
        self.rotation: RotationSets | None = None
        self.rotation_failed = 0
        self.applied: Plan | None = None
        self.guard: Guard | None = None  # the watcher that puts back what others remove (guard.py)

    def apply(self, plan: Plan, now: float) -> None:
        """Install the plan, its sessions sets filled first (sessions.py: the host's sessions
        survive the switch even where conntrack does not know them); then sets it no longer uses
        go (a failure there is logged: a leftover set holds no rule and opens nothing)."""
        if self.real is not None:
            if self.sessions is None:
                self.sessions = SessionSets(self.real.set_runner())
            self.sessions.sync(plan, now)
        self.firewall.apply(plan)
        self.applied = plan
        if self.guard is not None:
            self.guard.applied(plan)
        if self.real is not None:
            runner = self.real.set_runner()
            try:
                for name in prune_first_step_sets(self.config.queue_num, plan, runner):
                    self.log.info("removed the first-step set %s (no door uses it any more)", name)
                for name in prune_session_sets(self.config.queue_num, plan, runner):
                    self.log.info("removed the sessions set %s (no door protects its port any more)", name)
            except FirewallError as exc:
                self.log.warning("%s", exc)

    def watch(
        self,
        loop: Loop,
        granted: GrantedSets,
        grants: Callable[[], list[tuple[str, float]]],
        protected: Callable[[], set[tuple[str, int]]],
    ) -> None:
        """Start the watcher before the first install (guard.py): its fd in the loop's select, a
        look right after every wake-up, before the packets (closed first), and its timers."""
        self.guard = guard = start_guard(self.firewall, self.log, granted, grants, self._sessions_anew, protected)
        if guard is None:
            return
        loop.readers.append(guard.fds)
        loop.first.append(lambda readable: guard.step(readable, self.clock()))
        loop.timers.append(guard.sleep)

    def _sessions_anew(self) -> None:
        """The sets were re-created: every session goes in again at the next sync."""
        if self.sessions is not None:
            self.sessions.written, self.sessions.refreshed = {}, None
        if self.rotation is not None:
            self.rotation.written = {}

    def close(self) -> None:
        if self.guard is not None:
            self.guard.close()

    def sync_sessions(self, now: float) -> None:
        """The sessions sets follow the host's sockets (sessions.py); a failure is logged (at
        worst a session without conntrack entry is dropped: closed)."""
        if self.sessions is None or self.applied is None:
            return
        try:
            self.sessions.sync(self.applied, now)
        except FirewallError as exc:
            self.sessions_failed += 1
            if self.sessions_failed <= 10 or self.sessions_failed % 100 == 0:
                self.log.warning("%s (%d so far)", exc, self.sessions_failed)

    def sync_rotation(self, doors: tuple[Door, ...], wall: float) -> None:
        """The rotating doors' sets hold their current steps (rotation_sets.py); a failure is
        logged (at worst a current step is dropped by the kernel: closed). Hook point: right
        after the first apply, and every ROTATION_EVERY seconds (single.py, supervisor.py)."""
        if self.real is None or self.applied is None:
            return
        if self.rotation is None:
            self.rotation = RotationSets(self.real.set_runner())
        try:
            self.rotation.sync(self.applied, doors, wall)
        except FirewallError as exc:
            self.rotation_failed += 1
            if self.rotation_failed <= 10 or self.rotation_failed % 100 == 0:
                self.log.warning("%s (%d so far)", exc, self.rotation_failed)

    def marks_installed(self) -> MarkHistory:
        """What the first-step marks of rules in place mean: ours, and a chain the other iptables
        flavour may still hold (an earlier run with the other --firewall) that marks packets for
        our queues too (doors/first_steps.py keeps to these meanings)."""
        queue, pass_mark = self.config.queue_num, self.config.pass_mark
        try:
            held = marks_installed(self.firewall.installed(), queue, pass_mark)
        except Exception as exc:  # noqa: BLE001 - applying the rules will say what is wrong
            self.log.warning("cannot read the rules in place (%s): assuming none", exc)
            held = MarkHistory()
        if self.firewall.name not in FLAVOURS:
            return held
        other = next(flavour for flavour in FLAVOURS if flavour != self.firewall.name)
        elsewhere = saved_chain(other)
        self._warn_about_other_chain(other, elsewhere)
        return held | marks_installed(elsewhere, queue, pass_mark)

    def _warn_about_other_chain(self, other: str, chain: dict[int, list[str]]) -> None:
        """Name a chain the other iptables flavour still holds (a stop leaves the rules, and a
        start replaces only its own flavour's): it sends packets to our queues or to queues no
        one listens to, and either way this daemon cannot tell from what it sees."""
        listened = set(parse_queue_table(_read(QUEUE_PROC)))
        text = other_flavour_chain(other, chain, set(self.config.all_queues), listened)
        if text is not None:
            self.log.warning("%s", text)

    def warn_about_flavour(self) -> None:
        if self.firewall.name == "legacy" and iptables_flavour() == "nf_tables":
            self.log.warning(
                "this host's 'iptables' is the nf_tables flavour but --firewall legacy was chosen; nfknock's "
                "rules live in the legacy tables: list them with 'iptables-legacy -S %s' (the kernel applies "
                "both)",
                CHAIN,
            )


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
