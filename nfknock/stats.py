"""Counters that are not events: kernel queue drops, unparsable packets, evictions.

The daemon samples them every few seconds and logs one line per counter that grew, so a flood
is visible in the log without a line per packet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

QUEUE_PROC = Path("/proc/net/netfilter/nfnetlink_queue")


@dataclass(frozen=True)
class QueueDrops:
    queue_full: int  # the kernel's queue_dropped: more than --queue-maxlen packets waiting
    socket_full: int  # user_dropped: netlink socket buffer overrun

    @property
    def total(self) -> int:
        return self.queue_full + self.socket_full


def read_queue_drops(queue_num: int, path: Path = QUEUE_PROC) -> QueueDrops | None:
    """This namespace's drop counters for one queue, or None if the queue is not listed.

    Each line: queue_num peer_portid queue_total copy_mode copy_range queue_dropped
    user_dropped id_sequence 1.
    """
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 7 and fields[0].isdigit() and int(fields[0]) == queue_num:
            return QueueDrops(int(fields[5]), int(fields[6]))
    return None


class Reporter:
    """Remembers the last values seen and says, in one line each, what grew since."""

    def __init__(self):
        # The kernel creates the queue's counters at zero when the daemon binds it.
        self._drops = QueueDrops(0, 0)
        self._unparsable: dict[str, int] = {}
        self._evicted = 0
        self._errors = 0

    def report(self, queue_num: int, drops: QueueDrops | None, unparsable: dict[str, int],
               evicted: int, errors: int, max_sources: int) -> list[str]:
        lines = []
        if drops is not None:
            if drops.total > self._drops.total:
                lines.append(
                    f"queue {queue_num}: the kernel dropped {drops.total - self._drops.total} packets since the "
                    f"last report (queue full: {drops.queue_full - self._drops.queue_full}, socket buffer: "
                    f"{drops.socket_full - self._drops.socket_full}); dropped knocks must be sent again"
                )
            self._drops = drops
        grown = {r: n - self._unparsable.get(r, 0) for r, n in sorted(unparsable.items())
                 if n > self._unparsable.get(r, 0)}
        if grown:
            lines.append("unparsable packets dropped since the last report: "
                         + ", ".join(f"{reason}: {n}" for reason, n in grown.items()))
            self._unparsable = dict(unparsable)
        if evicted > self._evicted:
            lines.append(f"state full: {evicted - self._evicted} oldest entries evicted since the last report "
                         f"(--max-sources {max_sources})")
            self._evicted = evicted
        if errors > self._errors:
            lines.append(f"{errors - self._errors} packets dropped after internal errors since the last report")
            self._errors = errors
        return lines
