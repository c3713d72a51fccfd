"""What a process that judges packets is made of (a single process, or one worker): the engine,
the sinks chosen once for its role, the hot path, and what the loop asks of it between batches
(control requests, timers, the fleet, the counters). The supervisor of workers judges nothing
and has none of this."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..doors.engine import Engine, Verdict
from ..doors.first_steps import FirstSteps
from ..doors.rules import Ruleset
from ..firewall.backend import Firewall, PerFamily
from ..firewall.granted import GrantedSets
from ..firewall.handshakes import Handshakes
from . import control, metrics
from .claims import live_records
from .config import DaemonConfig
from .cutter import HandshakeCutter
from .drops import DeferredDrops
from .logs import RateLimit, log_events
from .loop import Loop
from .sinks import ClaimsSink, FleetSink, GrantedSink, LogSink, ReplayStoreSink, Sinks, TallySink
from .stats import Reporter, read_queue_drops
from .store import ReplayStore
from .verdicts import Verdicts


class Judge:
    def __init__(
        self,
        config: DaemonConfig,
        firewall: Firewall,
        log: logging.Logger,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        ruleset: Ruleset,
        first_steps: FirstSteps,
        claims: Any = None,
        store: ReplayStore | None = None,
    ):
        self.config, self.firewall, self.log, self.clock, self.wall_clock = config, firewall, log, clock, wall_clock
        self.ruleset = ruleset
        self.first_steps = first_steps
        self.claims, self.store = claims, store
        # A shared replay cache asks before it grants (ClaimNeeded): the other workers, the fleet,
        # or the replay cache on disk, which is written off the verdict path (sinks.py).
        shared = config.fleet is not None or config.workers > 1 or claims is not None or store is not None
        self.wake: Callable[[], None] = lambda: None  # the loop's, once the role has one
        # --max-sources bounds the daemon: each worker tracks its share of the sources.
        self.engine = Engine(
            ruleset.doors, -(-config.max_sources // config.workers), shared=shared, first_steps=first_steps
        )
        if store is not None:
            self.engine.restore_replays(store.load(), wall_clock())
        self.log_limit = RateLimit()
        self.sinks = Sinks()
        self.grants = GrantedSink(self.engine, GrantedSets(config.queue_num, log), log, self._protected_tcp)
        if isinstance(firewall, PerFamily):  # a test's fake firewall has no conntrack to cut
            # A revoke cuts pending handshakes by their exact tuples (cutter.py); the survey reads
            # what an earlier process let begin.
            self.grants.handshakes = HandshakeCutter(Handshakes(), log, clock())
        self.fleet_sink = FleetSink(self.sinks.consume, wall_clock)
        self.tally = TallySink() if config.metrics_port else None
        last_word = claims is None and config.fleet is None
        self.store_sink = (
            None
            if store is None
            else ReplayStoreSink(store, self.engine, self.grants, self.sinks, last_word, log, lambda: self.wake())
        )
        self.sinks.add(
            self.grants,
            self.store_sink,
            LogSink(log, self.log_limit),
            self.tally,
            None
            if claims is None
            else ClaimsSink(claims, self.engine, self.grants, self.fleet_sink, self.sinks.consume, log, wall_clock),
        )
        self.verdicts = Verdicts(self.engine, self.sinks, clock, wall_clock, config.pass_mark, log)
        self.on_packet = self.verdicts.on_packet
        self.reporter = Reporter()
        # When the engine next has something to expire; in a loop, what the loop read at the top
        # of the turn (hook_into): asking the engine again costs a walk over every table, each turn.
        self.turn_deadline: Callable[[], float | None] = self.engine.next_deadline

    def survey_handshakes(self) -> None:
        """Read the pending handshakes an earlier process let begin (cutter.py); once the server
        extra is known to be there, before the queues are bound."""
        if self.grants.handshakes is not None:
            self.grants.handshakes.survey()

    # What control.py, metrics.py and the tests read of a daemon.
    @property
    def errors(self) -> int:
        return self.verdicts.errors

    @property
    def unparsable(self) -> dict[str, int]:
        return self.verdicts.unparsable

    @property
    def handled(self) -> dict[Verdict, int]:
        return self.verdicts.handled

    @property
    def tallies(self) -> dict:
        return {} if self.tally is None else self.tally.tallies

    @property
    def granted(self) -> GrantedSets:
        return self.grants.granted

    @granted.setter
    def granted(self, sets: GrantedSets) -> None:
        self.grants.granted = sets

    @property
    def fleet(self) -> Any:
        return self.fleet_sink.member

    @fleet.setter
    def fleet(self, member: Any) -> None:
        """The fleet's sink joins the pipeline (last) once there is a member: no cost without."""
        self.fleet_sink.member = member
        if member is not None and self.fleet_sink not in self.sinks.sinks:
            self.sinks.add(self.fleet_sink)

    def _protected_tcp(self) -> set[int]:
        return {p.port for door in self.ruleset.doors for p in door.protect if p.proto == "tcp"}

    def sync_granted(self, src: str, now: float) -> None:
        self.grants.sync(src, now)

    def adopt(self, ruleset: Ruleset, first_steps: FirstSteps) -> list[str]:
        """Switch the engine to rules already installed (`first_steps`: what the kernel records with
        kernel); returns the doors whose state was reset."""
        dropped = self.engine.reload(ruleset.doors, first_steps)
        self.ruleset, self.first_steps = ruleset, first_steps
        self.sinks.consume(self.engine.rekeyed, self.clock())  # SPA keys that left, with their grants
        return dropped

    def hook_into(self, loop: Loop) -> None:
        """What every judging loop does each turn, in this order (a role adds its own around)."""
        loop.deadline = self.engine.next_deadline
        self.turn_deadline = lambda: loop.turn_deadline
        loop.drops = self.verdicts.drops = DeferredDrops(self.log)  # a flood's drops, one message a turn
        loop.hooks.append(lambda now: self.granted.flush())  # after the packets that were waiting: granted.py

    def settle(self, now: float) -> None:
        """Claims answered by a durable write, then the connections held behind them judged again
        (the loop's hook, each turn)."""
        if self.store_sink is not None:
            self.store_sink.step(now)
        self.verdicts.release(now)

    def expire(self, now: float) -> None:
        """Whatever ran out, after the turn's packets. The turn's deadline is as good as a fresh
        one: what its packets added ends later than now (lifetimes are seconds); what they removed
        at most makes `engine.expire` find nothing."""
        deadline = self.turn_deadline()
        if deadline is not None and now >= deadline:
            log_events(self.log, self.engine.expire(now), self.log_limit, now)

    # -- control requests ------------------------------------------------------------------

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """One checked control request, from the loop. A failure is the request's, not the daemon's."""
        try:
            now = self.clock()
            answer = control.answer(self, request, now)
            if "error" not in answer:
                for address in answer.get("addresses", [request.get("address")]):
                    if address:
                        self.sync_granted(address, now)
                if self.fleet is not None and request["cmd"] != "status":
                    self.fleet.on_control(request, answer, now, self.wall_clock())
            return answer
        except Exception as exc:
            self.log.exception("control request %s failed", request.get("cmd"))
            return {"error": f"internal error: {type(exc).__name__}"}

    # -- fleet mode ------------------------------------------------------------------------

    def start_fleet(self, wake: Callable[[], None]) -> None:
        """The Redis link (threads of its own); the loop only ever hands it work and reads its
        answers, between batches of packets."""
        if self.config.fleet is not None:
            from ..fleet.member import FleetMember

            self.fleet = FleetMember(
                self.config.fleet, self.engine, self.log, wake, wall=self.wall_clock, state_dir=self.config.state_dir
            )
            if self.claims is not None:  # what the workers used before a restart: put back if Redis loses it
                self.fleet.link.hold_records(live_records(self.claims, self.wall_clock()))
            self.fleet.start()

    def fleet_step(self, now: float) -> None:
        if self.fleet is None:
            return
        try:
            events, touched = self.fleet.step(now, self.wall_clock())
            if events:
                self.sinks.consume(events, now)
            for src in touched:
                self.sync_granted(src, now)
        except Exception:  # the fleet never stops the daemon
            self.verdicts.errors += 1
            self.log.exception("internal error while applying what the fleet said (ignored)")
        self.granted.flush()

    # -- counters --------------------------------------------------------------------------

    def report_counters(self) -> None:
        lines = self.reporter.report(
            self.config.queues[0],
            read_queue_drops(self.config.queues[0]),
            self.unparsable,
            self.engine.evicted,
            self.errors,
            self.config.max_sources,
        )
        for line in lines + self.log_limit.held_back():
            self.log.warning("%s", line)

    def snapshot(self, now: float) -> metrics.Snapshot:
        return metrics.take(self, now)

    def log_totals(self) -> None:
        self.report_counters()
        self.log.info(
            "handled %d packets: %d accepted, %d dropped, %d passed back; %d attempts and %d grants tracked",
            sum(self.handled.values()),
            self.handled[Verdict.ACCEPT],
            self.handled[Verdict.DROP],
            self.handled[Verdict.PASS],
            self.engine.tracked,
            len(self.engine.grants(self.clock())),
        )

    def close(self) -> None:
        """Everything a judge holds open but the rules: held connections (dropped), the set link,
        conntrack, the fleet."""
        self.verdicts.drop_held()
        if self.store_sink is not None:
            self.store_sink.writer.stop()
        self.granted.close()
        if self.grants.handshakes is not None:
            self.grants.handshakes.close()
        if self.fleet is not None:
            self.fleet.stop()
