"""Alert tests on what the exporter really emits: scrapes (exposition text, one a minute) become
promtool's input series, exactly as Prometheus would have stored them (a series missing from a
scrape is '_', not a made-up 0), and `promtool test rules` checks the alerts against them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

LABELS = {"job": "nfknock", "instance": "bastion:9474"}


def exposition(snapshot) -> str:
    """What a scrape of a daemon with this snapshot returns (the exporter's own collector)."""
    from prometheus_client import generate_latest
    from prometheus_client.core import CollectorRegistry

    from nfknock.daemon.metrics import Collector

    registry = CollectorRegistry()
    registry.register(Collector(lambda: snapshot))
    return generate_latest(registry).decode()


def samples(text: str) -> dict[str, float]:
    """Series (name{labels}, with the scrape's job and instance) -> value, from exposition text."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = {**LABELS, **sample.labels}
            inner = ", ".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            found[f"{sample.name}{{{inner}}}"] = sample.value
    return found


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def input_series(scrapes: list[str]) -> list[dict]:
    """promtool's input_series for one scrape a minute."""
    taken = [samples(text) for text in scrapes]
    names = sorted(set().union(*taken))
    return [
        {"series": name, "values": " ".join(_number(scrape[name]) if name in scrape else "_" for scrape in taken)}
        for name in names
    ]


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def expected_alert(rules: Path, alert: str, labels: dict[str, str]) -> dict:
    """The alert `alert` as it fires with `labels` (its own labels added, annotations rendered;
    only `{{ $labels.NAME }}` templates are supported)."""
    rule = next(
        r for group in yaml.safe_load(rules.read_text())["groups"] for r in group["rules"] if r.get("alert") == alert
    )

    def render(text: str) -> str:
        return re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), text)

    return {
        "exp_labels": {**rule.get("labels", {}), **labels},
        "exp_annotations": {key: render(text) for key, text in rule.get("annotations", {}).items()},
    }


def promtool_test(rules: Path, scrapes: list[str], checks: list[dict], directory: Path) -> subprocess.CompletedProcess:
    """Run `promtool test rules` on `rules` with these scrapes (one a minute) and alert checks."""
    test = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": input_series(scrapes), "alert_rule_test": checks}],
    }
    path = directory / "scraped-alerts.test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False, width=1000))
    return subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True)
