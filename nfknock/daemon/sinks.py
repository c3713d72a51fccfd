"""Where the engine's events go: one pipeline of sinks, chosen once per role.

The engine decides and returns events; everything with a side effect happens here, in a fixed
order (each sink gets what the one before passed on):

1. `GrantedSink`: a source the engine just granted (or whose SPA packet waits for its durable
   record or claim) enters the kernel's granted set at once, before any disk or network work:
   its first SYN then waits in the grant queue, out of a flood's way (firewall/granted.py);
   a grant that ended (a close sequence, a revocation) leaves it;
2. `ReplayStoreSink` (a single process with a state directory): the replay cache is written
   off the verdict path, and a claim waits until its record is durable (or is refused);
3. `LogSink`: the knockd-style lines;
4. `TallySink` (with --metrics-port): the counters behind the metrics;
5. `ClaimsSink` (workers, or a single process after a run with workers): the replay check
   across processes and restarts (claims.py);
6. `FleetSink` (--cluster): grants, revocations and replay claims shared with the fleet.

Every change of a grant, whoever makes it (an event, a control request, the fleet), reaches the
kernel through the one `GrantedSink.sync`. A new side effect is a new sink, not a branch in the
packet path.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from ..doors.engine import Engine
from ..doors.events import ClaimNeeded, ConnectionAccepted, DoorClosed, DoorOpened, GrantsRevoked, Recorded
from ..errors import FirewallError
from ..firewall.granted import GrantedSets
from .cutter import HandshakeCutter
from .logs import RateLimit, log_events
from .metrics import tally
from .store import ReplayStore
from .writer import DurableWriter

Sink = Callable[[tuple, float], tuple]  # (events, now) -> the events passed on


class Sinks:
    """The pipeline. Sinks that produce events of their own (a claim's answer, the fleet's)
    feed them back in at the top with `consume`."""

    def __init__(self) -> None:
        self.sinks: list[Sink] = []

    def add(self, *sinks: Sink | None) -> None:
        self.sinks += [sink for sink in sinks if sink is not None]

    def consume(self, events, now: float) -> None:
        """Events through every sink (the packet path: kept lean)."""
        if type(events) is not tuple:
            events = tuple(events)
        for sink in self.sinks:
            events = sink(events, now)

    def consume_after(self, after: Sink, events, now: float) -> None:
        """Events through the sinks after `after` (what a sink held back and now lets go on)."""
        events = tuple(events)
        for sink in self.sinks[self.sinks.index(after) + 1 :]:
            events = sink(events, now)


class GrantedSink:
    """The kernel's granted set follows the engine (firewall/granted.py); a grant that ends also
    cuts the handshakes its source began meanwhile (firewall/handshakes.py)."""

    def __init__(self, engine: Engine, granted: GrantedSets, log: logging.Logger, protected: Callable[[], set[int]]):
        self.engine = engine
        self.granted = granted
        self.log = log
        self.protected = protected  # the TCP ports the doors protect now; None: no real conntrack
        self.handshakes: HandshakeCutter | None = None  # only with real firewall rules (not a test's fake)

    def __call__(self, events: tuple, now: float) -> tuple:
        """Route first, decide after: a grant, or an SPA packet or rotating sequence that now waits
        for its durable record or claim, goes into the set before any disk or network work (if
        the record or the claim fails, its element is removed again and the held SYN dropped);
        a grant that ended (a close sequence, a revocation) leaves it."""
        for event in events:
            kind = type(event)
            if kind is ConnectionAccepted:  # its handshake may need cutting at a revoke (cutter.py)
                # (not one to a gateway door's destination: the cut covers this host's protected ports)
                if self.handshakes is not None and not event.forwarded:
                    self.handshakes.accepted(event.src, now, event.dst, event.sport, event.port)
            elif kind is DoorOpened:
                self.granted.add_now(event.src, self.engine.grant_left(event.src, now))
            elif kind is ClaimNeeded:
                self.granted.add_now(event.src, max(event.seconds, self.engine.grant_left(event.src, now)))
            elif kind is DoorClosed:
                self.sync(event.src, now)
            elif kind is GrantsRevoked:
                for src in event.sources:
                    self.sync(src, now)
        return events

    def sync(self, src: str, now: float) -> None:
        """Tell the kernel's granted set what the engine now says about `src`."""
        left = self.engine.grant_left(src, now)
        if left > 0:
            self.granted.add(src, left)
        else:
            self.granted.remove(src)
            self._cut_handshakes(src, now)

    def _cut_handshakes(self, src: str, now: float) -> None:
        """No new connection once a grant is gone, not even one whose SYN was accepted before."""
        if self.handshakes is None:
            return
        try:
            cut = self.handshakes.cut(src, self.protected(), now)
        except FirewallError as exc:
            self.log.warning("%s: a handshake it started during its grant may still complete", exc)
            return
        if cut:
            self.log.info("%s: %d handshake(s) begun during the grant will not complete", src, cut)


class ReplayStoreSink:
    """A single process's replay cache (store.py), written off the verdict path (writer.py).

    The engine asks first (ClaimNeeded: its cache is `shared` when there is a store): a claim
    waits here until the snapshot that holds its record is durable, meanwhile the source is in the
    granted set and its SYNs are held (Verdict.HOLD); then the claim goes on to the sinks after
    this one (the workers' claims, the fleet), or, when nothing else has a word, is granted. When
    the write fails, the claim is refused: what cannot be recorded as used does not open."""

    def __init__(
        self,
        store: ReplayStore,
        engine: Engine,
        granted: GrantedSink,
        sinks: Sinks,
        last_word: bool,
        log: logging.Logger,
        wake: Callable[[], None],
    ):
        self.store, self.engine, self.granted, self.sinks, self.log = store, engine, granted, sinks, log
        self.last_word = last_word  # no claims directory and no fleet: this sink grants
        self.writer = DurableWriter(lambda entries: self.store.save(entries), wake)
        self.waiting: list[tuple[int, ClaimNeeded, Recorded | None]] = []

    def __call__(self, events: tuple, now: float) -> tuple:
        if not any(type(event) is Recorded for event in events):
            return events
        generation = self.writer.submit(self.engine.replays.snapshot())
        claims = [event for event in events if type(event) is ClaimNeeded]
        if not claims:
            return events  # records of refused packets: nothing waits for them
        # A claim's own record waits with it: passed on alone, the claims directory would write it
        # as used (`ClaimsSink._record`), and the claim coming after would find it taken.
        held = {claim.record for claim in claims}
        records = {event.key: event for event in events if type(event) is Recorded and event.key in held}
        self.waiting += [(generation, claim, records.get(claim.record)) for claim in claims]
        return tuple(
            event
            for event in events
            if type(event) is not ClaimNeeded and not (type(event) is Recorded and event.key in held)
        )

    def step(self, now: float) -> None:
        """The loop's hook: answer the claims whose record is now durable (or failed)."""
        for generation, error in self.writer.finished():
            detail = ""
            ready = [(claim, record) for wanted, claim, record in self.waiting if wanted <= generation]
            self.waiting = [entry for entry in self.waiting if entry[0] > generation]
            if error is not None:
                detail = f"cannot write the replay cache {self.store.path}: {getattr(error, 'strerror', None) or error}"
                self.log.error("%s (a restart would forget what was used)", detail)
            for claim, record in ready:
                if error is None and not self.last_word:
                    self.sinks.consume_after(self, (record, claim) if record else (claim,), now)
                    continue
                if record is not None:  # on to the log, and (refused here) still used for the other workers
                    self.sinks.consume_after(self, (record,), now)
                follow = self.engine.claimed(claim, "ours" if error is None else "unrecorded", now, detail)
                if follow:
                    self.sinks.consume(follow, now)
                elif error is not None:  # a rotating sequence: the engine has no event for it
                    self.log.warning("%s: %s: sequence not honoured: %s", claim.src, claim.door, detail)
                self.granted.sync(claim.src, now)


class LogSink:
    def __init__(self, log: logging.Logger, limit: RateLimit):
        self.log, self.limit = log, limit

    def __call__(self, events: tuple, now: float) -> tuple:
        log_events(self.log, events, self.limit, now)
        return events


class TallySink:
    """The event counters behind the metrics (off by default: no per-event cost then)."""

    def __init__(self) -> None:
        self.tallies: Counter = Counter()

    def __call__(self, events: tuple, now: float) -> tuple:
        tally(self.tallies, events)
        return events


class FleetSink:
    """Hands events to the fleet member (fleet/member.py) once it runs; what it answers at once
    goes through the pipeline again."""

    def __init__(self, again: Callable[..., None], wall_clock: Callable[[], float]):
        self.again, self.wall_clock = again, wall_clock
        self.member: Any = None

    def __call__(self, events: tuple, now: float) -> tuple:
        if self.member is not None:
            follow = self.member.on_events(events, now, self.wall_clock())
            if follow:
                self.again(follow, now)
        return events


class ClaimsSink:
    """The replay check across workers and restarts (claims.py): what another worker, or an
    earlier run, used first is a replay. Every record goes to the claims directory, also those
    of packets refused after their HMAC (no ClaimNeeded), so that none of them opens through
    another worker or after a restart either. In a fleet the local claims come first (they are
    on disk, Redis may forget): a claim that is ours here is passed on for the fleet's word."""

    def __init__(
        self,
        claims: Any,
        engine: Engine,
        granted: GrantedSink,
        fleet: FleetSink,
        again: Callable[..., None],
        log: logging.Logger,
        wall_clock: Callable[[], float],
    ):
        self.claims, self.engine, self.granted, self.fleet = claims, engine, granted, fleet
        self.again, self.log, self.wall_clock = again, log, wall_clock

    def __call__(self, events: tuple, now: float) -> tuple:
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
                if answer == "ours" and self.fleet.member is not None:
                    left.append(event)  # the fleet has the last word
                    continue
                follow = self.engine.claimed(event, answer, now, detail)
                if follow:
                    self.again(follow, now)
                elif answer == "unrecorded":  # a rotating sequence: the engine has no event for it
                    self.log.warning("%s: %s: sequence not honoured: %s", event.src, event.door, detail)
                self.granted.sync(event.src, now)  # a claim lost: out of the set again
                continue
            left.append(event)
        return tuple(left)

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
