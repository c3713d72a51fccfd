"""Workers that live but do not answer (SIGSTOP, a debugger, a loop that never returns).

Such a worker keeps its queues bound: the kernel holds what they get and drops what does not
fit, so its share of the sources can neither knock nor connect. That is closed, the safe side,
but it must not be silent: the supervisor pings every worker every few seconds between its own
turns, and one that leaves a ping unanswered for STUCK_AFTER seconds is named in the log (pid,
queues, the sources it owns, what its process state says, what its queues hold and dropped), in
`nfknock status` and in the metrics, again every STUCK_REPEAT seconds while it lasts, and once
more when it answers again. Nothing else is done to it (workers.py says why)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..firewall.shards import byte_ranges
from .stats import read_queue_counters

PING_EVERY = 2.0  # seconds between a worker's answer and the supervisor's next ping
STUCK_AFTER = 5.0  # seconds a ping may wait for its answer (a worker answers within a turn, <= 1 s)
STUCK_REPEAT = 60.0  # seconds between the warnings about a worker that still does not answer


class _Worker:
    def __init__(self, shard: int, pid: int, conn: Connection, queues: tuple[int, int]):
        self.shard, self.pid, self.conn, self.queues = shard, pid, conn, queues
        self.alive = True  # not yet collected (waitpid)
        self.closed = False  # its end of the channel is gone: it has ended or is ending
        self.next_ping = 0.0  # (the supervisor's clock) when to ping it next
        self.pinged: float | None = None  # when the ping it has not answered yet went out
        self.stuck: float | None = None  # when the log said it does not answer (None: it answers)
        self.said: float = 0.0  # when the log last said so

    def silent_for(self, now: float) -> float:
        return 0.0 if self.pinged is None else now - self.pinged


class Watchdog:
    def __init__(self, log: logging.Logger, count: int, clock: Callable[[], float]):
        self.log, self.count, self.clock = log, count, clock
        self.restarted_after: float | None = None  # WatchdogSec, when systemd's watchdog is on (heartbeat.py)

    def answering(self, workers: list[_Worker], now: float) -> bool:
        """Whether every worker lives and has answered its last ping within STUCK_AFTER: the
        supervisor pings systemd's watchdog only then (heartbeat.py)."""
        return all(w.alive and not w.closed and w.silent_for(now) < STUCK_AFTER for w in workers)

    def stuck_row(self, worker: _Worker, now: float) -> dict[str, Any]:
        lo, hi = byte_ranges(self.count)[worker.shard]
        return {
            "worker": worker.shard,
            "pid": worker.pid,
            "queues": list(worker.queues),
            "silent_for": round(worker.silent_for(now), 1),
            "state": process_state(worker.pid),
            "sources": f"{lo}-{hi}",
        }

    def watch(self, workers: list[_Worker], now: float) -> None:
        """Ping each worker whose last answer is PING_EVERY old; name one that leaves a ping
        unanswered for STUCK_AFTER seconds (the supervisor's loop calls this each turn)."""
        for worker in workers:
            if worker.closed or not worker.alive:
                continue
            if worker.pinged is None:
                if now >= worker.next_ping:
                    try:
                        worker.conn.send(("ping",))
                    except OSError:
                        continue  # its end is gone: pump() and check() say so
                    worker.pinged = now
                continue
            silent = now - worker.pinged
            if worker.stuck is None and silent >= STUCK_AFTER:
                worker.stuck = worker.said = now
                self.log.warning("%s", self._stuck_line(worker, silent, first=True))
            elif worker.stuck is not None and now - worker.said >= STUCK_REPEAT:
                worker.said = now
                self.log.warning("%s", self._stuck_line(worker, silent, first=False))

    def heard(self, worker: _Worker) -> None:
        now = self.clock()
        if worker.stuck is not None:
            self.log.warning(
                "%s answers again after %.0fs: its sources are served again (%s)",
                self.named(worker),
                worker.silent_for(now),
                self._queue_load(worker, while_stuck=True),
            )
        worker.pinged = worker.stuck = None
        worker.next_ping = now + PING_EVERY

    def named(self, worker: _Worker) -> str:
        return f"worker {worker.shard} (pid {worker.pid}, queues {worker.queues[0]}-{worker.queues[1]})"

    def _stuck_line(self, worker: _Worker, silent: float, first: bool) -> str:
        lo, hi = byte_ranges(self.count)[worker.shard]
        what = STATES.get(process_state(worker.pid), STATES["running"])
        text = (
            f"{self.named(worker)} has not answered for {silent:.0f}s: {what}. Sources whose address ends in "
            f"byte {lo}-{hi} cannot knock or connect until it answers (closed, not open: {self._queue_load(worker)})"
        )
        if first and self.restarted_after is not None:
            text += (
                f"; systemd's watchdog (WatchdogSec={self.restarted_after:g}s) restarts nfknock unless it "
                f"answers before: 'kill -CONT {worker.pid}' resumes it"
            )
        elif first:
            text += (
                "; nfknock neither kills nor restarts it (a stopped worker may be a debugger session): "
                f"'kill -CONT {worker.pid}' resumes it, stopping nfknock ends it"
            )
        return text

    def _queue_load(self, worker: _Worker, while_stuck: bool = False) -> str:
        """What the kernel holds and dropped in the worker's queues, as the log says it."""
        counters = [read_queue_counters(number) for number in worker.queues]
        waiting = sum(c.queue_total for c in counters if c is not None)
        dropped = sum(c.dropped + c.user_dropped for c in counters if c is not None)
        if while_stuck:
            return f"its queues dropped {dropped} packets since it started; a dropped knock must be sent again"
        return f"the kernel holds {waiting} packets in its queues and drops what does not fit, {dropped} so far"


# What a worker's process state (process_state) says about a worker that does not answer.
STATES = {
    "stopped": "it is stopped (SIGSTOP or SIGTSTP)",
    "traced": "it is stopped by a debugger (tracing stop)",
    "waiting": "it waits in the kernel (uninterruptible sleep)",
    "running": "it runs but does not get back to its loop",
}


def process_state(pid: int) -> str:
    """`stopped`, `traced`, `waiting` or `running`, from the state letter in /proc/PID/stat."""
    try:
        letter = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "running"
    return {"T": "stopped", "t": "traced", "D": "waiting"}.get(letter, "running")
