"""How long nfknock's scaffolding is away when another program takes it (issue 22, item 1).

    sudo .venv/bin/python bench/self_healing.py [--trials N] [--backend legacy|nft ...]

For each backend and each everyday operation (`nft flush ruleset`, `iptables -F INPUT`,
`iptables -F NFKNOCK`, `iptables-restore` of a file saved before nfknock started), N trials
(default 20) against a running daemon in a throwaway namespace, timed from the moment the kernel
has the change to the moment the scaffolding is back, as seen from outside the daemon:

- nf_tables: the bench listens to the same netlink notifications the daemon does; the change is
  the operation's transaction (known by its pid), "closed" is when every family it touched has
  had a transaction of the daemon's (the protected ports closed again), "back" is the daemon's
  last transaction (the whole chain back).
- legacy tables announce nothing: the bench reads the tables every ~0.2 ms (with the same
  getsockopt calls the daemon uses) and times from the first read that shows the damage to the
  first that shows our chain and its jump back (one transaction: closed and back are the same
  moment); a repair no read saw counts as 0.

Prints median and max per (backend, operation) and the daemon's own figures from its log (from
its wake-up to the repair), and the idle CPU the watcher costs (legacy looks every 20 ms).
The baseline, measured in the same run, is how long the same operation leaves the ports open
without the watcher: until nfknock restarts (no trial needed: forever).
"""

from __future__ import annotations

import argparse
import re
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from nfknock.firewall.watch import (  # noqa: E402
    FAMILIES,
    NETLINK_NETFILTER,
    NFNL_SUBSYS_NFTABLES,
    NFNLGRP_NFTABLES,
    NFT_MSG_NEWGEN,
    NLMSG_HDR,
    LegacyProbe,
)
from support.sandbox import EchoService, Sandbox, cpu_seconds, entered, nfknock_argv, wait_for_line  # noqa: E402

OPERATIONS = ("nft flush ruleset", "iptables -F INPUT", "iptables -F NFKNOCK", "iptables-restore < saved")
SEED = (REPO / "rules" / "ssh.yaml").read_text()
SETTLE = 0.3  # seconds after an operation before the next one (the repair is done long before)


class NftClock:
    """NEWGEN notifications as they arrive: (time, pid, families the transaction touched)."""

    def __init__(self, namespace: str):
        with entered(namespace):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
        self.commits: list[tuple[float, int, frozenset[int]]] = []
        self._families: set[int] = set()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            if not select.select([self.sock], [], [], 0.1)[0]:
                continue
            data = self.sock.recv(1 << 20)
            now = time.perf_counter()
            offset = 0
            while offset + NLMSG_HDR.size <= len(data):
                length, kind = NLMSG_HDR.unpack_from(data, offset)[:2]
                if length < NLMSG_HDR.size:
                    break
                if kind >> 8 == NFNL_SUBSYS_NFTABLES:
                    family = FAMILIES.get(data[offset + NLMSG_HDR.size])
                    if kind & 0xFF == NFT_MSG_NEWGEN:
                        pid = _newgen_pid(data[offset + NLMSG_HDR.size + 4 : offset + length])
                        self.commits.append((now, pid, frozenset(self._families)))
                        self._families = set()
                    elif family is not None:
                        self._families.add(family)
                offset += (length + 3) & ~3

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def _newgen_pid(body: bytes) -> int:
    offset = 0
    while offset + 4 <= len(body):
        length, kind = struct.unpack_from("=HH", body, offset)
        if kind & 0x3FFF == 2 and length == 8:
            return struct.unpack(">I", body[offset + 4 : offset + 8])[0]
        offset += (length + 3) & ~3 or 4
    return -1


def nft_trial(box: Sandbox, clock: NftClock, argv: list[str], stdin: str | None) -> tuple[float, float]:
    """(closed, back) in ms after the operation's transaction."""
    start = len(clock.commits)
    process = subprocess.Popen(["ip", "netns", "exec", box.server, *argv], stdin=subprocess.PIPE, text=True)
    process.communicate(stdin)
    time.sleep(SETTLE)
    commits = clock.commits[start:]
    ops = [c for c in commits if c[1] == process.pid]
    assert ops, f"no transaction of {argv} seen"
    changed, touched = ops[0][0], ops[0][2]
    ours = [c for c in commits if c[1] != process.pid and c[0] >= changed]
    assert ours, f"nfknock did not repair after {argv}"
    closed = max(min(c[0] for c in ours if family in c[2]) for family in touched if any(family in c[2] for c in ours))
    return (closed - changed) * 1000, (ours[-1][0] - changed) * 1000


def legacy_trial(box: Sandbox, argv: list[str], stdin: str | None) -> float:
    """ms from the first read that shows the damage to the first that shows it undone."""
    with entered(box.server):
        probe = LegacyProbe()
    try:
        before = probe.view(4)
        assert before is not None and before.chain is not None
        seen: dict[str, float] = {}
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                view = probe.view(4)
                now = time.perf_counter()
                broken = view is None or view.chain != before.chain or view.jumps == 0
                if broken and "changed" not in seen:
                    seen["changed"] = now
                elif not broken and "changed" in seen:
                    seen["back"] = now
                    return
                time.sleep(0.0001)  # the daemon needs the cores too

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        subprocess.run(["ip", "netns", "exec", box.server, *argv], input=stdin, text=True, check=True)
        time.sleep(SETTLE)
        done.set()
        thread.join(2)
        view = probe.view(4)
        assert view is not None and view.chain == before.chain and view.jumps > 0, f"not repaired after {argv}"
        if "changed" not in seen:
            return 0.0  # back before a read (~0.1 ms apart) could see it gone
        return (seen["back"] - seen["changed"]) * 1000
    finally:
        probe.close()


def run_backend(backend: str, trials: int, workdir: Path) -> dict:
    results: dict[str, dict] = {}
    with Sandbox(clients_wanted=1) as box:
        service = EchoService(box.server)
        try:
            tool = f"iptables-{backend}"
            box.run(box.server, [tool, "-A", "INPUT", "-p", "udp", "--dport", "9", "-j", "ACCEPT"], check=True)
            saved = box.run(box.server, [f"iptables-{backend}-save"], check=True).stdout
            rules = workdir / f"rules-{backend}"
            rules.mkdir()
            (rules / "doors.yaml").write_text(SEED)
            log = workdir / f"nfknock-{backend}.log"
            argv = nfknock_argv(
                "run", "--rules", str(rules), "--queue-num", "7", "--firewall", backend, "--log-file", str(log),
                "--state-dir", str(workdir / f"state-{backend}"),
            )  # fmt: skip
            daemon = box.spawn(box.server, argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for_line(log, "ready:", daemon)
            idle_start, idle_cpu = time.monotonic(), cpu_seconds([daemon.pid])
            time.sleep(5)
            results["idle cpu %"] = 100 * (cpu_seconds([daemon.pid]) - idle_cpu) / (time.monotonic() - idle_start)
            clock = NftClock(box.server) if backend == "nft" else None
            try:
                for operation in OPERATIONS:
                    if operation == "nft flush ruleset" and backend == "legacy":
                        continue  # nf_tables only: legacy tables are not touched
                    if operation == "nft flush ruleset":
                        op_argv, stdin = ["nft", "flush", "ruleset"], None
                    elif operation == "iptables-restore < saved":
                        op_argv, stdin = [f"iptables-{backend}-restore"], saved
                    else:
                        op_argv, stdin = [tool, "-F", operation.split()[-1]], None
                    closed, back = [], []
                    for _ in range(trials):
                        if clock is not None:
                            c, b = nft_trial(box, clock, op_argv, stdin)
                        else:
                            c = b = legacy_trial(box, op_argv, stdin)
                            time.sleep(SETTLE)
                        closed.append(c)
                        back.append(b)
                    results[operation] = {"closed": closed, "back": back}
            finally:
                if clock is not None:
                    clock.close()
            own = [float(m) for m in re.findall(r"put back in ([0-9.]+) ms", log.read_text())]
            results["daemon's own figure (wake-up to back)"] = own
            daemon.terminate()
            daemon.wait(10)
            box.run(box.server, nfknock_argv("down", "--firewall", backend), cwd=REPO)
        finally:
            service.close()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--backend", choices=("legacy", "nft"), action="append")
    parser.add_argument(
        "--report", action="store_true", help="also put the figures into bench/results/report.json (and report.md)"
    )
    args = parser.parse_args(argv)
    figures: dict[str, dict] = {}
    print(f"self-healing: {args.trials} trials per operation; ms from the change to the scaffolding back")
    print("baseline (no watcher, before issue 22): the ports stay open until nfknock restarts")
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backend or ["legacy", "nft"]:
            results = run_backend(backend, args.trials, Path(tmp))
            print(f"\n{backend}: idle CPU of the daemon {results.pop('idle cpu %'):.2f}% of one core")
            own = results.pop("daemon's own figure (wake-up to back)")
            print(f"  {'operation':28} {'closed median':>14} {'closed max':>11} {'back median':>12} {'back max':>9}")
            for operation, measured in results.items():
                closed, back = measured["closed"], measured["back"]
                for what, values in (("closed", closed), ("back", back)):
                    figures[f"self_healing.{backend}.{operation}.{what}"] = summary(values, "ms")
                print(
                    f"  {operation:28} {statistics.median(closed):14.1f} {max(closed):11.1f} "
                    f"{statistics.median(back):12.1f} {max(back):9.1f}"
                )
            if own:
                print(f"  daemon's own figure, wake-up to back: median {statistics.median(own):.1f} max {max(own):.1f}")
    if args.report:
        into_report(figures, args.trials)
    return 0


def summary(values: list[float], unit: str) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values, "unit": unit}


def into_report(figures: dict[str, dict], trials: int) -> None:
    """Replace this bench's figures in the one report (bench/report.py), keeping every other figure."""
    import json

    sys.path[:0] = [str(REPO / "bench")]
    import run
    from report import commit_of, merge, stamp

    out = REPO / "bench" / "results"
    new = stamp(
        {
            "machine": run.machine(),
            "commit": commit_of(REPO),
            "smoke": False,
            "repeat": trials,
            "ratios": {},
            "figures": figures,
        }
    )
    kept = out / "report.json"
    run.write(out, merge(json.loads(kept.read_text()), new) if kept.exists() else new)


if __name__ == "__main__":
    sys.exit(main())
