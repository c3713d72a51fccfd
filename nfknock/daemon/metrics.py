"""Prometheus metrics (prometheus-client), off unless --metrics-port (localhost) or
--metrics-listen ADDR:PORT is given.

Nothing is counted per packet for Prometheus: the daemon already keeps counters (verdicts,
unparsable packets) and tallies events; a custom collector turns them into metric families at
scrape time, from a snapshot the loop takes when a scrape asks for one (the scrape runs in
prometheus-client's thread and never touches the engine).

Every labelled counter an alert watches exists at 0 from the first scrape, for every door (and
SPA reason and key) of the rules in force: a series born at 1 has no increase() in Prometheus,
so the first SPA replay would never fire the alert. After a reload, new doors and keys get
their series and those of removed ones go (`zero_series`).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import NamedTuple

from ..doors.events import (
    ConnectionAccepted,
    ConnectionRefused,
    DoorClosed,
    DoorOpened,
    KnockAdvanced,
    LockedOut,
    SpaRefused,
)

# event type -> (metric name, help, label names, labels of an event)
TALLIED = {
    KnockAdvanced: ("knock_stages", "Knock steps matched", ("door", "sequence"), lambda e: (e.door, e.sequence.value)),
    DoorOpened: ("doors_opened", "Doors opened (OPEN SESAME)", ("door",), lambda e: (e.door,)),
    DoorClosed: ("doors_closed", "Doors closed by a close sequence", ("door",), lambda e: (e.door,)),
    LockedOut: ("lockouts", "Sources locked out", ("door",), lambda e: (e.door,)),
    SpaRefused: (
        "spa_refused",
        "SPA packets refused; key: the key whose HMAC the packet carries",
        ("door", "reason", "key"),
        lambda e: (e.door, e.reason, e.key or ""),
    ),
    ConnectionAccepted: (
        "connections",
        "New connections to protected ports",
        ("door", "result"),
        lambda e: (e.door, "accepted"),
    ),
    ConnectionRefused: (
        "connections",
        "New connections to protected ports",
        ("door", "result"),
        lambda e: ("", "refused"),
    ),
}


# Also counted for a DoorOpened that names its key (SPA): who opens the door, by person.
SPA_OPENED = ("spa_opened", "SPA doors opened, by the key (person) that opened them", ("door", "key"), None)
# Also counted for a ConnectionAccepted to a destination behind this host (gateway doors).
FORWARDED = (
    "forwarded",
    "New connections forwarded to destinations behind this host, by door and destination",
    ("door", "destination"),
    None,
)
SPECS = {spec[0]: spec for spec in (*TALLIED.values(), SPA_OPENED, FORWARDED)}


# SPA refusal reasons (doors/spa.py, doors/spa_access.py, doors/engine.py), pre-created at 0:
# those said before a key is known (the key label is empty), those said once the HMAC named a key.
SPA_UNKEYED = ("malformed", "bad hmac", "gpg", "no clock", "config")
SPA_KEYED = (
    "replay",
    "too old",
    "from the future",
    "key expired",
    "source not allowed",
    "username mismatch",
    "source mismatch",
    "port not allowed",
    "destination not allowed",
    "bad key",
    "malformed",
    "refused type",
    "replay record not written",
    "key removed",
    "fleet unreachable",
)


class DoorSeries(NamedTuple):
    """What of a door decides its series: its name, kind, SPA key names, whether it closes."""

    name: str
    kind: str
    keys: tuple[str, ...] = ()
    closes: bool = False


def door_series(doors: Iterable) -> tuple[DoorSeries, ...]:
    """The series-deciding part of the doors in force (picklable: workers send it)."""
    return tuple(
        DoorSeries(
            door.name,
            door.kind,
            tuple(key.name for key in getattr(door, "keyring", ())),
            bool(getattr(door, "close_sequence", None)),
        )
        for door in doors
    )


@functools.lru_cache(maxsize=4)  # the same doors scrape after scrape, until a reload
def zero_series(doors: tuple[DoorSeries, ...]) -> dict[tuple[str, tuple[str, ...]], int]:
    """Every tallied series these doors can have, at 0 (shared: copy before changing it)."""
    zeros: dict[tuple[str, tuple[str, ...]], int] = {}
    for door in doors:
        name = door.name
        for family in ("doors_opened", "lockouts"):
            zeros[(family, (name,))] = 0
        zeros[("connections", (name, "accepted"))] = 0
        zeros[("connections", ("", "refused"))] = 0
        if door.kind == "spa":
            for reason in SPA_UNKEYED:
                zeros[("spa_refused", (name, reason, ""))] = 0
            for key in door.keys:
                zeros[("spa_opened", (name, key))] = 0
                for reason in SPA_KEYED:
                    zeros[("spa_refused", (name, reason, key))] = 0
        else:
            zeros[("knock_stages", (name, "open"))] = 0
            if door.closes:
                zeros[("knock_stages", (name, "close"))] = 0
                zeros[("doors_closed", (name,))] = 0
    return zeros


def series(snapshot: Snapshot) -> dict[tuple[str, tuple[str, ...]], int]:
    """The tallied series a scrape shows: the doors' zeros, overlaid with what was counted, less
    the series of doors that left at a reload (the first label of every tally is the door; ""
    is a connection no door took)."""
    if snapshot.doors is None:  # not known (a snapshot made by hand): what was counted
        return dict(snapshot.tallies)
    names = {door.name for door in snapshot.doors} | {""}
    shown = dict(zero_series(snapshot.doors))
    for (name, labels), count in snapshot.tallies.items():
        if labels[0] in names:
            shown[(name, labels)] = count
    return shown


def tally(counter: Counter, events) -> None:
    for event in events:
        kind = type(event)
        spec = TALLIED.get(kind)
        if spec is not None:
            counter[(spec[0], spec[3](event))] += 1
            if kind is DoorOpened and event.key is not None:
                counter[("spa_opened", (event.door, event.key))] += 1
            elif kind is ConnectionAccepted and event.forwarded:
                counter[("forwarded", (event.door, event.port))] += 1


@dataclass(frozen=True)
class Snapshot:
    """What a scrape reports, copied by the daemon's loop: the exporter's thread never iterates
    the engine's live tables (they change under it)."""

    queue_num: int
    handled: dict[str, int]
    unparsable: dict[str, int]
    tallies: dict[tuple[str, tuple[str, ...]], int]
    grants_per_door: dict[str, int]
    tracked: int
    fleet: dict | None = None  # the fleet's part of status, in fleet mode
    drops: tuple[int, int] | None = None  # (queue full, socket full) of the main queue(s)
    workers_up: tuple[tuple[int, bool], ...] = ()  # with workers: (worker, answers the supervisor)
    scaffolding_restored: int | None = None  # repairs by the scaffolding watcher (guard.py)
    scaffolding_failed: int | None = None  # repairs that failed (retried; ports may be open meanwhile)
    last_good: bool = False  # running on the last good rules (lastgood.py): the rules on disk do not load
    doors: tuple[DoorSeries, ...] | None = None  # the doors in force: their series exist at 0
    errors: int = 0  # packets dropped after an internal error
    evicted: int = 0  # state entries evicted because --max-sources was reached
    granted_failed: int = 0  # granted-set updates the kernel refused
    granted_dropped: int = 0  # granted-set updates lost because too many were waiting
    reload: tuple[bool, float] | None = None  # (last reload succeeded, wall time of the last success)
    worker_rss: tuple[tuple[int, int], ...] = ()  # with workers: (worker, resident bytes)


def take(daemon, now: float) -> Snapshot:
    """A snapshot of the daemon's counters (from the loop)."""
    from .stats import read_queue_drops

    per_door = Counter(door for door, _, _ in daemon.engine.grants(now))
    drops = read_queue_drops(daemon.config.queues[0])
    snapshot = Snapshot(
        queue_num=daemon.config.queue_num,
        handled={verdict.value: count for verdict, count in daemon.handled.items()},
        unparsable=dict(daemon.unparsable),
        tallies=dict(daemon.tallies),
        grants_per_door={door: per_door.get(door, 0) for door in daemon.engine.doors},
        tracked=daemon.engine.tracked,
        fleet=None if daemon.fleet is None else daemon.fleet.status(now, daemon.wall_clock()),
        drops=None if drops is None else (drops.queue_full, drops.socket_full),
        doors=door_series(daemon.ruleset.doors),
        errors=daemon.errors,
        evicted=daemon.engine.evicted,
        granted_failed=daemon.granted.failed,
        granted_dropped=daemon.granted.dropped,
    )
    return of_process(daemon, snapshot)


def of_process(daemon, snapshot: Snapshot) -> Snapshot:
    """What the process that owns the rules adds: the watcher's repairs, the last good rules,
    the last reload."""
    guard, last_good = getattr(daemon, "guard", None), getattr(daemon, "last_good", None)
    reloader = getattr(daemon, "reloader", None)
    return replace(
        snapshot,
        scaffolding_restored=None if guard is None else guard.restored,
        scaffolding_failed=None if guard is None else guard.failed,
        last_good=last_good is not None and last_good.degraded is not None,
        reload=None if reloader is None else (reloader.last_ok, reloader.last_success),
    )


def resident_bytes(pid: int, proc: str = "/proc") -> int | None:
    """A process's resident memory (statm's second field, in pages), or None if it is gone."""
    import os

    try:
        with open(f"{proc}/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Collector:
    def __init__(self, latest: Callable[[], Snapshot | None]):
        self.latest = latest

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snapshot = self.latest()
        if snapshot is None:
            return
        verdicts = CounterMetricFamily("nfknock_packets", "Queued packets by verdict", labels=("verdict",))
        for verdict, count in snapshot.handled.items():
            verdicts.add_metric((verdict,), count)
        yield verdicts
        unparsable = CounterMetricFamily("nfknock_unparsable_packets", "Packets dropped unparsed", labels=("reason",))
        for reason, count in snapshot.unparsable.items():
            unparsable.add_metric((reason,), count)
        yield unparsable
        families: dict[str, CounterMetricFamily] = {}
        for (name, labels), count in sorted(series(snapshot).items()):
            spec = SPECS[name]
            family = families.get(name)
            if family is None:
                family = families[name] = CounterMetricFamily(f"nfknock_{name}", spec[1], labels=spec[2])
            family.add_metric(labels, count)
        yield from families.values()
        grants = GaugeMetricFamily("nfknock_active_grants", "Live grants", labels=("door",))
        for door, count in snapshot.grants_per_door.items():
            grants.add_metric((door,), count)
        yield grants
        yield GaugeMetricFamily("nfknock_tracked_attempts", "Knock attempts in progress", value=snapshot.tracked)
        yield GaugeMetricFamily(
            "nfknock_running_on_last_good_rules",
            "1 while the daemon runs on its last good rules because the rules on disk do not load",
            value=int(snapshot.last_good),
        )
        yield from health_metrics(snapshot)
        if snapshot.fleet is not None:
            yield from fleet_metrics(snapshot.fleet)
        if snapshot.drops is not None:
            dropped = CounterMetricFamily(
                "nfknock_queue_dropped", "Packets the kernel dropped before nfknock saw them", labels=("cause",)
            )
            dropped.add_metric(("queue_full",), snapshot.drops[0])
            dropped.add_metric(("socket_full",), snapshot.drops[1])
            yield dropped
        if snapshot.scaffolding_restored is not None:
            yield CounterMetricFamily(
                "nfknock_scaffolding_restored",
                "Times another program removed or changed nfknock's rules and the daemon put them back",
                value=snapshot.scaffolding_restored,
            )
        if snapshot.scaffolding_failed is not None:
            yield CounterMetricFamily(
                "nfknock_scaffolding_restore_failures",
                "Times nfknock's rules were removed or changed and could not be put back (retried; the "
                "protected ports may be open meanwhile)",
                value=snapshot.scaffolding_failed,
            )
        if snapshot.workers_up:
            up = GaugeMetricFamily(
                "nfknock_worker_up",
                "1 if the worker answers the supervisor; 0: stopped or stuck, its sources cannot knock or connect",
                labels=("worker",),
            )
            for worker, answers in snapshot.workers_up:
                up.add_metric((str(worker),), 1 if answers else 0)
            yield up


def health_metrics(snapshot: Snapshot):
    """What `nfknock status` says about the daemon's own health, and its version."""
    import platform

    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from .. import __version__

    info = GaugeMetricFamily("nfknock_build_info", "1, labelled with nfknock's version", labels=("version", "python"))
    info.add_metric((__version__, platform.python_version()), 1)
    yield info
    for name, help_text, value in (
        (
            "internal_errors",
            "Packets dropped after an internal error (a bug: the log has the traceback)",
            snapshot.errors,
        ),
        ("evicted", "Oldest knock attempts or grants evicted because --max-sources was reached", snapshot.evicted),
        (
            "granted_set_failures",
            "Granted-set updates the kernel refused (the source's SYNs take the main queue; still judged)",
            snapshot.granted_failed,
        ),
        (
            "granted_set_dropped",
            "Granted-set updates lost because too many were waiting (as a failure: still judged)",
            snapshot.granted_dropped,
        ),
    ):
        yield CounterMetricFamily(f"nfknock_{name}", help_text, value=value)
    if snapshot.reload is not None:
        ok, when = snapshot.reload
        yield GaugeMetricFamily(
            "nfknock_last_reload_successful",
            "1 if the last reload (or the start) took the rules on disk; 0: refused, the rules before it stay",
            value=int(ok),
        )
        yield GaugeMetricFamily(
            "nfknock_last_reload_success_timestamp_seconds",
            "When the rules in force were taken (start or reload), Unix time",
            value=when,
        )
    if snapshot.worker_rss:
        rss = GaugeMetricFamily(
            "nfknock_worker_resident_memory_bytes",
            "Resident memory of each worker (the supervisor's is process_resident_memory_bytes)",
            labels=("worker",),
        )
        for worker, size in snapshot.worker_rss:
            rss.add_metric((str(worker),), size)
        yield rss


def fleet_metrics(fleet: dict):
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    yield GaugeMetricFamily(
        "nfknock_fleet_redis_up", "1 if this member reaches the fleet's Redis", value=fleet["reachable"]
    )
    yield GaugeMetricFamily(
        "nfknock_fleet_members",
        "Fleet members seen recently, this one included (a member's workers count once)",
        value=len({member["member"] for member in fleet["members"]}),
    )
    yield GaugeMetricFamily(
        "nfknock_fleet_shared_grants", "Live grants made on other members", value=len(fleet["shared_grants"])
    )
    yield GaugeMetricFamily("nfknock_fleet_backlog", "Fleet writes waiting for Redis", value=fleet["backlog"])
    yield GaugeMetricFamily(
        "nfknock_fleet_clock_skew_seconds", "This member's clock minus Redis's TIME", value=fleet["clock_skew"]
    )
    alarm = GaugeMetricFamily(
        "nfknock_fleet_alarm",
        "1: said since the start: Redis lost data, evicted keys, evicts; or this member's clock is off now",
        labels=("what",),
    )
    for what in fleet["alarms"]:
        alarm.add_metric((what,), 1)
    yield alarm
    yield CounterMetricFamily(
        "nfknock_fleet_reasserted", "Live claims put back after Redis lost or evicted them", value=fleet["reasserted"]
    )
    for name, help_text in (
        ("published", "Grants and revocations this member published"),
        ("received", "Grants and revocations received from other members"),
        ("dropped", "Publishes lost because the backlog was full"),
        ("rejected", "Entries in Redis that did not verify with the fleet key (ignored)"),
        ("claims_refused", "SPA packets or sequences refused because another member used them first"),
    ):
        yield CounterMetricFamily(f"nfknock_fleet_{name}", help_text, value=fleet[name])


def serve(latest: Callable[[], Snapshot | None], port: int, addr: str = "127.0.0.1"):
    """Start the exporter on addr:port (a thread of prometheus-client), with the process's own
    metrics (process_resident_memory_bytes: the check of the bounded-memory promise)."""
    from prometheus_client import ProcessCollector, start_http_server
    from prometheus_client.core import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(Collector(latest))
    ProcessCollector(registry=registry)
    return start_http_server(port, addr=addr, registry=registry)


def parse_listen(text: str) -> tuple[str, int]:
    """ADDR:PORT as exporters take it (`127.0.0.1:9474`, `[::1]:9474`, `0.0.0.0:9474`), or
    ValueError saying what is wrong. The address is an IP literal: a name could resolve to
    an address nobody meant to serve on."""
    import ipaddress

    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected ADDR:PORT (e.g. 127.0.0.1:9474 or [::1]:9474), got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host, bracketed = host[1:-1], True
    else:
        bracketed = False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} in {text!r} is not an IP address (IPv6 in brackets: [::1]:9474)") from None
    if address.version == 6 and not bracketed:
        raise ValueError(f"an IPv6 address goes in brackets ([::1]:9474), got {text!r}")
    if address.version == 4 and bracketed:
        raise ValueError(f"only IPv6 addresses go in brackets, got {text!r}")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port must be in 1..65535, got {port_text!r} in {text!r}")
    return str(address), int(port_text)


def url(addr: str, port: int) -> str:
    return f"http://[{addr}]:{port}/metrics" if ":" in addr else f"http://{addr}:{port}/metrics"
