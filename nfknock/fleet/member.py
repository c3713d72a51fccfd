"""A fleet member, as the daemon's loop sees it: what to tell the fleet after the engine decided,
what the fleet said since the last turn, and the fleet's part of `nfknock status`.

Everything here runs in the loop's thread and never waits: Redis is the link's business
(link.py). Remote grants and revocations reach the engine through the same entry points as the
control socket's `grant` and `revoke`; they are not published again (only events of this
member's own engine are), so nothing echoes round the fleet.

Grants travel with their expiry in wall-clock time (members' monotonic clocks mean nothing to
each other); a member's clock that is a few seconds off makes a remote grant a few seconds
longer or shorter there, nothing else.

A revocation is never undone (records.py says how they are ordered): every revocation this member
issues or reads is kept (revocations.py, durably under --state-dir) until what it covers is over,
and a grant from the fleet is applied only if none of them covers it and its SPA key is still on
the door here. A key that leaves a door at a reload is published as a revocation of that key.

A used packet opens at most once in the fleet: besides its claim in Redis, every member keeps the
used entries other members append to the stream (used.py, durably) and refuses a packet found
there before it asks Redis, so a claim deleted by hand reopens nothing. When the stream shows that
entries were deleted (a skipped number, link.py), this member cannot tell what it missed: for
as long as a replay record lives, claims follow --cluster-offline (refuse: refused).
"""

from __future__ import annotations

import logging
import queue
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..doors.events import ClaimNeeded, DoorClosed, DoorOpened, Event, GrantsRevoked, Recorded
from ..doors.replay import ReplayCache
from ..doors.rules import RotatingDoor, SpaDoor
from .link import (
    CLAIM_MARGIN,
    Alarm,
    Answer,
    Confirmed,
    FleetConfig,
    Link,
    LinkState,
    Placed,
    Received,
    Rejected,
    Settled,
)
from .records import MAX_GRANT_SECONDS, Entry, Grant, Revoke, Signer, Used, grant_seconds, stream_order
from .revocations import SUBDIR, Revocations
from .used import SUBDIR as USED_SUBDIR
from .used import UsedElsewhere

MAX_APPLIED = 65536  # ids of entries applied, remembered until they are useless
REJECTED_LOGGED = 10  # the first unauthenticated entries are logged one by one, then every 100th
OFFLINE_POLICIES = ("accept", "refuse")


class FleetMember:
    def __init__(
        self,
        config: FleetConfig,
        engine,
        log: logging.Logger,
        wake: Callable[[], None],
        connect: Callable[..., Any] | None = None,
        wall: Callable[[], float] = time.time,
        state_dir: Path | None = None,
    ):
        self.config = config
        self.engine = engine
        self.log = log
        self.member = config.member or socket.gethostname()
        self.instance = secrets.token_hex(6)
        self.signer = Signer(config.key, config.name, config.older_keys)
        link_config = config if config.member else _named(config, self.member)
        self.link = Link(link_config, self.signer, self.instance, wake, log, connect, wall)
        self.applied = ReplayCache(MAX_APPLIED)
        self.revocations = Revocations(self.signer, log, None if state_dir is None else Path(state_dir) / SUBDIR)
        self.link.revocations = lambda: list(self.revocations.entries.values())
        self.used = UsedElsewhere(self.signer, log, None if state_dir is None else Path(state_dir) / USED_SUBDIR)
        self._doubt_until = 0.0  # wall: entries were deleted from the stream; claims follow the offline policy
        self._next_sweep = 0.0
        self.alarms: dict[str, str] = {}  # what -> the last thing said about it (status)
        self.confirmations: dict[str, dict[str, str]] = {}  # our recent revocations: id -> {instance: member}
        self.origins: dict[tuple[str, str], str] = {}  # (source, door) -> member, for grants from the fleet
        self.rejected = 0
        self.claims_refused = 0
        self.since = wall()
        self.detail = "connecting"
        self._unknown_doors: set[str] = set()
        self._next_count = 0.0
        # Grants that were in the stream before this member joined wait for Settled: someone may
        # have deleted the revocation that covers them (stream entry and second copy) moments
        # before, and the members keeping it put the copy back within REASSERT (link.py).
        self._catching_up: list[Grant] = []
        self._settled = False  # Settled handled (not the link's flag: messages before it come first)

    def start(self) -> None:
        self.log.info(
            "fleet %s: member %s, Redis at %s, SPA when Redis cannot be asked: %s",
            self.config.name,
            self.member,
            self.config.where,
            self.config.offline,
        )
        wall = self.link.wall()
        if self.revocations.load(wall):
            self.log.info("fleet: %d revocation(s) kept from before apply", len(self.revocations))
        if self.used.load(wall):
            self.log.info("fleet: %d record(s) used on other members kept from before", len(self.used))
        for revoke in list(self.revocations.entries.values()):
            self.applied.record(revoke.id, revoke.at + MAX_GRANT_SECONDS)
            if revoke.pos is None:  # issued, never placed in the stream: the others still need it
                self.link.publish(revoke, revoke.at + MAX_GRANT_SECONDS)
        # What this member used before (its replay cache on disk): put back if Redis lost it.
        self.link.hold_records(self.engine.replays.snapshot())
        self.link.start()

    def stop(self) -> None:
        self.link.stop()
        self.revocations.flush()
        self.used.flush()

    # -- after the engine decided -----------------------------------------------------------

    def on_events(self, events: Sequence[Event], now: float, wall: float) -> list[Event]:
        """Tell the fleet what this member's engine did; returns events to consume in turn
        (a claim answered at once because Redis is unreachable)."""
        follow: list[Event] = []
        for event in events:
            if isinstance(event, Recorded):
                if not any(isinstance(other, ClaimNeeded) and other.record == event.key for other in events):
                    # An SPA packet refused after its HMAC: used fleet-wide too, or a copy replayed
                    # to another member would open there once the door widens or its time comes.
                    self.link.record(event.key, event.expires)
            elif isinstance(event, DoorOpened):
                self._publish_grant(event.src, event.door, now, wall)
            elif isinstance(event, DoorClosed) and event.was_open:
                self._revoke(Revoke(_id(), self.member, self.instance, event.src, event.door, wall))
            elif isinstance(event, GrantsRevoked):
                # A key that left the door (a reload): its grants end fleet-wide, and stay ended
                # for members that restart or join and read the stream again.
                self._revoke(Revoke(_id(), self.member, self.instance, None, event.door, wall, event.key))
            elif isinstance(event, ClaimNeeded):
                by = self.used.holder(self.signer.claim_names(event.record), wall)
                if by is not None:  # read from the stream: refused whatever Redis says of its claim
                    self.claims_refused += 1
                    follow += self.engine.claimed(event, "taken", now, f"used on member {by}")
                elif wall < self._doubt_until and self.config.offline == "refuse":
                    follow += self._refuse(
                        event,
                        now,
                        "entries were deleted from the fleet's stream: cannot tell whether another "
                        "member used it (--cluster-offline refuse)",
                    )
                elif self.link.connected:
                    self.link.claim(event)
                else:
                    follow += self._unreachable(event, now)
        return follow

    def on_control(self, request: dict[str, Any], answer: dict[str, Any], now: float, wall: float) -> None:
        """An operator's revoke or grant on this member is the fleet's."""
        if "error" in answer:
            return
        if request["cmd"] == "revoke":
            address, key = request.get("address"), request.get("key")
            revoke_id = request.get("fleet_revoke_id") or _id()  # the same in every worker (workers.py)
            revoke = Revoke(revoke_id, self.member, self.instance, address, request["door"], wall, key)
            self.link.watch.add(revoke.id)
            self._revoke(revoke)
            self.confirmations[revoke.id] = {}
            while len(self.confirmations) > 16:
                self.confirmations.pop(next(iter(self.confirmations)))
            answer["fleet_revoke"] = revoke.id  # `nfknock revoke` follows who confirms it
            for source in answer.get("addresses", [address]):
                for pair in [pair for pair in self.origins if pair[0] == source]:
                    if request["door"] in (None, pair[1]):
                        del self.origins[pair]
        elif request["cmd"] == "grant":
            self._publish_grant(request["address"], request["door"], now, wall)

    def _publish_grant(self, src: str, door: str, now: float, wall: float) -> None:
        grant = self.engine.grant_of(src, door, now)
        if grant is None:
            return
        deadline, spa = grant
        until = wall + (deadline - now)
        self.origins.pop((src, door), None)
        ports, key = (None, None) if spa is None else (spa.ports, spa.key)
        dests = frozenset() if spa is None else spa.dests  # an SPA NAT grant's (docs/gateway.md)
        base = self.link.last_seen  # no revocation after this was known here: it came before them
        self._publish(Grant(_id(), self.member, self.instance, src, door, until, ports, key, base, dests), until)

    def _revoke(self, revoke: Revoke) -> None:
        """Kept (and refused to every grant it covers) before it is even published."""
        self.revocations.add(revoke)
        self._publish(revoke, revoke.at + MAX_GRANT_SECONDS)  # a grant elsewhere may last that long

    def _publish(self, entry: Grant | Revoke, expires: float) -> None:
        self.applied.record(entry.id, expires)  # ours: never applied again if it comes back
        self.link.publish(entry, expires)

    # -- each turn of the loop --------------------------------------------------------------

    def step(self, now: float, wall: float) -> tuple[list[Event], set[str]]:
        """What the fleet said since the last turn: events to consume (claims answered) and the
        sources whose grants changed (for the kernel's granted set; a claimed source is in it
        while its claim is in flight, and leaves it if the claim is lost)."""
        events: list[Event] = []
        touched: set[str] = set()
        self.applied.forget_expired(wall)
        while True:
            try:
                message = self.link.inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(message, Answer):
                events += self._answered(message, now)
                touched.add(message.claim.src)
            elif isinstance(message, Received):
                if isinstance(message.entry, Grant) and self._before_joining(message):
                    if len(self._catching_up) < MAX_APPLIED:
                        self._catching_up.append(message.entry)
                    continue
                touched |= self._apply(message.entry, now, wall)
            elif isinstance(message, Settled):
                self._settled = True
                held, self._catching_up = self._catching_up, []
                for grant in held:  # each checked against every revocation known by now
                    touched |= self._apply(grant, now, wall)
            elif isinstance(message, Rejected):
                self._rejected(message)
            elif isinstance(message, LinkState):
                self._state(message, wall)
            elif isinstance(message, Placed):
                self.revocations.placed(message.id, message.pos)
            elif isinstance(message, Confirmed):
                if message.id in self.confirmations:
                    self.confirmations[message.id] = dict(message.by)
            elif isinstance(message, Alarm) and message.cleared:
                self.alarms.pop(message.what, None)
                self.log.warning("fleet: %s", message.detail)
            elif isinstance(message, Alarm):
                self.alarms[message.what] = message.detail
                self.log.error("fleet: %s", message.detail)
                if message.what == "stream gap":
                    self._doubt(wall)
        if self._doubt_until and wall >= self._doubt_until:
            self._doubt_until = 0.0
            self.alarms.pop("stream gap", None)
            self.log.warning(
                "fleet: what was deleted from the stream can no longer open anything (its records are over)"
            )
        if wall >= self._next_sweep:
            self._next_sweep = wall + 60.0
            self.revocations.sweep(wall)
            self.used.sweep(wall)
        if wall >= self._next_count:  # for our presence entry; not every turn (it walks the grants)
            self._next_count = wall + 2.0
            self._prune(now)
            self.link.local_grants = len(self.engine.grants(now)) - len(self.origins)
        return events, touched

    def _doubt(self, wall: float) -> None:
        """Entries were deleted from the stream (a used entry among them, perhaps): until every
        record that could have been in them is over, claims follow --cluster-offline."""
        life = 0.0
        for door in self.engine.doors.values():
            if isinstance(door, SpaDoor):
                life = max(life, door.max_age)
            elif isinstance(door, RotatingDoor):
                life = max(life, 2 * door.rotate.window)
        self._doubt_until = max(self._doubt_until, wall + life + CLAIM_MARGIN)
        self.log.error(
            "fleet: for the next %.0fs SPA and rotating doors %s",
            life + CLAIM_MARGIN,
            "are refused (--cluster-offline refuse)"
            if self.config.offline == "refuse"
            else "are checked against this member's records and Redis's claims only (--cluster-offline accept)",
        )

    def _before_joining(self, message: Received) -> bool:
        """A grant read while catching up on what the stream held when this member joined."""
        joined = self.link.joined_at
        if self._settled or joined is None or not message.pos:
            return False
        return stream_order(message.pos) <= stream_order(joined)

    def _revokes(self, wall: float) -> list[dict[str, Any]]:
        """Our recent revocations: which members confirmed them, which did not (cut off, or
        stale: the door may still be open there)."""
        rows = []
        live: dict[str, set[str]] = {}  # member -> its instances seen lately (a member's workers)
        for instance, (member, _seen, _grants) in self.link.members.items():
            live.setdefault(member, set()).add(instance)
        for revoke_id, by in self.confirmations.items():
            # A member with workers is confirmed once every worker seen lately applied it: the
            # one that holds the source's grant may be the one cut off (our own workers revoked
            # it from the control request, they do not count).
            confirmed = {member for member in set(by.values()) - {self.member} if live.get(member, set()) <= set(by)}
            missing: dict[str, float] = {}
            for instance, (member, seen) in self.link.known.items():
                if member != self.member and instance not in by and member not in confirmed:
                    missing[member] = min(missing.get(member, 1e18), round(max(0.0, wall - seen), 1))
            rows.append({"id": revoke_id, "confirmed": sorted(confirmed), "missing": missing})
        return rows

    def _prune(self, now: float) -> None:
        """Forget where grants came from once they are over."""
        for key in [key for key in self.origins if self.engine.grant_of(key[0], key[1], now) is None]:
            del self.origins[key]

    def _answered(self, answer: Answer, now: float) -> list[Event]:
        claim = answer.claim
        if answer.answer == "ours":
            return self.engine.claimed(claim, "ours", now)
        if answer.answer == "taken":
            self.claims_refused += 1
            return self.engine.claimed(claim, "taken", now, answer.detail)
        if answer.answer == "skewed":  # whatever the offline policy: this is not an outage
            self.claims_refused += 1
            return self._refuse(claim, now, answer.detail)
        if answer.answer == "late":
            self.log.warning(
                "%s: %s: fleet: what this member accepted while Redis was unreachable was also used on member %s "
                "(a replay, or the client sent it to both)",
                claim.src,
                claim.door,
                answer.by,
            )
            return []
        return self._unreachable(claim, now)

    def _unreachable(self, claim: ClaimNeeded, now: float) -> list[Event]:
        if self.config.offline == "accept":
            self.link.claim(claim, late=True)  # the others learn of it once Redis is back
            return self.engine.claimed(claim, "ours", now)
        return self._refuse(
            claim, now, "Redis cannot be asked whether another member used it (--cluster-offline refuse)"
        )

    def _refuse(self, claim: ClaimNeeded, now: float, detail: str) -> list[Event]:
        events = self.engine.claimed(claim, "unreachable", now, detail)
        if not events:  # a rotating door's sequence: the engine has no refusal event for this
            self.log.warning("%s: %s: sequence not honoured: %s", claim.src, claim.door, detail)
        return events

    def _apply(self, entry: Entry, now: float, wall: float) -> set[str]:
        """Apply another member's entry; returns the sources whose grants changed here."""
        if isinstance(entry, Used):
            self.used.add(entry, wall)  # refused here from now on, whatever happens to its claim
            return set()
        if isinstance(entry, Revoke):
            self.revocations.add(entry)  # kept whatever else happens: it may come before its grant
        if entry.id in self.applied:
            return set()
        if entry.door is not None and entry.door not in self.engine.doors:
            if entry.door not in self._unknown_doors:
                self._unknown_doors.add(entry.door)
                self.log.warning(
                    "fleet: member %s %s door %r, which this member does not have (ignored; the doors of a "
                    "fleet's members should be the same)",
                    entry.member,
                    "grants on" if isinstance(entry, Grant) else "revokes on",
                    entry.door,
                )
            return set()
        if isinstance(entry, Revoke):
            self.applied.record(entry.id, entry.at + MAX_GRANT_SECONDS)
            self.link.ack(entry.id)  # its issuer names who confirmed it (`nfknock revoke`)
            if entry.key is not None:
                pairs = self.engine.revoke_key(entry.key, entry.door)
                for pair in pairs:
                    self.origins.pop((pair[1], pair[0]), None)
                self.log.log(
                    logging.INFO if pairs else logging.DEBUG,
                    "key %s: revoked on fleet member %s (%s)",
                    entry.key,
                    entry.member,
                    ", ".join(f"{src} on {name}" for name, src in pairs) or "no grant here",
                )
                return {src for _, src in pairs}
            assert entry.src is not None  # records.verify: a revocation names a source or a key
            revoked = self.engine.revoke(entry.src, entry.door)
            for name in revoked:
                self.origins.pop((entry.src, name), None)
            # Quiet when there was nothing to revoke here: a member catching up reads old ones too.
            self.log.log(
                logging.INFO if revoked else logging.DEBUG,
                "%s: revoked on fleet member %s (%s)",
                entry.src,
                entry.member,
                ", ".join(revoked) or "no grant here",
            )
            return {entry.src} if revoked else set()
        self.applied.record(entry.id, entry.until)
        door = entry.door
        if not self._may_apply(entry):
            return set()
        seconds = grant_seconds(entry, wall)
        if seconds <= 0:
            return set()
        ports, key, dests = entry.ports, entry.key, entry.dests
        held = self.engine.grant_of(entry.src, door, now)
        if held is not None:  # never narrower or shorter than what this member holds already
            held_ports = None if held[1] is None else held[1].ports
            ports = None if held_ports is None or ports is None else held_ports | ports
            held_dests = frozenset() if held[1] is None else held[1].dests
            dests = dests | held_dests
            if held[0] >= now + seconds and ports == held_ports and dests == held_dests:
                return set()
            seconds = max(seconds, held[0] - now)
            key = key or (None if held[1] is None else held[1].key)
        self.engine.grant(entry.src, door, seconds, now, ports, key, dests)
        self.origins[(entry.src, door)] = entry.member
        self.log.info(
            "%s: %s: open, granted on fleet member %s%s (%.0fs left)",
            entry.src,
            door,
            entry.member,
            f" with key {key}" if key else "",
            seconds,
        )
        return {entry.src}

    def _may_apply(self, grant: Grant) -> bool:
        revoke = self.revocations.covering(grant)
        if revoke is not None:
            self.log.info(
                "%s: %s: grant from fleet member %s not applied: revoked on member %s after it was issued",
                grant.src,
                grant.door,
                grant.member,
                revoke.member,
            )
            return False
        spa = self.engine.doors.get(grant.door)
        if grant.key is not None and isinstance(spa, SpaDoor) and grant.key not in {k.name for k in spa.keyring}:
            self.log.warning(
                "%s: %s: grant from fleet member %s not applied: key %s is not on this door (removed?)",
                grant.src,
                grant.door,
                grant.member,
                grant.key,
            )
            return False
        return True

    def _rejected(self, message: Rejected) -> None:
        self.rejected += 1
        if self.rejected <= REJECTED_LOGGED or self.rejected % 100 == 0:
            self.log.warning(
                "fleet: %s in Redis does not verify with the fleet key (%s): ignored, it opens nothing (%d so far; "
                "who else writes to this Redis?)",
                message.where,
                message.why,
                self.rejected,
            )

    def _state(self, state: LinkState, wall: float) -> None:
        self.since = wall
        self.detail = state.detail
        if state.connected:
            self.log.info("fleet: Redis at %s reachable; sharing grants and replay records", self.config.where)
        else:
            self.log.warning(
                "fleet: Redis at %s unreachable (%s): serving knocks and SPA with this member's state; SPA and "
                "rotating doors %s; reconnecting by itself",
                self.config.where,
                state.detail,
                "accepted with the local replay check only"
                if self.config.offline == "accept"
                else "refused until it is back",
            )

    # -- status ------------------------------------------------------------------------------

    def status(self, now: float, wall: float) -> dict[str, Any]:
        link = self.link
        members = [{"member": self.member, "instance": self.instance, "seen_ago": 0.0, "self": True}]
        for instance, (member, seen, _grants) in sorted(link.members.items(), key=lambda item: item[1][0]):
            if instance != self.instance:
                members.append(
                    {"member": member, "instance": instance, "seen_ago": round(max(0.0, wall - seen), 1), "self": False}
                )
        shared = []
        for (src, door), member in sorted(self.origins.items()):
            grant = self.engine.grant_of(src, door, now)
            if grant is not None:
                shared.append({"source": src, "door": door, "from": member, "seconds_left": round(grant[0] - now, 1)})
        return {
            "name": self.config.name,
            "redis": self.config.where,
            "reachable": link.connected,
            "since": round(wall - self.since, 1),
            "detail": "" if link.connected else self.detail,
            "offline_policy": self.config.offline,
            "members": members,
            "shared_grants": shared,
            "published": link.published,
            "received": link.received,
            "backlog": link.backlog,
            "dropped": link.dropped,
            "rejected": self.rejected,
            "revocations": len(self.revocations),
            "redis_policy": link.policy,
            "clock_skew": round(link.skew, 1),
            "reasserted": link.reasserted,
            "alarms": dict(self.alarms),
            "revokes": self._revokes(wall),
            "claims_refused": self.claims_refused,
            "used_elsewhere": len(self.used),
        }


def _id() -> str:
    return secrets.token_hex(8)


def _named(config: FleetConfig, member: str) -> FleetConfig:
    from dataclasses import replace

    return replace(config, member=member)
