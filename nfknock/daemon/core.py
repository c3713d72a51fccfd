"""The I/O shell: the only place that touches netfilterqueue, signals and the clock.

Fail closed, on every way out. The scaffolding sends protected-port SYNs to the queue and never
uses --queue-bypass, so whenever no process is bound to the queue the kernel drops them: the
daemon never removes the scaffolding itself. A clean stop (SIGTERM, SIGINT) leaves it in place
and says so; an unexpected error is logged with its traceback and ends the process non-zero with
the rules in place (exactly as after SIGKILL or the OOM killer); only a deliberate `nfknock down`
takes them away. A reload never stops the daemon: whatever goes wrong while reading new rules,
the old ones stay. Bad input (a packet, a control request) never leaves its handler.

Start order: rules are validated before anything changes; the queue is bound before the
scaffolding sends packets to it. Every queued packet gets exactly one verdict, drop unless the
engine said accept.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..doors.describe import as_line
from ..doors.engine import DEFAULT_MAX_SOURCES, Engine, Verdict
from ..doors.events import ClaimNeeded, DoorClosed, DoorOpened, GrantsRevoked, Recorded, SpaRefused
from ..doors.first_steps import FirstStepGroup, first_step_groups, first_steps_in_daemon, marks_held
from ..doors.packet import parse
from ..doors.rules import KnockDoor, Ruleset, SpaDoor
from ..errors import FirewallError, NfknockError, PacketError, QueueError, RulesError, UsageError
from ..extras import FLEET, require, require_for_run
from ..firewall import FLAVOURS
from ..firewall.backend import Firewall, PerFamily
from ..firewall.granted import GrantedSets, prune_first_step_sets
from ..firewall.handshakes import Handshakes
from ..firewall.host import iptables_flavour, marks_installed, other_flavour_chain, saved_chain
from ..firewall.plan import PASS_MARK, Plan, first_step_marks, plan
from ..firewall.sessions import SYNC_EVERY as SESSIONS_EVERY
from ..firewall.sessions import SessionSets, prune_session_sets
from ..firewall.shards import queues
from ..fleet.link import FleetConfig
from ..loading import load_rules
from ..trust import why_unsafe
from . import control, metrics
from .claims import SUBDIR, open_claims
from .logs import RateLimit, log_events
from .metrics import tally
from .stats import QUEUE_PROC, Reporter, parse_queue_table, read_queue_drops
from .store import ReplayStore
from .workers import WorkerDied, WorkerPool, serve

BATCH = 256  # packets handled before signals, timers and control requests are looked at again
MAX_SLEEP = 1.0
STATS_EVERY = 5.0  # seconds between looks at the drop counters
SNAPSHOT_WAIT = 1.0  # seconds a scrape waits for the loop's snapshot before it takes the last one
DEFAULT_QUEUE_MAXLEN = 4096
_ACCEPT, _DROP, _PASS = Verdict.ACCEPT, Verdict.DROP, Verdict.PASS  # enum access is slow per packet
CLOSED = "the rules stay in place: protected ports stay closed until nfknock runs again ('nfknock down' removes them)"


@dataclass(frozen=True)
class DaemonConfig:
    """What `nfknock run` was asked to do."""

    rules_path: Path
    queue_num: int = 0
    max_sources: int = DEFAULT_MAX_SOURCES
    queue_maxlen: int = DEFAULT_QUEUE_MAXLEN
    state_dir: Path | None = None
    control_socket: Path | None = None
    metrics_port: int | None = None
    pass_mark: int = PASS_MARK
    fleet: FleetConfig | None = None  # fleet mode (--cluster): shared grants and replay records
    workers: int = 1  # verdict loops, each in a process of its own (workers.py)
    shard: int = 0  # in a worker: which one it is

    def plan(self, doors, groups: tuple[FirstStepGroup, ...] | None = None) -> Plan:
        """The scaffolding these doors need, on this queue, with this pass mark, for these workers
        (`groups`: the first steps the kernel records, as the daemon decided them)."""
        return plan(doors, self.queue_num, self.pass_mark, self.workers, groups)

    @property
    def queues(self) -> tuple[int, int]:
        """(main queue, grant queue) this process binds."""
        return queues(self.queue_num, self.shard)


class DaemonFailed(NfknockError):
    """The loop ended on an unexpected error; the log has the traceback, the rules stay."""


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op when not started by systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), path)
    except OSError:
        pass


class _YieldLoop(Exception):
    """Raised by the queue callback, after the verdict, to leave NetfilterQueue.run() so that a
    flood cannot starve signals and timers (run() returns only when the socket is empty).
    netfilterqueue propagates callback exceptions out of run(); one netlink message is one
    packet, so no other packet is left without a verdict."""


class _Reload:
    """New rules read and checked in a thread, so a large rules directory never holds up a
    verdict; the loop applies the result. Any error at all is kept for the loop to report."""

    def __init__(self, config: DaemonConfig, wake: Callable[[], None], held: dict):
        self.config = config
        self.held = held  # a copy: the loop may add to its own meanwhile
        self.ruleset: Ruleset | None = None
        self.groups: tuple[FirstStepGroup, ...] = ()
        self.plan: Plan | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._wake = wake
        threading.Thread(target=self._read, name="nfknock-reload", daemon=True).start()

    def _read(self) -> None:
        try:
            self.ruleset = load_rules(self.config.rules_path, strict=True)
            self.groups = first_step_groups(self.ruleset.doors, self.held)
            self.plan = self.config.plan(self.ruleset.doors, self.groups)
        except BaseException as exc:  # noqa: BLE001 - reported by the loop, whatever it is
            self.error = exc
        finally:
            self.done.set()
            self._wake()


class Daemon:
    def __init__(
        self,
        config: DaemonConfig,
        firewall: Firewall,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        ruleset: Ruleset | None = None,
        channel: Any = None,
        claims: Any = None,
        first_steps: tuple[FirstStepGroup, ...] | None = None,
        last_good: Any = None,
    ):
        self.config = config
        self.last_good = last_good  # lastgood.LastGood: keeps the rules installed; degraded start
        self.firewall = firewall
        self.log = logger or logging.getLogger("nfknock")
        self.clock = clock
        self.wall_clock = wall_clock
        # RulesError: nothing touched yet. A worker gets the supervisor's rules, read once.
        self.ruleset: Ruleset = ruleset if ruleset is not None else load_rules(config.rules_path, strict=True)
        if config.state_dir is not None and (unsafe := why_unsafe(config.state_dir)):
            # Whoever can write there can make used SPA packets usable again.
            raise UsageError(f"--state-dir {config.state_dir}: not trusted: {unsafe}")
        # In a worker: the replay records all workers share (claims.py). A single process reads and
        # writes them too when an earlier run with workers left some, so none becomes usable again.
        if claims is None and config.workers == 1 and config.state_dir is not None:
            if (Path(config.state_dir) / SUBDIR).is_dir():
                claims = open_claims(Path(config.state_dir) / SUBDIR)
        self.claims = claims
        shared = config.fleet is not None or config.workers > 1 or claims is not None
        # --max-sources bounds the daemon: each worker tracks its share of the sources.
        self.engine = Engine(self.ruleset.doors, -(-config.max_sources // config.workers), shared=shared)
        self.fleet: Any = None  # a FleetMember while running in fleet mode
        self.channel = channel  # in a worker: the supervisor's end (workers.py)
        self.pool: Any = None  # in the supervisor of workers: the WorkerPool
        self.store = ReplayStore(config.state_dir) if config.state_dir and config.workers == 1 else None
        self.granted = GrantedSets(config.queue_num, self.log)
        self.first_seen_marks = first_step_marks(config.pass_mark)
        # What each (second port, mark bit) has meant in first-step rules installed by or found by
        # this daemon; the first steps the kernel records now (first_steps.py, `held`).
        # A worker gets the supervisor's decision (it made the rules in place), never its own.
        self.marks_held: dict = {}
        self._named_in_daemon: set[str] = set()  # knock doors the log named for their first knocks
        self.first_steps = first_step_groups(self.ruleset.doors) if first_steps is None else first_steps
        self.engine.use_first_steps(self.first_steps)
        self.first_seen_field = sum(self.first_seen_marks)
        if self.store is not None:
            self.engine.restore_replays(self.store.load(), wall_clock())
        self.reporter = Reporter()
        self.log_limit = RateLimit()
        self.stopping = False
        self.unparsable: dict[str, int] = {}
        self.errors = 0
        self.handled = dict.fromkeys(Verdict, 0)
        self.tallies: Counter = Counter()  # event tallies for the metrics
        self.snapshot: metrics.Snapshot | None = None
        self._snapshot_wanted = False
        self._snapshot_taken = threading.Event()
        self.control: control.ControlServer | None = None
        self._reload_requested = False
        self._reload: _Reload | None = None
        self._budget = 0
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        # The process that installs the rules keeps the sessions sets (firewall/sessions.py).
        self.sessions: SessionSets | None = None
        self.handshakes = Handshakes()
        self.sessions_failed = 0
        self.applied_plan: Plan | None = None

    # -- the packet path -----------------------------------------------------------------

    def on_packet(self, queued) -> None:
        verdict = _DROP
        try:
            packet = parse(queued.get_payload())
            seen = queued.get_mark() & self.first_seen_field
            if seen:  # only a second step the kernel marked (first_steps.py)
                bits = sum(1 << i for i, mark in enumerate(self.first_seen_marks) if seen & mark)
                packet = packet._replace(first_seen=bits)
            now = self.clock()
            decision = self.engine.handle(packet, now, self.wall_clock())
            verdict = decision.verdict
            if decision.events:
                self._consume(decision.events, now)
        except PacketError as exc:
            self.unparsable[exc.reason] = self.unparsable.get(exc.reason, 0) + 1
        except Exception:  # never let a packet kill the loop; drop it instead
            self.errors += 1
            if self.errors <= 10 or self.errors % 1000 == 0:
                self.log.exception("internal error on a packet (dropped; %d so far)", self.errors)
        finally:
            self.handled[verdict] += 1
            try:
                if verdict is _ACCEPT:
                    queued.accept()
                elif verdict is _PASS:
                    queued.set_mark(queued.get_mark() | self.config.pass_mark)
                    queued.repeat()  # back to the top of INPUT; our chain returns marked packets
                else:
                    queued.drop()
            except Exception:
                self.errors += 1
                if verdict is not _DROP:
                    try:
                        queued.drop()
                    except Exception:
                        pass

    def _consume(self, events, now: float) -> None:
        self._route_first(events, now)
        if self.store is not None and any(type(event) is Recorded for event in events):
            events = self._save_replays(self.store, events, now)
        log_events(self.log, events, self.log_limit, now)
        for event in events:
            kind = type(event)
            if kind is DoorClosed:
                self.sync_granted(event.src, now)
            elif kind is GrantsRevoked:
                for src in event.sources:
                    self.sync_granted(src, now)
        if self.config.metrics_port:  # metrics are off by default: no per-event cost then
            tally(self.tallies, events)
        if self.claims is not None:
            events = self._claim(events, now)
        if self.fleet is not None:
            follow = self.fleet.on_events(events, now, self.wall_clock())
            if follow:
                self._consume(follow, now)

    def _route_first(self, events, now: float) -> None:
        """Route first, decide after: a source the engine just granted, or whose SPA packet or
        rotating sequence now waits for its durable record or claim, goes into the kernel's
        granted set at once, before any disk or network work (granted.py). Its first SYN then
        waits in the grant queue, out of a flood's way, and is judged after the grant took effect;
        or dropped, and the element removed, if the record or the claim failed."""
        for event in events:
            kind = type(event)
            if kind is DoorOpened:
                self.granted.add_now(event.src, self.engine.grant_left(event.src, now))
            elif kind is ClaimNeeded:
                self.granted.add_now(event.src, max(event.seconds, self.engine.grant_left(event.src, now)))

    def _claim(self, events, now: float) -> list:
        """The replay check across workers and restarts (claims.py): what another worker, or an
        earlier run, used first is a replay. Every record goes to the claims directory, also
        those of packets refused after their HMAC (no ClaimNeeded), so that none of them opens
        through another worker or after a restart either. In a fleet the local claims come
        first (they are on disk, Redis may forget): returns the events left for the fleet, a
        claim only if it is ours here."""
        claimed = {event.record for event in events if type(event) is ClaimNeeded}
        left = []
        for event in events:
            kind = type(event)
            if kind is Recorded and event.key not in claimed:
                self._record(event)
            elif kind is ClaimNeeded:
                try:
                    answer = "ours" if self.claims.claim(event.record, event.expires, self.wall_clock()) else "taken"
                    detail = "used through another worker or before a restart"
                except OSError as exc:  # closed: what cannot be recorded as used does not open
                    answer, detail = "unrecorded", f"cannot write to {self.claims.directory}: {exc.strerror or exc}"
                if answer == "ours" and self.fleet is not None:
                    left.append(event)  # the fleet has the last word
                    continue
                follow = self.engine.claimed(event, answer, now, detail)
                if follow:
                    self._consume(follow, now)
                elif answer == "unrecorded":  # a rotating sequence: the engine has no event for it
                    self.log.warning("%s: %s: sequence not honoured: %s", event.src, event.door, detail)
                self.sync_granted(event.src, now)  # a claim lost: out of the set again
                continue
            left.append(event)
        return left

    def _record(self, event: Recorded) -> None:
        """A record that opened nothing (its packet was refused anyway), kept for every worker."""
        try:
            self.claims.record(event.key, event.expires, self.wall_clock())
        except OSError as exc:
            self.log.error(
                "cannot write a replay record to %s: %s (an SPA packet refused here could open once through "
                "another worker or after a restart)",
                self.claims.directory,
                exc.strerror or exc,
            )

    def _save_replays(self, store: ReplayStore, events: tuple, now: float) -> tuple:
        """The durable record before the grant takes effect (the SYN waiting in the grant queue is
        judged after this). When it cannot be written, what these records opened is withdrawn:
        what cannot be recorded as used does not open (as a worker's failed claim)."""
        try:
            store.save(self.engine.replays.snapshot())
            return events
        except OSError as exc:
            detail = f"cannot write the replay cache {store.path}: {exc.strerror or exc}"
            self.log.error("%s (a restart would forget what was used)", detail)
        kept = []
        for event in events:
            door = self.engine.doors.get(event.door) if type(event) is DoorOpened else None
            if door is None or isinstance(door, KnockDoor):
                kept.append(event)  # not a record's grant (a knock door opened by the same packet)
                continue
            self.engine.revoke(event.src, event.door)
            self.sync_granted(event.src, now)
            if isinstance(door, SpaDoor):
                kept.append(SpaRefused(event.src, event.door, "replay record not written", detail, event.key))
            else:
                self.log.warning("%s: %s: sequence not honoured: %s", event.src, event.door, detail)
        return tuple(kept)

    def _on_queued(self, queued) -> None:
        self.on_packet(queued)
        self._budget -= 1
        if self._budget <= 0 or self.stopping or self._reload_requested:
            raise _YieldLoop

    # -- lifecycle -----------------------------------------------------------------------

    def run(self, ready: Callable[[], None] | None = None) -> None:
        # What the server and metrics extras bring, checked before a queue is bound or a rule
        # installed: a missing one is a single line (MissingExtra), not a traceback or a half start.
        require_for_run(self.config.metrics_port, self.firewall.name)
        if self.config.fleet is not None:
            require("redis", FLEET, "--cluster")
        # Rules left by an earlier run may still mark packets until ours replace them: keep to
        # what their mark bits mean (first_steps.py), before any queue is bound or worker forked.
        self.marks_held = self._marks_installed()
        self.first_steps = first_step_groups(self.ruleset.doors, self.marks_held)
        self.engine.use_first_steps(self.first_steps)
        if self.config.workers > 1:
            # The workers bind their queues before any rule sends packets there; the supervisor
            # binds none (no packet ever reaches it).
            self.pool = WorkerPool(self)
            self.pool.start(ReplayStore(self.config.state_dir).load() if self.config.state_dir else None)
            queues = []
        else:
            queues = self._bind_queues()

        def body() -> None:
            self._warn_about_flavour()
            self.granted.create()  # before the rules that refer to the sets
            if self.pool is None:
                self._start_fleet()  # with workers, each worker is a fleet member of its own
            self.marks_held = marks_held(self.first_steps, self.marks_held)
            self._apply(self.config.plan(self.ruleset.doors, self.first_steps))
            if self.last_good is not None:  # hook: last good rules (lastgood.py)
                self.last_good.installed(self.ruleset)
            self._start_control()
            self._log_ready()
            doors = len(self.ruleset.doors)
            status = f"guarding {doors} door(s)" if self.last_good is None else self.last_good.ready_status(doors)
            sd_notify(f"READY=1\nSTATUS={status} on queue {self.config.queue_num}")
            if ready is not None:
                ready()
            self._loop(queues)

        self._guarded(queues, body)

    def run_worker(self, bound: Callable[[], None]) -> None:
        """A worker's life (workers.py): its queues, its loop; the supervisor does the rest."""
        queues = self._bind_queues()

        def body() -> None:
            self.granted.connect()  # the supervisor created the sets
            self._start_fleet()
            bound()
            self._loop(queues)

        self._guarded(queues, body, reload=False)

    def _guarded(self, queues: list, body: Callable[[], None], reload: bool = True) -> None:
        """Run `body` with the signals handled; whatever ends it, stop with the rules in place."""
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        previous = self._install_signals(self._wake_w, reload)
        try:
            body()
        except NfknockError as exc:
            self.log.error("nfknock stopped: %s; %s", exc, CLOSED)
            raise
        except Exception as exc:
            self.log.critical("nfknock stopped on an unexpected error; %s", CLOSED, exc_info=True)
            raise DaemonFailed(f"stopped on an unexpected error ({type(exc).__name__}: {exc}); {CLOSED}") from exc
        finally:
            self._shutdown(queues, previous)
            self._wake_r.close()
            self._wake_w.close()

    def _bind_queues(self) -> list:
        """The main queue (knocks, and new connections from sources not in the granted set) and
        the grant queue after it (new connections from granted sources: no flood reaches it)."""
        from netfilterqueue import NetfilterQueue

        queues: list[Any] = []
        for number in self.config.queues:
            queue = NetfilterQueue()
            try:
                queue.bind(number, self._on_queued, max_len=self.config.queue_maxlen)
            except OSError as exc:
                for bound in queues:
                    bound.unbind()
                last = self.config.queue_num + 2 * self.config.workers - 1
                raise QueueError(
                    f"cannot bind NFQUEUE {number}: {exc} (nfknock uses queues {self.config.queue_num} to {last}; "
                    "is another nfknock or NFQUEUE listener using one? pick others with --queue-num)"
                ) from None
            # Non-blocking, so that unbinding at the end never waits: after a flood the socket is
            # full and the kernel's answer to the unbind can be lost (measured: a stop hung for
            # minutes). The loop reads with select and run(block=False) anyway.
            os.set_blocking(queue.get_fd(), False)
            queues.append(queue)
        return queues

    def _loop(self, queues: list) -> None:
        # The grant queue first, every time round: its packets are the ones users wait for.
        served = [(queue.get_fd(), queue) for queue in reversed(queues)]
        wake_r = self._wake_r
        assert wake_r is not None  # _guarded made it
        next_stats = next_sessions = self.clock()
        while not self.stopping:
            deadline = self.engine.next_deadline()
            sleep = MAX_SLEEP if deadline is None else min(MAX_SLEEP, max(0.0, deadline - self.clock()))
            readable, _, _ = select.select([fd for fd, _ in served] + [wake_r] + self._channels(), [], [], sleep)
            for fd, queue in served:
                if fd in readable:
                    self._budget = BATCH
                    try:
                        queue.run(block=False)
                    except _YieldLoop:
                        pass
            self.granted.flush()  # after the packets that were waiting: see granted.py
            if wake_r in readable:
                _drain(wake_r)
            self._serve_channels()
            if self.control is not None:
                self.control.answer_pending(self.answer)
                self.granted.flush()
            if self.fleet is not None:
                self._fleet_step()
                self.granted.flush()
            self._reload_step()
            now = self.clock()
            if deadline is not None and now >= deadline:
                log_events(self.log, self.engine.expire(now), self.log_limit, now)
            if now >= next_stats:
                next_stats = now + STATS_EVERY
                self.report_counters()
            if now >= next_sessions:
                next_sessions = now + SESSIONS_EVERY
                self._sync_sessions(now)
            if self._snapshot_wanted:
                self._snapshot_wanted = False
                self.snapshot = self._take_snapshot(now)
                self._snapshot_taken.set()
        if self.channel is None:
            self.log.info("nfknock stopped by a signal; %s", CLOSED)

    def _channels(self) -> list[int]:
        if self.pool is not None:
            return self.pool.fds()
        return [] if self.channel is None else [self.channel.fileno()]

    def _serve_channels(self) -> None:
        """The supervisor: what the workers sent, and whether they all live. A worker: what the
        supervisor asked (its end of file means the supervisor is gone: stop)."""
        if self.pool is not None:
            self.pool.pump()
            if not self.stopping:  # under systemd a stop signals the workers too: they may go first
                self.pool.check()
                self.pool.watch(self.clock())  # and whether they all answer
        elif self.channel is not None:
            try:
                while self.channel.poll():
                    serve(self, self.channel.recv())
            except (EOFError, OSError):
                self.stopping = True
            self.granted.flush()

    def _take_snapshot(self, now: float) -> metrics.Snapshot | None:
        """A slow worker costs a scrape its freshness, not the daemon: the last snapshot serves."""
        if self.pool is None:
            return metrics.take(self, now)
        try:
            return self.pool.snapshot()
        except WorkerDied:
            raise
        except NfknockError as exc:
            self.log.warning("metrics: %s; the last snapshot is served", exc)
            return self.snapshot

    def report_counters(self) -> None:
        if self.pool is not None:  # each worker reports its own; the supervisor sweeps claims
            self.pool.sweep(self.wall_clock())
            return
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

    # -- reload --------------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            if self._wake_w is not None:
                self._wake_w.send(b"w")
        except OSError:
            pass  # the loop is already awake (buffer full) or gone

    def _reload_step(self) -> None:
        try:
            self._advance_reload()
        except WorkerDied:
            raise  # a worker that could not take the rules: the daemon stops, closed (workers.py)
        except Exception as exc:  # a reload never stops the daemon
            self._reload = None
            self._refuse_reload(exc)

    def _advance_reload(self) -> None:
        if self._reload_requested and self._reload is None:
            self._reload_requested = False
            sd_notify("RELOADING=1")
            self._reload = _Reload(self.config, self._wake, dict(self.marks_held))
        if self._reload is not None and self._reload.done.is_set():
            job, self._reload = self._reload, None
            self.finish_reload(job.ruleset, job.plan, job.error, job.groups)
            sd_notify("READY=1")

    def reload(self) -> bool:
        """Read and apply the rules on disk now (in the caller's thread)."""
        try:
            ruleset = load_rules(self.config.rules_path, strict=True)
            groups = first_step_groups(ruleset.doors, self.marks_held)
            return self.finish_reload(ruleset, self.config.plan(ruleset.doors, groups), None, groups)
        except BaseException as exc:  # noqa: BLE001 - the same report as from the reload thread
            return self.finish_reload(None, None, exc)

    def finish_reload(
        self,
        ruleset: Ruleset | None,
        new_plan: Plan | None,
        error: BaseException | None,
        groups: tuple[FirstStepGroup, ...] = (),
    ) -> bool:
        """Switch to rules read by a reload (`groups`: the first steps `new_plan` has the kernel
        record); on any problem keep the old rules and say why."""
        if error is None and ruleset is not None and new_plan is not None:
            try:
                # Before the rules go in: from then on packets may carry these meanings.
                self.marks_held = marks_held(groups, self.marks_held)
                self._apply(new_plan)
            except Exception as exc:
                error = exc
                self._restore_firewall()
        if error is not None or ruleset is None:
            self._refuse_reload(error)
            return False
        self.first_steps = groups
        if self.pool is not None:
            self.engine.reload(ruleset.doors, groups)  # the supervisor's engine only names the doors
            self.ruleset = ruleset
            dropped = self.pool.reload(ruleset, groups)
        else:
            dropped = self.adopt(ruleset, groups)
        if self.last_good is not None:  # hook: last good rules (lastgood.py)
            self.last_good.installed(ruleset)
        self.log.info(
            "reloaded %s: %d door(s)%s",
            self.config.rules_path,
            len(ruleset.doors),
            f"; state reset for changed door(s): {', '.join(dropped)}" if dropped else "",
        )
        self._name_daemon_first_steps()
        return True

    def adopt(self, ruleset: Ruleset, groups: tuple[FirstStepGroup, ...]) -> list[str]:
        """Switch the engine to rules already installed (`groups`: their first steps in the
        kernel); returns the doors whose state was reset."""
        dropped = self.engine.reload(ruleset.doors, groups)
        self.ruleset = ruleset
        self._consume(self.engine.rekeyed, self.clock())  # SPA keys that left, with their grants
        return dropped

    def _refuse_reload(self, error: BaseException | None) -> None:
        if isinstance(error, RulesError):
            lines = list(error.lines)
        elif isinstance(error, NfknockError):
            lines = str(error).splitlines()
        else:
            lines = [f"{self.config.rules_path}: unexpected {type(error).__name__} while reading: {str(error)[:200]}"]
        for line in lines:
            self.log.error("reload refused, keeping the current rules: %s", line)

    def _name_daemon_first_steps(self) -> None:
        """Warn about knock doors whose first knocks reach the queue (a flood there competes with
        clients' knocks; first_steps.py): all of them at start, and after a reload those that
        were not there before it (new doors included)."""
        now = first_steps_in_daemon(self.ruleset.doors, self.marks_held)
        for name, reason in sorted(now.items()):
            if name not in self._named_in_daemon:
                self.log.warning("door %s: its first knocks go to the daemon, not the kernel: %s", name, reason)
        self._named_in_daemon = set(now)

    def _marks_installed(self) -> dict:
        """What the first-step marks of rules in place mean: ours, and a chain the other iptables
        flavour may still hold (an earlier run with the other --firewall) that marks packets
        for our queues too."""
        queue, pass_mark = self.config.queue_num, self.config.pass_mark
        try:
            held = marks_installed(self.firewall.installed(), queue, pass_mark)
        except Exception as exc:  # noqa: BLE001 - applying the rules will say what is wrong
            self.log.warning("cannot read the rules in place (%s): assuming none", exc)
            held = {}
        if self.firewall.name not in FLAVOURS:
            return held
        other = next(flavour for flavour in FLAVOURS if flavour != self.firewall.name)
        elsewhere = saved_chain(other)
        self._warn_about_other_chain(other, elsewhere)
        for key, meanings in marks_installed(elsewhere, queue, pass_mark).items():
            held[key] = held.get(key, frozenset()) | meanings
        return held

    def _warn_about_other_chain(self, other: str, chain: dict[int, list[str]]) -> None:
        """Name a chain the other iptables flavour still holds (a stop leaves the rules, and a
        start replaces only its own flavour's): it sends packets to our queues or to queues no
        one listens to, and either way this daemon cannot tell from what it sees."""
        ours = set(range(self.config.queue_num, self.config.queue_num + 2 * self.config.workers))
        listened = set(parse_queue_table(_read(QUEUE_PROC)))
        text = other_flavour_chain(other, chain, ours, listened)
        if text is not None:
            self.log.warning("%s", text)

    def _restore_firewall(self) -> None:
        try:
            self._apply(self.config.plan(self.ruleset.doors, self.first_steps))
        except Exception as exc:
            self.log.error("could not put the previous rules back after a failed reload: %s", exc)

    # -- shutdown --------------------------------------------------------------------------

    def _shutdown(self, queues: list, previous: dict) -> None:
        """Everything but the scaffolding: with no process bound to the queues the kernel drops
        what the scaffolding queues, so the protected ports stay closed."""
        sd_notify("STOPPING=1")
        steps = [self._close_control, lambda: self._restore_signals(previous), self._log_totals, self.granted.close]
        steps.append(self.handshakes.close)
        if self.fleet is not None:
            steps.append(self.fleet.stop)
        if self.pool is not None:
            steps.append(self.pool.stop)
        for step in steps + [queue.unbind for queue in queues]:
            try:
                step()
            except Exception:
                self.log.exception("while stopping (ignored; %s)", CLOSED)

    def _close_control(self) -> None:
        if self.control is not None:
            self.control.close()

    def _log_totals(self) -> None:
        if self.pool is not None:
            return  # each worker logs its own
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

    # -- control socket and metrics ----------------------------------------------------------

    def _start_control(self) -> None:
        if self.config.control_socket:
            try:
                self.control = control.ControlServer(self.config.control_socket, self._wake)
            except OSError as exc:
                self.log.error(
                    "no control socket at %s: %s (status/revoke/grant will not work)", self.config.control_socket, exc
                )
        if self.config.metrics_port:
            self.snapshot = self._take_snapshot(self.clock())
            try:
                metrics.serve(self._fresh_snapshot, self.config.metrics_port)
                self.log.info("metrics on http://127.0.0.1:%d/metrics", self.config.metrics_port)
            except OSError as exc:
                self.log.error("no metrics on 127.0.0.1:%d: %s", self.config.metrics_port, exc)

    def _fresh_snapshot(self) -> metrics.Snapshot | None:
        """For the exporter's thread: ask the loop for a snapshot and wait a moment for it."""
        self._snapshot_taken.clear()
        self._snapshot_wanted = True
        self._wake()
        self._snapshot_taken.wait(SNAPSHOT_WAIT)
        if self.snapshot is not None and self.last_good is not None:  # hook: last good rules
            return replace(self.snapshot, last_good=self.last_good.degraded is not None)
        return self.snapshot

    def _apply(self, new_plan: Plan) -> None:
        """Install the plan, its sessions sets filled first (sessions.py: the host's sessions
        survive the switch even where conntrack does not know them); then sets it no longer uses
        go (a failure there is logged: a leftover set holds no rule and opens nothing)."""
        real = self.firewall if isinstance(self.firewall, PerFamily) else None  # real sets too
        if real is not None:
            if self.sessions is None:
                self.sessions = SessionSets(real.set_runner())
            self.sessions.sync(new_plan, self.clock())
        self.firewall.apply(new_plan)
        self.applied_plan = new_plan
        if real is not None:
            runner = real.set_runner()
            try:
                for name in prune_first_step_sets(self.config.queue_num, new_plan, runner):
                    self.log.info("removed the first-step set %s (no door uses it any more)", name)
                for name in prune_session_sets(self.config.queue_num, new_plan, runner):
                    self.log.info("removed the sessions set %s (no door protects its port any more)", name)
            except FirewallError as exc:
                self.log.warning("%s", exc)

    def _sync_sessions(self, now: float) -> None:
        """The sessions sets follow the host's sockets (sessions.py); a failure is logged (at
        worst a session without conntrack entry is dropped: closed)."""
        if self.sessions is None or self.applied_plan is None:
            return
        try:
            self.sessions.sync(self.applied_plan, now)
        except FirewallError as exc:
            self.sessions_failed += 1
            if self.sessions_failed <= 10 or self.sessions_failed % 100 == 0:
                self.log.warning("%s (%d so far)", exc, self.sessions_failed)

    def sync_granted(self, src: str, now: float) -> None:
        """Tell the kernel's granted set what the engine now says about `src`."""
        left = self.engine.grant_left(src, now)
        if left > 0:
            self.granted.add(src, left)
        else:
            self.granted.remove(src)
            self._cut_handshakes(src)

    def _cut_handshakes(self, src: str) -> None:
        """No new connection once a grant is gone, not even one whose SYN was accepted before
        (firewall/handshakes.py). Only with real firewall rules: a test's fake has no conntrack."""
        if not isinstance(self.firewall, PerFamily):
            return
        ports = {p.port for door in self.ruleset.doors for p in door.protect if p.proto == "tcp"}
        try:
            cut = self.handshakes.cut(src, ports)
        except FirewallError as exc:
            self.log.warning("%s: a handshake it started during its grant may still complete", exc)
            return
        if cut:
            self.log.info("%s: %d handshake(s) begun during the grant will not complete", src, cut)

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """One checked control request, from the loop; status says whether the daemon runs on the
        last good rules (lastgood.py)."""
        answer = self._answer(request)
        if request["cmd"] == "status" and "error" not in answer:  # hook: last good rules
            answer["degraded"] = None if self.last_good is None else self.last_good.status()
        return answer

    def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """One checked control request, from the loop. A failure is the request's, not the daemon's."""
        try:
            if self.pool is not None:
                try:
                    answer = self.pool.answer(request)
                    if request["cmd"] == "revoke" and answer.get("revoked") == []:  # no worker said it
                        who = request.get("address") or f"key {request.get('key')}"
                        self.log.info("%s: revoked by the operator (no grant)", who)
                    return answer
                except WorkerDied:
                    raise
                except NfknockError as exc:
                    self.log.warning("control request %s: %s", request.get("cmd"), exc)
                    return {"error": str(exc)}
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

    def _start_fleet(self) -> None:
        """The Redis link (threads of its own); the loop only ever hands it work and reads its
        answers, between batches of packets."""
        if self.config.fleet is not None:
            from ..fleet.member import FleetMember

            self.fleet = FleetMember(self.config.fleet, self.engine, self.log, self._wake, wall=self.wall_clock)
            self.fleet.start()

    def _fleet_step(self) -> None:
        try:
            now = self.clock()
            events, touched = self.fleet.step(now, self.wall_clock())
            if events:
                self._consume(events, now)
            for src in touched:
                self.sync_granted(src, now)
        except Exception:  # the fleet never stops the daemon
            self.errors += 1
            self.log.exception("internal error while applying what the fleet said (ignored)")

    def _install_signals(self, wake_w: socket.socket, reload_on_hup: bool = True) -> dict:
        """A worker ignores SIGHUP: reloading is the supervisor's (it hands the rules over)."""

        def stop(signum, frame):
            self.stopping = True

        def reload(signum, frame):
            self._reload_requested = True

        previous = {}
        hup = reload if reload_on_hup else signal.SIG_IGN
        for signum, handler in ((signal.SIGTERM, stop), (signal.SIGINT, stop), (signal.SIGHUP, hup)):
            previous[signum] = signal.signal(signum, handler)
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        return previous

    @staticmethod
    def _restore_signals(previous: dict) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(-1)

    def _warn_about_flavour(self) -> None:
        if self.firewall.name == "legacy" and iptables_flavour() == "nf_tables":
            self.log.warning(
                "this host's 'iptables' is the nf_tables flavour but --firewall legacy was chosen; nfknock's "
                "rules live in the legacy tables: list them with 'iptables-legacy -S %s' (the kernel applies "
                "both)",
                "NFKNOCK",
            )

    def _log_ready(self) -> None:
        for door in self.ruleset.doors:
            self.log.info("%s", as_line(door))
        self._name_daemon_first_steps()
        if self.pool is None:
            self.log.info(
                "ready: pid %d, queue %d, firewall %s", os.getpid(), self.config.queue_num, self.firewall.name
            )
            return
        first, last = self.config.queue_num, self.config.queue_num + 2 * self.config.workers - 1
        self.log.info(
            "ready: pid %d, %d workers (pids %s) on queues %d-%d, firewall %s",
            os.getpid(),
            self.config.workers,
            " ".join(map(str, self.pool.pids)),
            first,
            last,
            self.firewall.name,
        )


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(512):
            pass
    except BlockingIOError:
        pass
