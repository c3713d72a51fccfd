"""Prometheus metrics (prometheus-client), off unless --metrics-port is given, bound to localhost.

Nothing is counted per packet for Prometheus: the daemon already keeps counters (verdicts,
unparsable packets) and tallies events; a custom collector turns them into metric families at
scrape time, from a snapshot the loop takes when a scrape asks for one (the scrape runs in
prometheus-client's thread and never touches the engine).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

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
    last_good: bool = False  # running on the last good rules (lastgood.py): the rules on disk do not load


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
    )
    return of_process(daemon, snapshot)


def of_process(daemon, snapshot: Snapshot) -> Snapshot:
    """What the process that owns the rules adds: the watcher's repairs, the last good rules."""
    guard, last_good = getattr(daemon, "guard", None), getattr(daemon, "last_good", None)
    return replace(
        snapshot,
        scaffolding_restored=None if guard is None else guard.restored,
        last_good=last_good is not None and last_good.degraded is not None,
    )


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
        for (name, labels), count in snapshot.tallies.items():
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
        if snapshot.workers_up:
            up = GaugeMetricFamily(
                "nfknock_worker_up",
                "1 if the worker answers the supervisor; 0: stopped or stuck, its sources cannot knock or connect",
                labels=("worker",),
            )
            for worker, answers in snapshot.workers_up:
                up.add_metric((str(worker),), 1 if answers else 0)
            yield up


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


def serve(latest: Callable[[], Snapshot | None], port: int):
    """Start the exporter on 127.0.0.1:port (a thread of prometheus-client)."""
    from prometheus_client import start_http_server
    from prometheus_client.core import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(Collector(latest))
    return start_http_server(port, addr="127.0.0.1", registry=registry)
