"""The verdict path in one process, without the kernel: CPU per verdict of `on_packet` for what a
flood brings (a stranger's knock at a later step, a SYN to a protected port, junk) and for a
client's knock sequence. Runs against whatever checkout is first on sys.path, so the same script
measures two trees on the same machine in the same minute:

    .venv/bin/python bench/hot_path.py                          # this checkout
    .venv/bin/python bench/hot_path.py --compare /path/to/old   # and another checkout, rounds interleaved

Figures are microseconds of process CPU per packet (median of --repeat rounds; with --compare the
two trees take turns, one process per round, so that the machine's noise falls on both alike, and
the ratio new/old is printed); nothing is asserted."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def packets():
    import dpkt

    def tcp(src: str, dport: int) -> bytes:
        seg = dpkt.tcp.TCP(sport=40000, dport=dport, flags=dpkt.tcp.TH_SYN)
        ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton("10.0.0.1"), p=6, data=seg)
        ip.len = len(ip)
        return bytes(ip)

    strangers = [f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}" for i in range(1, 2001)]
    return {
        "later step, stranger": [tcp(src, 60000) for src in strangers],
        "SYN to 22, stranger": [tcp(src, 22) for src in strangers],
        "junk": [b"\x45" + bytes(30)] * len(strangers),
        "knock sequence": [tcp(src, port) for src in strangers[:500] for port in (40000, 50000, 60000)],
    }


def measure(daemon_for, queued, payloads, rounds: int) -> float:
    per_packet = []
    for _ in range(rounds):
        daemon = daemon_for()
        items = [queued(p) for p in payloads]
        start = time.process_time()
        for item in items:
            daemon.on_packet(item)
        per_packet.append((time.process_time() - start) / len(items) * 1e6)
    return statistics.median(per_packet)


def compare(old: Path, repeat: int) -> int:
    here = Path(__file__).resolve()
    trees = {"this": here.parent.parent, "old": old}
    rounds: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    for _ in range(repeat):
        for name, tree in trees.items():
            out = subprocess.run(
                [sys.executable, str(here), "--tree", str(tree), "--repeat", "3", "--json"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            for kind, figure in json.loads(out).items():
                rounds[name].setdefault(kind, []).append(figure)
    print(f"us CPU per verdict, median of {repeat} interleaved rounds: this tree {trees['this']}, old {old}")
    for kind in rounds["this"]:
        new, before = statistics.median(rounds["this"][kind]), statistics.median(rounds["old"][kind])
        print(f"  {kind:24s} this {new:6.2f}   old {before:6.2f}   this/old {new / before:5.2f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--compare", type=Path, help="another checkout to measure in turns with this one")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compare:
        return compare(args.compare, args.repeat)
    sys.path[:0] = [str(args.tree), str(args.tree / "tests")]
    from nfknock.daemon import Daemon, DaemonConfig
    from support.fakes import FakeFirewall, Queued

    build = Path(__file__).resolve().parent / "build"  # not /tmp: rules must live where only root writes
    build.mkdir(exist_ok=True)
    rules = Path(tempfile.mkdtemp(prefix="hot-path-", dir=build))
    (rules / "doors.yaml").write_text(
        "doors:\n  - {name: ssh, sequence: [40000, 50000, 60000], protect: [22/tcp], tripwire: 0}\n"
    )
    log = logging.getLogger("bench-hot-path")
    log.addHandler(logging.NullHandler())
    log.propagate = False
    clock = [1000.0]

    def daemon_for():
        return Daemon(DaemonConfig(rules), FakeFirewall(), logger=log, clock=lambda: clock[0])

    import nfknock

    try:
        figures = {name: measure(daemon_for, Queued, payloads, args.repeat) for name, payloads in packets().items()}
    finally:
        shutil.rmtree(rules)
    if args.json:
        print(json.dumps(figures))
        return 0
    print(f"tree: {Path(nfknock.__file__).parent.parent}")
    for name, figure in figures.items():
        print(f"  {name:24s} {figure:6.2f} us CPU per verdict")
    return 0


if __name__ == "__main__":
    sys.exit(main())
