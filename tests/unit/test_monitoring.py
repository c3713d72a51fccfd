"""deploy/monitoring: the alert rules and the Grafana dashboard name metrics nfknock exports, the
rules pass promtool, and each alert fires on the series it watches (promtool test rules)."""

import json
import re
import subprocess
from pathlib import Path

import pytest

from nfknock.daemon.metrics import TALLIED, Collector, Snapshot

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
ALERTS = MONITORING / "nfknock-alerts.yml"
DASHBOARD = MONITORING / "nfknock-dashboard.json"


def exported_names() -> set[str]:
    """Metric names in the exposition of a daemon that has seen one of everything."""
    from prometheus_client import generate_latest
    from prometheus_client.core import CollectorRegistry

    tallies = {(name, tuple("x" for _ in labels)): 1 for name, _, labels, _ in TALLIED.values()}
    snapshot = Snapshot(
        0, {"accept": 1, "drop": 2}, {"short": 1}, tallies, {"openSSH": 1}, 3, drops=(1, 2), workers_up=((0, True),)
    )
    registry = CollectorRegistry()
    registry.register(Collector(lambda: snapshot))
    text = generate_latest(registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def used_names(text: str) -> set[str]:
    return set(re.findall(r"\bnfknock_[a-z_]+\b", text))


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_alerts_and_dashboard_use_only_exported_metrics():
    exported = exported_names()
    assert {"nfknock_queue_dropped_total", "nfknock_lockouts_total", "nfknock_spa_refused_total"} <= exported
    assert used_names(ALERTS.read_text()) <= exported
    for expr in dashboard_exprs():
        assert used_names(expr) <= exported, expr


def test_every_exported_metric_is_on_the_dashboard():
    shown = set().union(*(used_names(expr) for expr in dashboard_exprs()))
    assert exported_names() <= shown


def test_the_alerts_cover_down_drops_lockouts_and_spa():
    import yaml

    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    assert {rule["alert"] for rule in rules} >= {
        "NfknockDown",
        "NfknockQueueDrops",
        "NfknockLockouts",
        "NfknockSpaRefusals",
        "NfknockSpaReplay",
        "NfknockWorkerStuck",
    }


@pytest.mark.needs_tools("promtool")
def test_promtool_checks_the_rules_and_their_unit_tests():
    for argv in (["check", "rules", ALERTS.name], ["test", "rules", "nfknock-alerts.test.yml"]):
        result = subprocess.run(["promtool", *argv], cwd=MONITORING, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.needs_tools("promtool")
def test_promtool_parses_every_dashboard_query(tmp_path):
    import yaml

    # Grafana's variables, as Grafana would substitute them; each query becomes a recording rule.
    exprs = [e.replace("$__rate_interval", "5m").replace("$instance", ".*") for e in dashboard_exprs()]
    rules = [{"record": f"nfknock:dashboard_query_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
