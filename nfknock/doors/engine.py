"""The decision engine: (packet, now) in, verdict and events out. No I/O, no clock.

Theory of operation
-------------------
Every packet that reaches the engine is routed by (proto, port), once, to the doors that use
that port: as a knock port, as a tripwire, or as a protected port.

A *new connection to a protected port* is accepted if its exact source address holds a live
grant of a door protecting that port (an SPA grant: only for the ports the packet asked for);
everything else is dropped. Established connections never come here: the firewall scaffolding
accepts them before the queue.

A *forwarded* new connection (queued on the FORWARD hook: a gateway door's destination behind
this host, docs/gateway.md) is routed by (proto, destination address, port) instead, never by
port alone, and accepted only for a source with a grant of a door that lists that destination.

A *knock* is offered to each door on that port that admits it: the packet's family is the
door's, a TCP knock's flags match the door's `tcp_flags` (non-matching TCP packets are ignored,
as knockd does), the source is in the door's `sources` and is not locked out. How the door
takes it depends on its kind, decided once when the doors are compiled:

- a knock door feeds it to its sequences (sequence.py has the transition table). Attempts in
  progress see the packet first, and the first sequence that advances, restarts or completes
  with it consumes it for the whole door, so knocking the last step of the open sequence does
  not also start a close sequence that begins with that port. A reset that nothing consumed
  is a failure. Completing the open sequence grants the source NEW connections to the door's
  protected ports until now + open_for (knocking again extends it); completing the close
  sequence revokes the grant.
- a rotating door does the same with the sequences of the current and the previous time
  window (rotation.py); a sequence that has opened the door is recorded in the replay cache
  and does not open it again (SequenceReused, a failure).
- an SPA door checks the packet (spa_access.py: which person's key by its HMAC, replay cache,
  age, the key's expiry, sources and username, address, ports) and grants the ports it asked
  for, for the time it asked for (up to the key's max_open_for) or open_for; a refusal is a
  failure only when no one but a key holder could have caused it (spa_access.counts_against_source:
  never junk, a bad HMAC, a replay or a stale copy, whose UDP source anyone can forge). The
  grant remembers whose key it was: `revoke_key` ends a person's grants, and a reload that
  only adds or removes keys keeps the door's state but the grants of keys that left
  (GrantsRevoked).

Fleet mode (a `shared` replay cache): an SPA packet or rotating sequence that passed every local
check is recorded as always, but instead of granting, the door reports ClaimNeeded; the daemon
asks the fleet whether another member used it first and calls `claimed` with the answer, which
grants (DoorOpened) or refuses (a failure, like a local replay). Knock doors have nothing to
claim and grant at once.

Scanners: every port within `tripwire` of a step (not a step itself) is a tripwire. A knock
client never touches one; a scanner walking the ports in any order does, between the steps. A
tripwire hit resets the door's attempts for that source and counts as a failure. Failures lock
a source out (lockout.py). Tripwire packets get the PASS verdict: nfknock only watches them;
the rest of the firewall decides. Knock packets are always dropped.

State is bounded (`state.Pool`): at most `max_sources` attempts, as many grants, and as many
failure/lock records; when a pool is full its oldest entry goes, and a flood of first knocks
can evict only attempts, never a grant. Records of what may be used once (replay.py) are
bounded by the same number.
"""

from __future__ import annotations

import ipaddress
from enum import Enum
from typing import NamedTuple

from ..errors import SpaError
from . import later_steps, rotation
from .events import (
    ClaimNeeded,
    ConnectionAccepted,
    ConnectionRefused,
    DoorClosed,
    DoorOpened,
    Event,
    GrantExpired,
    GrantsRevoked,
    Recorded,
    Sequence,
    SequenceReset,
    SequenceReused,
    SpaRefused,
)
from .first_steps import ROTATING_BIT, FirstSteps, require
from .lockout import Lockouts
from .packet import Packet
from .replay import ReplayCache
from .rules import Door, KnockDoor, RotatingDoor, SpaDoor
from .sequence import Action, Key, KnockSequence, _FastHash
from .spa_access import KeyRefused, SpaGrant, authorize, counts_against_source
from .state import Pool, Table

DEFAULT_MAX_SOURCES = 65536


class Verdict(_FastHash, Enum):
    ACCEPT = "accept"
    DROP = "drop"
    PASS = "pass"  # not ours to decide: hand the packet back to the rest of the firewall
    HOLD = "hold"  # a new connection whose source waits for a claim's answer: judged again then


class Decision(NamedTuple):
    verdict: Verdict
    events: tuple[Event, ...] = ()


# Enum member access costs ~50 ns on Python 3.11 (it showed in the per-packet profile).
_ACCEPT, _DROP, _PASS, _HOLD = Verdict.ACCEPT, Verdict.DROP, Verdict.PASS, Verdict.HOLD
_ADVANCE, _COMPLETE, _ABSORB, _RESTART, _RESET = (
    Action.ADVANCE,
    Action.COMPLETE,
    Action.ABSORB,
    Action.RESTART,
    Action.RESET,
)
_OPEN, _CLOSE = Sequence.OPEN, Sequence.CLOSE
_DROP_NOTHING = Decision(_DROP)
_HOLD_NOTHING = Decision(_HOLD)
HOLD_SECONDS = 3.0  # at most this long a new connection waits for its source's claim (TCP retries after 1 s)


# (knock doors, tripwire doors, protecting doors, the attempt tables of the lean path or None)
_Route = tuple[tuple["_DoorState", ...], tuple["_DoorState", ...], tuple["_DoorState", ...], tuple[dict, ...] | None]


class _Pools(NamedTuple):
    attempts: Pool
    grants: Pool
    records: Pool


class _DoorState:
    """A door and every table that belongs to it; subclasses take knocks their own way."""

    __slots__ = ("door", "name", "grants", "lockouts", "networks", "required", "forbidden", "families", "sequences")

    def __init__(self, door: Door, pools: _Pools):
        self.door = door
        self.name = door.name
        self.grants = pools.grants.table()
        self.lockouts = Lockouts(door.name, door.lockout, pools.records)
        self.networks = tuple(door.sources)
        self.required, self.forbidden = (0, 0) if isinstance(door, SpaDoor) else door.tcp_flags
        self.families = door.families
        self.sequences: list[KnockSequence] = []

    def admits(self, packet: Packet, now: float) -> bool:
        if packet.family not in self.families:
            return False
        if packet.proto == "tcp":
            flags = packet.flags
            if flags & self.required != self.required or flags & self.forbidden:
                return False
        if self.networks:
            address = ipaddress.ip_address(packet.src)
            if not any(address in network for network in self.networks):
                return False
        return not self.lockouts.locked(packet.src, now)

    def knock(self, packet: Packet, key: Key, now: float, wall: float | None, events: list[Event]) -> None:
        raise NotImplementedError

    def tripwire(self, src: str, key: Key, now: float, events: list[Event]) -> None:
        port = f"{key[1]}/{key[0]}"
        for seq in self.sequences:
            attempt = seq.forget(src)
            if attempt is not None:
                events.append(SequenceReset(src, seq.door, seq.kind, attempt.stage, port))
        self.failed(src, now, events)

    def failed(self, src: str, now: float, events: list[Event]) -> None:
        locked = self.lockouts.fail(src, now)
        if locked is not None:
            for seq in self.sequences:
                seq.forget(src)
            events.append(locked)

    def tables(self) -> list[Table]:
        return [seq.attempts for seq in self.sequences] + [self.grants] + self.lockouts.tables()

    def open_once(
        self, src: str, record: Recorded, shared: bool, now: float, events: list[Event], grant: SpaGrant | None = None
    ) -> None:
        """Grant what a once-only record allowed (an SPA packet's `grant`, or the whole door),
        or, in a fleet, ask first (ClaimNeeded)."""
        seconds = self.door.open_for if grant is None else grant.seconds
        if shared:
            ports = None if grant is None else tuple(sorted(grant.ports))
            key = None if grant is None else grant.key
            dests = () if grant is None else tuple(sorted(grant.dests))
            events.append(ClaimNeeded(src, self.name, record.key, record.expires, seconds, ports, key, dests))
            return
        until = now + seconds
        if grant is None:
            self.grants.put(src, until)
            events.append(DoorOpened(src, self.name, until))
        else:
            self.grants.put(src, until, grant)  # the latest packet decides: its ports, key and time
            events.append(DoorOpened(src, self.name, until, grant.key, grant.seconds))


class _KnockDoorState(_DoorState):
    """A fixed open sequence and perhaps a close sequence."""

    __slots__ = ("seq_timeout", "first", "first_bit")

    def __init__(self, door: KnockDoor | RotatingDoor, pools: _Pools):
        super().__init__(door, pools)
        self.seq_timeout = door.seq_timeout
        self.first: Key | None = None  # the open sequence's first step, when the kernel records it
        self.first_bit = 0  # the bit of Packet.first_seen that says the kernel saw that step
        if isinstance(door, KnockDoor):
            self.sequences = [self._compile(_OPEN, door.sequence, pools)]
            if door.close_sequence:
                self.sequences.append(self._compile(_CLOSE, door.close_sequence, pools))

    def _compile(self, kind: Sequence, steps, pools: _Pools, window: int | None = None) -> KnockSequence:
        keys = tuple(step if isinstance(step, tuple) else step.key for step in steps)
        return KnockSequence(self.name, kind, keys, self.seq_timeout, pools.attempts.table(), window)

    def first_in_kernel(self, bit: int | None) -> None:
        """Whether the kernel records the open sequence's first step (decided over all doors),
        and which bit of the first-step mark field says it did (None: the daemon sees it)."""
        opening = self.sequences[0]
        self.first, opening.second = (opening.steps[0], opening.steps[1]) if bit is not None else (None, None)
        self.first_bit = 0 if bit is None else 1 << bit

    def knock(self, packet: Packet, key: Key, now: float, wall: float | None, events: list[Event]) -> None:
        src = packet.src
        # The kernel marks a second step only from a source whose first step it recorded and
        # that knocked no other port of the door since (first_steps.py).
        # A bit is the door's only on its own second port (bits are distinct per second port).
        first_seen = bool(packet.first_seen & self.first_bit) and any(key == seq.second for seq in self.sequences)
        ordered = self.sequences
        if first_seen and src not in ordered[0].attempts and self.first is not None:
            # The first step the kernel saw would have ended a close attempt, as a knock does.
            first = f"{self.first[1]}/{self.first[0]}"
            for seq in ordered[1:]:
                attempt = seq.forget(src)
                if attempt is not None:
                    events.append(SequenceReset(src, seq.door, seq.kind, attempt.stage, first))
        elif len(ordered) == 2 and src in ordered[1].attempts and src not in ordered[0].attempts:
            ordered = ordered[::-1]
        reset = False
        for seq in ordered:
            action = seq.step(src, key, now, events, first_seen)
            if action is _COMPLETE:
                self.complete(seq, src, now, events)
                return
            if action is _ADVANCE or action is _RESTART or action is _ABSORB:
                return
            reset = reset or action is _RESET
        if reset:
            self.failed(src, now, events)

    def complete(self, seq: KnockSequence, src: str, now: float, events: list[Event]) -> None:
        if seq.kind is _OPEN:
            until = now + self.door.open_for
            self.grants.put(src, until)
            events.append(DoorOpened(src, self.name, until))
        else:
            was_open = self.grants.pop(src) is not None
            events.append(DoorClosed(src, self.name, was_open))


class _RotatingDoorState(_KnockDoorState):
    """The sequences of the current and the previous time window; each opens the door once."""

    __slots__ = ("pools", "replays", "rotate")

    def __init__(self, door: RotatingDoor, pools: _Pools, replays: ReplayCache):
        super().__init__(door, pools)
        self.pools = pools
        self.replays = replays
        self.rotate = door.rotate

    def first_in_kernel(self, bit: int | None) -> None:
        """Whether the kernel records this door's current first steps (later_steps.py), and the
        bit of Packet.first_seen that says it saw one (ROTATING_BIT); None: the daemon sees them.
        Then a marked second step of the current or the previous window is taken as that
        window's first step done (sequence.py, phase KERNEL); `first` stays None (no close
        sequence to end)."""
        self.first_bit = 0 if bit is None else 1 << bit
        for seq in self.sequences:
            seq.second = seq.steps[1] if bit is not None else None

    def knock(self, packet: Packet, key: Key, now: float, wall: float | None, events: list[Event]) -> None:
        if wall is None:
            return  # no wall-clock time, no window: nothing can match
        self._follow_windows(wall)
        super().knock(packet, key, now, wall, events)

    def _follow_windows(self, wall: float) -> None:
        rotate = self.rotate
        windows = rotation.accepted_windows(wall, rotate.window)
        if self.sequences and self.sequences[0].window == windows[0]:
            return
        keep = {seq.window: seq for seq in self.sequences if seq.window in windows}
        for seq in self.sequences:
            if seq.window not in keep:
                seq.attempts.pool.forget(seq.attempts)
        proto, first, last = rotate.range
        for index in windows:
            if index not in keep:
                steps = rotation.steps_of(rotate.secret, self.name, index, rotate.length, proto, first, last)
                keep[index] = self._compile(_OPEN, steps, self.pools, window=index)
                keep[index].second = steps[1] if self.first_bit else None
        self.sequences = [keep[index] for index in windows]

    def complete(self, seq: KnockSequence, src: str, now: float, events: list[Event]) -> None:
        assert seq.window is not None  # every sequence of a rotating door has its window
        used = f"rotation:{self.name}:{seq.window}"
        if used in self.replays:
            events.append(SequenceReused(src, self.name))
            self.failed(src, now, events)
            return
        # Accepted in its own window and the next one: useless after that.
        record = self.replays.record(used, (seq.window + 2) * self.rotate.window)
        events.append(record)
        self.open_once(src, record, self.replays.shared, now, events)


class _SpaDoorState(_DoorState):
    """One authenticated packet opens the ports it asks for; its grant names the key."""

    __slots__ = ("replays", "spa")

    def __init__(self, door: SpaDoor, pools: _Pools, replays: ReplayCache):
        super().__init__(door, pools)
        self.replays = replays
        self.spa = door

    def knock(self, packet: Packet, key: Key, now: float, wall: float | None, events: list[Event]) -> None:
        src = packet.src
        try:
            if wall is None:
                raise SpaError("no clock", "the engine was not given the wall-clock time")
            grant = authorize(self.spa, packet, wall, self.replays, events)
        except SpaError as exc:
            who = exc.key if isinstance(exc, KeyRefused) else None
            events.append(SpaRefused(src, self.name, exc.reason, exc.detail, who))
            if counts_against_source(exc):  # never junk, a bad HMAC, a replay: anyone can forge those
                self.failed(src, now, events)
            return
        record = next(event for event in reversed(events) if type(event) is Recorded)  # authorize recorded it
        self.open_once(src, record, self.replays.shared, now, events, grant)

    def rekey(self, door: SpaDoor) -> list[Event]:
        """Take the door's new keys (its other settings are unchanged): grants of keys that
        left, or changed, end; everyone else's stay."""
        kept = set(door.keyring)
        gone = [key.name for key in self.spa.keyring if key not in kept]
        events: list[Event] = []
        for name in gone:
            sources = [
                src for src, _, value in self.grants.items() if isinstance(value, SpaGrant) and value.key == name
            ]
            for src in sources:
                self.grants.pop(src)
            events.append(GrantsRevoked(self.name, name, tuple(sources)))
        self.door = self.spa = door
        return events


class GrantRow(NamedTuple):
    """A live grant as `status` shows it; key and seconds (its length) for SPA grants."""

    door: str
    source: str
    seconds_left: float
    key: str | None
    seconds: float | None


def _door_state(door: Door, pools: _Pools, replays: ReplayCache) -> _DoorState:
    """Dispatch on the door's kind, once."""
    if isinstance(door, SpaDoor):
        return _SpaDoorState(door, pools, replays)
    if isinstance(door, RotatingDoor):
        return _RotatingDoorState(door, pools, replays)
    return _KnockDoorState(door, pools)


class Engine:
    """Per-source knock progress, grants and lockouts for a set of doors."""

    def __init__(
        self,
        doors: tuple[Door, ...],
        max_sources: int = DEFAULT_MAX_SOURCES,
        shared: bool = False,
        *,
        first_steps: FirstSteps,
    ):
        """`first_steps`: which first steps the kernel records, with their mark bits
        (first_steps.decide: the firewall's plan was made from the same value)."""
        self.max_sources = max_sources
        self._pools = _Pools(Pool(max_sources), Pool(max_sources), Pool(max_sources))
        self._doors: dict[str, _DoorState] = {}
        # SPA packets and rotating sequences used, until they would be refused anyway; `shared`:
        # a fleet member's, whose records must be claimed fleet-wide before they open anything.
        self.replays = ReplayCache(max_sources)
        self.replays.shared = shared
        self.rekeyed: tuple[Event, ...] = ()  # what the last reload did to SPA doors' keys
        # Sources whose SPA packet or rotating sequence waits for its claim (a shared cache), until
        # when: their new connections are held (HOLD), not refused, and judged again once the
        # claim is answered, so the client's first SYN is not lost to a Redis round trip.
        self.pending: dict[str, float] = {}
        self._compile(doors, first_steps)

    # -- configuration ------------------------------------------------------------------

    def _reusable(self, door: Door) -> _DoorState | None:
        """The state of the door of that name if it can carry on: the same door, or an SPA door
        whose keys alone changed."""
        old = self._doors.get(door.name)
        if old is None:
            return None
        if old.door == door:
            return old
        if isinstance(old, _SpaDoorState) and isinstance(door, SpaDoor) and door.same_settings(old.door):
            return old
        return None

    def use_first_steps(self, first_steps: FirstSteps) -> None:
        """Take these first steps as the kernel's, with these mark bits: the firewall's plan was
        made with the same value (the daemon decides it once, first_steps.decide)."""
        in_kernel = {name: group.bit for group in require(first_steps).groups for name in group.doors}
        rotating = later_steps.rotating_doors_in_kernel(tuple(state.door for state in self._doors.values()))
        for state in self._doors.values():
            if type(state) is _KnockDoorState:
                state.first_in_kernel(in_kernel.get(state.name))
            elif type(state) is _RotatingDoorState:
                state.first_in_kernel(ROTATING_BIT if state.name in rotating else None)
        if hasattr(self, "_routes"):
            self._route_strangers()

    def _compile(self, doors: tuple[Door, ...], first_steps: FirstSteps) -> None:
        require(first_steps)  # before anything changes
        states = {}
        rekeyed: list[Event] = []
        for door in doors:
            state = self._reusable(door)
            if state is None:
                state = _door_state(door, self._pools, self.replays)
            elif isinstance(state, _SpaDoorState) and state.door is not door:
                rekeyed += state.rekey(door)  # type: ignore[arg-type]  # an SPA door, as _reusable checked
            states[door.name] = state
        self._doors = states
        self.rekeyed = tuple(rekeyed)
        self.use_first_steps(first_steps)
        knock: dict[Key, list[_DoorState]] = {}
        trip: dict[Key, list[_DoorState]] = {}
        protect: dict[Key, list[_DoorState]] = {}
        for state in states.values():
            door = state.door
            for port in door.knock_ports:
                knock.setdefault(port.key, []).append(state)
            for proto, first, last in door.knock_ranges:
                for number in range(first, last + 1):
                    knock.setdefault((proto, number), []).append(state)
            for key in door.tripwire_keys:
                trip.setdefault(key, []).append(state)
            for port in door.protect:
                protect.setdefault(port.key, []).append(state)
        # One lookup per packet: (proto, port) -> (knock doors, tripwire doors, protecting doors).
        self._routes: dict[Key, _Route] = {
            key: (tuple(knock.get(key, ())), tuple(trip.get(key, ())), tuple(protect.get(key, ())), None)
            for key in set(knock) | set(trip) | set(protect)
        }
        # Gateway doors (docs/gateway.md): (proto, address, port) of a destination behind this host
        # -> the doors whose grant opens it. Only forwarded packets carry such a destination.
        dests: dict[tuple[str, str, int], list[_DoorState]] = {}
        for state in states.values():
            for dest in state.door.destinations:
                dests.setdefault(dest.key, []).append(state)
        self._dests = {key: tuple(doors) for key, doors in dests.items()}
        self._route_strangers()

    def _route_strangers(self) -> None:
        """The lean path of a flood at a later step (later_steps.py; the kernel sheds most of it,
        but not where a door's first step is the daemon's): on a port that only knock doors use,
        and none of them as the first step of a sequence or as a second step the kernel marks, a
        source with no attempt at any of their sequences can only meet IDLE and OTHER, which is
        IGNORE (sequence.py), and no failure, whatever its flags or lockout. So the route keeps
        those sequences' attempt tables, and `handle` drops such a source after one membership
        test per sequence: no admission check, no event list."""
        routes: dict[Key, _Route] = {}
        for key, (knock_doors, trip_doors, protect_doors, _) in self._routes.items():
            lean = None
            if knock_doors and not trip_doors and not protect_doors:
                sequences = [seq for state in knock_doors for seq in state.sequences]
                if all(type(state) is _KnockDoorState for state in knock_doors) and not any(
                    key == seq.steps[0] or key == seq.second for seq in sequences
                ):
                    lean = tuple(seq.attempts.entries for seq in sequences)
            routes[key] = (knock_doors, trip_doors, protect_doors, lean)
        self._routes = routes

    def reload(self, doors: tuple[Door, ...], first_steps: FirstSteps) -> list[str]:
        """Switch to new doors, whose first steps the kernel records as `first_steps` says. State
        of doors that did not change is kept; returns the names of doors whose attempts, grants
        and lockouts were dropped (changed or removed)."""
        require(first_steps)  # before anything is dropped
        keep = {d.name for d in doors if self._reusable(d) is not None}
        dropped = sorted(set(self._doors) - keep)
        for name in dropped:
            for table in self._doors[name].tables():
                table.pool.forget(table)
        self._compile(doors, first_steps)
        return dropped

    @property
    def doors(self) -> dict[str, Door]:
        return {name: state.door for name, state in self._doors.items()}

    # -- the packet path -----------------------------------------------------------------

    def handle(self, packet: Packet, now: float, wall: float | None = None) -> Decision:
        """`now`: monotonic engine time; `wall`: Unix time, needed only by SPA and rotating doors."""
        if packet.forwarded:  # never judged as a port of this host, whatever its port number
            return self._forward(self._dests.get((packet.proto, packet.dst, packet.dport), ()), packet, now)
        key = (packet.proto, packet.dport)
        route = self._routes.get(key)
        if route is None:
            return _DROP_NOTHING
        knock_doors, trip_doors, protect_doors, lean = route
        if lean is not None:
            src = packet.src
            for attempts in lean:
                if src in attempts:
                    break
            else:
                return _DROP_NOTHING  # a stranger at a later step: nothing to do (_route_strangers)
        if not knock_doors and protect_doors:
            return self._connect(protect_doors, packet, now)
        events: list[Event] = []
        for state in knock_doors:
            if state.admits(packet, now):
                state.knock(packet, key, now, wall, events)
        for state in trip_doors:
            if state.admits(packet, now):
                state.tripwire(packet.src, key, now, events)
        if self.replays.shared:  # only a shared cache asks before it grants
            for event in events:
                if type(event) is ClaimNeeded and len(self.pending) < self.max_sources:
                    self.pending[event.src] = now + HOLD_SECONDS
        return Decision(_DROP if knock_doors else _PASS, tuple(events))

    def _connect(self, doors: tuple[_DoorState, ...], packet: Packet, now: float) -> Decision:
        port = f"{packet.dport}/{packet.proto}"
        for state in doors:
            # Grants are per exact address: a knock over IPv4 opens IPv4 only. An SPA grant
            # holds the ports the packet asked for; a knock grant (None) all of the door's.
            grant = state.grants.live(packet.src, now)
            if grant is not None and (grant[1] is None or (packet.proto, packet.dport) in grant[1][0]):
                return Decision(
                    _ACCEPT, (ConnectionAccepted(packet.src, state.name, port, dst=packet.dst, sport=packet.sport),)
                )
        if self.pending and self.pending.get(packet.src, 0.0) > now:
            return _HOLD_NOTHING
        return Decision(_DROP, (ConnectionRefused(packet.src, port),))

    def _forward(self, doors: tuple[_DoorState, ...], packet: Packet, now: float) -> Decision:
        """A new connection forwarded to a destination behind this host (routed, or published:
        after the DNAT the packet has the destination's address). Accepted when its source holds
        a grant of a door with that destination: a knock grant opens all the door's
        destinations, an SPA grant the ones its packet asked for (or the door's force_nat).
        A forwarded packet to no destination of the current doors (a reload under way) is
        refused: a grant of a port of this host never opens a host behind it."""
        key = (packet.proto, packet.dst, packet.dport)
        host = f"[{packet.dst}]" if packet.family == 6 else packet.dst
        where = f"{host}:{packet.dport}/{packet.proto}"
        for state in doors:
            grant = state.grants.live(packet.src, now)
            if grant is not None and (grant[1] is None or key in grant[1].dests):
                return Decision(
                    _ACCEPT,
                    (ConnectionAccepted(packet.src, state.name, where, True, dst=packet.dst, sport=packet.sport),),
                )
        if self.pending and self.pending.get(packet.src, 0.0) > now:
            return _HOLD_NOTHING
        return Decision(_DROP, (ConnectionRefused(packet.src, where),))

    def restore_replays(self, entries: dict[str, float], wall: float) -> None:
        """Records saved by an earlier run (see replay.py)."""
        self.replays.restore(entries, wall)

    # -- time ----------------------------------------------------------------------------

    def expire(self, now: float) -> list[Event]:
        """Remove attempts, grants, failure counts and locks whose time is up; report them."""
        events: list[Event] = []
        for name, state in self._doors.items():
            for seq in state.sequences:
                events.extend(seq.expire(now))
            events.extend(
                GrantExpired(src, name, value.key if isinstance(value, SpaGrant) else None)
                for src, value in state.grants.expire(now)
            )
            events.extend(state.lockouts.expire(now))
        for src in [src for src, until in self.pending.items() if until <= now]:
            del self.pending[src]  # no answer in time: its held connections are refused
        return events

    def next_deadline(self) -> float | None:
        """Engine time at which `expire` next has something to do, or None. The loop asks twice
        a turn: one pass, the front of each non-empty table read in place (Table.next_deadline)."""
        soonest = min(self.pending.values()) if self.pending else None
        for state in self._doors.values():
            for table in state.tables():
                if entries := table.entries:
                    deadline = next(iter(entries.values()))[0]
                    if soonest is None or deadline < soonest:
                        soonest = deadline
        return soonest

    # -- operator actions (the control socket) --------------------------------------------

    def grant(
        self, src: str, door: str, seconds: float, now: float, ports=None, key: str | None = None, dests=()
    ) -> float:
        """Break-glass (or a fleet member's grant): let `src` open new connections through
        `door` for `seconds` (the table keeps deadline order, so it expires on time even before
        older grants). A fleet member's SPA grant holds only `ports` and `dests` (an SPA NAT
        grant's destinations, docs/gateway.md) and names the `key`."""
        state = self._doors.get(door)
        if state is None:
            raise KeyError(door)
        until = now + seconds
        spa = None if ports is None else SpaGrant(frozenset(ports), key or "", seconds, frozenset(dests))
        state.grants.put(src, until, spa)
        return until

    def claimed(self, claim: ClaimNeeded, answer: str, now: float, detail: str = "") -> list[Event]:
        """The fleet's (or the other workers') answer to a ClaimNeeded: "ours" grants; "taken"
        (another member used it first) is refused as a replay, a failure of the source for a
        rotating door (an SPA packet's copy can come from any address: no failure);
        "unreachable" (no answer, and the member refuses then) and "unrecorded" (a worker could not
        write the record down) are refused without counting against the source. An "ours" for an
        SPA key that left the door while the claim was asked is refused too: the keyring has the
        last word."""
        self.pending.pop(claim.src, None)
        state = self._doors.get(claim.door)
        if state is None:
            return []  # the door went away in a reload meanwhile
        events: list[Event] = []
        if answer == "ours" and claim.key is not None and isinstance(state, _SpaDoorState):
            if claim.key not in {key.name for key in state.spa.keyring}:
                answer, detail = "key gone", f"key {claim.key} left the door while its claim was asked"
        if answer == "ours":
            until = now + claim.seconds
            if claim.ports is None:
                state.grants.put(claim.src, until)
                events.append(DoorOpened(claim.src, claim.door, until))
            else:
                spa = SpaGrant(frozenset(claim.ports), claim.key or "", claim.seconds, frozenset(claim.dests))
                state.grants.put(claim.src, until, spa)
                events.append(DoorOpened(claim.src, claim.door, until, spa.key, spa.seconds))
            return events
        taken = answer == "taken"
        reason = {"taken": "replay", "unrecorded": "replay record not written", "key gone": "key removed"}.get(
            answer, "fleet unreachable"
        )
        if isinstance(state, _SpaDoorState):
            events.append(SpaRefused(claim.src, claim.door, reason, detail or "used on another member", claim.key))
        elif taken:
            events.append(SequenceReused(claim.src, claim.door))
        if taken and not isinstance(state, _SpaDoorState):  # an SPA packet used elsewhere: a replay
            state.failed(claim.src, now, events)
        return events

    def grant_of(self, src: str, door: str, now: float) -> tuple[float, SpaGrant | None] | None:
        """(engine deadline, SpaGrant or None for a grant of all the door's ports) of the live
        grant of `src` on `door`."""
        state = self._doors.get(door)
        return None if state is None else state.grants.live(src, now)

    def revoke_key(self, key: str, door: str | None = None) -> list[tuple[str, str]]:
        """End the SPA grants opened with the key named `key` (on one door or all); returns
        the (door, source) pairs that had one."""
        revoked = []
        for name, state in self._doors.items():
            if door in (None, name):
                for src, _, value in list(state.grants.items()):
                    if isinstance(value, SpaGrant) and value.key == key:
                        state.grants.pop(src)
                        revoked.append((name, src))
        return revoked

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
        return self._pools.attempts.size

    @property
    def evicted(self) -> int:
        """Entries dropped because a pool was full."""
        return sum(pool.evicted for pool in self._pools)

    def grant_left(self, src: str, now: float) -> float:
        """Seconds the longest live grant of `src` has left, on any door (0: none)."""
        left = 0.0
        for state in self._doors.values():
            grant = state.grants.live(src, now)
            if grant is not None:
                left = max(left, grant[0] - now)
        return left

    def grants(self, now: float) -> list[tuple[str, str, float]]:
        """Live grants as (door, source, seconds left)."""
        return [
            (name, src, until - now)
            for name, state in self._doors.items()
            for src, until, _ in state.grants.items()
            if until > now
        ]

    def grant_rows(self, now: float) -> list[GrantRow]:
        """Live grants with whose key opened them and for how long (SPA), for `status`."""
        rows = []
        for name, state in self._doors.items():
            for src, until, value in state.grants.items():
                if until > now:
                    spa = isinstance(value, SpaGrant)
                    rows.append(
                        GrantRow(name, src, until - now, value.key if spa else None, value.seconds if spa else None)
                    )
        return rows

    def locked(self, now: float) -> list[tuple[str, str, float]]:
        """Live lockouts as (door, source, seconds left)."""
        return [(name, src, left) for name, state in self._doors.items() for src, left in state.lockouts.live(now)]
