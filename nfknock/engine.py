"""The knock state machine: (packet, now) in, verdict and events out. No I/O, no clock.

Theory of operation
-------------------
Each door has an open sequence and optionally a close sequence. For every (sequence, source)
there is at most one *attempt*: how many steps that source has matched and when it started.
A knock packet is classified against an attempt as

  EXPECTED  the next step of the sequence (for a source with no attempt: the first step)
  REPEAT    the step just matched again (a retransmit, or a client that knocks twice)
  FIRST     the first step of the sequence, while an attempt is further along
  OTHER     any other port of the same door (either sequence)

and `TRANSITIONS` says what happens. A packet that advanced or restarted one sequence of a door
is not fed to the door's other sequence, so knocking the last step of the open sequence does not
also start the close sequence that begins with that port. Attempts in progress see the packet
before idle ones. A TCP knock whose flags do not match the door's `tcp_flags` is ignored by
that door (knockd does the same), and so is a knock from outside the door's `sources`.

Completing the open sequence grants the source NEW connections to the door's protected ports
until now + open_for (again: extends); completing the close sequence revokes the grant.
Grants are per exact source address. Established connections never come here: the firewall
scaffolding accepts them before the queue.

State is bounded: at most `max_sources` attempts and `max_sources` grants; when full, the oldest
is dropped. Attempts and grants are kept in insertion order per sequence/door; their timeouts are
constant per door, so that order is also deadline order and expiry only looks at the front.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from .events import (
    ConnectionAccepted,
    ConnectionRefused,
    DoorClosed,
    DoorOpened,
    Event,
    GrantExpired,
    KnockAdvanced,
    Sequence,
    SequenceReset,
    SequenceTimeout,
)
from .packet import Packet
from .rules import Door

DEFAULT_MAX_SOURCES = 65536


class Verdict(Enum):
    ACCEPT = "accept"
    DROP = "drop"


class Decision(NamedTuple):
    verdict: Verdict
    events: tuple[Event, ...] = ()


class Phase(Enum):
    IDLE = "idle"  # no attempt for this source and sequence
    STARTED = "started"  # at least one step matched


class Match(Enum):
    EXPECTED = "expected"
    REPEAT = "repeat"
    FIRST = "first"
    OTHER = "other"


class Action(Enum):
    ADVANCE = "advance"  # one more step; completes the sequence on its last step
    RESTART = "restart"  # drop the attempt and begin a new one at stage 1
    RESET = "reset"  # drop the attempt
    IGNORE = "ignore"  # nothing changes


TRANSITIONS: dict[tuple[Phase, Match], Action] = {
    (Phase.IDLE, Match.EXPECTED): Action.ADVANCE,
    (Phase.IDLE, Match.OTHER): Action.IGNORE,
    (Phase.STARTED, Match.EXPECTED): Action.ADVANCE,
    (Phase.STARTED, Match.REPEAT): Action.IGNORE,
    (Phase.STARTED, Match.FIRST): Action.RESTART,
    (Phase.STARTED, Match.OTHER): Action.RESET,
}


def classify(steps: tuple[tuple[str, int], ...], stage: int, key: tuple[str, int]) -> Match:
    """Where `key` stands for an attempt that has matched `stage` steps of `steps`."""
    if key == steps[stage]:
        return Match.EXPECTED
    if stage and key == steps[stage - 1]:
        return Match.REPEAT
    if key == steps[0]:
        return Match.FIRST
    return Match.OTHER


@dataclass(slots=True)
class Attempt:
    stage: int
    started: float


class _CompiledSequence:
    """A door's sequence with everything the hot path needs precomputed."""

    __slots__ = ("door", "kind", "steps", "timeout")

    def __init__(self, door: Door, kind: Sequence, steps):
        self.door = door
        self.kind = kind
        self.steps = tuple(step.key for step in steps)
        self.timeout = door.seq_timeout


class Engine:
    """Per-source knock progress and grants for a set of doors."""

    def __init__(self, doors: tuple[Door, ...], max_sources: int = DEFAULT_MAX_SOURCES):
        if max_sources < 1:
            raise ValueError("max_sources must be at least 1")
        self.max_sources = max_sources
        self.evicted = 0  # attempts and grants dropped because the tables were full
        self._attempts: dict[tuple[str, Sequence], OrderedDict[str, Attempt]] = {}
        self._grants: dict[str, OrderedDict[str, float]] = {}
        self._attempt_count = 0
        self._grant_count = 0
        self._compile(doors)

    # -- configuration ------------------------------------------------------------------

    def _compile(self, doors: tuple[Door, ...]) -> None:
        self.doors = {door.name: door for door in doors}
        by_port: dict[tuple[str, int], list[list[_CompiledSequence]]] = {}
        protected: dict[tuple[str, int], list[Door]] = {}
        for door in doors:
            sequences = [_CompiledSequence(door, Sequence.OPEN, door.sequence)]
            if door.close_sequence:
                sequences.append(_CompiledSequence(door, Sequence.CLOSE, door.close_sequence))
            for seq in sequences:
                self._attempts.setdefault((door.name, seq.kind), OrderedDict())
            for port in door.knock_ports:
                by_port.setdefault(port.key, []).append(sequences)
            for port in door.protect:
                protected.setdefault(port.key, []).append(door)
            self._grants.setdefault(door.name, OrderedDict())
        self._knock_index = {key: tuple(tuple(s) for s in groups) for key, groups in by_port.items()}
        self._protect_index = {key: tuple(group) for key, group in protected.items()}
        self._sources = {
            door.name: tuple(door.sources) for door in doors if door.sources
        }

    def reload(self, doors: tuple[Door, ...]) -> list[str]:
        """Switch to new doors. State of doors that did not change is kept; returns the names
        of doors whose attempts and grants were dropped (changed or removed)."""
        keep = {d.name for d in doors if self.doors.get(d.name) == d}
        dropped = sorted(set(self.doors) - keep)
        for key in [k for k in self._attempts if k[0] not in keep]:
            self._attempt_count -= len(self._attempts.pop(key))
        for name in [n for n in self._grants if n not in keep]:
            self._grant_count -= len(self._grants.pop(name))
        self._compile(doors)
        return dropped

    def is_knock_port(self, key: tuple[str, int]) -> bool:
        return key in self._knock_index

    # -- the packet path -----------------------------------------------------------------

    def handle(self, packet: Packet, now: float) -> Decision:
        key = (packet.proto, packet.dport)
        groups = self._knock_index.get(key)
        if groups is not None:
            events: list[Event] = []
            for sequences in groups:
                if self._admits(sequences[0].door, packet):
                    self._knock(sequences, packet.src, key, now, events)
            return Decision(Verdict.DROP, tuple(events))
        doors = self._protect_index.get(key)
        if doors is not None:
            port = f"{packet.dport}/{packet.proto}"
            for door in doors:
                if self._grants[door.name].get(packet.src, 0.0) > now:
                    return Decision(Verdict.ACCEPT, (ConnectionAccepted(packet.src, door.name, port),))
            return Decision(Verdict.DROP, (ConnectionRefused(packet.src, port),))
        return Decision(Verdict.DROP)

    def _admits(self, door: Door, packet: Packet) -> bool:
        if packet.proto == "tcp" and not door.tcp_flags.matches(packet.flags):
            return False
        networks = self._sources.get(door.name)
        if networks:
            address = ipaddress.IPv4Address(packet.src)
            return any(address in network for network in networks)
        return True

    def _knock(self, sequences, src: str, key, now: float, events: list[Event]) -> None:
        # Attempts in progress see the packet first; the first sequence it advances or
        # restarts consumes it for the whole door.
        ordered = sorted(sequences, key=lambda s: src not in self._attempts[(s.door.name, s.kind)])
        for seq in ordered:
            if self._step(seq, src, key, now, events):
                return

    def _step(self, seq: _CompiledSequence, src: str, key, now: float, events: list[Event]) -> bool:
        table = self._attempts[(seq.door.name, seq.kind)]
        attempt = table.get(src)
        if attempt is not None and now >= attempt.started + seq.timeout:
            self._drop_attempt(table, src)
            events.append(SequenceTimeout(src, seq.door.name, seq.kind, attempt.stage))
            attempt = None
        if attempt is None:
            phase, stage = Phase.IDLE, 0
        else:
            phase, stage = Phase.STARTED, attempt.stage
        if key not in seq.steps:
            # A port of the door's other sequence: "any other port of that door".
            match = Match.OTHER
        else:
            match = classify(seq.steps, stage, key)
        action = TRANSITIONS.get((phase, match), Action.IGNORE)
        door = seq.door.name

        if action is Action.IGNORE:
            return False
        if action is Action.RESET:
            self._drop_attempt(table, src)
            events.append(SequenceReset(src, door, seq.kind, stage, f"{key[1]}/{key[0]}"))
            return False
        if action is Action.RESTART:
            self._drop_attempt(table, src)
            events.append(SequenceReset(src, door, seq.kind, stage, f"{key[1]}/{key[0]}"))
            stage = 0
            attempt = None
        # ADVANCE (or the first step of a restart)
        stage += 1
        if stage < len(seq.steps):
            if attempt is None:
                self._add_attempt(table, src, Attempt(stage, now))
            else:
                attempt.stage = stage
            events.append(KnockAdvanced(src, door, seq.kind, stage))
            return True
        if attempt is not None:
            self._drop_attempt(table, src)
        if seq.kind is Sequence.OPEN:
            until = now + seq.door.open_for
            self._grant(door, src, until)
            events.append(DoorOpened(src, door, until))
        else:
            grants = self._grants[door]
            was_open = grants.pop(src, None) is not None
            self._grant_count -= was_open
            events.append(DoorClosed(src, door, was_open))
        return True

    # -- bounded tables ------------------------------------------------------------------

    def _add_attempt(self, table: OrderedDict, src: str, attempt: Attempt) -> None:
        if self._attempt_count >= self.max_sources:
            oldest = min(
                (t for t in self._attempts.values() if t),
                key=lambda t: next(iter(t.values())).started,
            )
            oldest.popitem(last=False)
            self._attempt_count -= 1
            self.evicted += 1
        table[src] = attempt
        self._attempt_count += 1

    def _drop_attempt(self, table: OrderedDict, src: str) -> None:
        del table[src]
        self._attempt_count -= 1

    def _grant(self, door: str, src: str, until: float) -> None:
        grants = self._grants[door]
        if src in grants:
            grants.move_to_end(src)
        else:
            if self._grant_count >= self.max_sources:
                oldest = min((g for g in self._grants.values() if g), key=lambda g: next(iter(g.values())))
                oldest.popitem(last=False)
                self._grant_count -= 1
                self.evicted += 1
            self._grant_count += 1
        grants[src] = until

    # -- time ----------------------------------------------------------------------------

    def expire(self, now: float) -> list[Event]:
        """Remove attempts and grants whose time is up; report each."""
        events: list[Event] = []
        for (door, kind), table in self._attempts.items():
            timeout = self.doors[door].seq_timeout
            while table:
                src, attempt = next(iter(table.items()))
                if now < attempt.started + timeout:
                    break
                self._drop_attempt(table, src)
                events.append(SequenceTimeout(src, door, kind, attempt.stage))
        for door, grants in self._grants.items():
            while grants:
                src, until = next(iter(grants.items()))
                if now < until:
                    break
                del grants[src]
                self._grant_count -= 1
                events.append(GrantExpired(src, door))
        return events

    def next_deadline(self) -> float | None:
        """Engine time at which `expire` next has something to do, or None."""
        deadlines = [
            next(iter(table.values())).started + self.doors[door].seq_timeout
            for (door, _), table in self._attempts.items()
            if table
        ]
        deadlines += [next(iter(g.values())) for g in self._grants.values() if g]
        return min(deadlines, default=None)

    # -- inspection ----------------------------------------------------------------------

    @property
    def tracked(self) -> int:
        """Attempts in progress."""
        return self._attempt_count

    def grants(self, now: float) -> list[tuple[str, str, float]]:
        """Live grants as (door, source, seconds left)."""
        return [
            (door, src, until - now)
            for door, table in self._grants.items()
            for src, until in table.items()
            if until > now
        ]
