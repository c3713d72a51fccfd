"""The kernel's list of the current steps of rotating doors: one ipset of port numbers per gated
port range and family (plan.rotation_set, doors/later_steps.py), fed by the daemon once a window.

It is state, not rules: the scaffolding refers to each set by name, and the daemon adds the steps
of the windows that open the door now and of the next one (doors/rotation.py kernel_ports), each
with a timeout that ends when its window stops opening the door. So a port leaves by itself on
time even if the daemon is stopped or stuck: then the range is closed to strangers (fail closed),
never open to an old sequence. Adding the next window ahead means a refresh any time within a
window keeps the kernel ahead of the clock; the daemon refreshes every few seconds and writes
only when a window changed (or the set is new). `ipset restore`, a fork per write: once a window
per range, off the packet path's hot loop.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

from ..doors.rotation import kernel_ports, kernel_steps, window_of
from ..doors.rules import Door, RotatingDoor
from ..errors import FirewallError
from .granted import _headers, _restore
from .plan import Plan, SetName

SWEEP = 3  # the set's own timeout: only paces the kernel's collection of expired ports
ROTATION_KINDS = ("rotation", "rotation-first")


def rotation_sets(plan: Plan) -> dict[str, tuple[int, int]]:
    """The rotation sets the plan's rules refer to, with their port range."""
    found: dict[str, tuple[int, int]] = {}
    for specs in plan.values():
        for spec in specs:
            name = spec.match_set
            fields = SetName.parse(name) if name else None
            if name and fields is not None and fields.kind in ROTATION_KINDS and isinstance(spec.dport, tuple):
                found[name] = spec.dport
    return found


def create_rotation_sets(plan: Plan, runner: Callable = subprocess.run) -> None:
    """Create the sets the plan's rotating-range rules match, before the rules. One of another
    range (its doors' range changed, keeping the first port) is replaced in place by `ipset
    swap`, so the rules that refer to it never lose it."""
    wanted = rotation_sets(plan)
    if not wanted:
        return
    existing = _headers(runner)
    lines = []
    for name, (first, last) in wanted.items():
        create = f"bitmap:port range {first}-{last} timeout {SWEEP}"
        if name not in existing or existing[name].get("range") == f"{first}-{last}":
            lines.append(f"create {name} {create} -exist")
            continue
        spare = f"{name}-new"
        if spare in existing:
            lines.append(f"destroy {spare}")
        lines += [f"create {spare} {create}", f"swap {name} {spare}", f"destroy {spare}"]
    error = _restore(runner, lines)
    if error:
        raise FirewallError(f"cannot create the rotating doors' sets: {error}")


class RotationSets:
    """Keeps the rotation sets of an applied plan filled with the current steps.

    Where the plan records a range's first steps (a `rotation-first` set beside its `rotation`
    set, later_steps.py), the first steps go to the one and the second steps to the other (a
    later step is queued only for a source mid-attempt, as any port of the range); else every
    step goes to the `rotation` set. When what a set is for changes (a door of its range
    changed, came or went, or its first steps moved into or out of the kernel: a reload), the set
    is flushed and written anew in the same `ipset restore`, so no port of an old sequence stays
    in it (fail closed: a step missing for an instant is dropped by the kernel)."""

    def __init__(self, runner: Callable = subprocess.run):
        self.runner = runner
        self.written: dict[tuple[str, str], int] = {}  # (set, door) -> the window last written
        self.meant: dict[str, tuple] = {}  # set -> what it holds the steps of (see sync)

    def sync(self, plan: Plan, doors: tuple[Door, ...], wall: float) -> int:
        """Add the current steps of every rotating door whose range has a set in `plan`, where
        its window changed since the last write; returns how many ports were written. Raises
        FirewallError naming what could not be written (the next sync tries again)."""
        lines: list[str] = []
        done: dict[tuple[str, str], int] = {}
        meant: dict[str, tuple] = {}
        names = rotation_sets(plan)
        for name in names:
            fields = SetName.parse(name)
            assert fields is not None and fields.key is not None  # rotation_sets parsed it
            split = str(SetName("rotation-first", fields.queue_num, fields.family, fields.key)) in names
            members = [d for d in doors if isinstance(d, RotatingDoor) and d.rotate.range[:2] == fields.key]
            meant[name] = (split, tuple((door.name, door.rotate) for door in members))
            anew = self.meant.get(name) != meant[name]
            if anew and name in self.meant:
                lines.append(f"flush {name}")
            for door in members:
                window = window_of(wall, door.rotate.window)
                if not anew and self.written.get((name, door.name)) == window:
                    continue
                if split:
                    firsts, seconds = kernel_steps(door.rotate, door.name, wall)
                    ports = firsts if fields.kind == "rotation-first" else seconds
                else:
                    ports = kernel_ports(door.rotate, door.name, wall)
                lines += [f"add {name} {port} timeout {seconds} -exist" for port, seconds in sorted(ports.items())]
                done[(name, door.name)] = window
        if not lines:
            self.meant = meant
            return 0
        error = _restore(self.runner, lines)
        if error:
            raise FirewallError(f"cannot write the rotating doors' current steps: {error}")
        self.written.update(done)
        self.meant = meant
        return sum(1 for line in lines if line.startswith("add "))
