"""deploy/monitoring: the alert rules and the Grafana dashboard name metrics nfknock exports, the
rules pass promtool, and each alert fires on the series it watches (promtool test rules) as the
exporter really emits them: born at 0, for every door, SPA reason and key."""

import json
import re
import subprocess
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from nfknock.daemon.metrics import SPA_KEYED, SPA_UNKEYED, Snapshot, door_series, tally
from nfknock.doors.packet import Packet
from nfknock.doors.rules import KnockDoor, SpaDoor
from nfknock.doors.spa import encode, generate_keys
from nfknock.loading import load_secrets
from support.decisions import fresh_engine
from support.scrapes import expected_alert, exposition, promtool_test, samples

pytest.importorskip("prometheus_client")

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
ALERTS = MONITORING / "nfknock-alerts.yml"
DASHBOARD = MONITORING / "nfknock-dashboard.json"
WALL = 1_800_000_000.0


@pytest.fixture
def doors(monkeypatch):
    """A knock door with a close sequence and an SPA door with one key (from the environment)."""
    encryption, mac = generate_keys()
    monkeypatch.setenv("TESTSPA_KEY_BASE64", encryption)
    monkeypatch.setenv("TESTSPA_HMAC_KEY_BASE64", mac)
    spa = SpaDoor.model_validate(dict(kind="spa", name="spaSSH", keys_env="TESTSPA", protect=["22/tcp"]))
    load_secrets(spa)
    knock = KnockDoor.model_validate(
        dict(name="openSSH", sequence=[40000, 50000, 60000], close_sequence=[60000, 50000, 40000], protect=["22/tcp"])
    )
    return (knock, spa)


def fresh(doors, tallies=None, **fields) -> Snapshot:
    """A daemon's snapshot with these doors: nothing seen yet, unless `tallies`."""
    handled = {"accept": 0, "drop": 0, "pass": 0}  # as verdicts.py starts them
    return Snapshot(
        0,
        handled,
        {},
        dict(tallies or {}),
        {d.name: 0 for d in doors},
        0,
        drops=(0, 0),
        doors=door_series(doors),
        **fields,
    )


def exported_names(doors) -> set[str]:
    """Metric names in the exposition of a daemon with these doors, every optional part on."""
    snapshot = replace(
        fresh(
            doors,
            workers_up=((0, True),),
            scaffolding_restored=0,
            scaffolding_failed=0,
            reload=(True, WALL),
            worker_rss=((0, 1 << 20),),
        ),
        unparsable={"short": 1},  # its reasons are born with their first packet (no alert watches them)
    )
    return {name.split("{")[0] for name in samples(exposition(snapshot))}


def used_names(text: str) -> set[str]:
    return set(re.findall(r"\bnfknock_[a-z_]+\b", text))


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_alerts_and_dashboard_use_only_exported_metrics(doors):
    exported = exported_names(doors)
    assert {"nfknock_queue_dropped_total", "nfknock_lockouts_total", "nfknock_spa_refused_total"} <= exported
    assert used_names(ALERTS.read_text()) <= exported
    for expr in dashboard_exprs():
        assert used_names(expr) <= exported, expr


def test_every_exported_metric_is_on_the_dashboard(doors):
    shown = set().union(*(used_names(expr) for expr in dashboard_exprs()))
    assert exported_names(doors) <= shown


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
        "NfknockReloadRefused",
        "NfknockInternalErrors",
        "NfknockStateFull",
        "NfknockGrantedSetFailures",
        "NfknockScaffoldingRestored",
        "NfknockScaffoldingNotRestored",
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


def watched_counters() -> set[str]:
    return {name for name in used_names(ALERTS.read_text()) if name.endswith("_total")}


def test_every_counter_an_alert_watches_is_at_zero_before_its_first_event(doors):
    """A series born at 1 has no increase(): the alert would miss the first event."""
    found = samples(exposition(fresh(doors, scaffolding_restored=0, scaffolding_failed=0)))
    for name in watched_counters():
        values = [value for series, value in found.items() if series.startswith(name + "{")]
        assert values and set(values) == {0}, name
    for door in ("openSSH", "spaSSH"):
        assert any(f'door="{door}"' in series for series in found if series.startswith("nfknock_lockouts_total"))
    replays = [s for s in found if s.startswith("nfknock_spa_refused_total") and 'reason="replay"' in s]
    assert replays == [
        'nfknock_spa_refused_total{door="spaSSH", instance="bastion:9474", job="nfknock", key="default", '
        'reason="replay"}'
    ]


def test_a_reload_adds_the_series_of_new_doors_and_drops_those_of_removed_ones(doors):
    knock, spa = doors
    counted: Counter = Counter({("lockouts", ("spaSSH",)): 2, ("lockouts", ("openSSH",)): 1})
    after = samples(exposition(fresh((knock,), counted)))
    assert 'nfknock_lockouts_total{door="openSSH", instance="bastion:9474", job="nfknock"}' in after
    assert after['nfknock_lockouts_total{door="openSSH", instance="bastion:9474", job="nfknock"}'] == 1
    assert not [series for series in after if "spaSSH" in series]
    again = samples(exposition(fresh(doors, counted)))
    assert again['nfknock_lockouts_total{door="spaSSH", instance="bastion:9474", job="nfknock"}'] == 2


def test_the_pre_created_spa_reasons_are_every_reason_the_code_can_give():
    """The zero series cover every refusal reason the SPA code says (read from its source)."""
    import ast

    import nfknock.doors as doors_package

    said: set[str] = set()
    for path in Path(doors_package.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("SpaError", "KeyRefused", "refuse"):
                if node.args:
                    said |= {c.value for c in ast.walk(node.args[0]) if isinstance(c, ast.Constant)}
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["reason"]:
                # reason = {answer: reason, ...}.get(answer, default reason)
                for part in ast.walk(node.value):
                    if isinstance(part, ast.Dict):
                        said |= {v.value for v in part.values if isinstance(v, ast.Constant)}
                    if isinstance(part, ast.Call) and len(part.args) == 2:
                        said |= {a.value for a in part.args[1:] if isinstance(a, ast.Constant)}
    said = {reason for reason in said if isinstance(reason, str)}
    assert "replay" in said and "fleet unreachable" in said and "from the future" in said
    assert said <= set(SPA_KEYED) | set(SPA_UNKEYED)


def spa_packet(door, at: float) -> Packet:
    payload = encode(door.keyring[0].keys, "10.0.0.2", [("tcp", 22)], at)
    return Packet("10.0.0.2", "10.0.0.1", "udp", 40000, 62201, 0, payload)


@pytest.mark.needs_tools("promtool")
def test_the_first_spa_replay_fires_the_critical_alert(doors, tmp_path):
    """The engine opens the door, then refuses the same packet as a replay; the exporter's
    scrapes, one a minute, go to promtool: the critical alert fires on that first replay."""
    _, spa = doors
    engine, counted, scrapes = fresh_engine(doors), Counter(), []
    packet = spa_packet(spa, WALL)
    for minute in range(8):
        if minute == 2:
            tally(counted, engine.handle(packet, 120.0, WALL + 10).events)
        if minute == 5:
            events = engine.handle(packet, 300.0, WALL + 40).events
            assert [e.reason for e in events if type(e).__name__ == "SpaRefused"] == ["replay"]
            tally(counted, events)
        scrapes.append(exposition(fresh(doors, counted)))
    fired = expected_alert(ALERTS, "NfknockSpaReplay", {"instance": "bastion:9474", "door": "spaSSH"})
    checks = [
        {"eval_time": "4m", "alertname": "NfknockSpaReplay", "exp_alerts": []},
        {"eval_time": "6m", "alertname": "NfknockSpaReplay", "exp_alerts": [fired]},
        {"eval_time": "3m", "alertname": "NfknockSpaRefusals", "exp_alerts": []},
    ]
    result = promtool_test(ALERTS, scrapes, checks, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.needs_tools("promtool")
@pytest.mark.parametrize(
    "field, alert",
    [
        ("errors", "NfknockInternalErrors"),
        ("evicted", "NfknockStateFull"),
        ("granted_failed", "NfknockGrantedSetFailures"),
        ("granted_dropped", "NfknockGrantedSetFailures"),
        ("scaffolding_restored", "NfknockScaffoldingRestored"),
        ("scaffolding_failed", "NfknockScaffoldingNotRestored"),
    ],
)
def test_the_first_health_event_fires_its_alert(doors, tmp_path, field, alert):
    scrapes = [exposition(fresh(doors, **{"scaffolding_restored": 0, field: int(minute >= 4)})) for minute in range(7)]
    fired = expected_alert(ALERTS, alert, {"instance": "bastion:9474"})
    checks = [
        {"eval_time": "3m", "alertname": alert, "exp_alerts": []},
        {"eval_time": "5m", "alertname": alert, "exp_alerts": [fired]},
    ]
    result = promtool_test(ALERTS, scrapes, checks, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.needs_tools("promtool")
def test_a_refused_reload_fires_until_a_reload_succeeds(doors, tmp_path):
    states = [True, True, False, False, False, True]
    scrapes = [exposition(fresh(doors, reload=(ok, WALL))) for ok in states]
    fired = expected_alert(ALERTS, "NfknockReloadRefused", {"instance": "bastion:9474", "job": "nfknock"})
    checks = [
        {"eval_time": "1m", "alertname": "NfknockReloadRefused", "exp_alerts": []},
        {"eval_time": "3m", "alertname": "NfknockReloadRefused", "exp_alerts": [fired]},
        {"eval_time": "5m", "alertname": "NfknockReloadRefused", "exp_alerts": []},
    ]
    result = promtool_test(ALERTS, scrapes, checks, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_shipped_alert_tests_seed_only_series_the_exporter_emits_at_zero(doors):
    """nfknock-alerts.test.yml starts counters at 0 only where a fresh daemon emits them at 0
    (a hand-written 0 the exporter never emits hid the first-replay bug)."""
    fresh_series = samples(exposition(fresh(doors, scaffolding_restored=0, scaffolding_failed=0)))

    def shape(series: str) -> tuple[str, frozenset]:
        name, _, labels = series.partition("{")
        keys = frozenset(re.findall(r"(\w+)=", labels)) - {"job", "instance"}
        return name, keys

    emitted = {shape(series) for series, value in fresh_series.items() if value == 0}
    tests = yaml.safe_load((MONITORING / "nfknock-alerts.test.yml").read_text())["tests"]
    for case in tests:
        for row in case["input_series"]:
            if row["series"].split("{")[0].endswith("_total") and row["values"].split()[0] == "0":
                assert shape(row["series"]) in emitted, row["series"]
