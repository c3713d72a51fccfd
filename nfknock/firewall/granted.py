"""The kernel's list of sources that hold a grant: one ipset per family, fed by the daemon.

It is state, not rules: the scaffolding refers to the set by name and never changes when a
client is granted; elements carry their own timeout and leave the kernel by themselves. The set
only *routes*: a new connection from a source in it goes to the grant queue, and its knocks on
ports whose first step the kernel records go to the daemon (first_steps.py); the daemon still
decides (a revoked or expired grant is refused at once, whatever the set says). Nothing in the
kernel accepts on its own, and with no daemon bound to the queues everything stays closed.

Updates are sent over netlink (pyroute2) by the verdict loop itself, after it has served the
packets waiting in the queues: the client's first SYN, usually right behind its last knock, is
verdicted first (through the main queue), and the set is up to date before the loop reads the
next packets. So a granted client's close sequence, which ends on the first step's port, never
races the update. (`ipset restore` in a thread needed a fork per batch and lagged by tens of
milliseconds; a pipe to a long-lived `ipset restore` applies nothing until it exits.)
"""

from __future__ import annotations

import logging
import math
import socket
import subprocess
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import FirewallError
from . import SET_PREFIX, Plan, granted_set

MAX_ELEMENTS = 65536
MAX_PENDING = 4096  # updates waiting for the end of the loop's turn; more are dropped (and counted)
MAX_TIMEOUT = 86400  # seconds; ipset's limit is higher, a grant's (open_for) is at most this


def _family(address: str) -> int:
    return 6 if ":" in address else 4


def _address_family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


class SetLink(Protocol):
    """What GrantedSets needs from netlink: add (or refresh) and delete one address."""

    def add(self, name: str, address: str, timeout: int) -> None: ...

    def delete(self, name: str, address: str) -> None: ...

    def close(self) -> None: ...


class Pyroute2Link:
    """SetLink over pyroute2's IPSet (one netlink socket, used from the loop's thread only)."""

    def __init__(self) -> None:
        try:
            from pyroute2 import IPSet  # type: ignore[import-untyped]
        except ModuleNotFoundError:
            raise FirewallError("the granted-source sets need pyroute2: pip install 'nfknock[server]'") from None
        self._ipset: Any = IPSet()

    def add(self, name: str, address: str, timeout: int) -> None:
        self._ipset.add(name, address, family=_address_family(address), etype="ip", timeout=timeout, exclusive=False)

    def delete(self, name: str, address: str) -> None:
        try:
            self._ipset.delete(name, address, family=_address_family(address), etype="ip")
        except Exception as exc:
            if getattr(exc, "code", None) != NOT_ADDED:
                raise

    def close(self) -> None:
        self._ipset.close()


NOT_ADDED = 4103  # ipset's "it's not added": deleting what is already gone is fine


class GrantedSets:
    def __init__(
        self,
        queue_num: int,
        log: logging.Logger,
        runner: Callable = subprocess.run,
        link: Callable[[], SetLink] = Pyroute2Link,
    ):
        self.queue_num = queue_num
        self.log = log
        self.runner = runner
        self.dropped = 0  # updates lost because too many were waiting
        self.failed = 0  # updates the kernel refused
        self._make_link = link
        self._link: SetLink | None = None
        self._pending: dict[tuple[str, str], int | None] = {}  # (set, address) -> timeout (None: delete)

    def names(self) -> dict[int, str]:
        return {family: granted_set(self.queue_num, family) for family in (4, 6)}

    def create(self) -> None:
        """Create both sets (empty: the daemon's grants start empty too); before the rules that
        refer to them."""
        lines = []
        for family, name in self.names().items():
            kind = "inet" if family == 4 else "inet6"
            lines += [
                f"create {name} hash:ip family {kind} timeout {MAX_TIMEOUT} maxelem {MAX_ELEMENTS} -exist",
                f"flush {name}",
            ]
        error = _restore(self.runner, lines)
        if error:
            raise FirewallError(f"cannot create the granted-source sets: {error} (is the 'ipset' package installed?)")
        self.connect()

    def connect(self) -> None:
        """Open this process's netlink link to sets that exist (a worker's: the supervisor made them)."""
        self._link = self._make_link()

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None

    def add(self, address: str, seconds: float) -> None:
        self._put(
            granted_set(self.queue_num, _family(address)), address, min(MAX_TIMEOUT, max(1, math.ceil(seconds) + 1))
        )

    def remove(self, address: str) -> None:
        self._put(granted_set(self.queue_num, _family(address)), address, None)

    def _put(self, name: str, address: str, timeout: int | None) -> None:
        if len(self._pending) >= MAX_PENDING and (name, address) not in self._pending:
            self.dropped += 1
            return
        self._pending[(name, address)] = timeout

    def flush(self) -> None:
        """Send what changed since the last flush (the loop calls this after each turn)."""
        if not self._pending or self._link is None:
            return
        pending, self._pending = self._pending, {}
        for (name, address), timeout in pending.items():
            try:
                if timeout is None:
                    self._link.delete(name, address)
                else:
                    self._link.add(name, address, timeout)
            except Exception as exc:
                self.failed += 1
                if self.failed <= 10 or self.failed % 1000 == 0:
                    self.log.warning(
                        "could not update the set %s for %s (%s; %d so far); granted clients still get in, "
                        "through the main queue",
                        name,
                        address,
                        exc,
                        self.failed,
                    )


# Sizes of a first-step set. The kernel cannot grow a hash set from the packet path: an add to a
# full bucket fails. With 4 elements per bucket on average when the set is full, buckets (12 at
# most) practically never fill first, so a flood fills the set to its maximum, where `forceadd`
# takes over: a new source replaces an element of its bucket (an empty bucket, e^-4 = 2% of them,
# waits for expired elements to be collected).
FIRST_STEP_BUCKETS = 65536
FIRST_STEP_ELEMENTS = 4 * FIRST_STEP_BUCKETS  # ~9 MB per set when full


def create_first_step_sets(plan: Plan, runner: Callable = subprocess.run) -> None:
    """Create the sets the plan's first-step rules add to (first_steps.py), before the rules.

    `forceadd`: when a flood has filled a set, a new source takes the place of an entry in its
    hash bucket instead of being refused, so a flood cannot keep a client's first knock out.
    Existing sets are kept as they are (their elements expire by themselves)."""
    lines = []
    for family, specs in plan.items():
        kind = "inet" if family == 4 else "inet6"
        for name in dict.fromkeys(spec.add_set[0] for spec in specs if spec.add_set is not None):
            size = f"hashsize {FIRST_STEP_BUCKETS} maxelem {FIRST_STEP_ELEMENTS} forceadd"
            lines.append(f"create {name} hash:ip family {kind} timeout {MAX_TIMEOUT} {size} -exist")
    if lines:
        error = _restore(runner, lines)
        if error:
            raise FirewallError(f"cannot create the first-step sets: {error} (is the 'ipset' package installed?)")


def prune_first_step_sets(queue_num: int, plan: Plan, runner: Callable = subprocess.run) -> list[str]:
    """Destroy this daemon's first-step sets that the plan no longer refers to (after it is
    applied, so no rule uses them), so that reloads do not pile sets up. Returns their names;
    raises FirewallError naming what could not be destroyed."""
    wanted = {spec.add_set[0] for specs in plan.values() for spec in specs if spec.add_set is not None}
    prefix = f"{SET_PREFIX}q{queue_num}-"
    try:
        listed = runner(["ipset", "list", "-n"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise FirewallError(f"ipset: {exc}") from None
    stale = [
        name
        for name in listed.stdout.split()
        if name.startswith(prefix) and name[len(prefix) : len(prefix) + 3] in ("tcp", "udp") and name not in wanted
    ]
    if stale:
        error = _restore(runner, [f"destroy {name}" for name in stale])
        if error:
            raise FirewallError(f"first-step sets not removed: {error}")
    return stale


def _restore(runner: Callable, lines: list[str]) -> str | None:
    """Feed `ipset restore`; None on success, else what went wrong, in one line."""
    try:
        result = runner(["ipset", "restore"], input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"ipset: {exc}"
    if result.returncode != 0:
        said = "; ".join(part.strip() for part in result.stderr.splitlines() if part.strip())
        return f"ipset restore exited with status {result.returncode}: {said}"
    return None


def destroy(names: list[str], runner: Callable = subprocess.run) -> None:
    """Destroy these sets (after the rules that use them are gone); FirewallError if one cannot go."""
    if names:
        error = _restore(runner, [f"destroy {name}" for name in names])
        if error:
            raise FirewallError(f"sets not removed: {error}")


def destroy_all(runner: Callable = subprocess.run) -> list[str]:
    """Destroy every nfknock set (after the rules that use them are gone); returns their names.
    Raises FirewallError naming what could not be destroyed."""
    try:
        listed = runner(["ipset", "list", "-n"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return []  # no ipset tool: no sets of ours either
    except (OSError, subprocess.SubprocessError) as exc:
        raise FirewallError(f"ipset: {exc}") from None
    ours = [name for name in listed.stdout.split() if name.startswith(SET_PREFIX)]
    if ours:
        error = _restore(runner, [f"destroy {name}" for name in ours])
        if error:
            raise FirewallError(f"sets not removed: {error}")
    return ours
