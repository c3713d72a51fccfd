"""The kernel's list of sources that hold a grant: one ipset per family, fed by the daemon.

It is state, not rules: the scaffolding refers to the set by name and never changes when a
client is granted; elements carry their own timeout and leave the kernel by themselves. The set
only *routes*: a new connection from a source in it goes to the grant queue, where the daemon
still decides (a revoked or expired grant is refused at once, whatever the set says). Nothing in
the kernel accepts on its own, and with no daemon bound to the queues everything stays closed.

Updates run in a thread of their own (`ipset restore`, batched), so the verdict loop never waits
for them; a client whose element is not there yet reaches the daemon through the main queue.
"""

from __future__ import annotations

import logging
import math
import queue
import subprocess
import threading
import time
from collections.abc import Callable

from ..errors import FirewallError
from . import SET_PREFIX, granted_set

MAX_ELEMENTS = 65536
MAX_PENDING = 4096  # updates waiting for the thread; more are dropped (and counted)
MAX_TIMEOUT = 86400  # seconds; ipset's limit is higher, a grant's (open_for) is at most this
SETTLE = 0.02  # seconds between a grant and its set update (which batches whatever came meanwhile)


def _family(address: str) -> int:
    return 6 if ":" in address else 4


class GrantedSets:
    def __init__(self, queue_num: int, log: logging.Logger, runner: Callable = subprocess.run):
        self.queue_num = queue_num
        self.log = log
        self.runner = runner
        self.dropped = 0  # updates lost because the backlog was full
        self._pending: queue.Queue[str | None] = queue.Queue(MAX_PENDING)
        self._thread: threading.Thread | None = None

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

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="nfknock-ipset", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            try:
                self._pending.put_nowait(None)
            except queue.Full:
                pass
            self._thread.join(timeout=5)

    def add(self, address: str, seconds: float) -> None:
        timeout = min(MAX_TIMEOUT, max(1, math.ceil(seconds) + 1))
        self._put(f"add {granted_set(self.queue_num, _family(address))} {address} timeout {timeout} -exist")

    def remove(self, address: str) -> None:
        self._put(f"del {granted_set(self.queue_num, _family(address))} {address} -exist")

    def _put(self, line: str) -> None:
        try:
            self._pending.put_nowait(line)
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while True:
            line = self._pending.get()
            if line is None:
                return
            # Let the loop verdict the client's first SYN before we fork: it is served through
            # the main queue meanwhile, and the fork would compete with it for the CPU.
            time.sleep(SETTLE)
            lines = [line]
            while len(lines) < 256:  # whatever else is waiting goes in the same call
                try:
                    more = self._pending.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._pending.put(None)
                    break
                lines.append(more)
            error = _restore(self.runner, lines)
            if error:
                self.log.warning(
                    "could not update the granted-source set (%s); granted clients still get in, through "
                    "the main queue",
                    error,
                )


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
