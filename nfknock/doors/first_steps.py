"""Which knock doors have their first step recorded by the kernel instead of the daemon. Pure.

Why: a flood of first knocks from spoofed sources looks exactly like a client's first knock, so
nothing can shed it before the queue; the daemon can decide only a fraction of a saturating
flood, and the client's knock is lost with the rest. A door's first step, though, decides nothing
by itself: it only says "this source may take the second step within seq_timeout". The kernel
can record that at line rate in a set with timeouts (an ipset per first port and family, hash:ip
sized to hold a million sources at a flat cost per knock, with `forceadd` beyond that, so that a
full set gives the newcomer the place of an element of its hash bucket instead of refusing it:
firewall/granted.py), and the flood never reaches the queue. The daemon still decides
everything that matters: a second step reaches the queue marked "the first step was seen" only
from a source in that set, and marking spends the element (a later packet to that port is not
marked again); the engine then takes it as the second step of an attempt that the kernel
started (sequence.py, phase KERNEL); every later step, the grant and the connection are decided
by the engine as before.
A set element is state that expires by itself, not a rule; nothing in the kernel accepts.

A door qualifies when the kernel can tell its first two steps apart from everything else:

- a knock door (fixed sequence) of two steps or more; rotating doors change their ports every
  window (the kernel records their current first steps in per-range sets the daemon refreshes,
  with a mark bit of their own: later_steps.py) and SPA doors need the whole packet;
- its first port is used by no door except as the first step of such doors (which then share
  one set, a *group*) or as a step of a close sequence, and all doors of the group want the same
  TCP flags; its second port is used only as the second step of doors the kernel serves (its
  group's or other groups': "twins" that share a second step after different first steps) or in
  a close sequence; neither port is a tripwire, protected port, SPA port or inside a rotating range.

Twins are why the mark is a small field, not one bit: a second step reaches the daemon with one
bit per group whose set held the source (MARK_BITS bits below the pass mark, firewall/plan.py MarkBits),
so the engine knows *which* first step the kernel saw. Knocking 44000 must not count as 45000 for
the twin; one shared bit would have let either first step stand for both.

Close sequences matter only to a source that holds a grant, and packets from sources in the
granted set (firewall/granted.py) go to the daemon whatever the port, so a close sequence (and a
granted client knocking again) keeps the daemon's semantics. What changes for a stranger: the
daemon never sees its first step, so a wrong knock between the first and second step no longer
resets the attempt (a tripwire hit still does: the engine remembers it), and the attempt's
seq_timeout counts from the second step (the set element's own timeout bounds the first).

At most MAX_GROUPS groups (in port order) go to the kernel: every group is one set per family,
and the kernel's default limit is 256 sets per namespace; at most MARK_BITS groups share one
second port. A group left out stays in the daemon, and so does every group sharing a second
port with it.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, replace

from .rules import Door, KnockDoor, RotatingDoor, SpaDoor, TcpFlags

Key = tuple[str, int]
MAX_GROUPS = 32
MARK_BITS = 4  # groups that can share one second port (each marks its own bit of the packet mark)
# The bit of Packet.first_seen that says "the kernel saw this source knock a current first step
# of the rotating door of this port range" (later_steps.py; its own mark value, MarkBits.rotating,
# never one of a group's, so no history is needed for it: its meaning is fixed).
ROTATING_BIT = MARK_BITS


@dataclass(frozen=True)
class FirstStepGroup:
    """Doors whose shared first step the kernel records in one set per family."""

    first: Key
    seconds: tuple[Key, ...]  # the second steps of the group's doors
    doors: frozenset[str]
    timeout: int  # seconds a set element lives: the longest seq_timeout of the group, rounded up
    tcp_flags: TcpFlags | None  # what a TCP first knock must carry (None for UDP)
    families: tuple[int, ...]
    bit: int = 0  # which of the first-step mark bits its second steps carry (see _mark_bits)


# What a (second port, mark bit) has meant: the first port whose set marked it, and the doors of
# that group (None: not known, read back from rules in place).
Meaning = tuple[Key, frozenset[str] | None]
Slot = tuple[Key, int]  # (second port, mark bit)
Held = Mapping[Slot, frozenset[Meaning]]

# Seconds a meaning is kept once no installed rule marks with it any more. A packet marked under
# it waits in the queue for milliseconds (the queue holds a few thousand packets at most), and a
# reload reaches every worker before it is done; a few seconds is far beyond both.
GRACE = 5.0


@dataclass(frozen=True)
class MarkHistory:
    """What each (second port, mark bit) has meant, as long as a packet marked under a meaning
    can still be judged (see decide): a bit must never be read with another meaning than the
    rule that set it had.

    `current`: what installed rules mark with (or rules found in place, or rules about to be
    installed). `past`: meanings no rule marks with any more, with the monotonic time since when
    (None: not known yet: the rules that mark with it may still be in place until the new ones are
    installed; `retire(now)` stamps it). A past meaning older than `grace` is dropped by `retire`,
    so a few reloads that add and remove twins never use up a port's bits (before, every meaning
    was kept until a restart)."""

    current: frozenset[tuple[Slot, Meaning]] = frozenset()
    past: frozenset[tuple[Slot, Meaning, float | None]] = frozenset()
    grace: float = GRACE

    @classmethod
    def in_place(cls, held: Held) -> MarkHistory:
        """The meanings of rules found in place (firewall/host.py marks_installed): they mark
        packets until ours replace them."""
        return cls(frozenset((slot, meaning) for slot, meanings in held.items() for meaning in meanings))

    def held(self) -> dict[Slot, frozenset[Meaning]]:
        """Every meaning each slot may still carry on a packet: current and past alike."""
        out: dict[Slot, frozenset[Meaning]] = {}
        for slot, meaning in (*self.current, *((slot, meaning) for slot, meaning, _ in self.past)):
            out[slot] = out.get(slot, frozenset()) | {meaning}
        return out

    def installed(self, groups: tuple[FirstStepGroup, ...]) -> MarkHistory:
        """This history once rules that record `groups` replace the ones in place: their meanings
        are current, the meanings current before and not now are past since a time not known yet."""
        current = frozenset(_meanings(groups))
        past = {entry for entry in self.past if (entry[0], entry[1]) not in current}
        past |= {(slot, meaning, None) for slot, meaning in self.current - current}
        return replace(self, current=current, past=frozenset(past))

    def retire(self, now: float) -> MarkHistory:
        """This history at monotonic time `now`, with the rules of `current` installed and every
        worker switched to them: past meanings of unknown time left at `now`, and those that left
        more than `grace` seconds ago dropped (no packet marked under them can still be judged)."""
        past = frozenset(
            (slot, meaning, now if since is None else since)
            for slot, meaning, since in self.past
            if since is None or now - since < self.grace
        )
        return replace(self, past=past)

    def __or__(self, other: MarkHistory) -> MarkHistory:
        """Both histories' meanings (rules in place in both iptables flavours)."""
        return replace(self, current=self.current | other.current, past=self.past | other.past)


@dataclass(frozen=True)
class FirstSteps:
    """The one decision about first steps, which the plan, the engine and the workers all take:
    the groups the kernel records, the knock doors of two steps or more whose first knocks the
    daemon decides (each with why: `nfknock doctor` and reloads say so), and the mark history as
    it is once rules that record these groups are installed."""

    groups: tuple[FirstStepGroup, ...]
    in_daemon: Mapping[str, str]
    history: MarkHistory


def require(first_steps: object) -> FirstSteps:
    """`first_steps` itself if it is the one decision, else TypeError: a bare tuple of groups (what
    callers passed before there was a FirstSteps) or None would leave the mark history out."""
    if not isinstance(first_steps, FirstSteps):
        raise TypeError(f"first_steps must be a FirstSteps (first_steps.decide), not {type(first_steps).__name__}")
    return first_steps


def decide(doors: tuple[Door, ...], history: MarkHistory) -> FirstSteps:
    """Which first steps the kernel records (see the module's docstring), keeping to `history`.

    A marked packet may wait in the queue while a reload swaps the rules (or, with workers, reach
    a worker before it has the new ones), so it can be judged by an engine of other rules than
    marked it; a bit must therefore never come to mean another door's first step on a port while
    a packet marked under an earlier meaning may still be judged. A group may take a bit whose
    every meaning there still held was its own first port, or its own doors (the same doors,
    their first step changed: at worst a packet in flight counts their old first step for the
    new one), else a bit nothing holds there, else it stays in the daemon (until the meanings in
    its way retire: `MarkHistory.retire`)."""
    groups, in_daemon = _decide(doors, history.held())
    return FirstSteps(groups, in_daemon, history.installed(groups))


def _meanings(groups: tuple[FirstStepGroup, ...]) -> set[tuple[Slot, Meaning]]:
    """What these groups make each (second port, mark bit) mean."""
    return {((second, group.bit), (group.first, group.doors)) for group in groups for second in group.seconds}


def _name(key: Key) -> str:
    return f"{key[1]}/{key[0]}"


_ROLES = {"first": "as its first step", "second": "as its second step", "other": "as a later step or protected port"}


def _decide(doors: tuple[Door, ...], held: Held) -> tuple[tuple[FirstStepGroup, ...], dict[str, str]]:
    candidates: dict[Key, list[KnockDoor]] = defaultdict(list)
    for door in doors:
        if isinstance(door, KnockDoor) and len(door.sequence) >= 2:
            candidates[door.sequence[0].key].append(door)
    if not candidates:
        return (), {}
    # Every use of every port, as (door name, role); roles: "first", "second", "close", "other".
    uses: dict[Key, set[tuple[str, str]]] = defaultdict(set)
    ranges: list[tuple[str, int, int, frozenset[Key]]] = []  # (proto, first, last, except these)
    for door in doors:
        for port in door.protect:
            uses[port.key].add((door.name, "other"))
        if isinstance(door, SpaDoor):
            uses[door.port.key].add((door.name, "other"))
            continue
        if isinstance(door, RotatingDoor):
            ranges.append((*door.rotate.range, frozenset()))
        else:
            for index, step in enumerate(door.sequence):
                role = "first" if index == 0 else "second" if index == 1 else "other"
                uses[step.key].add((door.name, role))
            for step in door.close_sequence or ():
                uses[step.key].add((door.name, "close"))
        steps = frozenset(p.key for p in door.knock_ports)
        ranges += [(*span, steps) for span in door.tripwire_ranges]

    # Candidate ports inside some other door's tripwire or rotating range (bisect: 10k doors).
    wanted: dict[str, list[int]] = defaultdict(list)
    for first, members in candidates.items():
        for key in {first, *(door.sequence[1].key for door in members)}:
            wanted[key[0]].append(key[1])
    for numbers in wanted.values():
        numbers.sort()
    covered: set[Key] = set()
    for proto, low, high, own in ranges:
        numbers = wanted.get(proto, [])
        for number in numbers[bisect_left(numbers, low) : bisect_right(numbers, high)]:
            if (proto, number) not in own:
                covered.add((proto, number))

    def why_not(first: Key, members: list[KnockDoor], accepted: set[str]) -> str | None:
        """Why the kernel cannot record this first step, or None if it can."""
        names = {door.name for door in members}
        if len({door.tcp_flags for door in members}) != 1:
            return f"the doors starting on {_name(first)} want different TCP flags"
        for name, role in sorted(uses[first]):
            if not (role == "close" or (role == "first" and name in names)):
                return f"{_name(first)} is also door {name}'s port ({_ROLES[role]})"
        seconds = sorted({door.sequence[1].key for door in members})
        for key in seconds:
            for name, role in sorted(uses[key]):
                if role == "second" and name not in names and name not in accepted:
                    why = f" ({left[name]})" if name in left else ""
                    return (
                        f"its second step {_name(key)} is also door {name}'s, whose first step the daemon decides{why}"
                    )
                if not (role == "close" or role == "second"):
                    return f"its second step {_name(key)} is also door {name}'s port ({_ROLES[role]})"
        for key in (first, *seconds):
            if key in covered:
                return f"{_name(key)} lies in another door's tripwire or rotating range"
        return None

    # A second port may be shared by several groups (each marks its own bit), but only by doors
    # the kernel serves: a daemon door's second step there would meet the port's final DROP. So
    # groups are dropped until what is left only shares with itself (each round only drops).
    accepted = dict(sorted(candidates.items()))
    left: dict[str, str] = {}
    while True:
        names = {door.name for members in accepted.values() for door in members}
        kept: dict[Key, list[KnockDoor]] = {}
        for first, members in accepted.items():
            reason = why_not(first, members, names)
            if reason is not None:
                left.update((door.name, reason) for door in members)
            elif len(kept) == MAX_GROUPS:
                left.update((door.name, f"more than {MAX_GROUPS} first ports go to the kernel") for door in members)
            else:
                kept[first] = members
        bits = _mark_bits(kept, held)
        for first in [first for first in kept if first not in bits]:
            for door in kept.pop(first):
                left[door.name] = (
                    f"no first-step mark bit is free on its second step {_name(door.sequence[1].key)} (at most "
                    f"{MARK_BITS} first steps share one; a bit that meant another first step stays that step's "
                    f"until {GRACE:g} s after the rules that marked with it are gone)"
                )
        if kept.keys() == accepted.keys():
            break
        accepted = kept

    groups = tuple(
        FirstStepGroup(
            first=first,
            seconds=tuple(dict.fromkeys(door.sequence[1].key for door in members)),
            doors=frozenset(door.name for door in members),
            timeout=max(1, math.ceil(max(door.seq_timeout for door in members))),
            tcp_flags=members[0].tcp_flags if first[0] == "tcp" else None,
            families=tuple(sorted({family for door in members for family in door.families})),
            bit=bits[first],
        )
        for first, members in accepted.items()
    )
    return groups, left


def _same(new: Meaning, old: Meaning) -> bool:
    """Whether a packet marked with meaning `old` may be read as `new` (decide)."""
    return new[0] == old[0] or (old[1] is not None and new[1] == old[1])


def _mark_bits(groups: dict[Key, list[KnockDoor]], held: Held) -> dict[Key, int]:
    """A mark bit (0..MARK_BITS-1) for each group, distinct among groups that share a second
    port and never one that meant another door's first step on any of its second ports (`held`,
    see decide): one it already holds first, else the lowest free, in port order; a
    group left without one is not in the answer."""
    taken: dict[Key, set[int]] = defaultdict(set)  # second port -> bits its groups mark
    bits = {}
    for first, members in groups.items():
        seconds = {door.sequence[1].key for door in members}
        used = set().union(*(taken[key] for key in seconds))
        meaning = (first, frozenset(door.name for door in members))
        free = [
            bit
            for bit in range(MARK_BITS)
            if bit not in used and all(_same(meaning, old) for key in seconds for old in held.get((key, bit), ()))
        ]
        own = [bit for bit in free if any((key, bit) in held for key in seconds)]
        if free:
            bits[first] = (own or free)[0]
            for key in seconds:
                taken[key].add(bits[first])
    return bits
