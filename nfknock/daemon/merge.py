"""The workers' answers as one daemon's: `nfknock status` and the metrics read the same whether
one process or N workers judge the packets."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

from . import metrics


def merge_status(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """Workers' status answers as one daemon's: sums of counters, one row per grant."""
    merged = dict(answers[0])
    grants: dict[tuple[str, str], dict] = {}
    for answer in answers:
        for row in answer["grants"]:
            key = (row["door"], row["source"])
            if key not in grants or row["seconds_left"] > grants[key]["seconds_left"]:
                grants[key] = row
    merged["grants"] = [grants[key] for key in sorted(grants)]
    merged["locked"] = sorted(
        (row for answer in answers for row in answer["locked"]), key=lambda r: (r["door"], r["source"])
    )
    for field in ("tracked_attempts", "internal_errors", "evicted", "kernel_queue_drops"):
        merged[field] = sum(answer[field] for answer in answers)
    for field in ("packets", "unparsable"):
        total: Counter = Counter()
        for answer in answers:
            total.update(answer[field])
        merged[field] = dict(total)
    merged["workers"] = len(answers)
    if merged.get("fleet"):
        merged["fleet"] = dict(
            merged["fleet"], revokes=merge_revokes([answer.get("fleet") or {} for answer in answers])
        )
    return merged


def merge_revokes(fleets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each worker follows who confirmed the operator's revocation (one id for all workers,
    workers.py): a member confirmed in any worker's view is confirmed (its acknowledgements
    are in Redis for all to read; a worker cut off just did not read them), and missing only
    where no worker saw it confirm."""
    rows: dict[str, dict[str, Any]] = {}
    for fleet in fleets:
        for row in fleet.get("revokes", []):
            known = rows.setdefault(row["id"], {"id": row["id"], "confirmed": set(), "missing": {}})
            known["confirmed"] |= set(row["confirmed"])
            for member, ago in row["missing"].items():
                known["missing"][member] = min(ago, known["missing"].get(member, ago))
    return [
        {
            "id": row["id"],
            "confirmed": sorted(row["confirmed"]),
            "missing": {member: ago for member, ago in row["missing"].items() if member not in row["confirmed"]},
        }
        for row in rows.values()
    ]


def merge_snapshots(snapshots: list[metrics.Snapshot]) -> metrics.Snapshot:
    def total(field: str) -> dict:
        summed: Counter = Counter()
        for snapshot in snapshots:
            summed.update(getattr(snapshot, field))
        return dict(summed)

    drops = [snapshot.drops for snapshot in snapshots if snapshot.drops is not None]
    return replace(
        snapshots[0],
        handled=total("handled"),
        unparsable=total("unparsable"),
        tallies=total("tallies"),
        grants_per_door=total("grants_per_door"),
        tracked=sum(snapshot.tracked for snapshot in snapshots),
        drops=(sum(d[0] for d in drops), sum(d[1] for d in drops)) if drops else None,
        **{
            field: sum(getattr(snapshot, field) for snapshot in snapshots)
            for field in ("errors", "evicted", "granted_failed", "granted_dropped")
        },
    )
