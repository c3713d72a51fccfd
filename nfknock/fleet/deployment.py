"""What a Redis deployment risks for a fleet: no password, no or weak persistence, an evicting
maxmemory-policy. One judgement (`risks`, pure) for the two places that say it: the member's
start (link.py, logged once per connection) and `nfknock doctor --cluster URL`.

Why each matters (docs/fleet.md, "Check the Redis deployment"):
- No password: whoever reaches Redis can delete the fleet's entries, claims and members hash.
  Nothing they write opens a door (entries are signed with the fleet key), but deletions cost
  availability and, until members notice and re-assert, replay protection across members.
- No persistence (`save ""`, appendonly no): a Redis restart loses every claim and the stream;
  members notice (the epoch marker) and put their live claims back, but claims of members that
  are down meanwhile are gone: a packet used on such a member can open once on another.
- RDB only (Debian's default): a crash loses what was written since the last snapshot, the same
  risk for that span. AOF with `appendfsync everysec` loses about a second; `always` nothing.
- An evicting policy: claims are ordinary keys with expiries, the first that `volatile-*` and
  `allkeys-*` policies drop under memory pressure.

`read_facts` does the I/O with a redis client; nothing here ever reads or prints a password
(`CONFIG GET requirepass` is never asked: whether Redis wants one is learned by a second
connection without it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SAFE_POLICIES = ("noeviction",)
OK, WARN, ERROR = "ok", "warn", "error"


@dataclass(frozen=True)
class RedisFacts:
    """What Redis said about itself (None: it would not say, e.g. CONFIG refused by an ACL)."""

    has_password: bool  # this member (or doctor) was given --cluster-password-file
    open_without_password: bool | None  # a connection without a password may run commands
    save: str | None  # CONFIG GET save ("" = no RDB snapshots)
    appendonly: str | None  # "yes" / "no"
    appendfsync: str | None  # "always" / "everysec" / "no"
    policy: str | None  # maxmemory-policy


@dataclass(frozen=True)
class Risk:
    level: str  # OK, WARN or ERROR
    what: str  # "password", "persistence", "evicting"
    text: str


def risks(facts: RedisFacts) -> list[Risk]:
    """One line per concern, with what it risks; OK lines say what holds."""
    found = []
    if facts.open_without_password:
        found.append(
            Risk(
                ERROR,
                "password",
                "Redis answers without a password: anyone who reaches it can delete the fleet's claims and "
                "entries (nothing they write opens a door, but a deleted claim lets a used packet open once "
                "more until members put it back); set requirepass (or an ACL user) and --cluster-password-file",
            )
        )
    elif not facts.has_password:
        found.append(
            Risk(WARN, "password", "no --cluster-password-file: Redis is reached without AUTH (is it protected?)")
        )
    else:
        found.append(Risk(OK, "password", "Redis refuses connections without the password"))
    found.append(_persistence(facts))
    policy = facts.policy
    if policy is None:
        found.append(
            Risk(WARN, "evicting", "Redis did not say its maxmemory-policy (CONFIG refused): check it is noeviction")
        )
    elif policy not in SAFE_POLICIES:
        found.append(Risk(ERROR, "evicting", evicting_text(policy)))
    else:
        found.append(Risk(OK, "evicting", f"maxmemory-policy {policy}: claims are never evicted"))
    return found


def evicting_text(policy: str) -> str:
    return (
        f"Redis's maxmemory-policy is {policy}: it may evict replay claims; members notice evictions and put "
        "their claims back, but a packet may open twice in between (set maxmemory-policy noeviction)"
    )


def _persistence(facts: RedisFacts) -> Risk:
    if facts.save is None and facts.appendonly is None:
        return Risk(WARN, "persistence", "Redis did not say how it persists (CONFIG refused): check save/appendonly")
    aof = facts.appendonly == "yes"
    rdb = bool((facts.save or "").strip())
    if aof and facts.appendfsync == "always":
        return Risk(OK, "persistence", "appendonly yes, appendfsync always: a Redis crash loses no claim")
    if aof:
        return Risk(
            OK,
            "persistence",
            f"appendonly yes, appendfsync {facts.appendfsync or '?'}: a Redis crash loses about the last second "
            "of claims (members that stay up put theirs back)",
        )
    if rdb:
        return Risk(
            WARN,
            "persistence",
            f"RDB snapshots only (save {facts.save!r}), no AOF: a Redis crash loses the claims since the last "
            "snapshot; those of members down meanwhile are gone, and such a packet can open once more on "
            "another member (appendonly yes, appendfsync everysec or always)",
        )
    return Risk(
        WARN,
        "persistence",
        "no persistence (save '' and appendonly no): a Redis restart loses every claim; members that stay up "
        "put theirs back, those of members down meanwhile are gone and such a packet can open once more "
        "(appendonly yes)",
    )


def read_facts(client: Any, anonymous: Any | None, has_password: bool) -> RedisFacts:
    """Ask Redis (`client` authenticated as the member is; `anonymous`: a client without a
    password, or None when the member has none). Commands an ACL refuses leave a fact None."""

    def config(name: str) -> str | None:
        try:
            value = client.config_get(name).get(name)
        except Exception:  # noqa: BLE001 - refused (ACL, managed Redis): unknown
            return None
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    open_without: bool | None = None
    if anonymous is None:
        open_without = True if not has_password else None
    else:
        try:
            anonymous.ping()
            open_without = True
        except Exception as exc:  # noqa: BLE001 - NOAUTH / WRONGPASS / AuthenticationError
            text = f"{type(exc).__name__} {exc}".lower()
            open_without = False if ("auth" in text or "password" in text) else None
        finally:
            try:
                anonymous.close()
            except Exception:  # noqa: BLE001
                pass
    return RedisFacts(
        has_password,
        open_without,
        config("save"),
        config("appendonly"),
        config("appendfsync"),
        config("maxmemory-policy"),
    )
