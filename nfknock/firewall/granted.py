"""The kernel's list of sources that hold a grant: one ipset per family, fed by the daemon.

It is state, not rules: the scaffolding refers to the set by name and never changes when a
client is granted; elements carry their own timeout and leave the kernel by themselves. The set
only *routes*: a new connection from a source in it goes to the grant queue, and its knocks on
ports whose first step the kernel records go to the daemon (first_steps.py); the daemon still
decides (a revoked or expired grant is refused at once, whatever the set says). Nothing in the
kernel accepts on its own, and with no daemon bound to the queues everything stays closed.

Updates are sent over netlink (pyroute2) by the verdict loop itself. A grant is routed first
and decided after (`add_now`): the source goes into the set the moment the engine grants it, or
an SPA packet has passed its HMAC and waits for its durable replay record or claim, before any
disk or network work. The client's first SYN, right behind its last knock or SPA packet, then
reaches the grant queue, which no flood reaches, and waits there while the daemon writes; it is
judged once the grant has taken effect (or dropped if the record could not be made: the element
is removed again, and routed nothing open meanwhile). Through the main queue it would meet the
kernel's limit for strangers, which a SYN flood at the protected port keeps empty. Removals
(close, revoke, expiry) wait for the end of the loop's turn (`remove`, `flush`), after the
packets that were waiting: a close sequence ends on a port that granted sources knock through
the daemon, never racing the update. One address's updates are sent in the order they were
made: a removal is never sent after a later add. (`ipset restore` in a thread needed a fork
per batch and lagged by tens of milliseconds; a pipe to a long-lived `ipset restore` applies
nothing until it exits.)
"""

from __future__ import annotations

import logging
import math
import socket
import subprocess
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import FirewallError
from .plan import SET_PREFIX, Plan, SetName, granted_set

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
        self._sent: dict[tuple[str, str], int] = {}  # written at once this turn (add_now): (set, address) -> timeout
        self._names = {family: granted_set(queue_num, family) for family in (4, 6)}  # named once: per grant

    def names(self) -> dict[int, str]:
        return dict(self._names)

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

    def ensure(self) -> bool:
        """Create the sets again if another program destroyed them (after a `flush ruleset` left
        them unreferenced), keeping what they hold when they are there. True if one was missing:
        the caller then refills it from the grants it holds (daemon/guard.py)."""
        try:
            listed = self.runner(["ipset", "list", "-n"], capture_output=True, text=True, timeout=30)
            present = set(listed.stdout.split())
        except (OSError, subprocess.SubprocessError):
            present = set()
        missing = [(family, name) for family, name in self.names().items() if name not in present]
        lines = [
            f"create {name} hash:ip family {'inet' if family == 4 else 'inet6'} timeout {MAX_TIMEOUT} "
            f"maxelem {MAX_ELEMENTS} -exist"
            for family, name in missing
        ]
        error = _restore(self.runner, lines) if lines else None
        if error:
            raise FirewallError(f"cannot create the granted-source sets: {error}")
        return bool(missing)

    def connect(self) -> None:
        """Open this process's netlink link to sets that exist (a worker's: the supervisor made them)."""
        self._link = self._make_link()

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None

    def add(self, address: str, seconds: float) -> None:
        """Put `address` in the set for `seconds` at the end of the loop's turn."""
        self._put(self._names[_family(address)], address, _timeout(seconds))

    def add_now(self, address: str, seconds: float) -> None:
        """Put `address` in the set for `seconds` at once: one netlink message, before the caller
        goes on to disk or network work, so that the client's next SYN is routed to the grant
        queue. What was waiting for this address is superseded (it was said earlier)."""
        key, timeout = (self._names[_family(address)], address), _timeout(seconds)
        if self._link is None or self._sent.get(key) == timeout:
            self._put(*key, timeout)
            return
        self._pending.pop(key, None)
        if self._send(*key, timeout):
            self._sent[key] = timeout

    def remove(self, address: str) -> None:
        self._put(self._names[_family(address)], address, None)

    def _put(self, name: str, address: str, timeout: int | None) -> None:
        if timeout is not None and self._sent.get((name, address)) == timeout:
            return  # add_now sent exactly this in this turn
        self._sent.pop((name, address), None)
        if len(self._pending) >= MAX_PENDING and (name, address) not in self._pending:
            self.dropped += 1
            return
        self._pending[(name, address)] = timeout

    def flush(self) -> None:
        """Send what changed since the last flush (the loop calls this after each turn)."""
        self._sent.clear()
        if not self._pending or self._link is None:
            return
        pending, self._pending = self._pending, {}
        for (name, address), timeout in pending.items():
            self._send(name, address, timeout)

    def _send(self, name: str, address: str, timeout: int | None) -> bool:
        """One update over netlink; a failure is logged and counted, never raised."""
        assert self._link is not None
        try:
            if timeout is None:
                self._link.delete(name, address)
            else:
                self._link.add(name, address, timeout)
            return True
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
            return False


def _timeout(seconds: float) -> int:
    """An element's timeout for a grant with `seconds` left: whole seconds, rounded up, with one to
    spare (the set only routes: the daemon ends the grant on time)."""
    return min(MAX_TIMEOUT, max(1, math.ceil(seconds) + 1))


# Sizes of a first-step set, from how the kernel's hash sets behave (ip_set_hash_gen.h, 6.x; the
# evidence is bench/run.py's first_step_set). The table is cut into regions of 1024 buckets, and
# `maxelem` is checked per region: once a region holds maxelem / regions elements, *every* add
# there first walks the region's 1024 buckets to collect expired elements (and, with `forceadd`,
# then overwrites slot 0 of the newcomer's bucket, the slot the previous newcomer took). A
# flood of spoofed first knocks keeps a set in that state: each one cost 3.2x the machine's CPU
# of an unfilled set, 57% of it in that walk. So the set is sized for the flood it has to hold
# (every source stays in it for seq_timeout; at ~120k first knocks a second, the rate this 2-core
# machine sends, a million sources are all there at once with the default 15 s), with maxelem
# far enough above that no region reaches its share: then an add only hashes and scans its own
# bucket (12 elements at most), whether the set holds 100 or a million sources. Beyond the cap
# (more distinct sources than it within seq_timeout) `forceadd` takes over as before.
#
# Memory: the bucket table is allocated at creation, 8 bytes a bucket (2 MiB a set, which
# `ipset list -t` leaves out of "Size in memory"); elements only as sources arrive, 36 bytes each
# for IPv4 and 45 for IPv6 with their buckets (measured with a million), so at the cap about 47
# and 59 MiB a set, back to the table within seq_timeout + 26 s after a flood (FIRST_STEP_SWEEP).
FIRST_STEP_BUCKETS = 262144  # 2**18: a million sources are ~4 a bucket, a full one (12) is rare
FIRST_STEP_ELEMENTS = 5 * FIRST_STEP_BUCKETS  # 1,310,720: each region's share, 5120, is never
# reached with a million sources in the set (a region of 1024 buckets then holds 3906 +- 63)
FIRST_STEP_BUCKETSIZE = 12  # the kernel's default and maximum; each element at most 12 compares
# The set's own timeout is not an element's (the rules give each element its door's seq_timeout);
# it only paces the kernel's garbage collector: one region every max(timeout / 3 s, 1 s) / regions,
# 0.1 s at least, so 3 sweeps the whole set in 25.6 s. With 86400, a set stayed full of expired
# elements for hours after a flood, and each add there walked its region as if it were full.
FIRST_STEP_SWEEP = 3
FIRST_STEP_SIZE = (
    f"hashsize {FIRST_STEP_BUCKETS} maxelem {FIRST_STEP_ELEMENTS} timeout {FIRST_STEP_SWEEP} "
    f"bucketsize {FIRST_STEP_BUCKETSIZE}"
)


def create_first_step_sets(plan: Plan, runner: Callable = subprocess.run) -> None:
    """Create the sets the plan's first-step rules add to (first_steps.py), before the rules.

    `forceadd`: when a flood of more sources than FIRST_STEP_ELEMENTS has filled a set, a new
    source takes the place of an entry in its hash bucket instead of being refused, so a flood
    cannot keep a client's first knock out. An existing set of this size is kept as it is (its
    elements expire by themselves); one of another size (an earlier version's) is replaced in
    place by `ipset swap`, so the rules that refer to it never lose it, and its first steps are
    forgotten (a client in the middle of a knock knocks again)."""
    wanted = {}
    for family, specs in plan.items():
        for name in dict.fromkeys(spec.add_set[0] for spec in specs if spec.add_set is not None):
            wanted[name] = "inet" if family == 4 else "inet6"
    if not wanted:
        return
    existing = _headers(runner)
    lines = []
    for name, kind in wanted.items():
        create = f"hash:ip family {kind} {FIRST_STEP_SIZE} forceadd"
        if name not in existing or _same_size(existing[name], kind):
            lines.append(f"create {name} {create} -exist")
            continue
        spare = f"{name}-new"  # pruned later like any set of ours the plan does not use
        if spare in existing:
            lines.append(f"destroy {spare}")
        lines += [f"create {spare} {create}", f"swap {name} {spare}", f"destroy {spare}"]
    error = _restore(runner, lines)
    if error:
        raise FirewallError(f"cannot create the first-step sets: {error} (is the 'ipset' package installed?)")


def _headers(runner: Callable) -> dict[str, dict[str, str]]:
    """Every set's creation parameters, by name ({} without ipset: creating then says why)."""
    try:
        listed = runner(["ipset", "list", "-t"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    headers: dict[str, dict[str, str]] = {}
    name = None
    for line in listed.stdout.splitlines():
        key, _, value = line.partition(": ")
        if key == "Name":
            name = value.strip()
        elif key == "Header" and name is not None:
            words = value.split()
            headers[name] = dict(zip(words[::2], words[1::2], strict=False))
    return headers


def _same_size(header: dict[str, str], kind: str) -> bool:
    """Whether an existing set was created as create_first_step_sets creates it now (`forceadd`
    is not listed by ipset 7.x, so it is not compared)."""
    words = f"family {kind} {FIRST_STEP_SIZE}".split()
    return all(header.get(key) == value for key, value in zip(words[::2], words[1::2], strict=True))


def prune_first_step_sets(queue_num: int, plan: Plan, runner: Callable = subprocess.run) -> list[str]:
    """Destroy this daemon's first-step sets that the plan no longer refers to (after it is
    applied, so no rule uses them), so that reloads do not pile sets up. Returns their names;
    raises FirewallError naming what could not be destroyed."""
    wanted = {spec.add_set[0] for specs in plan.values() for spec in specs if spec.add_set is not None}
    try:
        listed = runner(["ipset", "list", "-n"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise FirewallError(f"ipset: {exc}") from None
    stale = [name for name in listed.stdout.split() if _first_step_set_of(name, queue_num) and name not in wanted]
    if stale:
        error = _restore(runner, [f"destroy {name}" for name in stale])
        if error:
            raise FirewallError(f"first-step sets not removed: {error}")
    return stale


def _first_step_set_of(name: str, queue_num: int) -> bool:
    """Whether `name` is a first-step set of the daemon on `queue_num` (plan.SetName), or the
    spare a swap of one made (create_first_step_sets)."""
    fields = SetName.parse(name.removesuffix("-new"))
    return fields is not None and fields.kind == "first-step" and fields.queue_num == queue_num


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
