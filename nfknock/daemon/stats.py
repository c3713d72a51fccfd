"""Counters that are not events: kernel queue drops, unparsable packets, evictions.

The daemon samples them every few seconds and logs one line per counter that grew, so a flood
is visible in the log without a line per packet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

QUEUE_PROC = Path("/proc/net/netfilter/nfnetlink_queue")


@dataclass(frozen=True)
class QueueCounters:
    """One line of the kernel's queue table (net/netfilter/nfnetlink_queue.c, seq_show)."""

    queue_num: int
    peer_portid: int  # the netlink port of the process bound to the queue
    queue_total: int  # packets waiting for a verdict now
    dropped: int  # queue_dropped: more than --queue-maxlen packets waiting
    user_dropped: int  # netlink socket buffer overrun
    id_sequence: int  # ids handed out: packets that fitted in the queue


def parse_queue_table(text: str) -> dict[int, QueueCounters]:
    """The kernel's queue table by queue number; lines that are not a queue's are skipped.

    Each line: queue_num peer_portid queue_total copy_mode copy_range queue_dropped
    user_dropped id_sequence 1.
    """
    queues = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 8 and all(field.isdigit() for field in fields[:8]):
            num, portid, total, _, _, dropped, user_dropped, id_sequence = map(int, fields[:8])
            queues[num] = QueueCounters(num, portid, total, dropped, user_dropped, id_sequence)
    return queues


def read_queue_counters(queue_num: int, path: Path = QUEUE_PROC) -> QueueCounters | None:
    """One queue's line of the table in `path` (this namespace's by default; from a thread that
    entered another namespace, read /proc/thread-self/net/...), or None if it is not listed or
    the table cannot be read."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return parse_queue_table(text).get(queue_num)


@dataclass(frozen=True)
class QueueDrops:
    queue_full: int  # the kernel's queue_dropped: more than --queue-maxlen packets waiting
    socket_full: int  # user_dropped: netlink socket buffer overrun

    @property
    def total(self) -> int:
        return self.queue_full + self.socket_full


def read_queue_drops(queue_num: int, path: Path = QUEUE_PROC) -> QueueDrops | None:
    """This namespace's drop counters for one queue, or None if the queue is not listed."""
    counters = read_queue_counters(queue_num, path)
    return None if counters is None else QueueDrops(counters.dropped, counters.user_dropped)


class Reporter:
    """Remembers the last values seen and says, in one line each, what grew since."""

    def __init__(self):
        # The kernel creates the queue's counters at zero when the daemon binds it.
        self._drops = QueueDrops(0, 0)
        self._unparsable: dict[str, int] = {}
        self._evicted = 0
        self._errors = 0

    def report(
        self,
        queue_num: int,
        drops: QueueDrops | None,
        unparsable: dict[str, int],
        evicted: int,
        errors: int,
        max_sources: int,
    ) -> list[str]:
        lines = []
        if drops is not None:
            if drops.total > self._drops.total:
                lines.append(
                    f"queue {queue_num}: the kernel dropped {drops.total - self._drops.total} packets since the "
                    f"last report (queue full: {drops.queue_full - self._drops.queue_full}, socket buffer: "
                    f"{drops.socket_full - self._drops.socket_full}); dropped knocks must be sent again"
                )
            self._drops = drops
        grown = {
            r: n - self._unparsable.get(r, 0) for r, n in sorted(unparsable.items()) if n > self._unparsable.get(r, 0)
        }
        if grown:
            lines.append(
                "unparsable packets dropped since the last report: "
                + ", ".join(f"{reason}: {n}" for reason, n in grown.items())
            )
            self._unparsable = dict(unparsable)
        if evicted > self._evicted:
            lines.append(
                f"state full: {evicted - self._evicted} oldest entries evicted since the last report "
                f"(--max-sources {max_sources})"
            )
            self._evicted = evicted
        if errors > self._errors:
            lines.append(f"{errors - self._errors} packets dropped after internal errors since the last report")
            self._errors = errors
        return lines
