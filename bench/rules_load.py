"""How long `load_rules` takes for many doors (validation and the checks between doors).

    .venv/bin/python bench/rules_load.py [N ...]      (default: 1000 3000 10000)

Each run writes N distinct knock doors (three steps, one protected port each; every 100th
door rotates) to a temporary file and prints the wall time of one `load_rules` call. No root
needed; nothing touches the network.
"""

from __future__ import annotations

import base64
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nfknock.loading import load_rules  # noqa: E402


def doors_yaml(count: int) -> str:
    lines = ["doors:"]
    for i in range(count):
        protect = f"{1 + i % 15000}/{'tcp' if i < 15000 else 'udp'}"
        if i % 100 == 99:
            lines.append(
                f"  - {{name: rot{i}, rotate: {{secret_env: BENCH_SECRET, ports: 60000-60999}}, protect: [{protect}]}}"
            )
        else:
            first = 20000 + (i % 13000) * 3
            proto = "tcp" if i < 13000 else "udp"
            steps = ", ".join(f"{first + k}/{proto}" for k in range(3))
            lines.append(f"  - {{name: door{i}, sequence: [{steps}], protect: [{protect}]}}")
    return "\n".join(lines) + "\n"


def main(counts: list[int]) -> None:
    os.environ["BENCH_SECRET"] = base64.b64encode(b"s" * 32).decode()
    with tempfile.TemporaryDirectory() as tmp:
        for count in counts:
            path = Path(tmp) / "doors.yaml"
            path.write_text(doors_yaml(count))
            started = time.perf_counter()
            ruleset = load_rules(path)
            elapsed = time.perf_counter() - started
            assert len(ruleset.doors) == count
            print(f"{count:>6} doors ({path.stat().st_size / 1024:.0f} KiB): load_rules {elapsed:.2f} s", flush=True)


if __name__ == "__main__":
    main([int(n) for n in sys.argv[1:]] or [1000, 3000, 10000])
