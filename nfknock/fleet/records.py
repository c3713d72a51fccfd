"""What members write into Redis, signed with the fleet key. Pure: no I/O, time passed in.

Redis is a meeting point, not an authority: whoever can write to it (another tenant of a shared
instance, a leaked Redis password) must not be able to open a door. So every entry a member acts
on carries an HMAC-SHA256 tag made with the fleet key (a secret only members hold) over the
fleet's name and the entry's bytes; an entry whose tag does not verify is `Forged` and opens
nothing. Binding the fleet name in means an entry copied from one fleet to another sharing the
key does not verify either.

Names of replay claims are themselves keyed (HMAC of the record): Redis never learns which SPA
packet was used, and nobody without the key can pre-claim a packet to have it refused.

Every grant and revocation has a random id: a member applies an id once (ReplayCache, until the
entry would be useless anyway), so a genuine entry re-added by someone with write access to
Redis cannot re-open a grant that was revoked since.

Order (one clock, Redis's): a revocation's place is the id Redis gave its stream entry (`pos`,
from Redis's clock, the same for every member); a grant carries `base`, the newest stream id its
member had seen (read or written) when it granted. A revocation covers every matching grant
whose base is before its place: whatever its issuer knew, it did not know of the revocation, so
the grant was issued before it, however late it reached Redis (a member cut off publishes late).
Members' wall clocks order nothing.

Used records (issue 23): a member that claims a replay record also appends a `Used` entry to the
stream, naming the claim (its keyed names, never the record) and when it is over; every member
keeps those (used.py), so a packet used on A is refused on B even when someone with the Redis
password deleted A's claim. Each entry a member appends carries a signed sequence number of its
instance (`sign_seq`): a reader that sees one skip knows entries were deleted from the stream.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes, hmac

from ..errors import UsageError

# What members write and expect of each other. 1: before issue 23 (grants without `base`,
# revocations without `pos`: such a member applies a grant whatever was revoked after it was
# issued, and does not keep revocations); 2: ordered revocations, kept, confirmed; 3: used
# records on the stream, numbered entries (an older member ignores both: a packet used elsewhere
# whose claim was deleted opens there). Members say theirs in their presence entry; a member
# seeing an older one raises an alarm naming it.
PROTOCOL = 3
MIN_KEY_BYTES = 32
MAX_GRANT_SECONDS = 86400.0
MAX_ENTRY_BYTES = 2048


class FleetKeyError(UsageError):
    """The fleet key file does not hold a usable key."""

    exit_code = 2


class Forged(Exception):
    """An entry that does not verify with the fleet key, or is not one of ours."""


MAX_KEYS = 4


def parse_keys(text: str, where: str) -> tuple[bytes, ...]:
    """The fleet key file: one key per line, the first signs, the others are still accepted (a
    rotation in progress: docs/fleet.md "Rotating the fleet key"); # starts a comment line."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not lines:
        raise FleetKeyError(f"{where}: no key in it (make one with: openssl rand -base64 48)")
    if len(lines) > MAX_KEYS:
        raise FleetKeyError(f"{where}: {len(lines)} keys; at most {MAX_KEYS} (the current one first)")
    keys = tuple(parse_key(line, f"{where}, key {n}") for n, line in enumerate(lines, 1))
    if len(set(keys)) != len(keys):
        raise FleetKeyError(f"{where}: the same key twice")
    return keys


def parse_key(text: str, where: str) -> bytes:
    """The fleet key: base64 of at least MIN_KEY_BYTES random bytes (`openssl rand -base64 48`)."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise FleetKeyError(f"{where}: the fleet key must be base64 (make one with: openssl rand -base64 48)") from None
    if len(key) < MIN_KEY_BYTES:
        raise FleetKeyError(f"{where}: the fleet key is {len(key)} bytes; it needs at least {MIN_KEY_BYTES}")
    return key


@dataclass(frozen=True)
class Grant:
    """`src` may open new connections through `door` until `until` (wall-clock seconds);
    `ports`: the (proto, port)s an SPA packet asked for, None for all the door protects; `key`:
    whose SPA key opened it; `dests`: the (proto, address, port)s behind this host an SPA
    NAT-access packet asked for (docs/gateway.md), empty for all other grants. A member of an
    older version ignores `dests` and applies `ports` alone: an SPA NAT grant's ports are
    empty, so there it opens nothing (never more than asked for)."""

    id: str
    member: str
    instance: str
    src: str
    door: str
    until: float
    ports: frozenset[tuple[str, int]] | None = None
    key: str | None = None
    base: str = "0-0"  # the newest stream id the issuer had seen: it knew of no revocation after
    dests: frozenset[tuple[str, str, int]] = frozenset()


@dataclass(frozen=True)
class Revoke:
    """End the grants of `src` (on `door`, or on every door when None), issued at `at`; or,
    with `key` (and no `src`), every grant that SPA key opened, from any address."""

    id: str
    member: str
    instance: str
    src: str | None
    door: str | None
    at: float
    key: str | None = None
    pos: str | None = None  # its stream id (Redis's clock); None while not yet placed

    def covers(self, grant: Grant) -> bool:
        """Whether this revocation ends `grant`: the same source (or key) and door, and the grant
        issued before the revocation's place (unplaced: before anything, it is still to come)."""
        if self.door is not None and self.door != grant.door:
            return False
        if self.src is not None and self.src != grant.src:
            return False
        if self.key is not None and self.key != grant.key:
            return False
        return self.pos is None or stream_order(grant.base) < stream_order(self.pos)


@dataclass(frozen=True)
class Used:
    """Replay records used on `member` until `expires` (its wall clock): `names` are the claim
    names (claim_names, one per key of the issuer), never the record itself."""

    id: str
    member: str
    instance: str
    names: tuple[str, ...]
    expires: float


Entry = Grant | Revoke | Used


def stream_order(entry_id: str) -> tuple[int, int]:
    """A Redis stream id (milliseconds-sequence, Redis's clock) as something to compare."""
    milliseconds, _, sequence = entry_id.partition("-")
    return int(milliseconds), int(sequence or 0)


def check_stream_id(value: Any) -> str:
    text = _text(value)
    stream_order(text)  # ValueError if it is not one
    return text


@dataclass(frozen=True)
class Claim:
    """Who used a replay record first (the value of a claim key)."""

    member: str
    instance: str
    expires: float


class Signer:
    """Signs and verifies entries of one fleet with its key."""

    def __init__(self, key: bytes, fleet: str, older: tuple[bytes, ...] = ()):
        self._key = key
        self._keys = (key, *older)  # the first signs; all verify (a rotation in progress)
        self.fleet = fleet

    def _tag(self, purpose: str, body: bytes, key: bytes | None = None) -> bytes:
        mac = hmac.HMAC(key or self._key, hashes.SHA256())
        mac.update(f"nfknock-fleet:{self.fleet}:{purpose}\0".encode() + body)
        return mac.finalize()

    def _seal(self, purpose: str, payload: dict[str, Any], key: bytes | None = None) -> bytes:
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        return base64.b64encode(self._tag(purpose, body, key)) + b"." + body

    def _open(self, purpose: str, raw: bytes | str) -> dict[str, Any]:
        if isinstance(raw, str):
            raw = raw.encode()
        if len(raw) > MAX_ENTRY_BYTES:
            raise Forged(f"{len(raw)} bytes, more than an entry ever has")
        tag64, dot, body = raw.partition(b".")
        if not dot:
            raise Forged("not a signed entry")
        try:
            tag = base64.b64decode(tag64, validate=True)
        except (binascii.Error, ValueError):
            raise Forged("not a signed entry") from None
        for key in self._keys:
            mac = hmac.HMAC(key, hashes.SHA256())
            mac.update(f"nfknock-fleet:{self.fleet}:{purpose}\0".encode() + body)
            try:
                mac.verify(tag)
                break
            except Exception:  # cryptography's InvalidSignature
                continue
        else:
            raise Forged("its tag does not verify with the fleet key")
        try:
            payload = json.loads(body)
        except ValueError:
            raise Forged("signed but not JSON") from None
        if not isinstance(payload, dict):
            raise Forged("signed but not an object")
        return payload

    # -- grants and revocations (the stream) -------------------------------------------------

    def sign(self, entry: Entry) -> bytes:
        if isinstance(entry, Used):
            used = {"kind": "used", "names": list(entry.names), "expires": entry.expires}
            return self._seal("entry", {"id": entry.id, "member": entry.member, "instance": entry.instance} | used)
        payload: dict[str, Any] = {"id": entry.id, "member": entry.member, "instance": entry.instance, "src": entry.src}
        if isinstance(entry, Grant):
            payload |= {
                "kind": "grant",
                "door": entry.door,
                "until": entry.until,
                "ports": None if entry.ports is None else sorted([proto, port] for proto, port in entry.ports),
                "key": entry.key,
                "base": entry.base,
            }
            if entry.dests:  # absent otherwise: a grant without destinations signs as it always did
                payload["dests"] = sorted([proto, host, port] for proto, host, port in entry.dests)
        else:
            payload |= {"kind": "revoke", "door": entry.door, "at": entry.at, "key": entry.key}
            if entry.pos is not None:
                payload["pos"] = entry.pos
        return self._seal("entry", payload)

    def verify(self, raw: bytes | str) -> Entry:
        """The entry, or Forged saying why it is not one."""
        payload = self._open("entry", raw)
        try:
            ids = (_text(payload["id"]), _text(payload["member"]), _text(payload["instance"]))
            if payload["kind"] == "used":
                return Used(*ids, self._names(payload["names"]), _number(payload["expires"]))
            src = None if payload["src"] is None else str(ipaddress.ip_address(_text(payload["src"])))
            key = None if payload.get("key") is None else _text(payload["key"])
            if payload["kind"] == "grant":
                if src is None:
                    raise ValueError("a grant names its source")
                ports = _ports(payload["ports"])
                until = _number(payload["until"])
                base = check_stream_id(payload.get("base", "0-0"))
                dests = _dests(payload.get("dests"))
                return Grant(*ids, src, _text(payload["door"]), until, ports, key, base, dests)
            if payload["kind"] == "revoke":
                if (src is None) == (key is None):
                    raise ValueError("a revocation names a source or a key")
                door = payload["door"]
                pos = None if payload.get("pos") is None else check_stream_id(payload["pos"])
                return Revoke(*ids, src, None if door is None else _text(door), _number(payload["at"]), key, pos)
        except (KeyError, TypeError, ValueError) as exc:
            raise Forged(f"signed but malformed ({type(exc).__name__}: {exc})") from None
        raise Forged(f"signed but of unknown kind {payload.get('kind')!r}")

    def _names(self, value: Any) -> tuple[str, ...]:
        """A used entry's claim names: this fleet's, as claim_name writes them, a few."""
        prefix = f"{self.fleet}:used:"
        if not isinstance(value, list) or not 0 < len(value) <= MAX_KEYS:
            raise ValueError("names must be a short list")
        for name in value:
            tail = _text(name)[len(prefix) :]
            if not name.startswith(prefix) or len(tail) != 40 or any(c not in "0123456789abcdef" for c in tail):
                raise ValueError(f"not a claim name of this fleet: {name!r:.60}")
        return tuple(value)

    # -- the sequence numbers of a member's stream entries ---------------------------------

    def sign_seq(self, instance: str, seq: int, entry_id: str) -> bytes:
        """Entry `entry_id` is the `seq`th that `instance` appended (bound to the entry: a number
        cannot be moved to another one)."""
        return self._seal("seq", {"instance": instance, "seq": seq, "entry": entry_id})

    def verify_seq(self, raw: bytes | str, entry_id: str) -> tuple[str, int]:
        """(instance, seq) of the entry `entry_id`, or Forged."""
        payload = self._open("seq", raw)
        try:
            if payload["entry"] != entry_id:
                raise Forged("the sequence number of another entry")
            seq = payload["seq"]
            if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
                raise ValueError(f"bad sequence number {seq!r:.40}")
            return _text(payload["instance"]), seq
        except (KeyError, TypeError, ValueError) as exc:
            raise Forged(f"signed but malformed ({type(exc).__name__}: {exc})") from None

    # -- replay claims ---------------------------------------------------------------------

    def claim_name(self, record: str, index: int = 0) -> str:
        """The Redis key under which `record` (a replay-cache key) is claimed (with key `index`)."""
        return f"{self.fleet}:used:{self._tag('used', record.encode(), self._keys[index]).hex()[:40]}"

    def claim_names(self, record: str) -> list[str]:
        """One name per key: during a rotation a record is claimed (and checked) under each, so
        members with the old key first and members with the new key first see the same claims."""
        return [self.claim_name(record, index) for index in range(len(self._keys))]

    def sign_claim(self, record: str, claim: Claim, index: int = 0) -> bytes:
        payload = {"record": self.claim_name(record, index), "member": claim.member, "instance": claim.instance}
        return self._seal("claim", payload | {"expires": claim.expires}, self._keys[index])

    def verify_claim(self, record: str, raw: bytes | str, index: int = 0) -> Claim:
        payload = self._open("claim", raw)
        try:
            if payload["record"] != self.claim_name(record, index):
                raise Forged("a claim of another record")
            return Claim(_text(payload["member"]), _text(payload["instance"]), _number(payload["expires"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise Forged(f"signed but malformed ({type(exc).__name__}: {exc})") from None

    # -- the epoch marker (has Redis lost data?) -------------------------------------------

    def sign_epoch(self, epoch: str, at: float) -> bytes:
        """`at`: when it was set, by Redis's clock (TIME)."""
        return self._seal("epoch", {"epoch": epoch, "at": at})

    def verify_epoch(self, raw: bytes | str) -> tuple[str, float]:
        try:
            payload = self._open("epoch", raw)
            return _text(payload["epoch"]), _number(payload["at"])
        except (KeyError, TypeError, ValueError) as exc:
            raise Forged(f"signed but malformed ({type(exc).__name__}: {exc})") from None

    # -- confirmations of a revocation -----------------------------------------------------

    def sign_ack(self, revoke_id: str, member: str, instance: str) -> bytes:
        return self._seal("ack", {"revoke": revoke_id, "member": member, "instance": instance})

    def verify_ack(self, revoke_id: str, raw: bytes | str) -> tuple[str, str]:
        """(member, instance) that applied revocation `revoke_id`."""
        payload = self._open("ack", raw)
        try:
            if payload["revoke"] != revoke_id:
                raise Forged("a confirmation of another revocation")
            return _text(payload["member"]), _text(payload["instance"])
        except (KeyError, TypeError, ValueError) as exc:
            raise Forged(f"signed but malformed ({type(exc).__name__}: {exc})") from None

    # -- members (who is there) ------------------------------------------------------------

    def sign_presence(self, member: str, instance: str, seen: float, grants: int, last: int = 0) -> bytes:
        """`last`: the number of the last entry this instance appended to the stream (sign_seq),
        so that readers notice its last entries deleted too (link.py)."""
        payload = {"member": member, "instance": instance, "seen": seen, "grants": grants, "v": PROTOCOL, "last": last}
        return self._seal("presence", payload)

    def verify_presence(self, raw: bytes | str) -> tuple[str, str, float, int, int, int]:
        """(member, instance, seen, grants, protocol, last): a presence without "v" is a member
        from before PROTOCOL 2 (it says nothing of its version, and ignores base and pos);
        without "last" (before 3), 0."""
        payload = self._open("presence", raw)
        try:
            last = payload.get("last", 0)
            if isinstance(last, bool) or not isinstance(last, int) or last < 0:
                raise ValueError(f"bad last entry number {last!r:.40}")
            return (
                _text(payload["member"]),
                _text(payload["instance"]),
                _number(payload["seen"]),
                int(payload["grants"]),
                int(payload.get("v", 1)),
                last,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise Forged(f"signed but malformed ({type(exc).__name__}: {exc})") from None


def grant_seconds(grant: Grant, wall: float) -> float:
    """What is left of a grant by this member's clock (0: over), capped at a day."""
    return min(MAX_GRANT_SECONDS, max(0.0, grant.until - wall))


def _text(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 200:
        raise ValueError(f"expected a short string, got {value!r:.40}")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"expected a number, got {value!r:.40}")
    return float(value)


MAX_DESTS = 32


def _dests(value: Any) -> frozenset[tuple[str, str, int]]:
    """A grant's destinations: [proto, address, port] each, the address as the engine writes it."""
    if value is None:
        return frozenset()
    if not isinstance(value, list) or len(value) > MAX_DESTS:
        raise ValueError("dests must be a short list")
    dests = set()
    for item in value:
        proto, host, port = item
        address = ipaddress.ip_address(_text(host))
        if proto not in ("tcp", "udp") or isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"bad destination {item!r:.60}")
        dests.add((proto, str(address), port))
    return frozenset(dests)


def _ports(value: Any) -> frozenset[tuple[str, int]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise ValueError("ports must be a list")
    ports = set()
    for item in value:
        proto, port = item
        if proto not in ("tcp", "udp") or isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"bad port {item!r:.40}")
        ports.add((proto, port))
    return frozenset(ports)
