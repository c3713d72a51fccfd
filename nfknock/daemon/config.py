"""What `nfknock run` was asked to do, and the few words every role says the same way."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from ..doors.engine import DEFAULT_MAX_SOURCES
from ..doors.first_steps import FirstSteps
from ..errors import NfknockError
from ..firewall.plan import PASS_MARK, Plan, plan
from ..firewall.shards import queues
from ..fleet.link import FleetConfig

DEFAULT_QUEUE_MAXLEN = 4096
STATS_EVERY = 5.0  # seconds between looks at the drop counters
CLOSED = "the rules stay in place: protected ports stay closed until nfknock runs again ('nfknock down' removes them)"


@dataclass(frozen=True)
class DaemonConfig:
    """What `nfknock run` was asked to do."""

    rules_path: Path
    queue_num: int = 0
    max_sources: int = DEFAULT_MAX_SOURCES
    queue_maxlen: int = DEFAULT_QUEUE_MAXLEN
    state_dir: Path | None = None
    control_socket: Path | None = None
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"  # --metrics-listen's address (an IP literal, metrics.parse_listen)
    pass_mark: int = PASS_MARK
    fleet: FleetConfig | None = None  # fleet mode (--cluster): shared grants and replay records
    workers: int = 1  # verdict loops, each in a process of its own (workers.py)
    shard: int = 0  # in a worker: which one it is

    def plan(self, doors, first_steps: FirstSteps) -> Plan:
        """The scaffolding these doors need, on this queue, with this pass mark, for these workers
        (`first_steps`: what the kernel records, as the daemon decided it)."""
        return plan(doors, self.queue_num, self.pass_mark, self.workers, first_steps=first_steps)

    @property
    def queues(self) -> tuple[int, int]:
        """(main queue, grant queue) this process binds."""
        return queues(self.queue_num, self.shard)

    @property
    def all_queues(self) -> range:
        """Every queue the daemon's processes bind, workers included."""
        return range(self.queue_num, self.queue_num + 2 * self.workers)


class DaemonFailed(NfknockError):
    """The loop ended on an unexpected error; the log has the traceback, the rules stay."""


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op when not started by systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), path)
    except OSError:
        pass
