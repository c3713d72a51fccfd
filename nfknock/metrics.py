"""Prometheus metrics (prometheus-client), off unless --metrics-port is given, bound to localhost.

Nothing is counted per packet for Prometheus: the daemon already keeps counters (verdicts,
unparsable packets) and tallies events; a custom collector turns them into metric families at
scrape time. The scrape runs in prometheus-client's thread and only copies dicts.
"""

from __future__ import annotations

from collections import Counter

from .events import (
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
    SpaRefused: ("spa_refused", "SPA packets refused", ("door", "reason"), lambda e: (e.door, e.reason)),
    ConnectionAccepted: ("connections", "New connections to protected ports", ("door", "result"),
                         lambda e: (e.door, "accepted")),
    ConnectionRefused: ("connections", "New connections to protected ports", ("door", "result"),
                        lambda e: ("", "refused")),
}


def tally(counter: Counter, events) -> None:
    for event in events:
        spec = TALLIED.get(type(event))
        if spec is not None:
            counter[(spec[0], spec[3](event))] += 1


class Collector:
    def __init__(self, daemon):
        self.daemon = daemon

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from .stats import read_queue_drops

        daemon = self.daemon
        verdicts = CounterMetricFamily("nfknock_packets", "Queued packets by verdict", labels=("verdict",))
        for verdict, count in dict(daemon.handled).items():
            verdicts.add_metric((verdict.value,), count)
        yield verdicts
        unparsable = CounterMetricFamily("nfknock_unparsable_packets", "Packets dropped unparsed", labels=("reason",))
        for reason, count in dict(daemon.unparsable).items():
            unparsable.add_metric((reason,), count)
        yield unparsable
        families = {}
        for (name, labels), count in dict(daemon.tallies).items():
            spec = next(s for s in TALLIED.values() if s[0] == name)
            family = families.get(name)
            if family is None:
                family = families[name] = CounterMetricFamily(f"nfknock_{name}", spec[1], labels=spec[2])
            family.add_metric(labels, count)
        yield from families.values()
        grants = GaugeMetricFamily("nfknock_active_grants", "Live grants", labels=("door",))
        per_door = Counter(door for door, _, _ in daemon.engine.grants(daemon.clock()))
        for door in daemon.engine.doors:
            grants.add_metric((door,), per_door.get(door, 0))
        yield grants
        yield GaugeMetricFamily("nfknock_tracked_attempts", "Knock attempts in progress", value=daemon.engine.tracked)
        drops = read_queue_drops(daemon.queue_num)
        if drops is not None:
            dropped = CounterMetricFamily("nfknock_queue_dropped", "Packets the kernel dropped before nfknock saw "
                                          "them", labels=("cause",))
            dropped.add_metric(("queue_full",), drops.queue_full)
            dropped.add_metric(("socket_full",), drops.socket_full)
            yield dropped


def serve(daemon, port: int):
    """Start the exporter on 127.0.0.1:port (a thread of prometheus-client)."""
    from prometheus_client import start_http_server
    from prometheus_client.core import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(Collector(daemon))
    return start_http_server(port, addr="127.0.0.1", registry=registry)
