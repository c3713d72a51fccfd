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

A worker that lives but does not answer keeps its queues bound: closed for its share of the
sources, and named by the supervisor's watchdog (watchdog.py). Nothing else is done to it: a
stopped process may be an administrator's debugger session, which a kill or a restart would
destroy, and a restarted worker would not make the shard any safer (it is closed already);
SIGCONT resumes it, a stop of the daemon ends it (SIGKILL after STOP_WAIT).
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import secrets
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..errors import NfknockError, QueueError
from ..firewall.shards import queues, shard_of
from . import metrics
from .claims import SUBDIR, open_claims
from .config import DaemonConfig
from .merge import merge_snapshots, merge_status
from .watchdog import Watchdog, _Worker

START_WAIT = 30.0  # seconds for every worker to bind its queues
ANSWER_WAIT = 3.0  # seconds for every worker to answer a request (within control's 5 s deadline)
RELOAD_WAIT = 120.0  # seconds for every worker to compile new rules (10k doors take about one)
Spawn = Callable[[int, Connection, Any], None]  # (shard, channel, claims): a worker's life, never returns
STOP_WAIT = 10.0  # seconds for workers to stop before they are killed


class WorkerDied(NfknockError):
    """A worker process ended on its own: its share of the sources is closed (the kernel drops what
    its queues would get); the daemon stops, the rules stay."""


class WorkerPool:
    """The supervisor's side: start the workers, route what crosses them, stop them."""

    def __init__(self, config: DaemonConfig, log: logging.Logger, clock: Callable[[], float]):
        self.log = log
        self.count: int = config.workers
        self.queue_num: int = config.queue_num
        self.clock = clock
        self.watchdog = Watchdog(log, config.workers, clock)
        self._snapshots: dict[int, metrics.Snapshot] = {}  # each worker's last, for one that is stuck
        self.workers: list[_Worker] = []
        self._private: Path | None = None
        self._handoff: Path | None = None  # 0700: reloaded rules on their way to the workers
        self.failure = ""  # why the pool cannot go on (a worker ended)
        self._replies: dict[int, dict[int, Any]] = {}
        self._ids = itertools.count(1)
        state_dir = config.state_dir
        try:
            self._handoff = Path(tempfile.mkdtemp(prefix="nfknock-rules-"))
            if state_dir is None:
                self._private = Path(tempfile.mkdtemp(prefix=f"nfknock-q{config.queue_num}-"))
        except OSError as exc:
            raise NfknockError(f"--workers: cannot make a private directory: {exc.strerror or exc}") from None
        try:
            self.claims = open_claims(Path(state_dir or self._private or ".") / SUBDIR)
        except NfknockError:
            self._remove_private()
            raise

    # -- start and stop --------------------------------------------------------------------

    def start(self, spawn: Spawn, seed: dict[str, float] | None = None) -> None:
        """Fork the workers, each running `spawn` (worker.py: never returns), and wait until each
        has bound its queues (before any rule sends packets there). `seed`: replay records from a
        single-process run's cache, claimed for all."""
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
                spawn(shard, Connection(theirs.detach()), self.claims)
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
        self.watchdog.heard(worker)  # any message: it reached its loop
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
            stuck = [
                self.watchdog.named(worker)
                for worker in workers
                if worker.shard in missing and worker.stuck is not None
            ]
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
        if request["cmd"] == "revoke":
            # One revocation for the fleet, however many workers publish it (each in case another
            # is cut off from Redis): the others apply and confirm one id, which `nfknock revoke`
            # follows in every worker's status (merge.py).
            request = {**request, "fleet_revoke_id": secrets.token_hex(8)}
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
            return {"error": "no worker answers: " + "; ".join(self.watchdog.named(worker) for worker in silent)}
        merged = merge_status([replies[shard] for shard in sorted(replies)])
        merged["workers"] = self.count
        merged["stuck_workers"] = [self.watchdog.stuck_row(worker, self.clock()) for worker in silent]
        return merged

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
        return replace(merge_snapshots(known), workers_up=up)

    def answering(self, now: float) -> bool:
        """Every worker lives and answers its pings (the supervisor's heartbeat.py hook asks)."""
        return not self.failure and self.watchdog.answering(self.workers, now)

    def watch(self, now: float) -> None:
        """Ping the workers; name one that does not answer (watchdog.py). Each loop turn."""
        self.watchdog.watch(self.workers, now)

    def reload(self, ruleset, first_steps) -> list[str]:
        """Give every worker the rules the supervisor just installed, with the first steps they
        have the kernel record (`first_steps`: decided once, by the supervisor; first_steps.py);
        returns the doors whose state was reset. The rules go through a root-only file (a large
        rule set would not fit a socket buffer, and a worker that does not read must not block
        the supervisor)."""
        assert self._handoff is not None  # made with the pool
        handoff = self._handoff / f"rules-{next(self._ids)}.pickle"
        try:
            with open(os.open(handoff, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
                pickle.dump((ruleset, first_steps), file, protocol=pickle.HIGHEST_PROTOCOL)
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


def _ended(worker: _Worker) -> str:
    return f"worker {worker.shard} (pid {worker.pid}) ended; its queues are unbound"
