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

Scanners: every port within `tripwire` of a step (not a step itself) is a tripwire. A knock
client never touches one; a scanner walking the ports in any order does, between the steps. A
tripwire hit resets the door's attempts for that source and counts as a failed attempt, like a
reset; `lockout.failures` failures within `lockout.window` lock the source out of that door for
`lockout.lock_for`: its knocks are ignored (grants it already has keep working). Tripwire
packets get the PASS verdict: nfknock only watches them; the rest of the firewall decides.

State is bounded (`state.Pool`): at most `max_sources` attempts, as many grants, and as many
failure/lock records; when a pool is full its oldest entry goes, and a flood of first knocks
can evict only attempts, never a grant.
"""

from __future__ import annotations

import ipaddress
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
    LockedOut,
    LockReleased,
    SequenceReused,
    SpaRefused,
    Sequence,
    SequenceReset,
    SequenceTimeout,
)
from .packet import Packet
from . import rotation, spa
from .errors import SpaError
from .rules import Door
from .replay import ReplayCache
from .state import Pool, Table

DEFAULT_MAX_SOURCES = 65536


class _FastHash:
    """Members are singletons: hash by identity, not by name (Enum's default is a Python-level
    hash of the name, which showed up in the per-packet profile)."""

    __hash__ = object.__hash__


class Verdict(_FastHash, Enum):
    ACCEPT = "accept"
    DROP = "drop"
    PASS = "pass"  # not ours to decide: hand the packet back to the rest of the firewall


class Decision(NamedTuple):
    verdict: Verdict
    events: tuple[Event, ...] = ()


_DROP_NOTHING = Decision(Verdict.DROP)


class Phase(_FastHash, Enum):
    IDLE = "idle"  # no attempt for this source and sequence
    STARTED = "started"  # at least one step matched


class Match(_FastHash, Enum):
    EXPECTED = "expected"
    REPEAT = "repeat"
    FIRST = "first"
    OTHER = "other"


class Action(_FastHash, Enum):
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


# Enum member access costs ~50 ns on Python 3.11 (it showed in the per-packet profile); the
# packet path below uses these module-level aliases instead.
_IDLE, _STARTED = Phase.IDLE, Phase.STARTED
_EXPECTED, _REPEAT, _FIRST, _OTHER = Match.EXPECTED, Match.REPEAT, Match.FIRST, Match.OTHER
_ADVANCE, _RESTART, _RESET, _IGNORE = Action.ADVANCE, Action.RESTART, Action.RESET, Action.IGNORE
_ACCEPT, _DROP, _PASS = Verdict.ACCEPT, Verdict.DROP, Verdict.PASS
_OPEN = Sequence.OPEN


def classify(steps: tuple[tuple[str, int], ...], stage: int, key: tuple[str, int]) -> Match:
    """Where `key` stands for an attempt that has matched `stage` steps of `steps`."""
    if key == steps[stage]:
        return _EXPECTED
    if stage and key == steps[stage - 1]:
        return _REPEAT
    if key == steps[0]:
        return _FIRST
    return _OTHER


@dataclass(slots=True)
class Attempt:
    stage: int
    started: float


class _Sequence:
    """One of a door's sequences, precompiled, with its attempts."""

    __slots__ = ("name", "kind", "steps", "timeout", "attempts", "window")

    def __init__(self, door: Door, kind: Sequence, steps, attempts: Table, window: int | None = None):
        self.name = door.name
        self.kind = kind
        self.steps = tuple(step if isinstance(step, tuple) else step.key for step in steps)
        self.timeout = door.seq_timeout
        self.attempts = attempts
        self.window = window  # the time window of a rotating door's sequence


class _DoorState:
    """A door and every table that belongs to it."""

    __slots__ = ("door", "sequences", "grants", "failures", "locks", "networks", "required", "forbidden",
                 "families", "spa", "rotate", "attempt_pool")

    def __init__(self, door: Door, attempts: Pool, grants: Pool, records: Pool):
        self.door = door
        self.spa = door.kind == "spa"
        self.rotate = None if self.spa else door.rotate
        self.attempt_pool = attempts
        self.sequences = [] if self.spa or self.rotate else [_Sequence(door, _OPEN, door.sequence, attempts.table())]
        if getattr(door, "close_sequence", None):
            self.sequences.append(_Sequence(door, Sequence.CLOSE, door.close_sequence, attempts.table()))
        self.grants = grants.table()
        self.failures = records.table()
        self.locks = records.table()
        self.networks = tuple(door.sources)
        self.required, self.forbidden = (0, 0) if self.spa else door.tcp_flags
        self.families = door.families

    def tables(self):
        return [s.attempts for s in self.sequences] + [self.grants, self.failures, self.locks]


class Engine:
    """Per-source knock progress, grants and lockouts for a set of doors."""

    def __init__(self, doors: tuple[Door, ...], max_sources: int = DEFAULT_MAX_SOURCES):
        self.max_sources = max_sources
        self._attempt_pool = Pool(max_sources)
        self._grant_pool = Pool(max_sources)
        self._record_pool = Pool(max_sources)
        self._doors: dict[str, _DoorState] = {}
        # SPA packets and rotating sequences used, until they would be refused anyway.
        self.replays = ReplayCache(max_sources)
        self._compile(doors)

    # -- configuration ------------------------------------------------------------------

    def _compile(self, doors: tuple[Door, ...]) -> None:
        states = {}
        for door in doors:
            old = self._doors.get(door.name)
            if old is not None and old.door == door:
                states[door.name] = old
            else:
                states[door.name] = _DoorState(door, self._attempt_pool, self._grant_pool, self._record_pool)
        self._doors = states
        knock: dict[tuple[str, int], list[_DoorState]] = {}
        trip: dict[tuple[str, int], list[_DoorState]] = {}
        protect: dict[tuple[str, int], list[_DoorState]] = {}
        for state in states.values():
            for port in state.door.knock_ports:
                knock.setdefault(port.key, []).append(state)
            for proto, first, last in state.door.knock_ranges:
                for port in range(first, last + 1):
                    knock.setdefault((proto, port), []).append(state)
            for key in state.door.tripwire_keys:
                trip.setdefault(key, []).append(state)
            for port in state.door.protect:
                protect.setdefault(port.key, []).append(state)
        # One lookup per packet: (proto, port) -> (knock doors, tripwire doors, protecting doors).
        self._routes = {
            key: (tuple(knock.get(key, ())), tuple(trip.get(key, ())), tuple(protect.get(key, ())))
            for key in set(knock) | set(trip) | set(protect)
        }

    def reload(self, doors: tuple[Door, ...]) -> list[str]:
        """Switch to new doors. State of doors that did not change is kept; returns the names
        of doors whose attempts, grants and lockouts were dropped (changed or removed)."""
        keep = {d.name for d in doors if d.name in self._doors and self._doors[d.name].door == d}
        dropped = sorted(set(self._doors) - keep)
        for name in dropped:
            for table in self._doors[name].tables():
                table.pool.forget(table)
        self._compile(doors)
        return dropped

    @property
    def doors(self) -> dict[str, Door]:
        return {name: state.door for name, state in self._doors.items()}

    # -- the packet path -----------------------------------------------------------------

    def handle(self, packet: Packet, now: float, wall: float | None = None) -> Decision:
        """`now`: monotonic engine time; `wall`: Unix time, needed only to judge SPA timestamps."""
        key = (packet.proto, packet.dport)
        route = self._routes.get(key)
        if route is None:
            return _DROP_NOTHING
        knock_doors, trip_doors, protect_doors = route
        if not knock_doors and protect_doors:
            return self._connect(protect_doors, packet, now)
        events: list[Event] = []
        src = packet.src
        for state in knock_doors:
            if self._admits(state, packet, now):
                if state.spa:
                    self._spa(state, packet, now, wall, events)
                elif state.rotate is not None:
                    if self._rotate_windows(state, wall):
                        self._knock(state, src, key, now, events)
                else:
                    self._knock(state, src, key, now, events)
        for state in trip_doors:
            if self._admits(state, packet, now):
                self._tripwire(state, src, key, now, events)
        return Decision(_DROP if knock_doors else _PASS, tuple(events))

    def _connect(self, doors, packet: Packet, now: float) -> Decision:
        port = f"{packet.dport}/{packet.proto}"
        for state in doors:
            # Grants are per exact address: a knock over IPv4 opens IPv4 only. An SPA grant
            # holds the ports the packet asked for; a knock grant (None) all of the door's.
            grant = state.grants.live(packet.src, now)
            if grant is not None and (grant[1] is None or (packet.proto, packet.dport) in grant[1]):
                return Decision(_ACCEPT, (ConnectionAccepted(packet.src, state.door.name, port),))
        return Decision(_DROP, (ConnectionRefused(packet.src, port),))

    def _admits(self, state: _DoorState, packet: Packet, now: float) -> bool:
        if packet.family not in state.families:
            return False
        if packet.proto == "tcp":
            flags = packet.flags
            if flags & state.required != state.required or flags & state.forbidden:
                return False
        if state.networks:
            address = ipaddress.ip_address(packet.src)
            if not any(address in network for network in state.networks):
                return False
        lock = state.locks.entries.get(packet.src)
        return lock is None or lock[0] <= now

    def _knock(self, state: _DoorState, src: str, key, now: float, events: list[Event]) -> None:
        # Attempts in progress see the packet first; the first sequence it advances or
        # restarts consumes it for the whole door. A reset that nothing consumed is a failure.
        ordered = state.sequences
        if len(ordered) == 2 and src in ordered[1].attempts and src not in ordered[0].attempts:
            ordered = ordered[::-1]
        reset = False
        for seq in ordered:
            action = self._step(seq, state, src, key, now, events)
            if action in (_ADVANCE, _RESTART):
                return
            reset = reset or action is _RESET
        if reset:
            self._failed(state, src, now, events)

    def _rotate_windows(self, state: _DoorState, wall: float | None) -> bool:
        """Point the door's sequences at the current and the previous time window."""
        if wall is None:
            return False
        rotate = state.rotate
        current = rotation.window_of(wall, rotate.window)
        if state.sequences and state.sequences[0].window == current:
            return True
        keep = {seq.window: seq for seq in state.sequences if seq.window in (current, current - 1)}
        for seq in state.sequences:
            if seq.window not in keep:
                seq.attempts.pool.forget(seq.attempts)
        proto, first, last = rotate.range
        sequences = []
        for index in (current, current - 1):
            if index not in keep:
                ports = rotation.derive(rotate.secret, state.door.name, index, rotate.length, first, last)
                keep[index] = _Sequence(state.door, _OPEN, [(proto, port) for port in ports],
                                        state.attempt_pool.table(), window=index)
            sequences.append(keep[index])
        state.sequences = sequences
        return True

    def _spa(self, state: _DoorState, packet: Packet, now: float, wall: float | None, events) -> None:
        door, src = state.door, packet.src
        try:
            if wall is None:
                raise SpaError("no clock", "the engine was not given the wall-clock time")
            data = spa.authenticate(packet.payload, door.keys)
            # From here on the packet is genuine: remember it before anything can refuse it
            # (fwknopd does the same), so a packet refused now as "from the future" cannot be
            # replayed once its time has come.
            identity = spa.packet_id(data)
            self.replays.forget_expired(wall)
            if identity in self.replays:
                raise SpaError("replay", "this packet was seen before")
            try:
                request = spa.decrypt(data, door.keys)
            except SpaError:
                events.append(self.replays.record(identity, wall + door.max_age))
                raise
            events.append(self.replays.record(identity, max(wall, request.timestamp) + door.max_age))
            age = wall - request.timestamp
            if abs(age) > door.max_age:
                raise SpaError("too old" if age > 0 else "from the future",
                               f"timestamp {abs(age):.0f}s {'old' if age > 0 else 'ahead'}, max_age {door.max_age:g}s")
            if not door.trust_inner_address and request.address != src:
                raise SpaError("source mismatch", f"the packet asks access for {request.address}")
            allowed = {p.key for p in door.protect}
            wanted = frozenset(request.ports)
            if not wanted <= allowed:
                refused = ", ".join(f"{port}/{proto}" for proto, port in sorted(wanted - allowed))
                raise SpaError("port not allowed", f"requested {refused}")
        except SpaError as exc:
            events.append(SpaRefused(src, door.name, exc.reason, exc.detail))
            self._failed(state, src, now, events)
            return
        until = now + door.open_for
        state.grants.put(src, until, wanted)
        events.append(DoorOpened(src, door.name, until))

    def restore_replays(self, entries: dict[str, float], wall: float) -> None:
        """Records saved by an earlier run (see replay.py)."""
        self.replays.restore(entries, wall)

    def _tripwire(self, state: _DoorState, src: str, key, now: float, events: list[Event]) -> None:
        port = f"{key[1]}/{key[0]}"
        for seq in state.sequences:
            entry = seq.attempts.pop(src)
            if entry is not None:
                events.append(SequenceReset(src, seq.name, seq.kind, entry[1].stage, port))
        self._failed(state, src, now, events)

    def _failed(self, state: _DoorState, src: str, now: float, events: list[Event]) -> None:
        lockout = state.door.lockout
        if lockout is None:
            return
        entry = state.failures.live(src, now)
        if entry is None:
            count = 1
            state.failures.put(src, now + lockout.window, count)
        else:
            count = entry[1] + 1
            state.failures.update(src, count)
        if count < lockout.failures:
            return
        state.failures.pop(src)
        for seq in state.sequences:
            seq.attempts.pop(src)
        until = now + lockout.lock_for
        state.locks.put(src, until)
        events.append(LockedOut(src, state.door.name, count, until))

    def _step(self, seq: _Sequence, state: _DoorState, src: str, key, now: float, events) -> Action:
        entry = seq.attempts.entries.get(src)
        attempt = None
        if entry is not None:
            if entry[0] <= now:
                seq.attempts.pop(src)
                events.append(SequenceTimeout(src, seq.name, seq.kind, entry[1].stage))
            else:
                attempt = entry[1]
        if attempt is None:
            phase, stage = _IDLE, 0
        else:
            phase, stage = _STARTED, attempt.stage
        # A port of the door's other sequence is "any other port of that door".
        match = classify(seq.steps, stage, key) if key in seq.steps else _OTHER
        action = TRANSITIONS.get((phase, match), _IGNORE)

        if action is _IGNORE:
            return action
        if action in (_RESET, _RESTART):
            seq.attempts.pop(src)
            events.append(SequenceReset(src, seq.name, seq.kind, stage, f"{key[1]}/{key[0]}"))
            if action is _RESET:
                return action
            stage, attempt = 0, None
        stage += 1
        if stage < len(seq.steps):
            if attempt is None:
                seq.attempts.put(src, now + seq.timeout, Attempt(stage, now))
            else:
                attempt.stage = stage
            events.append(KnockAdvanced(src, seq.name, seq.kind, stage))
            return action
        seq.attempts.pop(src)
        if seq.window is not None:
            used = f"rotation:{seq.name}:{seq.window}"
            if used in self.replays:
                events.append(SequenceReused(src, seq.name))
                self._failed(state, src, now, events)
                return action
            # Accepted in its own window and the next one: useless after that.
            events.append(self.replays.record(used, (seq.window + 2) * state.rotate.window))
        if seq.kind is _OPEN:
            until = now + state.door.open_for
            state.grants.put(src, until)
            events.append(DoorOpened(src, seq.name, until))
        else:
            was_open = state.grants.pop(src) is not None
            events.append(DoorClosed(src, seq.name, was_open))
        return action

    # -- time ----------------------------------------------------------------------------

    def expire(self, now: float) -> list[Event]:
        """Remove attempts, grants, failure counts and locks whose time is up; report them."""
        events: list[Event] = []
        for name, state in self._doors.items():
            for seq in state.sequences:
                events.extend(SequenceTimeout(src, name, seq.kind, a.stage) for src, a in seq.attempts.expire(now))
            events.extend(GrantExpired(src, name) for src, _ in state.grants.expire(now))
            for _ in state.failures.expire(now):
                pass
            events.extend(LockReleased(src, name) for src, _ in state.locks.expire(now))
        return events

    def next_deadline(self) -> float | None:
        """Engine time at which `expire` next has something to do, or None."""
        deadlines = [
            deadline
            for state in self._doors.values()
            for table in state.tables()
            if (deadline := table.next_deadline()) is not None
        ]
        return min(deadlines, default=None)

    # -- operator actions (the control socket) --------------------------------------------

    def grant(self, src: str, door: str, seconds: float, now: float) -> float:
        """Break-glass: let `src` open new connections through `door` for `seconds`. Its
        deadline may come before older grants'; `live()` still ends it on time (only its
        GrantExpired event may come late)."""
        state = self._doors.get(door)
        if state is None:
            raise KeyError(door)
        until = now + seconds
        state.grants.put(src, until)
        return until

    def revoke(self, src: str, door: str | None = None) -> list[str]:
        """End the grants of `src` (on one door or all); returns the doors it had a grant on."""
        revoked = []
        for name, state in self._doors.items():
            if door in (None, name) and state.grants.pop(src) is not None:
                revoked.append(name)
        return revoked

    # -- inspection ----------------------------------------------------------------------

    @property
    def tracked(self) -> int:
        """Attempts in progress."""
        return self._attempt_pool.size

    @property
    def evicted(self) -> int:
        """Entries dropped because a pool was full."""
        return self._attempt_pool.evicted + self._grant_pool.evicted + self._record_pool.evicted

    def grants(self, now: float) -> list[tuple[str, str, float]]:
        """Live grants as (door, source, seconds left)."""
        return [
            (name, src, until - now)
            for name, state in self._doors.items()
            for src, until, _ in state.grants.items()
            if until > now
        ]

    def locked(self, now: float) -> list[tuple[str, str, float]]:
        """Live lockouts as (door, source, seconds left)."""
        return [
            (name, src, until - now)
            for name, state in self._doors.items()
            for src, until, _ in state.locks.items()
            if until > now
        ]
