"""The Redis I/O of one fleet member, in two threads of its own, so the verdict loop never
waits on the network: a writer (publishes grants and revocations, claims replay records, says
the member is alive) and a reader (follows the fleet's stream of grants and revocations).

Everything goes through a bounded backlog: while Redis is down or slow, publishes wait there
(the oldest go first when it is full, and are counted), claims are answered "unreachable" at
once, and the loop goes on with local state. Both threads reconnect by themselves. The reader
resumes the stream where it left off, so a member that was cut off catches up on what it
missed; when Redis itself lost the stream (restarted without its data) it reads the new one
from its start.

What Redis holds (all under the fleet's name, so two fleets can share one Redis):
  NAME:stream         grants and revocations, signed (records.py), trimmed to ~STREAM_LENGTH
  NAME:used:<hmac>    one key per replay record used, SET NX with an expiry (the claim); also
                      for an SPA packet a member refused after its HMAC (told, not asked). In the
                      same pipeline a signed `used` entry goes on the stream: every member keeps
                      those (used.py), so a claim deleted by hand reopens nothing; and every
                      heartbeat puts back this member's live claims that are gone before their time
  NAME:members        instance -> signed presence (who is there, seen when)
  NAME:epoch          a signed marker, set once by the first member: when it is gone or another,
                      Redis lost data (restarted without it, evicted it, failed over to a
                      replica that missed it); each member then puts back its live claims
                      before it asks Redis about any claim again, and says so at error level
  NAME:revoked        revocation id -> the signed revocation with its place in the stream: a
                      second copy, read before the stream on every (re)connection and checked
                      every REASSERT seconds; each member puts back what it keeps
                      (revocations.py) when it is missing, so a trimmed stream or a writer
                      without the fleet key deleting an entry (XDEL, HDEL) undoes no revocation
Every entry this member appends carries a signed sequence number of its own (`n`): a reader that
sees one skip raises an alarm (entries deleted from the stream, or trimmed before it read them).
Answers and entries come back through `inbox`; `wake` tells the loop to look.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from ..doors.events import ClaimNeeded
from ..errors import UsageError
from .deployment import ERROR, OK, read_facts, risks
from .records import MAX_GRANT_SECONDS, PROTOCOL, Claim, Entry, Forged, Grant, Revoke, Signer, Used, stream_order

MAX_BACKLOG = 4096  # jobs waiting for Redis; more push the oldest publish out (counted)
STREAM_LENGTH = 10000  # entries kept in the stream (approximately): the catch-up horizon
READ_BLOCK_MS = 1000
SOCKET_TIMEOUT = 1.0  # seconds for one command; a slower Redis counts as unreachable
RETRY_FIRST, RETRY_MAX = 0.2, 5.0  # reconnect backoff, seconds
HEARTBEAT = 2.0  # seconds between presence updates
SEEN_RECENTLY = 10.0  # a member not heard from in this long is no longer listed
FORGET_MEMBERS = 86400.0  # presence entries older than this are removed
CLAIM_MARGIN = 60.0  # seconds added to a claim's expiry: members' clocks may differ
REASSERT = 2.0  # seconds between checks of the revocations' second copy
WATCH = 15.0  # seconds during which a member follows who confirmed its revocation
WATCH_EVERY = 0.1
MAX_WATCHED = 4
MAX_SKEW = 30.0  # seconds between this member's clock and Redis's beyond which claims are refused
MAX_HELD = 65536  # live claims this member keeps to put back when Redis lost them
RECOVERY = 2 * HEARTBEAT + 1.0  # after a loss: every live member has put its claims back by then
SETTLE_MARGIN = 1.0  # a joining member's first check of the second copy this long after REASSERT (Settled)
MAX_SEQUENCES = 4096  # instances whose entry numbers a reader follows (the most recent ones)
LAGGING = 15.0  # seconds a member's last entries may stay unread before they count as deleted


@dataclass(frozen=True)
class FleetConfig:
    """What `nfknock run --cluster ...` asked for (secrets already read from their files)."""

    url: str
    key: bytes = field(repr=False)
    password: str | None = field(default=None, repr=False)
    name: str = "nfknock"
    member: str = ""
    offline: str = "accept"  # what SPA / rotating doors do when the fleet cannot be asked
    older_keys: tuple[bytes, ...] = field(default=(), repr=False)  # still accepted (a rotation)

    @property
    def where(self) -> str:
        """The URL without anything secret, for logs and status."""
        parts = urlsplit(self.url)
        host = parts.hostname or "localhost"
        if ":" in host:
            host = f"[{host}]"
        return f"{parts.scheme}://{host}:{parts.port or 6379}{parts.path or '/0'}"


def check_url(url: str) -> str:
    """redis:// or rediss:// with a host and no password in it (passwords go in a file)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise UsageError(f"--cluster: expected redis://HOST:PORT/DB or rediss://..., got {parts.scheme or url!r}:...")
    if parts.password is not None:
        raise UsageError("--cluster: put the Redis password in --cluster-password-file, not in the URL")
    if not parts.hostname:
        raise UsageError("--cluster: the URL names no host")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise UsageError(f"--cluster: {exc}") from None
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise UsageError(f"--cluster: the database must be a number, got {db!r}")
    return url


@dataclass(frozen=True)
class Answer:
    """The fleet's word on a claim: "ours", "taken" (by `by`) or "unreachable"."""

    claim: ClaimNeeded
    answer: str
    by: str = ""
    detail: str = ""


@dataclass(frozen=True)
class Received:
    entry: Entry
    pos: str = ""  # its stream id ("" from the second copy)


@dataclass(frozen=True)
class Settled:
    """Every member that keeps a revocation has had a turn to put its second copy back since
    this member joined, and this member has read the copies since: grants issued before it
    joined may be applied now (member.py)."""


@dataclass(frozen=True)
class Rejected:
    """Something in Redis that does not verify with the fleet key: it is ignored."""

    where: str
    why: str


@dataclass(frozen=True)
class Placed:
    """Our revocation `id` is in the stream at `pos` (Redis's clock)."""

    id: str
    pos: str


@dataclass(frozen=True)
class LinkState:
    connected: bool
    detail: str = ""


class _Stamp:
    """What a job appends to the stream is numbered (and a used entry named) at its first try and
    keeps both across retries: a retry that Redis had already done shows as the same entry twice
    (applied once), never as a skip that readers would take for a deletion."""

    __slots__ = ("seq", "id")

    def __init__(self) -> None:
        self.seq = 0
        self.id = ""


@dataclass(frozen=True)
class _Publish:
    entry: Entry
    expires: float  # wall clock after which publishing it is pointless
    stamp: _Stamp = field(default_factory=_Stamp, compare=False)


@dataclass(frozen=True)
class _Claim:
    claim: ClaimNeeded
    late: bool = False  # used while Redis was unreachable: recorded afterwards, nobody waits
    stamp: _Stamp = field(default_factory=_Stamp, compare=False)


@dataclass(frozen=True)
class _Record:
    """A record used without opening anything (an SPA packet refused after its HMAC): told to the
    fleet so that no member grants it later (the door widened, its time came); nobody waits."""

    record: str
    expires: float
    stamp: _Stamp = field(default_factory=_Stamp, compare=False)


@dataclass(frozen=True)
class Confirmed:
    """Who applied our revocation `id` so far: instance -> member."""

    id: str
    by: dict


@dataclass(frozen=True)
class _Ack:
    """Tell the member that issued revocation `id` that we applied it."""

    id: str


@dataclass(frozen=True)
class Alarm:
    """Something about Redis that weakens a promise (data lost, keys evicted, a clock off)."""

    what: str
    detail: str
    cleared: bool = False  # the condition is over (a clock back within bounds)


_Job = _Publish | _Claim | _Record | _Ack

Message = Answer | Received | Rejected | LinkState | Placed | Alarm | Confirmed | Settled


class Link:
    def __init__(
        self,
        config: FleetConfig,
        signer: Signer,
        instance: str,
        wake: Callable[[], None],
        log: logging.Logger,
        connect: Callable[..., Any] | None = None,
        wall: Callable[[], float] = time.time,
    ):
        self.config = config
        self.signer = signer
        self.instance = instance
        self.wake = wake
        self.log = log
        self.wall = wall
        self._connect = connect or _redis_client
        self.inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.connected = False
        self.dropped = 0  # publishes lost because the backlog was full
        self.published = 0
        self.received = 0
        self.members: dict[str, tuple[str, float, int]] = {}  # instance -> (member, seen, grants)
        self.known: dict[str, tuple[str, float]] = {}  # every instance in the members hash -> (member, seen)
        self._watching: dict[str, float] = {}  # our revocation id -> until when we follow its confirmations
        self.watch: set[str] = set()  # revocation ids an operator waits on (`nfknock revoke`)
        self._next_follow = 0.0
        self._confirmed: dict[str, dict] = {}  # what was last told of each followed revocation
        self._told: set[str] = set()  # revocation ids of the second copy already handed to the member
        # The second copy as last checked: id -> (its bytes, the revocation). Checked every
        # REASSERT seconds, the hash is verified again only where its bytes changed (it holds
        # every live revocation of the fleet, up to a day's: an HMAC and a parse each).
        self._checked: dict[str, tuple[bytes, Revoke]] = {}
        self.local_grants = 0  # reported in our presence; set by the member
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.stream = f"{config.name}:stream"
        self.members_key = f"{config.name}:members"
        self.revoked_key = f"{config.name}:revoked"
        self.epoch_key = f"{config.name}:epoch"
        self.revocations: Callable[[], list[Revoke]] = list  # what this member keeps (member.py)
        self.last_seen = "0-0"  # the newest stream id read or written: a grant's base
        self._written = "0-0"  # the newest stream id this writer added
        self.epoch: tuple[str, float] | None = None  # the marker of the Redis data we trust (and when set)
        self.skew = 0.0  # this member's clock minus Redis's (TIME), at the last heartbeat
        self.policy = "unknown"  # Redis's maxmemory-policy
        self._evicted: int | None = None
        self._held: dict[str, tuple[bytes, float]] = {}  # claim name -> (signed claim, expires)
        self.reasserted = 0  # claims put back after Redis lost them
        self._recovering_until = 0.0  # monotonic: claims are not asked before (the others put theirs back)
        self._said: dict[str, str] = {}  # deployment risks logged: what -> text
        self.joined_at: str | None = None  # the newest stream id when the reader first connected
        self._connected_first: float | None = None  # monotonic: the writer's first connection
        self.settled = False  # Settled was told
        self.older: dict[str, str] = {}  # instance -> member, of members speaking an older protocol
        self._seq = 0  # entries this writer numbered (each appended entry's `n`)
        self._done_seq = 0  # the number of the last entry Redis took (said in our presence)
        # instance -> (a last number it announced, monotonic when, alarmed): see _check_last
        self._lagging: dict[str, tuple[int, float, bool]] = {}
        self._seqs: dict[str, int] = {}  # instance -> the highest number read of its entries (reader)
        self._there: set[str] = set()  # held claims known to have been in Redis (a later absence: deleted)
        self._appended: dict[str, float] = {}  # records whose used entry this member appended -> expiry

    # -- the loop's side (never blocks) ------------------------------------------------------

    def start(self) -> None:
        for target, name in ((self._write, "nfknock-fleet-write"), (self._read, "nfknock-fleet-read")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=SOCKET_TIMEOUT + READ_BLOCK_MS / 1000 + 1)

    def publish(self, entry: Entry, expires: float) -> None:
        self._put(_Publish(entry, expires))

    def claim(self, claim: ClaimNeeded, late: bool = False) -> None:
        """Ask (or, `late`, just tell) the fleet; the answer comes back in the inbox."""
        self._put(_Claim(claim, late))

    def ack(self, revoke_id: str) -> None:
        self._put(_Ack(revoke_id))

    def record(self, record: str, expires: float) -> None:
        """Tell the fleet that `record` is used until `expires` although it opened nothing: a
        member that claims it later is refused. No answer comes back."""
        self._put(_Record(record, expires))

    @property
    def backlog(self) -> int:
        return len(self._jobs)

    def _put(self, job: _Job) -> None:
        with self._cond:
            if len(self._jobs) >= MAX_BACKLOG:
                self._evict()
            self._jobs.append(job)
            self._cond.notify()

    def _evict(self) -> None:
        """Make room: the oldest publish goes (a revocation only when nothing else is left); a
        waiting claim is answered, never dropped."""
        at = next((n for n, job in enumerate(self._jobs) if not _is_revoke(job)), 0)
        oldest = self._jobs[at]
        del self._jobs[at]
        if isinstance(oldest, _Claim) and not oldest.late:
            self._tell(Answer(oldest.claim, "unreachable", detail="backlog full"))
        else:
            self.dropped += 1

    def _tell(self, message: Message) -> None:
        self.inbox.put(message)
        self.wake()

    # -- the writer --------------------------------------------------------------------------

    def _write(self) -> None:
        client = None
        delay = RETRY_FIRST
        next_beat = next_check = 0.0
        while not self._stopping.is_set():
            if client is None:
                self._answer_claims_offline()
                try:
                    client = self._connect(self.config)
                    client.ping()
                except Exception as exc:  # noqa: BLE001 - any failure is "not reachable"
                    client = None
                    self._set_connected(False, _reason(exc))
                    self._pause(delay)
                    delay = min(RETRY_MAX, delay * 2)
                    continue
                delay = RETRY_FIRST
                self._set_connected(True)
                if self._connected_first is None:
                    self._connected_first = time.monotonic()
                next_beat = next_check = 0.0
                try:
                    self._check_deployment(client)
                except Exception:  # noqa: BLE001 - CONFIG may be refused (ACL, managed Redis)
                    self.policy = "unknown"
            try:
                if time.monotonic() >= next_beat:
                    self._heartbeat(client)
                    next_beat = time.monotonic() + HEARTBEAT
                if time.monotonic() >= next_check:
                    self._reassert(client)
                    next_check = time.monotonic() + REASSERT
                with self._cond:
                    if not self._jobs and not self._stopping.is_set():
                        wait = next_beat - time.monotonic()
                        self._cond.wait(max(0.0, min(wait, WATCH_EVERY) if self._watching else wait))
                    jobs = list(self._jobs)
                    self._jobs.clear()
                self._do(client, jobs)
                if self._watching:
                    self._follow_confirmations(client)
            except Exception as exc:  # noqa: BLE001 - whatever Redis or the network did
                failed = exc if isinstance(exc, _Failed) else _Failed([], _reason(exc))
                with self._cond:  # what was not done goes back, in order, in front
                    self._jobs.extendleft(reversed(failed.left))
                    while len(self._jobs) > MAX_BACKLOG:
                        self._evict()
                _close(client)
                client = None
                self._set_connected(False, failed.reason)
        _close(client)

    def _do(self, client, jobs: list[_Job]) -> None:
        wall = self.wall()
        if any(isinstance(job, _Claim) for job in jobs):
            try:
                self._check_epoch(client)  # before any answer: Redis must not have forgotten
            except Exception as exc:  # noqa: BLE001
                raise _Failed(jobs, _reason(exc)) from None
        for at, job in enumerate(jobs):
            try:
                if isinstance(job, _Publish):
                    if job.expires > wall:
                        self._xadd(client, job.entry, job.stamp)
                elif isinstance(job, _Record):
                    if job.expires > wall:
                        self._record(client, job, wall)
                elif isinstance(job, _Ack):
                    name = f"{self.config.name}:acks:{job.id}"
                    client.hset(name, self.instance, self.signer.sign_ack(job.id, self.config.member, self.instance))
                    client.expire(name, int(MAX_GRANT_SECONDS))
                else:
                    self._claim(client, job, wall)
            except Exception as exc:  # noqa: BLE001 - the connection's failure, whatever it is
                raise _Failed(jobs[at:], _reason(exc)) from None

    def _numbered(self, entry: Entry, stamp: _Stamp) -> dict[str, bytes]:
        """The stream fields of `entry`: itself and its signed sequence number."""
        if not stamp.seq:
            self._seq += 1
            stamp.seq = self._seq
        return {"e": self.signer.sign(entry), "n": self.signer.sign_seq(self.instance, stamp.seq, entry.id)}

    def _used(self, record: str, expires: float, stamp: _Stamp) -> dict[str, bytes]:
        """The stream fields of the `used` entry of `record` (used.py), named once per job."""
        stamp.id = stamp.id or secrets.token_hex(8)
        names = tuple(self.signer.claim_names(record))
        return self._numbered(Used(stamp.id, self.config.member, self.instance, names, expires), stamp)

    def _append_used(self, pipe, record: str, expires: float, stamp: _Stamp) -> bool:
        """Queue the used entry of `record` on `pipe`, unless this member appended it already: a
        single process with a replay store tells the fleet of a record while it writes it
        (sinks.py), then claims it."""
        if record in self._appended:
            return False
        pipe.xadd(self.stream, self._used(record, expires, stamp), maxlen=STREAM_LENGTH, approximate=True)
        return True

    def _appended_now(self, appended: bool, record: str, expires: float, stamp: _Stamp) -> None:
        """Once Redis took it (a retry appends it again, under the same number)."""
        if not appended:
            return
        self._done_seq = max(self._done_seq, stamp.seq)
        wall = self.wall()
        while self._appended and (len(self._appended) >= MAX_HELD or next(iter(self._appended.values())) < wall):
            del self._appended[next(iter(self._appended))]
        self._appended[record] = expires

    def _xadd(self, client, entry: Entry, stamp: _Stamp) -> None:
        if isinstance(entry, Grant) and stream_order(self._written) > stream_order(entry.base):
            # Our own revocations published before it (the jobs are in order) came before it.
            entry = replace(entry, base=self._written)
        fields = self._numbered(entry, stamp)
        added = client.xadd(self.stream, fields, maxlen=STREAM_LENGTH, approximate=True)
        self._done_seq = max(self._done_seq, stamp.seq)
        pos = added.decode() if isinstance(added, bytes) else str(added)
        self._written = pos
        self._seen(pos)
        self.published += 1
        if isinstance(entry, Revoke):
            placed = replace(entry, pos=pos)
            client.hset(self.revoked_key, entry.id, self.signer.sign(placed))
            self._tell(Placed(entry.id, pos))
            if entry.id in self.watch:
                self.watch.discard(entry.id)
                self._watching[entry.id] = time.monotonic() + WATCH
                while len(self._watching) > MAX_WATCHED:  # an operator waits on the newest only
                    del self._watching[next(iter(self._watching))]

    def _follow_confirmations(self, client) -> None:
        now = time.monotonic()
        if now < self._next_follow:
            return
        self._next_follow = now + WATCH_EVERY
        for revoke_id, until in list(self._watching.items()):
            if now > until:
                del self._watching[revoke_id]
                self._confirmed.pop(revoke_id, None)
                continue
            by = {}
            for raw in client.hgetall(f"{self.config.name}:acks:{revoke_id}").values():
                try:
                    member, instance = self.signer.verify_ack(revoke_id, raw)
                except Forged:
                    continue  # says nothing: only what verifies counts as confirmed
                by[instance] = member
            if by != self._confirmed.get(revoke_id):  # the loop is woken for news only
                self._confirmed[revoke_id] = by
                self._tell(Confirmed(revoke_id, by))
            # Every instance of another member listed (stale ones too: they may come back) has
            # confirmed: nothing more to learn (the status keeps the last rows).
            others = {instance for instance, row in self.known.items() if row[0] != self.config.member}
            if others and others <= set(by):
                del self._watching[revoke_id]
                self._confirmed.pop(revoke_id, None)

    def _seen(self, pos: str) -> None:
        if stream_order(pos) > stream_order(self.last_seen):
            self.last_seen = pos

    def _reassert(self, client) -> None:
        """The revocations' second copy: learn the ones missed, put back the ones missing, and
        remove what is over or does not verify (the hash stays bounded). The first read that
        starts REASSERT + SETTLE_MARGIN after this member connected settles it: every member
        keeping a revocation had its turn to put a deleted copy back by then."""
        started = time.monotonic()
        self._reassert_once(client)
        joined = self._connected_first
        if not self.settled and joined is not None and started >= joined + REASSERT + SETTLE_MARGIN:
            self.settled = True
            self._tell(Settled())

    def _reassert_once(self, client) -> None:
        wall = self.wall()
        there: dict[str, bytes] = {}
        stale = []
        checked: dict[str, tuple[bytes, Revoke]] = {}
        for field_name, raw in client.hgetall(self.revoked_key).items():
            name = field_name.decode(errors="replace") if isinstance(field_name, bytes) else str(field_name)
            try:
                known = self._checked.get(name)
                if known is not None and known[0] == raw:  # verified at an earlier check: the same bytes
                    revoke = known[1]
                else:
                    entry = self.signer.verify(raw)
                    if not isinstance(entry, Revoke) or entry.id != name or entry.pos is None:
                        raise Forged("not a placed revocation under its own id")
                    revoke = entry
                checked[name] = (raw, revoke)
            except Forged as exc:
                self._tell(Rejected(f"revocation entry {name!r}", str(exc)))
                stale.append(field_name)
                continue
            if revoke.at + MAX_GRANT_SECONDS < wall:
                stale.append(field_name)
                continue
            there[name] = raw
            if name not in self._told:  # new here (the member ignores known ones anyway)
                self._told.add(name)
                self._tell(Received(revoke))
        if stale:
            client.hdel(self.revoked_key, *stale)
        self._checked = checked  # only what is there now: bounded by the hash
        self._told &= set(there)
        missing = {
            revoke.id: self.signer.sign(revoke)
            for revoke in self.revocations()
            if revoke.pos is not None and revoke.id not in there and revoke.at + MAX_GRANT_SECONDS >= wall
        }
        if missing:
            client.hset(self.revoked_key, mapping=missing)

    def _claim(self, client, job: _Claim, wall: float) -> None:
        claim = job.claim
        if abs(self.skew) > MAX_SKEW and not job.late:
            detail = f"this member's clock is {self.skew:+.0f}s off Redis's (more than {MAX_SKEW:.0f}s): cannot check"
            self._tell(Answer(claim, "skewed", detail=detail))
            return
        if time.monotonic() < self._recovering_until and not job.late:
            # Redis lost data moments ago: what other members used is not back in it yet.
            self._tell(
                Answer(claim, "unreachable", detail="Redis lost its data; members are putting their claims back")
            )
            return
        mine, milliseconds, names, signed, done = self._set_claims(client, claim.record, claim.expires, job.stamp, wall)
        other = None  # who else holds it, under any of the fleet's keys
        for index, name in enumerate(names):
            found = (
                None if done[index] else self._holder(client, claim.record, index, name, signed[index], milliseconds)
            )
            if found is None:
                self._hold(name, signed[index], mine.expires + CLAIM_MARGIN)
            other = other or found
        if other is None:  # ours (or our own earlier try got through)
            if not job.late:
                self._tell(Answer(claim, "ours"))
        elif other == "":
            self._tell(Answer(claim, "taken", detail="an unauthenticated claim holds it"))
        elif job.late:
            self._tell(Answer(claim, "late", by=other))
        else:
            self._tell(Answer(claim, "taken", by=other, detail=f"used on member {other}"))

    def _set_claims(self, client, record: str, expires: float, stamp: _Stamp, wall: float):
        """One round trip: the claim under each of the fleet keys' names (SET NX), and the used
        entry every member keeps (used.py; appended whoever wins: the record is used either way).
        Returns our claim, its lifetime in ms, the names, our signed values and SET's answers."""
        mine = Claim(self.config.member, self.instance, expires)
        milliseconds = max(1000, int((expires - wall + CLAIM_MARGIN) * 1000))
        names = self.signer.claim_names(record)
        signed = [self.signer.sign_claim(record, mine, index) for index in range(len(names))]
        pipe = client.pipeline(transaction=False)
        for name, value in zip(names, signed, strict=True):
            pipe.set(name, value, nx=True, px=milliseconds)
        appended = self._append_used(pipe, record, expires, stamp)
        done = pipe.execute()
        self._appended_now(appended, record, expires, stamp)
        return mine, milliseconds, names, signed, done

    def _holder(self, client, record: str, index: int, name: str, signed: bytes, milliseconds: int) -> str | None:
        """Who holds `record` under one key's name, our SET NX having found it taken: None if it
        is ours after all, else who ("" if nobody we can verify: the name is keyed with the
        fleet key, so someone wrote exactly there without it)."""
        raw = client.get(name)
        if raw is None:  # expired between the two commands: nobody holds it now
            client.set(name, signed, nx=True, px=milliseconds)
            return None
        try:
            holder = self.signer.verify_claim(record, raw, index)
        except Forged as exc:
            self._tell(Rejected(f"claim {name}", str(exc)))
            return ""
        return None if holder.instance == self.instance else holder.member

    def _record(self, client, job: _Record, wall: float) -> None:
        """A claim nobody waits for: if another member holds it already, it is used either way."""
        _, _, names, signed, done = self._set_claims(client, job.record, job.expires, job.stamp, wall)
        for index, (name, value) in enumerate(zip(names, signed, strict=True)):
            # Held by another member already: it ends when theirs does, not a deletion.
            self._hold(name, value, job.expires + CLAIM_MARGIN, there=bool(done[index]))

    def hold_records(self, records: dict[str, float]) -> None:
        """Records this member keeps on disk (its replay cache, from before a restart): put back
        in Redis, like its own claims, whenever Redis lost data. From the loop, before start()."""
        for record, expires in records.items():
            mine = Claim(self.config.member, self.instance, expires)
            for index, name in enumerate(self.signer.claim_names(record)):
                self._hold(name, self.signer.sign_claim(record, mine, index), expires + CLAIM_MARGIN, there=False)

    def _hold(self, name: str, signed: bytes, expires: float, there: bool = True) -> None:
        """Keep a live claim of ours to put back; `there`: it is in Redis now (its absence later,
        before its time, means someone deleted it)."""
        if len(self._held) >= MAX_HELD:
            oldest = next(iter(self._held))
            del self._held[oldest]
            self._there.discard(oldest)
        self._held[name] = (signed, expires)
        if there:
            self._there.add(name)

    # -- what Redis may have lost --------------------------------------------------------------

    def _check_deployment(self, client) -> None:
        """Say what the Redis deployment risks (deployment.py, the judgement doctor gives too): an
        evicting policy is an alarm at each connection; no password or weak persistence is said
        once per run (and whenever it changes)."""
        anonymous = None
        if self.config.password:
            try:
                anonymous = self._connect(replace(self.config, password=None))
            except Exception:  # noqa: BLE001 - cannot tell; said as unknown
                anonymous = None
        facts = read_facts(client, anonymous, bool(self.config.password))
        self.policy = facts.policy or "unknown"
        for risk in risks(facts):
            if risk.what == "evicting" and risk.level == ERROR:
                self._tell(Alarm("evicting", risk.text))
            elif risk.level != OK and self._said.get(risk.what) != risk.text:
                self._said[risk.what] = risk.text
                self.log.log(logging.ERROR if risk.level == ERROR else logging.WARNING, "fleet: %s", risk.text)

    def _check_epoch(self, client) -> None:
        """Is this still the Redis data we trusted? If not, put our live claims back first."""
        raw = client.get(self.epoch_key)
        epoch: tuple[str, float] | None = None
        if raw is not None:
            try:
                epoch = self.signer.verify_epoch(raw)
            except Forged as exc:
                self._tell(Rejected("the epoch marker", str(exc)))
                client.delete(self.epoch_key)
        if epoch is not None and raw != self.signer.sign_epoch(*epoch):
            # Signed with an older key (a rotation): signed again with ours, so that members
            # that keep only the new key at the end of the rotation still recognise it.
            client.set(self.epoch_key, self.signer.sign_epoch(*epoch), xx=True)
        if epoch is not None and epoch == self.epoch:
            return
        seconds, microseconds = client.time()
        redis_now = seconds + microseconds / 1e6
        if self.epoch is not None or epoch is None and self._held:
            lost = "gone" if epoch is None else "replaced"
            # Claims are not asked until every member had a heartbeat to put its own back since
            # the marker was set again (by Redis's clock: whoever found the loss first).
            since = 0.0 if epoch is None else max(0.0, redis_now - epoch[1])
            self._recovering_until = time.monotonic() + max(0.0, RECOVERY - since)
            count = self._reassert_claims(client)
            self._tell(
                Alarm(
                    "data lost",
                    f"Redis lost the fleet's data (its epoch marker is {lost}: restarted without its data, "
                    f"evicted, or failed over); {count} live claim(s) of this member put back before trusting it",
                )
            )
        if epoch is None:
            marker = self.signer.sign_epoch(secrets.token_hex(8), redis_now)
            client.set(self.epoch_key, marker, nx=True)
            raw = client.get(self.epoch_key)
            epoch = None if raw is None else self.signer.verify_epoch(raw)
        self.epoch = epoch

    def _reassert_claims(self, client) -> int:
        wall = self.wall()
        for name in [name for name, (_, expires) in self._held.items() if expires <= wall]:
            del self._held[name]
        for name, (signed, expires) in list(self._held.items()):
            client.set(name, signed, nx=True, px=max(1000, int((expires - wall) * 1000)))
        self.reasserted += len(self._held)
        self._there = set(self._held)
        return len(self._held)

    def _check_claims(self, client) -> None:
        """Every heartbeat: this member's live claims that are gone from Redis before their time
        are put back (one pipeline of SET NX); those known to have been there were deleted by
        someone with the Redis password (or evicted without INFO saying so): an alarm. Between a
        deletion and this check, the used entries on the stream (used.py) still refuse the packet
        on every member that read them."""
        wall = self.wall()
        for name in [name for name, (_, expires) in self._held.items() if expires <= wall]:
            del self._held[name]
        self._there &= set(self._held)
        if not self._held:
            return
        names = list(self._held)
        pipe = client.pipeline(transaction=False)
        for name in names:
            signed, expires = self._held[name]
            pipe.set(name, signed, nx=True, px=max(1000, int((expires - wall) * 1000)))
        back = [name for name, done in zip(names, pipe.execute(), strict=True) if done]
        deleted = [name for name in back if name in self._there]
        self._there.update(names)
        self.reasserted += len(back)
        if deleted:
            self._tell(
                Alarm(
                    "claims deleted",
                    f"{len(deleted)} live claim(s) of this member were gone from Redis before their time (deleted "
                    "by someone with the Redis password, or evicted): put back; members that read the used "
                    "entries refuse those packets anyway",
                )
            )

    def _check_evictions(self, client) -> None:
        evicted = int(client.info("stats").get("evicted_keys", 0))
        if self._evicted is not None and evicted > self._evicted:
            count = self._reassert_claims(client)
            self._tell(
                Alarm(
                    "evicted",
                    f"Redis evicted {evicted - self._evicted} key(s) (maxmemory-policy {self.policy}); "
                    f"{count} live claim(s) of this member put back",
                )
            )
        self._evicted = evicted

    def _check_clock(self, client) -> None:
        seconds, microseconds = client.time()
        skew = self.wall() - (seconds + microseconds / 1e6)
        if abs(skew) > MAX_SKEW and abs(self.skew) <= MAX_SKEW:
            self._tell(
                Alarm(
                    "clock",
                    f"this member's clock is {skew:+.0f}s off Redis's (more than {MAX_SKEW:.0f}s): SPA and rotating "
                    "doors refused until it is fixed (used packets cannot be checked across the fleet)",
                )
            )
        elif abs(skew) <= MAX_SKEW < abs(self.skew):
            self._tell(Alarm("clock", f"this member's clock is back within {MAX_SKEW:.0f}s of Redis's", cleared=True))
        self.skew = skew

    def _heartbeat(self, client) -> None:
        self._check_clock(client)
        self._check_epoch(client)
        try:
            self._check_evictions(client)
        except Exception:  # noqa: BLE001 - INFO may be refused (ACL)
            pass
        self._check_claims(client)
        wall = self.wall()
        client.hset(
            self.members_key,
            self.instance,
            self.signer.sign_presence(self.config.member, self.instance, wall, self.local_grants, self._done_seq),
        )
        members: dict[str, tuple[str, float, int]] = {}
        known: dict[str, tuple[str, float]] = {}
        stale = []
        older: dict[str, str] = {}
        for instance, raw in client.hgetall(self.members_key).items():
            key = instance.decode(errors="replace") if isinstance(instance, bytes) else str(instance)
            try:
                member, said_instance, seen, grants, protocol, last = self.signer.verify_presence(raw)
            except Forged as exc:
                self._tell(Rejected(f"member entry {key!r}", str(exc)))
                stale.append(instance)
                continue
            if said_instance != key or wall - seen > FORGET_MEMBERS:
                stale.append(instance)
            else:
                known[key] = (member, seen)
                if wall - seen <= SEEN_RECENTLY:
                    members[key] = (member, seen, grants)
                    if key != self.instance:
                        self._check_last(key, member, last)
                    if protocol < PROTOCOL:
                        older[key] = member
        if stale:
            client.hdel(self.members_key, *stale)
        self.members, self.known = members, known
        self._check_versions(older)

    def _check_last(self, instance: str, member: str, last: int) -> None:
        """A member's presence says the number of its last entry in the stream. When the reader
        has read some of its entries, but not up to a number announced LAGGING seconds ago, the
        entries after what it read were deleted: a skip the reader cannot see itself, nothing of
        that member follows them. A member none of whose entries this one read is not judged
        (they may have been trimmed before it joined)."""
        read = self._seqs.get(instance, 0)  # the reader's (a thread of its own: at worst late)
        if read == 0 or read >= last:
            self._lagging.pop(instance, None)
            return
        now = time.monotonic()
        noticed = self._lagging.get(instance)
        if noticed is None or read >= noticed[0]:  # what was announced before is read: watch the new
            self._lagging[instance] = (last, now, False)
            return
        target, since, said = noticed
        if not said and now - since >= LAGGING:
            self._lagging[instance] = (target, since, True)  # said once
            self._tell(
                Alarm(
                    "stream gap",
                    f"the last {target - read} stream entr{'y' if target - read == 1 else 'ies'} of member {member} "
                    f"(numbers {read + 1}..{target}) are not in the stream although it appended them: deleted by "
                    "someone with the Redis password (XDEL), or trimmed before this member read them; a used packet "
                    "whose claim was deleted too could open here",
                )
            )

    def _check_versions(self, older: dict[str, str]) -> None:
        """A member of an older nfknock in the fleet: it ignores revocations' order (base, pos),
        so it may reopen what was revoked, and it confirms nothing. Said at error (and in status,
        metrics) while it is seen; the fleet is not refused, since this member cannot stop it."""
        if older and set(older.values()) != set(self.older.values()):
            names = ", ".join(sorted(set(older.values())))
            self._tell(
                Alarm(
                    "version",
                    f"member(s) {names} run an older nfknock (an older fleet protocol, this member speaks {PROTOCOL}): "
                    "those of protocol 1 apply grants whatever was revoked since and keep no revocations, so a door "
                    "revoked fleet-wide may open again there; those of protocol 2 keep no used records of other "
                    "members, so a used packet whose claim is deleted from Redis may open there; upgrade them (do "
                    "not mix versions in one fleet)",
                )
            )
        elif not older and self.older:
            self._tell(Alarm("version", "no member of an older nfknock is seen any more", cleared=True))
        self.older = older

    def _pause(self, seconds: float) -> None:
        """Wait before reconnecting, answering claims that come meanwhile at once."""
        end = time.monotonic() + seconds
        while not self._stopping.is_set() and (left := end - time.monotonic()) > 0:
            with self._cond:
                self._cond.wait(left)
            self._answer_claims_offline()

    def _answer_claims_offline(self) -> None:
        """While unreachable, nobody waits for a claim: answer them now (late ones stay)."""
        with self._cond:
            waiting = [job for job in self._jobs if isinstance(job, _Claim) and not job.late]
            if not waiting:
                return
            for job in waiting:
                self._jobs.remove(job)
        for job in waiting:
            assert isinstance(job, _Claim)
            self._tell(Answer(job.claim, "unreachable", detail="Redis unreachable"))

    def _set_connected(self, connected: bool, detail: str = "") -> None:
        if connected != self.connected:
            self.connected = connected
            self._tell(LinkState(connected, detail))

    # -- the reader --------------------------------------------------------------------------

    def _read(self) -> None:
        client = None
        last_id = "0-0"
        delay = RETRY_FIRST
        while not self._stopping.is_set():
            try:
                if client is None:
                    client = self._connect(self.config, reader=True)
                    last_id = self._resume_from(client, last_id)
                    self._read_revocations(client)  # before any grant of the stream
                    delay = RETRY_FIRST
                answer = client.xread({self.stream: last_id}, count=500, block=READ_BLOCK_MS)
                for _stream, entries in answer or ():
                    for entry_id, fields in entries:
                        last_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                        self._seen(last_id)
                        try:
                            self._receive(last_id, fields)
                        except Exception as exc:  # noqa: BLE001 - one odd entry never stalls the stream
                            self._tell(Rejected(f"stream entry {last_id}", _reason(exc)))
            except Exception:  # noqa: BLE001 - the writer reports the state; we just retry
                _close(client)
                client = None
                self._stopping.wait(delay)
                delay = min(RETRY_MAX, delay * 2)
        _close(client)

    def _resume_from(self, client, last_id: str) -> str:
        """Where to read on (re)connection: after the last entry seen, unless the stream now
        ends before it (Redis restarted without its data, and its clock is behind ours): then
        from its start. Entries of a restarted Redis carry later ids, so they are read anyway.
        The first time, what is there already is what this member catches up on (joined_at)."""
        newest = client.xrevrange(self.stream, count=1)
        if not newest:
            if self.joined_at is None:
                self.joined_at = "0-0"
            return "0-0"
        newest_id = newest[0][0].decode() if isinstance(newest[0][0], bytes) else str(newest[0][0])
        if self.joined_at is None:
            self.joined_at = newest_id
        return last_id if _order(newest_id) >= _order(last_id) else "0-0"

    def _read_revocations(self, client) -> None:
        for field_name, raw in client.hgetall(self.revoked_key).items():
            try:
                revoke = self.signer.verify(raw)
            except Forged as exc:
                self._tell(Rejected(f"revocation entry {field_name!r:.60}", str(exc)))
                continue
            if isinstance(revoke, Revoke) and revoke.pos is not None:
                self._tell(Received(revoke))

    def _receive(self, entry_id: str, fields: dict) -> None:
        raw = fields.get(b"e", fields.get("e"))
        if raw is None:
            self._tell(Rejected(f"stream entry {entry_id}", "not an nfknock entry"))
            return
        try:
            entry = self.signer.verify(raw)
        except Forged as exc:
            self._tell(Rejected(f"stream entry {entry_id}", str(exc)))
            return
        if entry.instance == self.instance:
            return  # our own
        self._follow_numbers(entry_id, fields, entry)
        if isinstance(entry, Grant) and entry.until <= self.wall():
            return  # over already (catching up on old entries)
        if isinstance(entry, Used) and entry.expires + CLAIM_MARGIN <= self.wall():
            return
        if isinstance(entry, Revoke) and entry.pos is None:
            entry = replace(entry, pos=entry_id)  # its place: where Redis put it
        self.received += 1
        self._tell(Received(entry, entry_id))

    def _follow_numbers(self, entry_id: str, fields: dict, entry: Entry) -> None:
        """An instance's entries are numbered 1, 2, 3...: a number skipped since the last one read
        means entries were deleted from the stream (XDEL, by someone with the Redis password: a
        used entry and its claim deleted together would let a used packet open here), or trimmed
        before this member read them. Either way this member cannot tell what it missed: an
        alarm (member.py answers claims per --cluster-offline for a while). Entries without a
        number (an older member) are not followed."""
        raw = fields.get(b"n", fields.get("n"))
        if raw is None:
            return
        try:
            instance, seq = self.signer.verify_seq(raw, entry.id)
            if instance != entry.instance:
                raise Forged("the sequence number of another member")
        except Forged as exc:
            self._tell(Rejected(f"stream entry {entry_id}", str(exc)))
            return
        last = self._seqs.pop(instance, None)  # re-inserted: the most recent instances stay
        if last is not None and seq > last + 1:
            missing = seq - last - 1
            self._tell(
                Alarm(
                    "stream gap",
                    f"{missing} stream entr{'y' if missing == 1 else 'ies'} of member {entry.member} "
                    f"(numbers {last + 1}..{seq - 1}) missing before {entry_id}: deleted by someone with the Redis "
                    "password (XDEL), or trimmed before this member read them; a used packet whose claim was "
                    "deleted too could open here",
                )
            )
        self._seqs[instance] = max(seq, last or 0)
        while len(self._seqs) > MAX_SEQUENCES:
            del self._seqs[next(iter(self._seqs))]


class _Failed(Exception):
    def __init__(self, left: list, reason: str):
        super().__init__(reason)
        self.left = left
        self.reason = reason


_order = stream_order


def _is_revoke(job: _Job) -> bool:
    return isinstance(job, _Publish) and isinstance(job.entry, Revoke)


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _close(client) -> None:
    if client is not None:
        try:
            client.close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass


def _redis_client(config: FleetConfig, reader: bool = False):
    """A client that fails fast (no retries of its own: the threads retry)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        config.url,
        password=config.password,
        socket_timeout=READ_BLOCK_MS / 1000 + SOCKET_TIMEOUT if reader else SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
        client_name=f"nfknock-{config.member}"[:60].replace(" ", "_"),
    )
