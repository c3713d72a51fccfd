"""Which later steps and tripwire ports the kernel keeps strangers away from. Pure.

Why: once the kernel records a door's first step (first_steps.py), a stranger's packet at that
door's *third* step, or at one of its tripwire ports, was still queued for every source, so a
spoofed flood there reached the daemon at full rate and overflowed the queue, taking the
legitimate knocks with it. Yet the engine does nothing with a later step from a source that has
no attempt (sequence.py: IDLE and OTHER is IGNORE), and a source can only have an attempt at a
kernel door after its second step, which the kernel itself queues, marked, from a source in the
door's first-step set. So the kernel can tell who may be mid-attempt: the rule that queues a
marked second step also adds the source to the daemon's *midway* set (one ipset per family,
hash:ip with the first-step sets' sizing, each element living the group's seq_timeout: the
attempt's deadline counts from its second step). No daemon write, hence no race: the element is
in the set before the second step reaches the queue, long before a third knock can follow.

A later-step port then queues only sources in the granted set (close sequences, knocking
again), in the midway set, or (a bucket of RECENT_LIMIT, plan.py) in the recent set, and drops
the rest, as the engine would have. A tripwire range of kernel doors queues the same sources
and a small bucket of everyone else (TRIPWIRE_LIMIT): a tripwire's job is to catch a scanner
between the steps, and every source that can be between the steps of a kernel door is in one of
those sets (between the first and second step the kernel's forgetting rules already reset it);
a stranger's hit still counts toward its lockout (the engine's semantics) as long as no flood
empties the bucket, and the packet not queued goes on to the rest of the firewall, as a PASS
verdict would have sent it.

A port is gated only when every use of it is a later step (third or after) or a close-sequence
step of doors whose first step the kernel records in this family, and no door has it as a
tripwire, inside a rotating range, as a protected or SPA port, or as a first or second step: a
port that another door needs queued for everyone stays queued for everyone. A tripwire range is
gated only when every door that has it is such a kernel door; a packet in a range that also
belongs to another door falls through the gated rules (they never drop) to that door's rule.

The midway set is one per family for all kernel doors, not one per door: a source mid-attempt at
one door gets its packets at another door's later step queued, where the engine ignores them.
Its elements are state, not meanings: a reload keeps the set (it is never pruned) and does not
need the care mark bits need. A door that moves into the kernel in a reload loses the attempts in
progress at that moment, as its first steps do (first_steps.py).

Rotating doors (rotation.py) queue their whole port range, and their steps change every window.
The daemon keeps the steps of the windows that open the door now and of the next one in a
kernel set of port numbers (one per range and family, bitmap:port; each port with a timeout
that ends when its window stops opening the door: firewall/rotation_sets.py refreshes it once a
window), so the kernel can tell: a packet to one of those ports is queued for anyone (and its
source enters the midway set), any other port of the range only from a source that is mid-attempt,
granted or recent, and the rest is dropped (the engine ignores a stranger's knock on a port of no
current sequence). A flood at random ports of the range, not knowing the secret, then stays in
the kernel but for the few current steps it happens to hit. A range is gated only when rotating
doors of exactly that range are its only users (`rotating_ranges`).

A flood at the current first step, though, still reached the daemon (an attacker who knows
today's first port: every client of the door does). So where one rotating door is its range's
only user (`rotating_first_steps`), its current first steps are recorded in the kernel as a knock
door's are (first_steps.py): the first steps of those windows are a port set of their own, a
knock there only adds the source to the range's first-step set and is dropped; the port set of
current steps holds only the second steps, queued marked (MarkBits.rotating, firewall/plan.py)
from a source in the first-step set, which the mark spends and which enters the midway set; a
later step needs the midway set like any port of the range. The engine takes a marked second step
of the current or previous window as that window's first step done (sequence.py, KERNEL). With
several doors in one range, one first-step set could not say whose first step was knocked (one
door's first port would stand for another's), so their steps stay queued for everyone.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

from .first_steps import FirstSteps, require
from .rules import Door, KnockDoor, RotatingDoor, TcpFlags

Key = tuple[str, int]
Range = tuple[str, int, int]


@dataclass(frozen=True)
class LaterSteps:
    """What the kernel gates in one family: later-step ports, tripwire ranges, and the first
    ports of the groups whose marked second step feeds the midway set (with the element's
    timeout in seconds)."""

    ports: tuple[Key, ...] = ()
    tripwires: tuple[Range, ...] = ()
    feeding: tuple[tuple[Key, int], ...] = ()
    rotating: tuple[tuple[Range, int], ...] = ()  # rotating doors' ranges, with the midway timeout
    # Those of them whose door's current first steps the kernel records, with the door's
    # seq_timeout (whole seconds) and TCP flags (`rotating_first_steps`).
    rotating_first: tuple[tuple[Range, tuple[int, TcpFlags | None]], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.ports or self.tripwires or self.rotating)


def rotating_ranges(doors: tuple[Door, ...]) -> tuple[tuple[Range, int], ...]:
    """The rotating doors' port ranges the kernel gates (see the module's docstring), each with
    the longest seq_timeout of its doors (whole seconds): ranges that only rotating doors of
    exactly that range use, and that no other door's port, protected port, tripwire or rotating
    range touches."""
    owners: dict[Range, list[RotatingDoor]] = {}
    for door in doors:
        if isinstance(door, RotatingDoor):
            owners.setdefault(door.rotate.range, []).append(door)
    gated = []
    for span, members in sorted(owners.items()):
        proto, low, high = span

        def inside(key: Key) -> bool:
            return key[0] == proto and low <= key[1] <= high  # noqa: B023 - used at once

        def overlaps(other: Range) -> bool:
            return other[0] == proto and other[1] <= high and low <= other[2]  # noqa: B023 - used at once

        touched = any(
            any(inside(port.key) for port in (*door.knock_ports, *door.protect))
            or any(overlaps(other) for other in door.tripwire_ranges)
            or any(overlaps(other) and other != span for other in door.knock_ranges)
            for door in doors
        )
        if not touched:
            gated.append((span, math.ceil(max(door.seq_timeout for door in members))))
    return tuple(gated)


def rotating_first_steps(doors: tuple[Door, ...]) -> tuple[tuple[Range, tuple[int, TcpFlags | None]], ...]:
    """The gated rotating ranges (`rotating_ranges`) whose current first steps the kernel records
    too, as a knock door's first step (first_steps.py), with their door's seq_timeout (whole
    seconds) and TCP flags: those with exactly one rotating door. With several, one set of
    sources that knocked a first step would let one door's first step stand for another's (the
    mark cannot say whose), so their current steps stay queued for everyone."""
    owners: dict[Range, list[RotatingDoor]] = {}
    for door in doors:
        if isinstance(door, RotatingDoor):
            owners.setdefault(door.rotate.range, []).append(door)
    found = []
    for span, _ in rotating_ranges(doors):
        if len(owners[span]) == 1:
            door = owners[span][0]
            found.append((span, (max(1, math.ceil(door.seq_timeout)), door.tcp_flags)))
    return tuple(found)


def rotating_doors_in_kernel(doors: tuple[Door, ...]) -> frozenset[str]:
    """The rotating doors whose current first steps the kernel records in some family (the
    engine takes a marked second step of theirs as the first step done): `rotating_first_steps`
    over the doors of each family, as the plan decides it (firewall/plan.py scaffolding)."""
    names: set[str] = set()
    for family in (4, 6):
        listening = tuple(door for door in doors if family in door.families)
        spans = {span for span, _ in rotating_first_steps(listening)}
        names |= {d.name for d in listening if isinstance(d, RotatingDoor) and d.rotate.range in spans}
    return frozenset(names)


def decide(doors: tuple[Door, ...], first_steps: FirstSteps, family: int) -> LaterSteps:
    """The later steps and tripwire ranges the kernel gates for `family`, among `doors` (the
    doors that listen on that family: see the module's docstring)."""
    groups = [group for group in require(first_steps).groups if family in group.families]
    kernel = {name for group in groups for name in group.doors}
    rotating = rotating_ranges(doors)
    rotating_first = rotating_first_steps(doors)
    if not kernel:
        return LaterSteps(rotating=rotating, rotating_first=rotating_first)
    allowed: set[Key] = set()  # ports a kernel door uses as a later or close step
    forbidden: set[Key] = set()  # ports some door needs queued for everyone
    for door in doors:
        for port in door.protect:
            forbidden.add(port.key)
        if door.name in kernel and isinstance(door, KnockDoor):
            early = {step.key for step in door.sequence[:2]}
            forbidden |= early
            allowed |= {step.key for step in door.sequence[2:]} - early
            allowed |= {step.key for step in door.close_sequence or ()} - early
        else:
            forbidden |= {port.key for port in door.knock_ports}
    # Candidates inside some door's tripwire (not its own step) or rotating range (bisect: 10k doors).
    wanted: dict[str, list[int]] = {}
    for proto, number in sorted(allowed - forbidden):
        wanted.setdefault(proto, []).append(number)
    for door in doors:
        own = {port.key for port in door.knock_ports}
        for proto, low, high in (*door.tripwire_ranges, *door.knock_ranges):
            numbers = wanted.get(proto, [])
            for number in numbers[bisect_left(numbers, low) : bisect_right(numbers, high)]:
                if (proto, number) not in own:
                    forbidden.add((proto, number))
    ports = tuple(sorted(allowed - forbidden))
    owners: dict[Range, set[bool]] = {}
    for door in doors:
        for span in door.tripwire_ranges:
            owners.setdefault(span, set()).add(door.name in kernel)
    tripwires = tuple(span for span, kinds in owners.items() if kinds == {True})
    if not ports and not tripwires:
        return LaterSteps(rotating=rotating, rotating_first=rotating_first)
    # Only a door of three steps or more has an attempt after its second step (which completes
    # a two-step door); the other groups' second steps add nothing to the midway set.
    long = {door.name for door in doors if isinstance(door, KnockDoor) and len(door.sequence) > 2}
    feeding = tuple((group.first, group.timeout) for group in groups if group.doors & long)
    return LaterSteps(ports, tripwires, feeding, rotating, rotating_first)
