"""`nfknock status` as a person reads it: a summary line, then tables of doors, of sources
(granted or locked out) and of packet counters. `--json` prints the daemon's answer instead, for
tools; this module only ever renders that same answer, so the two cannot disagree.

A key missing from the answer (a daemon of another version) shows as `-`, never as a crash.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Left-aligned columns two spaces apart; numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in rows) and bool(rows) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True)]
        lines.append("  ".join(parts).rstrip())
    return lines


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def render_status(answer: dict[str, Any]) -> list[str]:
    doors = answer.get("doors", [])
    grants = answer.get("grants", [])
    locked = answer.get("locked", [])
    granted_per_door = Counter(g.get("door") for g in grants)
    locked_per_door = Counter(entry.get("door") for entry in locked)
    lines = [
        f"nfknock on queue {answer.get('queue', '-')}{_workers(answer)} (firewall {answer.get('firewall', '-')}): "
        f"{len(doors)} door(s), {len(grants)} grant(s), {len(locked)} lockout(s), "
        f"{answer.get('tracked_attempts', '-')} knock attempt(s) in progress",
        *_stuck_workers(answer),
        *_scaffolding(answer),
        *_degraded(answer),
        "",
    ]
    lines += table(
        ("DOOR", "KIND", "PROTECTS", "GRANTS", "LOCKED OUT"),
        [
            (d.get("name"), d.get("kind"), _protects(d), granted_per_door[d.get("name")],
             locked_per_door[d.get("name")])
            for d in doors
        ],
    )  # fmt: skip
    lines.append("")
    sources = [("granted", g) for g in grants] + [("locked out", entry) for entry in locked]
    if sources and any(row.get("key") for _, row in sources):  # SPA grants name the person's key
        lines += table(
            ("SOURCE", "DOOR", "STATE", "SECONDS LEFT", "KEY", "GRANTED FOR"),
            [
                (row.get("source"), row.get("door"), state, row.get("seconds_left"), row.get("key"),
                 row.get("granted_for"))
                for state, row in sources
            ],
        )  # fmt: skip
    elif sources:
        lines += table(
            ("SOURCE", "DOOR", "STATE", "SECONDS LEFT"),
            [(row.get("source"), row.get("door"), state, row.get("seconds_left")) for state, row in sources],
        )
    else:
        lines.append("no source holds a grant or is locked out")
    lines.append("")
    packets = answer.get("packets", {})
    unparsable = answer.get("unparsable", {})
    lines += table(
        ("ACCEPTED", "DROPPED", "PASSED BACK", "UNPARSABLE", "KERNEL DROPS", "EVICTED", "INTERNAL ERRORS"),
        [
            (
                packets.get("accept", 0),
                packets.get("drop", 0),
                packets.get("pass", 0),
                sum(unparsable.values()) if isinstance(unparsable, dict) else unparsable,
                answer.get("kernel_queue_drops"),
                answer.get("evicted"),
                answer.get("internal_errors"),
            )
        ],
    )
    return lines


def _workers(answer: dict) -> str:
    """ ", 2 workers on queues 3-6": each worker binds a queue pair of its own (workers.py)."""
    workers, first = answer.get("workers", 1), answer.get("queue")
    if workers == 1 or not isinstance(first, int) or not isinstance(workers, int):
        return ""
    return f", {workers} workers on queues {first}-{first + 2 * workers - 1}"


def _scaffolding(answer: dict) -> list[str]:
    """A line when another program removed nfknock's rules and the daemon put them back."""
    watch = answer.get("scaffolding")
    if not isinstance(watch, dict) or not (watch.get("restored") or watch.get("failed")):
        return []
    line = f"rules put back {watch.get('restored', 0)} time(s) after another program changed them"
    if watch.get("failed"):
        line = f"WARNING: {line}; {watch['failed']} repair(s) failed (see the log)"
    return [f"{line}; last: {watch.get('last') or '-'}"]


def _stuck_workers(answer: dict) -> list[str]:
    """One line per worker that does not answer the supervisor (workers.py): its shard is closed."""
    lines = []
    for row in answer.get("stuck_workers") or []:
        queues = row.get("queues") or ["-", "-"]
        lines.append(
            f"WARNING: worker {row.get('worker')} (pid {row.get('pid')}, queues {queues[0]}-{queues[-1]}) has not "
            f"answered for {_cell(row.get('silent_for'))}s ({row.get('state', '-')}): sources whose address ends "
            f"in byte {row.get('sources', '-')} cannot knock or connect (closed)"
        )
    return lines


def _degraded(answer: dict[str, Any]) -> list[str]:
    """The line an admin must not miss: the rules on disk do not load (lastgood.py)."""
    degraded = answer.get("degraded")
    if not isinstance(degraded, dict):
        return []
    saved = degraded.get("saved")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(saved)) if isinstance(saved, (int, float)) else "-"
    return [
        f"DEGRADED: running on the last good rules (kept {when}): {degraded.get('rules', '-')} does not load: "
        f"{degraded.get('reason', '-')}",
        "  fix the rules (nfknock check), then: systemctl reload nfknock",
    ]


def _protects(door: dict) -> str:
    """Ports of this host, then destinations behind it (gateway doors: `forward` routed,
    `publish` a port of this host DNAT'd to one)."""
    parts = list(door.get("protect", []))
    parts += [f"fwd {dest}" for dest in door.get("forward", [])]
    parts += [f"pub {entry}" for entry in door.get("publish", [])]
    return " ".join(parts)
