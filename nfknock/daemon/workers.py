"""Worker processes (`nfknock run --workers N`): one verdict loop per core, each bound to its own
pair of queues.

The scaffolding shards every queued packet on the last byte of its source address (shards.py),
so all packets of one source reach one worker whatever their protocol: the attempts, lockouts and
grants a source makes for itself live in that worker alone, and a worker decides its packets
without asking anyone. What crosses workers is rare and never waits for another process:
- replay records (SPA packets, rotating sequences): a packet captured from one client and sent
  again from another address reaches another worker. They are claimed in a shared directory,
  within the packet that needs them (claims.py);
- control requests and metrics: the supervisor asks every worker, between their batches, and
  merges the answers; an operator's grant goes to the worker owning the address only.
(Every grant the engine makes is for the packet's own source, so it is made where that source's
connections arrive; a fleet's grants reach every worker, each being a fleet member.)
The supervisor (the daemon's main process) owns the firewall, the control socket, the metrics
exporter and reloads; it never sees a packet. Fail closed: a worker that dies leaves its queues
unbound, so the kernel drops its share of the packets, and the supervisor then stops the others
and exits non-zero with the rules in place; a supervisor that dies takes its workers with it
(PR_SET_PDEATHSIG, and end of file on their channel).

A worker that lives but does not answer (SIGSTOP, a debugger, a loop that never returns) keeps
its queues bound: the kernel holds what they get and drops what does not fit, so its share of
the sources can neither knock nor connect. That is closed, the safe side, but it must not be
silent: the supervisor pings every worker every few seconds between its own turns, and one
that leaves a ping unanswered for STUCK_AFTER seconds is named in the log (pid, queues, the
sources it owns, what its process state says, what its queues hold and dropped), in `nfknock
status` and in the metrics, again every STUCK_REPEAT seconds while it lasts, and once more when
it answers again. Nothing else is done to it: a stopped process may be an administrator's
debugger session, which a kill or a restart would destroy, and a restarted worker would not
make the shard any safer (it is closed already); SIGCONT resumes it, a stop of the daemon ends
it (SIGKILL after STOP_WAIT).
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import pickle
import signal
import socket
import tempfile
import time
from collections import Counter
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..errors import NfknockError, QueueError
from ..firewall.shards import byte_ranges, queues, shard_of
from . import metrics
from .claims import SUBDIR, ReplayClaims, open_claims
from .stats import read_queue_counters

START_WAIT = 30.0  # seconds for every worker to bind its queues
ANSWER_WAIT = 3.0  # seconds for every worker to answer a request (within control's 5 s deadline)
RELOAD_WAIT = 120.0  # seconds for every worker to compile new rules (10k doors take about one)
STOP_WAIT = 10.0  # seconds for workers to stop before they are killed
PING_EVERY = 2.0  # seconds between a worker's answer and the supervisor's next ping
STUCK_AFTER = 5.0  # seconds a ping may wait for its answer (a worker answers within a turn, <= 1 s)
STUCK_REPEAT = 60.0  # seconds between the warnings about a worker that still does not answer
PR_SET_PDEATHSIG = 1


class WorkerDied(NfknockError):
    """A worker process ended on its own: its share of the sources is closed (the kernel drops what
    its queues would get); the daemon stops, the rules stay."""


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


class WorkerPool:
    """The supervisor's side: start the workers, route what crosses them, stop them."""

    def __init__(self, daemon: Any):
        self.daemon = daemon
        self.log: logging.Logger = daemon.log
        self.count: int = daemon.config.workers
        self.queue_num: int = daemon.config.queue_num
        self.clock = daemon.clock
        self._snapshots: dict[int, metrics.Snapshot] = {}  # each worker's last, for one that is stuck
        self.workers: list[_Worker] = []
        self._private: Path | None = None
        self._handoff: Path | None = None  # 0700: reloaded rules on their way to the workers
        self.failure = ""  # why the pool cannot go on (a worker ended)
        self._replies: dict[int, dict[int, Any]] = {}
        self._ids = itertools.count(1)
        state_dir = daemon.config.state_dir
        try:
            self._handoff = Path(tempfile.mkdtemp(prefix="nfknock-rules-"))
            if state_dir is None:
                self._private = Path(tempfile.mkdtemp(prefix=f"nfknock-q{daemon.config.queue_num}-"))
        except OSError as exc:
            raise NfknockError(f"--workers: cannot make a private directory: {exc.strerror or exc}") from None
        try:
            self.claims = open_claims(Path(state_dir or self._private or ".") / SUBDIR)
        except NfknockError:
            self._remove_private()
            raise

    # -- start and stop --------------------------------------------------------------------

    def start(self, seed: dict[str, float] | None = None) -> None:
        """Fork the workers and wait until each has bound its queues (before any rule sends packets
        there). `seed`: replay records from a single-process run's cache, claimed for all."""
        wall = time.time()
        for record, expires in (seed or {}).items():
            if expires > wall:
                self.claims.claim(record, expires, wall, durable=False)  # replay.json keeps them
        for shard in range(self.count):
            try:
                ours, theirs = socket.socketpair()
                pid = os.fork()
            except OSError as exc:
                self.stop()
                raise QueueError(f"cannot start worker {shard}: {exc}") from None
            if pid == 0:  # the worker: never returns
                ours.close()
                for worker in self.workers:
                    worker.conn.close()
                _worker_main(self.daemon, shard, Connection(theirs.detach()), self.claims)
            theirs.close()
            self.workers.append(_Worker(shard, pid, Connection(ours.detach()), queues(self.queue_num, shard)))
        deadline = time.monotonic() + START_WAIT
        waiting = {worker.shard for worker in self.workers}
        while waiting:
            for worker in self.workers:
                if worker.shard in waiting and worker.conn.poll(max(0.0, min(0.2, deadline - time.monotonic()))):
                    message = self._recv(worker)
                    if message is None or message[0] == "failed":
                        self.stop()
                        raise QueueError(message[1] if message else f"worker {worker.shard} ended while starting")
                    if message[0] == "bound":
                        waiting.discard(worker.shard)
            if waiting and time.monotonic() > deadline:
                self.stop()
                raise QueueError(f"worker(s) {sorted(waiting)} did not bind their queues within {START_WAIT:g}s")

    def stop(self) -> None:
        for worker in self.workers:
            if worker.alive:
                try:
                    worker.conn.send(("stop",))
                except OSError:
                    pass
        deadline = time.monotonic() + STOP_WAIT
        for worker in self.workers:
            while worker.alive and time.monotonic() < deadline:
                if os.waitpid(worker.pid, os.WNOHANG)[0]:
                    worker.alive = False
                else:
                    time.sleep(0.02)
            if worker.alive:
                self.log.warning("worker %d (pid %d) did not stop; killed", worker.shard, worker.pid)
                os.kill(worker.pid, signal.SIGKILL)
                os.waitpid(worker.pid, 0)
                worker.alive = False
            worker.conn.close()
        self._remove_private()

    def _remove_private(self) -> None:
        for private in (self._private, self._handoff):
            if private is not None and private.exists():
                for path in sorted(private.rglob("*"), reverse=True):
                    path.rmdir() if path.is_dir() else path.unlink()
                private.rmdir()
        self._private = self._handoff = None

    def check(self) -> None:
        """Raise WorkerDied if a worker has ended (the loop calls this each turn); once one has,
        always, whoever catches it first."""
        for worker in self.workers:
            if worker.alive and os.waitpid(worker.pid, os.WNOHANG)[0]:
                worker.alive = False
                self.failure = self.failure or _ended(worker)
        if self.failure:
            raise WorkerDied(self.failure)

    @property
    def pids(self) -> list[int]:
        return [worker.pid for worker in self.workers]

    def fds(self) -> list[int]:
        return [worker.conn.fileno() for worker in self.workers if not worker.closed]

    # -- messages --------------------------------------------------------------------------

    def _recv(self, worker: _Worker) -> tuple | None:
        try:
            return worker.conn.recv()
        except (EOFError, OSError):
            return None

    def pump(self, timeout: float = 0.0) -> None:
        """Handle whatever the workers sent (the loop calls this when one of their fds is readable)."""
        for worker in self.workers:
            while not worker.closed and worker.conn.poll(timeout):
                message = self._recv(worker)
                if message is None:
                    worker.closed = True
                    self.failure = self.failure or _ended(worker)
                    break
                self._handle(worker, message)

    def _handle(self, worker: _Worker, message: tuple) -> None:
        self._heard(worker)  # any message: it reached its loop
        if message[0] == "reply" and message[1] in self._replies:  # a late one is not waited for
            self._replies[message[1]][worker.shard] = message[2]
        elif message[0] == "failed":  # its last word: why it stops (its log has the traceback)
            self.failure = self.failure or f"worker {worker.shard} (pid {worker.pid}): {message[1]}"

    def _ask(self, message: tuple, workers: list[_Worker] | None = None, wait: float = ANSWER_WAIT) -> list[Any]:
        """Send `message` (with a request id) to workers and wait for all their replies."""
        workers = workers or self.workers
        replies = self._gather(message, workers, wait)
        missing = [worker.shard for worker in workers if worker.shard not in replies]
        if missing:
            stuck = [self._named(worker) for worker in workers if worker.shard in missing and worker.stuck is not None]
            hint = f" ({', '.join(stuck)} does not answer pings either: see 'nfknock status')" if stuck else ""
            raise NfknockError(f"worker(s) {missing} did not answer within {wait:g}s{hint}")
        return [replies[worker.shard] for worker in workers]

    def _gather(self, message: tuple, workers: list[_Worker], wait: float) -> dict[int, Any]:
        """Send `message` (with a request id) to `workers`; their replies by shard, as many as
        came within `wait` seconds."""
        if self.failure:
            raise WorkerDied(self.failure)
        rid = next(self._ids)
        self._replies[rid] = {}
        deadline = time.monotonic() + wait
        for worker in workers:
            try:
                # The deadline travels along: a worker that gets to the request later does not
                # carry it out (a grant the operator was told failed must not happen).
                worker.conn.send((message[0], rid, deadline, *message[1:]))
            except OSError as exc:
                self.failure = self.failure or f"worker {worker.shard} (pid {worker.pid}) cannot be reached: {exc}"
                raise WorkerDied(self.failure) from None
        while len(self._replies[rid]) < len(workers) and time.monotonic() < deadline and not self.failure:
            self.pump(0.01)
        replies = self._replies.pop(rid)
        if self.failure:
            raise WorkerDied(self.failure)
        return replies

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """A control request for all workers as one daemon."""
        if request["cmd"] == "grant":
            owner = self.workers[shard_of(request["address"], self.count)]
            return self._ask(("control", request), [owner])[0]
        if request["cmd"] == "status":
            return self._status(request)
        answers = self._ask(("control", request))
        for answer in answers:
            if "error" in answer:
                return answer
        merged = dict(answers[0])
        merged["revoked"] = sorted({door for answer in answers for door in answer["revoked"]})
        if "addresses" in merged:
            merged["addresses"] = sorted({src for answer in answers for src in answer["addresses"]})
        return merged

    def _status(self, request: dict[str, Any]) -> dict[str, Any]:
        """Status from the workers that answer (one that does not is not waited for again), and
        the ones that do not, named: their shard is closed and the operator must know it."""
        answering = [worker for worker in self.workers if worker.stuck is None]
        replies = self._gather(("control", request), answering, ANSWER_WAIT) if answering else {}
        silent = [worker for worker in self.workers if worker.shard not in replies]
        if not replies:
            return {"error": "no worker answers: " + "; ".join(self._named(worker) for worker in silent)}
        merged = merge_status([replies[shard] for shard in sorted(replies)])
        merged["workers"] = self.count
        merged["scaffolding"] = None if self.daemon.guard is None else self.daemon.guard.status()  # guard.py
        merged["stuck_workers"] = [self.stuck_row(worker, self.clock()) for worker in silent]
        return merged

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

    def snapshot(self) -> metrics.Snapshot:
        """The workers' counters as one daemon's; a worker that does not answer counts with its
        last snapshot (counters never go back) and shows as down."""
        answering = [worker for worker in self.workers if worker.stuck is None]
        replies = self._gather(("snapshot",), answering, ANSWER_WAIT) if answering else {}
        self._snapshots.update(replies)
        known = [self._snapshots[worker.shard] for worker in self.workers if worker.shard in self._snapshots]
        if not known:
            raise NfknockError("no worker answered for the metrics")
        up = tuple((worker.shard, worker.shard in replies) for worker in self.workers)
        return replace(merge_snapshots(known), workers_up=up, scaffolding_restored=metrics.restored(self.daemon))

    # -- workers that live but do not answer ----------------------------------------------------

    def watch(self, now: float) -> None:
        """Ping each worker whose last answer is PING_EVERY old; name one that leaves a ping
        unanswered for STUCK_AFTER seconds (the supervisor's loop calls this each turn)."""
        for worker in self.workers:
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

    def _heard(self, worker: _Worker) -> None:
        now = self.clock()
        if worker.stuck is not None:
            self.log.warning(
                "%s answers again after %.0fs: its sources are served again (%s)",
                self._named(worker),
                worker.silent_for(now),
                self._queue_load(worker, while_stuck=True),
            )
        worker.pinged = worker.stuck = None
        worker.next_ping = now + PING_EVERY

    def _named(self, worker: _Worker) -> str:
        return f"worker {worker.shard} (pid {worker.pid}, queues {worker.queues[0]}-{worker.queues[1]})"

    def _stuck_line(self, worker: _Worker, silent: float, first: bool) -> str:
        lo, hi = byte_ranges(self.count)[worker.shard]
        what = STATES.get(process_state(worker.pid), STATES["running"])
        text = (
            f"{self._named(worker)} has not answered for {silent:.0f}s: {what}. Sources whose address ends in "
            f"byte {lo}-{hi} cannot knock or connect until it answers (closed, not open: {self._queue_load(worker)})"
        )
        if first:
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

    def reload(self, ruleset, groups) -> list[str]:
        """Give every worker the rules the supervisor just installed, with the first steps they
        have the kernel record (`groups`: decided once, by the supervisor; first_steps.py);
        returns the doors whose state was reset. The rules go through a root-only file (a large
        rule set would not fit a socket buffer, and a worker that does not read must not block
        the supervisor)."""
        assert self._handoff is not None  # made with the pool
        handoff = self._handoff / f"rules-{next(self._ids)}.pickle"
        try:
            with open(os.open(handoff, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
                pickle.dump((ruleset, groups), file, protocol=pickle.HIGHEST_PROTOCOL)
            replies = self._ask(("reload", str(handoff)), wait=RELOAD_WAIT)
        except (NfknockError, OSError) as exc:
            # The kernel already has the new rules; a worker that cannot take them must not
            # decide with the old ones: stop, closed.
            self.failure = self.failure or f"{exc} to take the new rules"
            raise WorkerDied(self.failure) from None
        finally:
            handoff.unlink(missing_ok=True)
        return sorted({door for reply in replies for door in reply})

    def sweep(self, wall: float) -> None:
        try:
            self.claims.sweep(wall)
        except OSError as exc:
            self.log.warning("cannot sweep the replay claims in %s: %s", self.claims.directory, exc)


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


def _ended(worker: _Worker) -> str:
    return f"worker {worker.shard} (pid {worker.pid}) ended; its queues are unbound"


def merge_status(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """Workers' status answers as one daemon's: sums of counters, one row per grant."""
    merged = dict(answers[0])
    grants: dict[tuple[str, str], dict] = {}
    for answer in answers:
        for row in answer["grants"]:
            key = (row["door"], row["source"])
            if key not in grants or row["seconds_left"] > grants[key]["seconds_left"]:
                grants[key] = row
    merged["grants"] = [grants[key] for key in sorted(grants)]
    merged["locked"] = sorted(
        (row for answer in answers for row in answer["locked"]), key=lambda r: (r["door"], r["source"])
    )
    for field in ("tracked_attempts", "internal_errors", "evicted", "kernel_queue_drops"):
        merged[field] = sum(answer[field] for answer in answers)
    for field in ("packets", "unparsable"):
        total: Counter = Counter()
        for answer in answers:
            total.update(answer[field])
        merged[field] = dict(total)
    merged["workers"] = len(answers)
    return merged


def merge_snapshots(snapshots: list[metrics.Snapshot]) -> metrics.Snapshot:
    def total(field: str) -> dict:
        summed: Counter = Counter()
        for snapshot in snapshots:
            summed.update(getattr(snapshot, field))
        return dict(summed)

    drops = [snapshot.drops for snapshot in snapshots if snapshot.drops is not None]
    return replace(
        snapshots[0],
        handled=total("handled"),
        unparsable=total("unparsable"),
        tallies=total("tallies"),
        grants_per_door=total("grants_per_door"),
        tracked=sum(snapshot.tracked for snapshot in snapshots),
        drops=(sum(d[0] for d in drops), sum(d[1] for d in drops)) if drops else None,
    )


# -- the worker's side ------------------------------------------------------------------------


def _worker_main(supervisor: Any, shard: int, conn: Connection, claims: ReplayClaims) -> None:
    """The body of a forked worker: a Daemon bound to its shard's queues. Never returns."""
    from .core import Daemon

    code = 1
    try:
        os.environ.pop("NOTIFY_SOCKET", None)  # only the supervisor speaks to systemd
        _die_with_parent()
        config = replace(supervisor.config, shard=shard)
        daemon = Daemon(
            config,
            supervisor.firewall,
            supervisor.log,
            supervisor.clock,
            supervisor.wall_clock,
            ruleset=supervisor.ruleset,
            channel=conn,
            claims=claims,
            first_steps=supervisor.first_steps,
        )
        daemon.run_worker(lambda: conn.send(("bound", shard)))
        code = 0
    except BaseException as exc:  # noqa: BLE001 - logged by run_worker; the supervisor says why
        try:
            conn.send(("failed", str(exc).split("; the rules stay")[0] or type(exc).__name__))
        except OSError:
            pass
    finally:
        os._exit(code)


def _die_with_parent() -> None:
    """SIGTERM this worker when the supervisor dies, however it dies."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before the call
        os.kill(os.getpid(), signal.SIGTERM)


def serve(daemon: Any, message: tuple) -> None:
    """One message from the supervisor, in the worker's loop between batches."""
    kind = message[0]
    if kind == "stop":
        daemon.stopping = True
    elif kind == "ping":  # the supervisor's check that this loop turns (WorkerPool.watch)
        daemon.channel.send(("pong",))
    elif kind == "control":
        _, rid, deadline, request = message
        if time.monotonic() > deadline:  # the supervisor has answered "did not answer": so be it
            daemon.log.warning("control request %s came too late to this worker: not carried out", request["cmd"])
            return
        daemon.channel.send(("reply", rid, daemon.answer(request)))
    elif kind == "snapshot":
        daemon.channel.send(("reply", message[1], metrics.take(daemon, daemon.clock())))
    elif kind == "reload":
        with open(message[3], "rb") as file:
            ruleset, groups = pickle.load(file)  # written by the supervisor, root-only  # noqa: S301
        daemon.channel.send(("reply", message[1], daemon.adopt(ruleset, groups)))
