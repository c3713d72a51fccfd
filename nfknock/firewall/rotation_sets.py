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

from ..doors.rotation import kernel_ports, window_of
from ..doors.rules import Door, RotatingDoor
from ..errors import FirewallError
from .granted import _headers, _restore
from .plan import Plan, SetName

SWEEP = 3  # the set's own timeout: only paces the kernel's collection of expired ports


def rotation_sets(plan: Plan) -> dict[str, tuple[int, int]]:
    """The rotation sets the plan's rules refer to, with their port range."""
    found: dict[str, tuple[int, int]] = {}
    for specs in plan.values():
        for spec in specs:
            name = spec.match_set
            fields = SetName.parse(name) if name else None
            if name and fields is not None and fields.kind == "rotation" and isinstance(spec.dport, tuple):
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
    """Keeps the rotation sets of an applied plan filled with the current steps."""

    def __init__(self, runner: Callable = subprocess.run):
        self.runner = runner
        self.written: dict[tuple[str, str], int] = {}  # (set, door) -> the window last written

    def sync(self, plan: Plan, doors: tuple[Door, ...], wall: float) -> int:
        """Add the current steps of every rotating door whose range has a set in `plan`, where
        its window changed since the last write; returns how many ports were written. Raises
        FirewallError naming what could not be written (the next sync tries again)."""
        lines, done = [], {}
        for name in rotation_sets(plan):
            fields = SetName.parse(name)
            assert fields is not None and fields.key is not None  # rotation_sets parsed it
            for door in doors:
                if not isinstance(door, RotatingDoor) or door.rotate.range[:2] != fields.key:
                    continue
                window = window_of(wall, door.rotate.window)
                if self.written.get((name, door.name)) == window:
                    continue
                ports = kernel_ports(door.rotate, door.name, wall)
                lines += [f"add {name} {port} timeout {seconds} -exist" for port, seconds in sorted(ports.items())]
                done[(name, door.name)] = window
        if not lines:
            return 0
        error = _restore(self.runner, lines)
        if error:
            raise FirewallError(f"cannot write the rotating doors' current steps: {error}")
        self.written.update(done)
        return len(lines)
