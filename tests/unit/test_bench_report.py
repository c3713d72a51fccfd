"""The benchmark report is one generated file, and every document quotes it verbatim.

A figure typed by hand goes stale the day the code changes; these tests fail when the README (or
docs/performance.md) holds anything but what bench/results/report.json renders to.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUOTING = [REPO / "README.md", REPO / "docs" / "performance.md"]


def load(name: str):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(REPO / "bench"))


@pytest.fixture(scope="module")
def run():
    return load("run")


@pytest.fixture(scope="module")
def report_mod():
    return load("report")


def committed(run) -> dict:
    report = json.loads((REPO / "bench" / "results" / "report.json").read_text())
    report["ratios"] = {}
    run.add_ratios(report)
    return report


def test_report_md_is_the_rendering_of_report_json(run):
    assert (REPO / "bench" / "results" / "report.md").read_text() == run.render(committed(run))


@pytest.mark.parametrize("document", QUOTING, ids=lambda p: p.name)
def test_documents_quote_the_committed_report_verbatim(run, report_mod, document):
    assert report_mod.block_of(document.read_text()) == run.render(committed(run)), (
        f"{document.name}: the figures differ from bench/results/report.md: run `bench/run.py --readme`"
    )


def one_run(report_mod, date: str, figures: dict[str, list[float]]) -> dict:
    return report_mod.stamp(
        {
            "machine": {"cpu": "cpu", "cpus": 2, "kernel": "k", "python": "3", "date": date},
            "commit": date,
            "smoke": False,
            "repeat": 2,
            "ratios": {},
            "figures": {
                n: {"median": v[0], "min": min(v), "max": max(v), "runs": v, "unit": "x"} for n, v in figures.items()
            },
        }
    )


def test_a_run_replaces_what_it_measured_and_keeps_the_rest(report_mod):
    old = one_run(report_mod, "2026-12-01", {"a": [1.0, 1.0], "b": [2.0, 2.0]})
    new = one_run(report_mod, "2026-12-03", {"b": [3.0, 3.0]})
    merged = report_mod.merge(old, new)
    assert merged["figures"]["a"]["runs"] == [1.0, 1.0]
    assert merged["figures"]["a"]["measured"]["date"] == "2026-12-01"
    assert merged["figures"]["b"]["runs"] == [3.0, 3.0]
    assert merged["figures"]["b"]["measured"]["date"] == "2026-12-03"
    assert "2026-12-01 to 2026-12-03" in report_mod.provenance(merged)


def test_no_ratio_between_figures_of_different_runs(run, report_mod):
    old = one_run(report_mod, "2026-12-01", {"established.none": [10.0, 10.0], "established.nfknock": [9.0, 9.0]})
    new = one_run(report_mod, "2026-12-03", {"established.nfknock": [5.0, 5.0]})
    together = report_mod.merge(old, old)
    run.add_ratios(together)
    assert together["ratios"]["established"]["median"] == pytest.approx(0.9)
    mixed = report_mod.merge(old, new)
    run.add_ratios(mixed)
    assert "established" not in mixed["ratios"]


def test_a_baseline_measured_as_zero_gives_no_ratio_and_still_renders(run, report_mod):
    # CPU time comes in clock ticks: a short run of cheap SYNs can measure 0 us on the single host.
    report = one_run(report_mod, "2026-12-03", {"fleet.cpu_per_syn.fleet": [100.0], "fleet.cpu_per_syn.single": [0.0]})
    report["ratios"] = {}
    run.add_ratios(report)
    assert "fleet.cpu_per_syn" not in report["ratios"]
    full = committed(run)
    single = full["figures"]["fleet.cpu_per_syn.single"]
    single["runs"] = [0.0] * len(single["runs"])
    full["ratios"] = {}
    run.add_ratios(full)
    assert "| fleet: CPU per SYN of a granted client, us |" in run.render(full)
    assert "— (baseline 0)" in run.render(full)


def test_the_block_is_replaced_whole(report_mod):
    text = f"intro\n{report_mod.BEGIN}\nold figures\n{report_mod.END}\nafter\n"
    replaced = report_mod.with_block(text, "new table\n")
    assert report_mod.block_of(replaced) == "new table\n"
    assert replaced.startswith("intro\n") and replaced.endswith("after\n") and "old figures" not in replaced
    with pytest.raises(ValueError):
        report_mod.with_block("no markers", "x")


def test_figures_of_an_old_report_keep_their_own_date(report_mod):
    old = one_run(report_mod, "2026-11-26", {"a": [1.0, 1.0]})
    for figure in old["figures"].values():
        del figure["measured"]  # written before figures carried their context
    merged = report_mod.merge(old, one_run(report_mod, "2026-12-03", {"b": [2.0, 2.0]}))
    assert merged["figures"]["a"]["measured"]["date"] == "2026-11-26"
    assert "2026-11-26 to 2026-12-03" in report_mod.provenance(merged)
