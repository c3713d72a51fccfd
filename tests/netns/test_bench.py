"""The benchmark harness runs end to end (a smoke run: its figures are not judged here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_smoke_run_writes_a_complete_report(kernel, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    figures, ratios = report["figures"], report["ratios"]
    for name in (
        "throughput.udp.kernel",
        "throughput.tcp.kernel",
        "throughput.udp.nfknock",
        "throughput.udp.bare",
        "throughput.tcp.nfknock",
        "throughput.tcp.bare",
        "throughput.udp.nfknock2",
        "throughput.udp.bare2",
        "verdict_cpu.udp.nfknock",
        "verdict_cpu.udp.bare",
        "knock_to_connect.nfknock",
        "knock_to_connect.knockd",
        "established.nfknock",
        "established.none",
        "connection_rate.nfknock",
        "connection_rate.none",
        "connection_rate.bare_accept",
        "flood_knock.seconds",
        "flood_knock.attempts",
        "fleet.knock_to_connect.fleet",
        "fleet.connection_rate.fleet",
        "fleet.grant_propagation.max",
        "fleet.revoke_propagation.max",
    ):
        assert figures[name]["median"] > 0, name
    assert set(ratios) - {"one_core.udp", "one_core.tcp"} == {
        "throughput.udp.kernel",
        "throughput.tcp.kernel",
        "host_cpu.udp.kernel",
        "host_cpu.tcp.kernel",
        "throughput.udp",
        "throughput.tcp",
        "throughput.udp.workers2",
        "throughput.tcp.workers2",
        "throughput.udp.scaling",
        "throughput.tcp.scaling",
        "verdict_cpu.udp",
        "verdict_cpu.tcp",
        "knock_to_connect",
        "established",
        "connection_rate",
        "connection_rate.queue",
        "fleet.cpu_per_knock",
        "fleet.cpu_per_syn",
        "later_rate.kernel",
        "later_rate.loop",
        "later_rate.loop_cpu",
    }
    if len(os.sched_getaffinity(0)) >= 2:  # one_core pins the sender and the host apart
        assert figures["one_core.tcp.kernel"]["median"] > 0 and figures["one_core.tcp.bare"]["median"] > 0
        assert {"one_core.udp", "one_core.tcp"} <= set(ratios)
    assert any(name.startswith("memory.") and name.endswith(".bytes_per_source") for name in figures)
    table = (tmp_path / "report.md").read_text()
    assert "| verdicts/s, UDP flood" in table and "knockd 0.8" in table
    assert "| first knocks decided/s, TCP flood" in table
    assert "| the same, `--workers 2`" in table and "| CPU per verdict, us (UDP" in table
    assert "| client knock+connect during a SYN flood" in table
    assert "| fleet: grant reaches the other member" in table
    assert "| flood at the third step (60000)" in table and "| flood at a tripwire port (60005)" in table
    assert "| decided/s, TCP flood at the third step" in table
    assert "door opened (stock fwknop), then connect: on the first SYN" in table
    assert "door opened (SPA packet, SYN 0.1 ms later)" in table
