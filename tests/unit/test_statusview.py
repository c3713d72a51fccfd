"""`nfknock status`: a table for people, the daemon's own answer with --json."""

import json

from nfknock.cli import main
from nfknock.daemon import control
from nfknock.tools.statusview import render_status, table

ANSWER = {
    "queue": 3,
    "firewall": "nft",
    "doors": [
        {"name": "openSSH", "kind": "knock", "protect": ["22/tcp"]},
        {"name": "spaSSH", "kind": "spa", "protect": ["22/tcp", "443/tcp"]},
    ],
    "grants": [{"door": "openSSH", "source": "10.199.1.2", "seconds_left": 29.3}],
    "locked": [{"door": "spaSSH", "source": "fd00:251:2::9", "seconds_left": 280.0}],
    "tracked_attempts": 2,
    "packets": {"accept": 12, "drop": 40, "pass": 3},
    "unparsable": {"truncated": 1, "not-ip": 2},
    "internal_errors": 0,
    "evicted": 5,
    "kernel_queue_drops": 904,
}


def columns(lines, header):
    """The rows of the table whose header line starts with `header`, split on runs of 2+ spaces."""
    import re

    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start:]:
        if not line:
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def test_status_of_workers_names_their_queues():
    line = render_status({**ANSWER, "workers": 2})[0]
    assert line.startswith("nfknock on queue 3, 2 workers on queues 3-6 (firewall nft): 2 door(s)")


def test_status_is_a_table_of_doors_sources_and_counters():
    lines = render_status(ANSWER)
    assert lines[0] == (
        "nfknock on queue 3 (firewall nft): 2 door(s), 1 grant(s), 1 lockout(s), 2 knock attempt(s) in progress"
    )
    assert columns(lines, "DOOR") == [
        ["DOOR", "KIND", "PROTECTS", "GRANTS", "LOCKED OUT"],
        ["openSSH", "knock", "22/tcp", "1", "0"],
        ["spaSSH", "spa", "22/tcp 443/tcp", "0", "1"],
    ]
    assert columns(lines, "SOURCE") == [
        ["SOURCE", "DOOR", "STATE", "SECONDS LEFT"],
        ["10.199.1.2", "openSSH", "granted", "29.3"],
        ["fd00:251:2::9", "spaSSH", "locked out", "280.0"],
    ]
    assert columns(lines, "ACCEPTED") == [
        ["ACCEPTED", "DROPPED", "PASSED BACK", "UNPARSABLE", "KERNEL DROPS", "EVICTED", "INTERNAL ERRORS"],
        ["12", "40", "3", "3", "904", "5", "0"],
    ]


def test_columns_line_up():
    lines = table(("NAME", "N"), [("a", 1), ("longer", 100)])
    assert lines == ["NAME      N", "a         1", "longer  100"]


def test_an_idle_daemon_says_so_and_a_missing_key_is_a_dash():
    answer = {k: v for k, v in ANSWER.items() if k not in ("evicted",)} | {"grants": [], "locked": []}
    lines = render_status(answer)
    assert "no source holds a grant or is locked out" in lines
    assert columns(lines, "ACCEPTED")[1][5] == "-"


def test_cli_prints_the_table_or_the_answer_as_json(monkeypatch, capsys):
    monkeypatch.setattr(control, "call", lambda path, request: ANSWER)
    assert main(["status", "--control-socket", "/nonexistent"]) == 0
    assert capsys.readouterr().out.splitlines() == render_status(ANSWER)
    assert main(["status", "--json", "--control-socket", "/nonexistent"]) == 0
    assert json.loads(capsys.readouterr().out) == ANSWER


def test_a_worker_that_does_not_answer_is_a_warning_line_of_the_summary():
    stuck = {"worker": 1, "pid": 4242, "queues": [5, 6], "silent_for": 12.3, "state": "stopped", "sources": "128-255"}
    lines = render_status({**ANSWER, "workers": 2, "stuck_workers": [stuck]})
    assert lines[1] == (
        "WARNING: worker 1 (pid 4242, queues 5-6) has not answered for 12.3s (stopped): sources whose address "
        "ends in byte 128-255 cannot knock or connect (closed)"
    )
    assert not any("WARNING" in line for line in render_status({**ANSWER, "workers": 2, "stuck_workers": []}))
