"""nfknock benchmarks, each figure beside its baseline measured in the same run.

    sudo .venv/bin/python bench/run.py [--smoke] [--repeat N] [--out DIR]

Everything runs in throwaway network namespaces on veth links (tests/support/sandbox.py). Writes
DIR/report.json and DIR/report.md: every figure as the median and the spread (min..max) of
the repeated runs, with when and on which commit it was measured. A run replaces the figures it
measured in DIR/report.json and keeps the others (--fresh starts over); --readme copies
report.md into README.md (bench/report.py says why). --smoke runs each measurement once,
briefly: it proves the harness works, its figures mean little.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # this checkout's nfknock, and tests/support as `support`

from report import BEGIN, END, commit_of, merge, provenance, stamp, with_block  # noqa: E402
from spa_flood import render_rows as spa_flood_rows  # noqa: E402

from nfknock.doors.rotation import derive, window_of  # noqa: E402
from nfknock.firewall.plan import first_step_set  # noqa: E402
from nfknock.firewall.shards import queues  # noqa: E402
from support.sandbox import (  # noqa: E402
    Attempt,
    EchoService,
    Sandbox,
    connect,
    cpu_seconds,
    entered,
    nfknock_argv,
    process_tree,
    queue_counters,
    wait_for_line,
)

BENCH = REPO / "bench"
QUOTING = (REPO / "README.md", REPO / "docs" / "performance.md")  # the documents that quote the report
FLOOD = BENCH / "build" / "flood"
SPA_FLOOD = BENCH / "build" / "spaflood"  # bench/spa_flood.py's junk sender
QUEUE = 3
# The first-step set's sizing before issue 27 (nfknock/firewall/granted.py has today's).
OLD_FIRST_STEP_SIZE = "hashsize 65536 maxelem 262144 timeout 86400 forceadd"

RULES = """\
doors:
  - name: openSSH
    sequence: [40000, 50000, 60000]
    close_sequence: [60000, 50000, 40000]
    protect: [22/tcp]
    seq_timeout: 10m
    open_for: 10m
  - name: udpDoor
    sequence: [7000/udp, 8000/udp, 9000/udp]
    protect: [22/tcp]
    seq_timeout: 10m
    open_for: 10m
  # A twin shares openSSH's second step after another first: the kernel records both first
  # steps (a mark bit each; nfknock/first_steps.py). The kernel-path throughput flood hits 41000.
  - name: openSSHTwin
    sequence: [41000, 50000, 61000]
    protect: [22/tcp]
  # Five doors share each of the second steps 46000 and 7600/udp after different first steps:
  # one more than the kernel has mark bits for (nfknock/first_steps.py, MARK_BITS), so their
  # first knocks are the daemon's, and a knock on 45000 or 7500 is a step of one door only, as
  # in earlier runs. The loop-throughput flood hits 45000 and 7500.
  - {name: daemonTcp, sequence: [45000, 46000, 47000], protect: [22/tcp]}
  - {name: daemonTcp1, sequence: [44100, 46000, 47100], protect: [22/tcp]}
  - {name: daemonTcp2, sequence: [44200, 46000, 47200], protect: [22/tcp]}
  - {name: daemonTcp3, sequence: [44300, 46000, 47300], protect: [22/tcp]}
  - {name: daemonTcp4, sequence: [44400, 46000, 47400], protect: [22/tcp]}
  - {name: daemonUdp, sequence: [7500/udp, 7600/udp, 7700/udp], protect: [22/tcp]}
  - {name: daemonUdp1, sequence: [7300/udp, 7600/udp, 7750/udp], protect: [22/tcp]}
  - {name: daemonUdp2, sequence: [7350/udp, 7600/udp, 7800/udp], protect: [22/tcp]}
  - {name: daemonUdp3, sequence: [7400/udp, 7600/udp, 7850/udp], protect: [22/tcp]}
  - {name: daemonUdp4, sequence: [7450/udp, 7600/udp, 7900/udp], protect: [22/tcp]}
"""

KNOCKD_CONF = """\
[options]
    Interface = {iface}
    LogFile = {log}
[openSSH]
    sequence = 40000,50000,60000
    seq_timeout = 5
    tcpflags = syn
    command = /usr/sbin/iptables-legacy -I INPUT 1 -s %IP% -p tcp --dport 22 -j ACCEPT
[closeSSH]
    sequence = 60000,50000,40000
    seq_timeout = 5
    tcpflags = syn
    command = /usr/sbin/iptables-legacy -D INPUT -s %IP% -p tcp --dport 22 -j ACCEPT
"""


def log(text: str) -> None:
    print(f"[bench] {text}", flush=True)


class Figures:
    """name -> list of values; summarised as median and spread."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}
        self.units: dict[str, str] = {}

    def add(self, name: str, value: float, unit: str) -> None:
        self.values.setdefault(name, []).append(value)
        self.units[name] = unit

    def summary(self, name: str) -> dict:
        runs = self.values[name]
        return {
            "median": statistics.median(runs),
            "min": min(runs),
            "max": max(runs),
            "runs": runs,
            "unit": self.units[name],
        }


class Bench:
    def __init__(self, box: Sandbox, workdir: Path, smoke: bool, repeat: int):
        self.box, self.workdir, self.smoke, self.repeat = box, workdir, smoke, repeat
        self.alice, self.bob = box.clients[0], box.clients[1]
        self.figures = Figures()
        self.rules = workdir / "rules"
        self.rules.mkdir(mode=0o700)  # whatever the umask: rules others may write to are warned about
        (self.rules / "doors.yaml").write_text(RULES)
        self.daemon_log = workdir / "nfknock.log"
        self.iptables = "iptables"  # the flavour nfknock picks by default (--firewall auto)
        self.pinned: tuple[int, int] | None = None  # one_core: (the sender's CPU, the host's CPU)
        self.flood_sources = 1_000_000  # first_step_set: spoofed sources that fill the set
        self.fleet_baseline: Path | None = None  # fleet: a checkout whose members run as the baseline

    # -- helpers -----------------------------------------------------------------------

    def start_nfknock(self, *extra: str) -> subprocess.Popen:
        self.daemon_log.unlink(missing_ok=True)
        process = self.box.spawn(
            self.box.server,
            nfknock_argv(
                "run",
                "--rules",
                str(self.rules),
                "--queue-num",
                str(QUEUE),
                "--log-file",
                str(self.daemon_log),
                "--control-socket",
                "",
                "--state-dir",
                str(self.daemon_log.parent / "state"),
                *extra,
            ),
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for_line(self.daemon_log, "ready:", process)
        return self._pin(process)

    def start_bare(self, verdict: str, workers: int = 1) -> subprocess.Popen:
        process = self.box.spawn(
            self.box.server,
            [sys.executable, str(BENCH / "bare_queue.py"), str(self.rules), str(QUEUE), verdict, str(workers)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert process.stdout.readline().strip() == "ready"
        return self._pin(process)

    def _pin(self, process: subprocess.Popen) -> subprocess.Popen:
        """In one_core: every thread of the loop's processes on the host's CPU."""
        if self.pinned:
            for pid in process_tree(process.pid):
                subprocess.run(
                    ["taskset", "-a", "-p", "-c", str(self.pinned[1]), str(pid)], capture_output=True, check=True
                )
        return process

    def _sender(self, argv: list[str]) -> list[str]:
        """In one_core: the flood sender on a CPU of its own, as if it were another machine."""
        return ["taskset", "-c", str(self.pinned[0]), *argv] if self.pinned else argv

    def stop(self, process: subprocess.Popen) -> str:
        """Stop a daemon or a baseline loop, and take its rules away (nfknock leaves them on stop)."""
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
        self.box.run(self.box.server, nfknock_argv("down"), cwd=REPO)
        return out or ""

    def knock(self, client, *ports: str) -> None:
        subprocess.run(
            ["ip", "netns", "exec", client.namespace, "knock", client.server_address, *ports],
            check=True,
            capture_output=True,
        )

    def queue_counters(self, workers: int = 1) -> tuple[int, int, int]:
        """(ids handed out, socket overruns, queue-full drops) for the main queue of each of
        `workers` (QUEUE, QUEUE+2, ...), summed, server side.

        The kernel gives a packet an id only once it fits in the queue; a packet that then
        overruns the socket buffer is counted in user_dropped. So verdicts = ids - overruns.
        """
        total = [0, 0, 0]
        for shard in range(workers):
            counters = queue_counters(self.box.server, queues(QUEUE, shard)[0])
            if counters is None:
                raise RuntimeError(f"queue {queues(QUEUE, shard)[0]} not bound")
            for i, value in enumerate((counters.id_sequence, counters.user_dropped, counters.dropped)):
                total[i] += value
        return total[0], total[1], total[2]

    def retransmits(self, client) -> int:
        with entered(client.namespace):
            lines = Path("/proc/thread-self/net/snmp").read_text().splitlines()
        tcp = [line.split() for line in lines if line.startswith("Tcp:")]
        return int(tcp[1][tcp[0].index("RetransSegs")])

    # -- 1. verdict throughput -----------------------------------------------------------

    def throughput(self) -> None:
        """First knocks decided per second under a saturating flood from 100k sources.

        `kernel`: nfknock with its defaults, at a door whose first step the kernel records (a
        twin's: first_steps.py); decided = packets that reached the recording rule, plus any
        verdicts. `bare`: a drop-only netfilterqueue loop with every knock port queued, at the
        same port. Then the loops alone, 1 and 2 processes each, at a first step the daemon
        decides (`bare2`: two drop loops on the sharded scaffolding; `nfknock2`: --workers 2),
        with their CPU per verdict."""
        seconds = 1.5 if self.smoke else 4.0
        for run in range(self.repeat):
            for proto, kernel_port, port in (("udp", 7000, 7500), ("tcp", 41000, 45000)):
                rate, host = self._kernel_rate(proto, kernel_port, seconds)
                self.figures.add(f"throughput.{proto}.kernel", rate, "packets/s")
                self.figures.add(f"host_cpu.{proto}.kernel", host, "us")
                log(
                    f"throughput {proto} kernel-recorded first step run {run + 1}: {rate:,.0f} decided/s, "
                    f"{host:.2f} us of the machine's CPU each (sender included)"
                )
                for loop in ("bare", "nfknock", "bare2", "nfknock2"):
                    rate, cpu, host = self._verdict_rate(loop, proto, port, seconds)
                    self.figures.add(f"throughput.{proto}.{loop}", rate, "packets/s")
                    self.figures.add(f"verdict_cpu.{proto}.{loop}", cpu, "us")
                    self.figures.add(f"host_cpu.{proto}.{loop}", host, "us")
                    log(
                        f"throughput {proto} {loop} run {run + 1}: {rate:,.0f} verdicts/s, {cpu:.2f} us CPU each "
                        f"({host:.2f} us of the machine's)"
                    )

    def _kernel_rate(self, proto: str, port: int, seconds: float) -> tuple[float, float]:
        """(First knocks per second the default daemon's chain decided at `port` (the packets its
        recording rule saw, plus the queue's verdicts: there should be none), busy CPU of the
        whole machine per decided packet in microseconds, the sender's included)."""
        process = self.start_nfknock("--max-sources", "100000", "--queue-maxlen", "4096")
        flood = self._first_knock_flood(proto, port, seconds)
        time.sleep(seconds * 0.25)
        t0, recorded0, (ids0, over0, _) = time.monotonic(), self._recorded(port), self.queue_counters()
        busy0 = busy_cpu_seconds()
        time.sleep(seconds * 0.5)
        t1, recorded1, (ids1, over1, _) = time.monotonic(), self._recorded(port), self.queue_counters()
        busy1 = busy_cpu_seconds()
        flood.communicate(timeout=30)
        self.stop(process)
        verdicts = (ids1 - ids0) - (over1 - over0)
        if verdicts:
            log(f"  kernel: {verdicts} packets of the flood reached the queue")
        decided = recorded1 - recorded0 + verdicts
        return decided / (t1 - t0), (busy1 - busy0) * 1e6 / max(1, decided)

    def one_core(self) -> None:
        """The first-knock flood of `throughput` on a host with one core for everything, as a small
        VPS bastion has: receive steering (RPS) sends the server link's packets to one CPU, where the
        loop is pinned too, and the sender is pinned to another (as if it were elsewhere). The
        kernel's receive work and the loop share that core; softirq work comes first."""
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            log("one_core: skipped (needs 2 CPUs)")
            return
        seconds = 1.5 if self.smoke else 4.0
        rps = f"/sys/class/net/nk{self.box.token}2s/queues/rx-0/rps_cpus"  # bob's link, server side
        self.box.run(self.box.server, ["sh", "-c", f"echo {1 << cpus[1]:x} > {rps}"], check=True)
        self.pinned = (cpus[0], cpus[1])
        try:
            for run in range(self.repeat):
                for proto, kernel_port, port in (("udp", 7000, 7500), ("tcp", 41000, 45000)):
                    kernel, _ = self._kernel_rate(proto, kernel_port, seconds)
                    bare, _, _ = self._verdict_rate("bare", proto, port, seconds)
                    self.figures.add(f"one_core.{proto}.kernel", kernel, "packets/s")
                    self.figures.add(f"one_core.{proto}.bare", bare, "packets/s")
                    log(f"one core {proto} run {run + 1}: kernel-recorded {kernel:,.0f}/s, bare loop {bare:,.0f}/s")
        finally:
            self.pinned = None
            self.box.run(self.box.server, ["sh", "-c", f"echo 0 > {rps}"])

    def _first_knock_flood(self, proto: str, port: int, seconds: float) -> subprocess.Popen:
        """The C sender at full rate from 100k spoofed sources at `port`, from bob's namespace."""
        return self.box.spawn(
            self.bob.namespace,
            self._sender([str(FLOOD), self.bob.server_address, proto, str(port), str(seconds), "11.0.0.1", "100000"]),
            stdout=subprocess.PIPE,
            text=True,
        )

    def _recorded(self, port: int, family: int = 4) -> int:
        """Packets that reached the rule adding sources to the first-step set of `port`."""
        tool = self.iptables if family == 4 else self.iptables.replace("iptables", "ip6tables")
        listed = self.box.run(
            self.box.server, [tool, "-w", "-L", "NFKNOCK", "-v", "-x", "-n"], capture_output=True, text=True
        )
        rows = [line.split() for line in listed.stdout.splitlines() if f"dpt:{port} " in line + " "]
        counts = [
            int(row[0])
            for row in rows
            if len(row) > 2 and row[2] == "SET" and "add-set" in " ".join(row) and "-recent-" not in " ".join(row)
        ]
        if len(counts) != 1:
            raise RuntimeError(f"no rule records first steps on port {port}:\n{listed.stdout}")
        return counts[0]

    def _verdict_rate(self, loop: str, proto: str, port: int, seconds: float) -> tuple[float, float, float]:
        """(verdicts per second, CPU microseconds of the loop's processes per verdict, busy CPU
        microseconds of the whole machine per verdict)."""
        workers = 2 if loop.endswith("2") else 1
        if loop.startswith("bare"):
            process = self.start_bare("drop", workers)
        else:
            process = self.start_nfknock("--max-sources", "100000", "--queue-maxlen", "4096", "--workers", str(workers))
        pids = process_tree(process.pid)
        flood = self._first_knock_flood(proto, port, seconds)
        time.sleep(seconds * 0.25)
        t0, (ids0, over0, full0), cpu0 = time.monotonic(), self.queue_counters(workers), cpu_seconds(pids)
        busy0 = busy_cpu_seconds()
        time.sleep(seconds * 0.5)
        t1, (ids1, over1, full1), cpu1 = time.monotonic(), self.queue_counters(workers), cpu_seconds(pids)
        busy1 = busy_cpu_seconds()
        flood.communicate(timeout=30)
        self.stop(process)
        offered = (ids1 - ids0) + (full1 - full0)
        verdicts = (ids1 - ids0) - (over1 - over0)
        log(
            f"  {loop}: {offered / (t1 - t0):,.0f} packets/s reached the queue(s), "
            f"{(full1 - full0) / (t1 - t0):,.0f}/s dropped because it was full"
        )
        return (
            verdicts / (t1 - t0),
            (cpu1 - cpu0) * 1e6 / max(1, verdicts),
            (busy1 - busy0) * 1e6 / max(1, verdicts),
        )

    # -- 2. knock to connect --------------------------------------------------------------

    def knock_to_connect(self) -> None:
        trials = 5 if self.smoke else 50
        service = EchoService(self.box.server)
        try:
            for name, start, stop in (
                ("nfknock", self.start_nfknock, self.stop),
                ("knockd", self._start_knockd, self._stop_knockd),
            ):
                self._knock_to_connect(name, start, stop, trials)
        finally:
            service.close()

    def _knock_to_connect(self, name, start, stop, trials) -> None:
        handle = start()
        try:
            before = self.retransmits(self.alice)
            times = []
            for _ in range(trials):
                self.knock(self.alice, "40000", "50000", "60000")
                attempt = connect(self.alice, timeout=5)
                if not attempt.connected:
                    raise RuntimeError(f"{name}: connect after knock failed")
                times.append(attempt.seconds * 1000)
                self.knock(self.alice, "60000", "50000", "40000")
                time.sleep(0.05)
            retrans = self.retransmits(self.alice) - before
        finally:
            stop(handle)
        for value in times:
            self.figures.add(f"knock_to_connect.{name}", value, "ms")
        self.figures.add(f"knock_to_connect.{name}.syn_retransmits", retrans, "segments")
        log(
            f"knock to connect {name}: median {statistics.median(times):.2f} ms over {trials}, "
            f"{retrans} retransmitted segments"
        )

    def _start_knockd(self):
        iface = f"nk{self.box.token}1s"
        conf = self.workdir / "knockd.conf"
        knockd_log = self.workdir / "knockd.log"
        conf.write_text(KNOCKD_CONF.format(iface=iface, log=knockd_log))
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.box.server,
                "iptables-legacy",
                "-A",
                "INPUT",
                "-p",
                "tcp",
                "--dport",
                "22",
                "-j",
                "DROP",
            ],
            check=True,
        )
        process = self.box.spawn(
            self.box.server,
            ["knockd", "-c", str(conf), "-i", iface],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_line(knockd_log, "listening on", process, timeout=10)
        return process

    def _stop_knockd(self, process) -> None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:  # still busy with a flood's backlog
            process.kill()
            process.wait(10)
        subprocess.run(["ip", "netns", "exec", self.box.server, "iptables-legacy", "-F", "INPUT"], check=True)

    # -- 3. established throughput ----------------------------------------------------------

    def established(self) -> None:
        seconds = 1 if self.smoke else 5
        server = self.box.spawn(
            self.box.server, ["iperf3", "-s", "-p", "22"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(0.5)
        try:
            for run in range(self.repeat):
                for setup in ("none", "nfknock"):
                    with self.in_front_of_port_22(setup):
                        out = subprocess.run(
                            [
                                "ip",
                                "netns",
                                "exec",
                                self.alice.namespace,
                                "iperf3",
                                "-c",
                                self.alice.server_address,
                                "-p",
                                "22",
                                "-t",
                                str(seconds),
                                "-J",
                            ],
                            capture_output=True,
                            text=True,
                            timeout=60,
                        ).stdout
                    result = json.loads(out)
                    if "error" in result:
                        raise RuntimeError(f"iperf3 ({setup}): {result['error']}")
                    gbits = result["end"]["sum_received"]["bits_per_second"] / 1e9
                    self.figures.add(f"established.{setup}", gbits, "Gbit/s")
                    log(f"established {setup} run {run + 1}: {gbits:.2f} Gbit/s")
        finally:
            server.terminate()
            server.wait(10)

    @contextlib.contextmanager
    def in_front_of_port_22(self, setup: str):
        """Nothing ("none"), an accept-only queue loop ("bare_accept"), or nfknock with alice's
        grant ("nfknock") between the client and the service, for the duration of the block."""
        daemon = None
        if setup == "nfknock":
            daemon = self.start_nfknock()
            self.knock(self.alice, "40000", "50000", "60000")
        elif setup == "bare_accept":
            daemon = self.start_bare("accept")
        try:
            yield
        finally:
            if daemon:
                self.stop(daemon)

    # -- 4. new-connection rate -------------------------------------------------------------

    def connection_rate(self) -> None:
        seconds = 1 if self.smoke else 3
        server = self.box.spawn(
            self.box.server,
            [sys.executable, str(BENCH / "conn_rate.py"), "serve", "22"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout.readline().strip() == "ready"
        try:
            for run in range(self.repeat):
                for setup in ("none", "bare_accept", "nfknock"):
                    with self.in_front_of_port_22(setup):
                        out = subprocess.run(
                            [
                                "ip",
                                "netns",
                                "exec",
                                self.alice.namespace,
                                sys.executable,
                                str(BENCH / "conn_rate.py"),
                                "connect",
                                self.alice.server_address,
                                "22",
                                str(seconds),
                            ],
                            capture_output=True,
                            text=True,
                            timeout=60,
                            check=True,
                        ).stdout
                    rate = int(out) / seconds
                    self.figures.add(f"connection_rate.{setup}", rate, "connections/s")
                    log(f"new connections {setup} run {run + 1}: {rate:,.0f}/s")
        finally:
            server.terminate()
            server.wait(10)

    # -- 5. memory under spoofed sources ----------------------------------------------------

    def memory(self) -> None:
        sizes = (10_000, 100_000) if self.smoke else (100_000, 1_000_000)
        for cap in (2_000_000, 65_536):
            for size in sizes:
                # One loop: bytes per source are a loop's (each worker holds its share of the sources).
                daemon = self.start_nfknock("--max-sources", str(cap), "--queue-maxlen", "65536", "--workers", "1")
                baseline = _rss_kib(daemon.pid)
                flood = subprocess.run(
                    [
                        "ip",
                        "netns",
                        "exec",
                        self.bob.namespace,
                        str(FLOOD),
                        self.bob.server_address,
                        "tcp",
                        "45000",  # a first step the daemon decides (the kernel's sets are sized apart)
                        "120",
                        "11.0.0.1",
                        str(size),
                        "60000",
                        str(size),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                time.sleep(1.0)
                rss = _rss_kib(daemon.pid)
                self.stop(daemon)
                tracked = _tracked(self.daemon_log)
                label = "uncapped" if cap > size else f"cap{cap}"
                self.figures.add(f"memory.{label}.{size}.rss_mib", rss / 1024, "MiB")
                self.figures.add(f"memory.{label}.{size}.tracked", tracked, "sources")
                per_source = (rss - baseline) * 1024 / max(tracked, 1)
                self.figures.add(f"memory.{label}.{size}.bytes_per_source", per_source, "bytes")
                log(
                    f"memory {label} {size:,} sources sent ({flood.stdout.strip()} packets): RSS {rss / 1024:.1f} "
                    f"MiB, {tracked:,} tracked, {per_source:.0f} bytes/source"
                )

    # -- 6. a client knocking during a flood of spoofed first knocks ----------------------------

    def flood_knock(self) -> None:
        """How soon a real client gets in while a SYN flood from a million spoofed sources hits the
        same knock port (and so the same queue). Each knock the kernel drops while the queue is
        full costs the client a connect timeout; how many are lost depends on the scheduling of
        the two shared cores, so this is a figure, not a test (tests/netns/test_hostile.py
        checks what must always hold: bounded state, no grant to a spoofed source, the client
        gets in once the flood is over)."""
        seconds = 4 if self.smoke else 10
        service = EchoService(self.box.server)
        try:
            for run in range(self.repeat):
                daemon = self.start_nfknock("--max-sources", "50000", "--queue-maxlen", "65536")
                flood = self.box.spawn(
                    self.bob.namespace,
                    [str(FLOOD), self.bob.server_address, "tcp", "40000", str(seconds), "11.0.0.1", "1000000"],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                started = time.monotonic()
                try:
                    time.sleep(min(1.0, seconds / 4))  # the flood is under way, the queue filling
                    attempts, got_in, during = 0, None, False
                    while got_in is None and time.monotonic() - started < seconds + 30:
                        attempts += 1
                        self.knock(self.alice, "40000", "50000", "60000")
                        if connect(self.alice, timeout=2).connected:
                            got_in, during = time.monotonic() - started, flood.poll() is None
                    sent = flood.communicate(timeout=60)[0].strip()
                finally:
                    if flood.poll() is None:
                        flood.kill()
                        flood.wait(10)
                    self.stop(daemon)
                if got_in is None:
                    raise RuntimeError("flood_knock: the client never got in, not even after the flood")
                self.figures.add("flood_knock.seconds", got_in, "s")
                self.figures.add("flood_knock.attempts", attempts, "knocks")
                self.figures.add("flood_knock.during", 1.0 if during else 0.0, "runs")
                log(
                    f"knock during a flood run {run + 1}: in after {got_in:.1f}s and {attempts} knock(s), "
                    f"{'during' if during else 'AFTER'} the {seconds}s flood ({sent} spoofed SYNs)"
                )
        finally:
            service.close()

    # -- the flood goals (issue: hold the door under flood) ---------------------------------

    def _flood(self, port: int, seconds: float) -> subprocess.Popen:
        """The C sender at full rate from a million spoofed sources, from bob's namespace."""
        return self.box.spawn(
            self.bob.namespace,
            [str(FLOOD), self.bob.server_address, "tcp", str(port), str(seconds), "11.0.0.1", "1000000"],
            stdout=subprocess.PIPE,
            text=True,
        )

    def _connects(self, trials: int) -> tuple[int, list[float]]:
        times = []
        for _ in range(trials):
            attempt = connect(self.alice, timeout=3)
            if attempt.connected:
                times.append(attempt.seconds * 1000)
        return len(times), times

    def syn_flood(self) -> None:
        """Goal 1: a SYN flood at the protected port from a million spoofed sources; a client
        that knocked before connects 20 times. Baseline: the kernel rule knockd would have
        written for that client (`-s CLIENT --dport 22 -j ACCEPT`), under the same flood."""
        seconds, trials = (6, 10) if self.smoke else (15, 20)
        service = EchoService(self.box.server)
        try:
            for run in range(self.repeat):
                for who in ("nfknock", "kernel_rule"):
                    daemon = None
                    if who == "nfknock":
                        daemon = self.start_nfknock()
                        self.knock(self.alice, "40000", "50000", "60000")
                    else:
                        for rule in (
                            ["-I", "INPUT", "1", "-p", "tcp", "--dport", "22", "-j", "DROP"],
                            [
                                "-I",
                                "INPUT",
                                "1",
                                "-s",
                                self.alice.address,
                                "-p",
                                "tcp",
                                "--dport",
                                "22",
                                "-j",
                                "ACCEPT",
                            ],
                        ):
                            self.box.run(self.box.server, ["iptables-legacy", *rule], check=True)
                    flood = self._flood(22, seconds)
                    try:
                        time.sleep(1.0)
                        ok, times = self._connects(trials)
                        still = flood.poll() is None
                    finally:
                        flood.kill()
                        flood.wait(10)
                        if daemon is not None:
                            self.stop(daemon)
                        else:
                            self.box.run(self.box.server, ["iptables-legacy", "-F", "INPUT"], check=True)
                    self.figures.add(f"syn_flood.{who}.ok", ok, f"of {trials}")
                    self.figures.add(f"syn_flood.{who}.ms", statistics.median(times) if times else float("nan"), "ms")
                    log(
                        f"SYN flood run {run + 1}, {who}: {ok}/{trials} connects, median "
                        f"{statistics.median(times) if times else float('nan'):.2f} ms"
                        f"{'' if still else ' (the flood ended early: figure not under flood)'}"
                    )
        finally:
            service.close()

    def first_syn(self) -> None:
        """The first SYN after a door opens, under a SYN flood at 22 from a million spoofed sources
        (which keeps the kernel's limit for strangers' new connections empty). 20 trials each:
        the stock `knock` client, the stock `fwknop` client, and an SPA packet followed 0.1 ms
        later by the SYN; each trial's connect counts when it got in without TCP's 1 s SYN
        retransmit, i.e. on its first SYN. 1 and 2 workers. The grant is revoked after each trial
        (control socket), so every trial starts closed."""
        import base64

        from nfknock.daemon import control
        from nfknock.doors.spa import Keys, encode, generate_keys

        trials = 5 if self.smoke else 20
        encryption, mac = generate_keys()
        keys_file = self.workdir / "spa.keys"
        keys_file.write_text(f"KEY_BASE64: {encryption}\nHMAC_KEY_BASE64: {mac}\n")
        keys_file.chmod(0o600)
        spa_rules = self.rules / "spa.yaml"
        spa_rules.write_text(f"doors:\n  - {{name: spaSSH, kind: spa, keys_file: {keys_file}, protect: [22/tcp]}}\n")
        keys = Keys(base64.b64decode(encryption), base64.b64decode(mac), "sha256")
        alice, sock = self.alice, self.workdir / "first_syn.sock"
        fwknop = [
            "fwknop",
            *("-A", "tcp/22", "-a", alice.address, "-D", alice.server_address, "--use-hmac", "--rc-file", "/dev/null"),
            *("--key-base64-rijndael", encryption, "--key-base64-hmac", mac),
        ]
        with entered(alice.namespace):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

        def spa_then_syn() -> Attempt:
            udp.sendto(encode(keys, alice.address, [("tcp", 22)], time.time()), (alice.server_address, 62201))
            until = time.perf_counter() + 0.0001
            while time.perf_counter() < until:
                pass
            return connect(alice, timeout=3)

        openers = {
            "knock": lambda: (self.knock(alice, "40000", "50000", "60000"), connect(alice, timeout=3))[1],
            "fwknop": lambda: (self.box.run(alice.namespace, fwknop, check=True), connect(alice, timeout=3))[1],
            "spa_0.1ms": spa_then_syn,
        }
        service = EchoService(self.box.server)
        try:
            for run in range(self.repeat):
                for workers in (1, 2):
                    daemon = self.start_nfknock("--workers", str(workers), "--control-socket", str(sock))
                    flood = self._flood(22, 600)
                    try:
                        time.sleep(1.0)
                        for who, opener in openers.items():
                            first = 0
                            for _ in range(trials):
                                attempt = opener()
                                first += attempt.connected and attempt.seconds < 0.9
                                control.call(sock, {"cmd": "revoke", "address": alice.address})
                            still = flood.poll() is None
                            self.figures.add(f"first_syn.{who}.workers{workers}", first, f"of {trials}")
                            log(
                                f"first SYN under a SYN flood at 22, run {run + 1}, {who}, --workers {workers}: "
                                f"{first}/{trials} connected on the first SYN"
                                f"{'' if still else ' (the flood ended early: figure not under flood)'}"
                            )
                    finally:
                        flood.kill()
                        flood.wait(10)
                        self.stop(daemon)
        finally:
            udp.close()
            spa_rules.unlink()
            service.close()

    def spa_flood(self) -> None:
        """Goal 3: SPA under a junk flood (bench/spa_flood.py): random-byte and well-formed junk,
        1 and 20 keys, the stock fwknop client and ours, fwknopd in the same run, the capacity."""
        from spa_flood import SpaFlood

        if not (shutil.which("fwknop") and shutil.which("fwknopd")):
            log("spa_flood: skipped (no fwknop/fwknopd: run scripts/setup.sh)")
            return
        for run in range(self.repeat):
            SpaFlood(self, SPA_FLOOD, log).run(run)

    def fleet(self) -> None:
        """Fleet mode beside single-host (bench/fleet.py): CPU per knock and per SYN, grant and
        revoke propagation between two members (median and max), first SYN on another member."""
        from fleet import FleetBench

        if not (shutil.which("redis-server") and shutil.which("redis-cli")):
            log("fleet: skipped (no redis-server/redis-cli: run scripts/setup.sh)")
            return
        for run in range(self.repeat):
            if self.fleet_baseline is not None:  # interleaved: both see the same load
                FleetBench(
                    self.figures, self.workdir / f"fleet{run}-baseline", self.smoke, log, self.fleet_baseline
                ).run()
            FleetBench(self.figures, self.workdir / f"fleet{run}", self.smoke, log).run()

    def knock_flood(self) -> None:
        """Goal 2: a flood at the first knock port from a million spoofed sources, on the same link
        as the client; 10 trials of knock-then-connect each for `nfknock knock` (its defaults)
        and the stock `knock` with every step listed 8 times (as README documents)."""
        seconds, trials = (20, 4) if self.smoke else (45, 10)
        rules = self.rules / "doors.yaml"
        saved = rules.read_text()
        rules.write_text(saved.replace("open_for: 10m", "open_for: 1s", 1))  # each trial starts closed
        service = EchoService(self.box.server)
        clients = {
            "nfknock": nfknock_argv("knock", self.alice.server_address, "40000", "50000", "60000"),
            "stock_x8": [
                "knock",
                self.alice.server_address,
                *[p for p in ("40000", "50000", "60000") for _ in range(8)],
            ],
        }
        try:
            for run in range(self.repeat):
                daemon = self.start_nfknock("--max-sources", "50000")
                flood = self._flood(40000, seconds)
                try:
                    time.sleep(1.0)
                    for who, argv in clients.items():
                        ok = 0
                        for _ in range(trials):
                            time.sleep(1.1)  # the last grant is over
                            self.box.run(self.alice.namespace, argv, cwd=REPO)
                            ok += connect(self.alice, timeout=2).connected
                        still = flood.poll() is None
                        self.figures.add(f"knock_flood.{who}.ok", ok, f"of {trials}")
                        log(
                            f"knock flood run {run + 1}, {who}: {ok}/{trials} got in"
                            f"{'' if still else ' (the flood ended before the last trial)'}"
                        )
                finally:
                    flood.kill()
                    flood.wait(10)
                    self.stop(daemon)
        finally:
            rules.write_text(saved)
            service.close()

    # -- later steps and tripwires (issue 24, goals 1 and 2) ------------------------------------

    def later_rate(self) -> None:
        """A saturating flood from 100k spoofed sources at the seed door's third step (60000):
        packets decided per second by nfknock's chain (the kernel drops a stranger's later step,
        later_steps.py; decided = packets that met that DROP, plus any verdicts) against a
        drop-only netfilterqueue loop at the same port. Then the Python loop's lean path
        (engine._route_strangers) at a later step the kernel cannot gate (47000: daemonTcp's,
        whose first step the daemon decides) against the bare loop at that port."""
        seconds = 1.5 if self.smoke else 4.0
        for run in range(self.repeat):
            rate = self._later_kernel_rate(60000, seconds)
            bare, _, _ = self._verdict_rate("bare", "tcp", 60000, seconds)
            loop, cpu, _ = self._verdict_rate("nfknock", "tcp", 47000, seconds)
            bare_loop, bare_cpu, _ = self._verdict_rate("bare", "tcp", 47000, seconds)
            for name, value, unit in (
                ("later_rate.kernel", rate, "packets/s"),
                ("later_rate.bare", bare, "packets/s"),
                ("later_rate.loop", loop, "packets/s"),
                ("later_rate.loop_bare", bare_loop, "packets/s"),
                ("later_rate.loop_cpu", cpu, "us"),
                ("later_rate.loop_bare_cpu", bare_cpu, "us"),
            ):
                self.figures.add(name, value, unit)
            log(
                f"later step flood run {run + 1}: kernel {rate:,.0f}/s vs bare loop {bare:,.0f}/s at 60000; "
                f"loop at 47000 {loop:,.0f}/s ({cpu:.2f} us each) vs bare {bare_loop:,.0f}/s ({bare_cpu:.2f} us)"
            )

    def _later_kernel_rate(self, port: int, seconds: float) -> float:
        process = self.start_nfknock("--max-sources", "100000", "--queue-maxlen", "4096")
        flood = self._first_knock_flood("tcp", port, seconds)
        time.sleep(seconds * 0.25)
        t0, dropped0, (ids0, over0, _) = time.monotonic(), self._dropped_at(port), self.queue_counters()
        time.sleep(seconds * 0.5)
        t1, dropped1, (ids1, over1, _) = time.monotonic(), self._dropped_at(port), self.queue_counters()
        flood.communicate(timeout=30)
        self.stop(process)
        verdicts = (ids1 - ids0) - (over1 - over0)
        if verdicts:
            log(f"  kernel: {verdicts} packets of the flood reached the queue")
        return (dropped1 - dropped0 + verdicts) / (t1 - t0)

    def _dropped_at(self, port: int) -> int:
        """Packets that met the DROP rule of `port` (a later step the kernel gates)."""
        listed = self.box.run(
            self.box.server, [self.iptables, "-w", "-L", "NFKNOCK", "-v", "-x", "-n"], capture_output=True, text=True
        )
        rows = [line.split() for line in listed.stdout.splitlines() if f"dpt:{port} " in line + " "]
        counts = [int(row[0]) for row in rows if len(row) > 2 and row[2] == "DROP"]
        if len(counts) != 1:
            raise RuntimeError(f"no DROP rule on port {port}:\n{listed.stdout}")
        return counts[0]

    def later_flood(self) -> None:
        """Goal 1: a full-rate flood from 100k spoofed sources at the seed door's third step
        (60000) and at one of its tripwire ports (60005), sent on the client's own link (where
        knockd listens); 10 trials of knock-then-connect each for `nfknock knock` (its defaults),
        the stock `knock` with every step listed 3 times, and knockd in the same run (its door,
        the stock `knock` once per step: knockd takes a repeated first knock as a wrong one).
        Also how many packets a second reached nfknock's queue during the flood, and how many
        the server's side of the link received."""
        trials = 4 if self.smoke else 10
        rules = self.rules / "doors.yaml"
        saved = rules.read_text()
        rules.write_text(saved.replace("open_for: 10m", "open_for: 1s", 1))  # each trial starts closed
        service = EchoService(self.box.server)
        steps = ("40000", "50000", "60000")
        clients = {
            "nfknock": nfknock_argv("knock", self.alice.server_address, *steps),
            "stock_x3": ["knock", self.alice.server_address, *[p for p in steps for _ in range(3)]],
        }
        try:
            for run in range(self.repeat):
                for target, port in (("later", 60000), ("tripwire", 60005)):
                    daemon = self.start_nfknock("--max-sources", "50000")
                    flood = self._client_link_flood(port)
                    try:
                        time.sleep(1.0)
                        t0, (ids0, _, full0), rx0 = time.monotonic(), self.queue_counters(), self._rx_packets()
                        for who, argv in clients.items():
                            ok = 0
                            for _ in range(trials):
                                time.sleep(1.1)  # the last grant is over
                                self.box.run(self.alice.namespace, argv, cwd=REPO)
                                ok += connect(self.alice, timeout=2).connected
                            self.figures.add(f"later_flood.{target}.{who}.ok", ok, f"of {trials}")
                            log(f"{target} flood run {run + 1}, {who}: {ok}/{trials} got in")
                        t1, (ids1, _, full1), rx1 = time.monotonic(), self.queue_counters(), self._rx_packets()
                        if flood.poll() is not None:
                            raise RuntimeError("later_flood: the flood ended before the trials did")
                    finally:
                        flood.kill()
                        flood.wait(10)
                        self.stop(daemon)
                    queued, arrived = (ids1 - ids0 + full1 - full0) / (t1 - t0), (rx1 - rx0) / (t1 - t0)
                    self.figures.add(f"later_flood.{target}.queued", queued, "packets/s")
                    self.figures.add(f"later_flood.{target}.arrived", arrived, "packets/s")
                    log(f"{target} flood run {run + 1}: {queued:,.0f}/s reached the queue of {arrived:,.0f}/s arriving")
                    knockd = self._start_knockd()
                    flood = self._client_link_flood(port)
                    try:
                        time.sleep(1.0)
                        ok = 0
                        for _ in range(trials):
                            self._knockd_closed()
                            self.knock(self.alice, *steps)
                            ok += connect(self.alice, timeout=2).connected
                        if flood.poll() is not None:
                            raise RuntimeError("later_flood: the flood ended before the trials did")
                    finally:
                        flood.kill()
                        flood.wait(10)
                        self._stop_knockd(knockd)
                    self.figures.add(f"later_flood.{target}.knockd.ok", ok, f"of {trials}")
                    log(f"{target} flood run {run + 1}, knockd: {ok}/{trials} got in")
            self._rotating_first_flood(trials, "rotating_first")
            self._rotating_first_flood(trials, "rotating_shared")
        finally:
            rules.write_text(saved)
            service.close()

    def _rotating_first_flood(self, trials: int, label: str) -> None:
        """Goal 4: the same flood at a rotating door's current first step (the kernel records it,
        later_steps.py rotating_first_steps). A window opens the door once (a sequence is used
        once), so every trial waits for a fresh 5 s window, aims the flood at its first step and
        knocks 1 s into it: `nfknock knock --door rotBench` and the stock `knock` with each of
        the window's steps 3 times (no knockd figure: knockd has no rotating doors). The
        baseline in the same run ("rotating_shared"): a second rotating door shares the range,
        so the kernel records no first step there and queues the current steps for everyone,
        as it did for every rotating door before."""
        secret, window = b"b" * 32, 5.0
        key = self.workdir / "rot.key"
        key.write_text(base64.b64encode(secret).decode() + "\n")
        key.chmod(0o600)
        door = self.rules / "rotating.yaml"
        door.write_text(
            "doors:\n  - name: rotBench\n"
            f"    rotate: {{secret_file: {key}, window: {window:g}s, ports: 20000-29999}}\n"
            "    protect: [22/tcp]\n    open_for: 1s\n"
            + (
                f"  - name: rotOther\n    rotate: {{secret_file: {key}, window: 1h, ports: 20000-29999}}\n"
                "    protect: [2222/tcp]\n"
                if label == "rotating_shared"
                else ""
            )
        )
        address = self.alice.server_address
        try:
            for run in range(self.repeat):
                daemon = self.start_nfknock("--max-sources", "50000")
                took = queued = arrived = 0.0
                try:
                    for who in ("nfknock", "stock_x3"):
                        ok = 0
                        for _ in range(trials):
                            time.sleep(window - time.time() % window + 0.1)  # a fresh window
                            ports = [
                                str(p)
                                for p in derive(secret, "rotBench", window_of(time.time(), window), 3, 20000, 29999)
                            ]
                            argv = (
                                nfknock_argv("knock", address, "--door", "rotBench", "--rules", str(self.rules))
                                if who == "nfknock"
                                else ["knock", address, *[p for p in ports for _ in range(3)]]
                            )
                            flood = self._client_link_flood(int(ports[0]))
                            try:
                                time.sleep(1.0)
                                t0, (ids0, _, full0), rx0 = time.monotonic(), self.queue_counters(), self._rx_packets()
                                self.box.run(self.alice.namespace, argv, cwd=REPO)
                                ok += connect(self.alice, timeout=2).connected
                                t1, (ids1, _, full1), rx1 = time.monotonic(), self.queue_counters(), self._rx_packets()
                                if flood.poll() is not None:
                                    raise RuntimeError("later_flood: the flood ended before the trial did")
                            finally:
                                flood.kill()
                                flood.wait(10)
                            took, queued, arrived = (
                                took + t1 - t0,
                                queued + ids1 - ids0 + full1 - full0,
                                arrived + rx1 - rx0,
                            )
                        self.figures.add(f"later_flood.{label}.{who}.ok", ok, f"of {trials}")
                        log(f"{label} flood run {run + 1}, {who}: {ok}/{trials} got in")
                finally:
                    self.stop(daemon)
                self.figures.add(f"later_flood.{label}.queued", queued / took, "packets/s")
                self.figures.add(f"later_flood.{label}.arrived", arrived / took, "packets/s")
                log(
                    f"{label} flood run {run + 1}: {queued / took:,.0f}/s reached the queue of "
                    f"{arrived / took:,.0f}/s arriving"
                )
        finally:
            door.unlink()
            key.unlink()

    def _client_link_flood(self, port: int) -> subprocess.Popen:
        """The C sender at full rate from 100k spoofed sources at `port`, from alice's namespace:
        the flood shares the client's link, which knockd watches."""
        return self.box.spawn(
            self.alice.namespace,
            [str(FLOOD), self.alice.server_address, "tcp", str(port), "600", "11.0.0.1", "100000"],
            stdout=subprocess.PIPE,
            text=True,
        )

    def _rx_packets(self) -> int:
        """Packets the server's side of alice's link received so far."""
        path = f"/sys/class/net/nk{self.box.token}1s/statistics/rx_packets"
        return int(self.box.run(self.box.server, ["cat", path], check=True).stdout)

    def _knockd_closed(self) -> None:
        """Take away every rule knockd's door added for alice: each trial starts closed."""
        rule = ["-p", "tcp", "-s", self.alice.address, "--dport", "22", "-j", "ACCEPT"]
        while self.box.run(self.box.server, ["iptables-legacy", "-w", "-D", "INPUT", *rule]).returncode == 0:
            pass

    # -- 7. the kernel's first-step set under spoofed IPv6 first knocks -------------------------

    def first_step_set(self) -> None:
        """The kernel's first-step set (nfknock/firewall/granted.py) under a flood of spoofed IPv6
        first knocks at 40000/tcp, with the product's sizing and the one it had before (swapped in
        under the set's name once the daemon has made it: the sizing is a parameter of the bench,
        not of the product). For each: the machine's busy CPU and the sender's CPU per spoofed
        first knock while 100k sources leave the set unfilled, then while a million fill it; the
        set's kernel memory (`ipset list -t`) with the million in it; and how many of 10 trials
        of a slow client (stock `knock -d 500` then a connect, over IPv6) get in during that
        flood. The door's seq_timeout is 10 minutes: no source leaves the set during a run."""
        seconds, trials, self.flood_sources = (2.0, 3, 300_000) if self.smoke else (4.0, 10, 1_000_000)
        rules = self.rules / "doors.yaml"
        saved = rules.read_text()
        rules.write_text(saved.replace("open_for: 10m", "open_for: 1s", 1))  # each trial starts closed
        service = EchoService(self.box.server)
        name = first_step_set(QUEUE, 6, ("tcp", 40000))
        try:
            for run in range(self.repeat):
                for sizing in ("old", "new") if run % 2 == 0 else ("new", "old"):
                    daemon = self.start_nfknock()
                    try:
                        if sizing == "old":
                            self._resize_set(name, OLD_FIRST_STEP_SIZE)
                        self._first_step_set(sizing, name, seconds, trials, run)
                    finally:
                        self.stop(daemon)
        finally:
            rules.write_text(saved)
            service.close()

    def _first_step_set(self, sizing: str, name: str, seconds: float, trials: int, run: int) -> None:
        flood = self._flood6(100_000, "2001:db8:1::", seconds * 2)
        time.sleep(seconds / 2)
        cost = self._spoofed_first_knock_cost(flood, seconds)
        flood.communicate(timeout=30)
        self.figures.add(f"first_step.{sizing}.unfilled.host_us", cost[0], "us")
        self.figures.add(f"first_step.{sizing}.unfilled.sender_us", cost[1], "us")
        flood = self._flood6(self.flood_sources, "2001:db8:2::", 600)
        try:
            entries = self._settled(name, flood)
            full = self._spoofed_first_knock_cost(flood, seconds)
            self.figures.add(f"first_step.{sizing}.filled.host_us", full[0], "us")
            self.figures.add(f"first_step.{sizing}.filled.sender_us", full[1], "us")
            memory, entries = self._set_size(name)
            self.figures.add(f"first_step.{sizing}.memory_mib", memory / 2**20, "MiB")
            self.figures.add(f"first_step.{sizing}.entries", entries, "sources")
            ok = 0
            for _ in range(trials):
                # The last grant is over, also in the kernel's granted set (open_for + 1 s): a source
                # still in it knocks through the daemon, and its second knock, after the element
                # expired, would meet the drop at 50000 (a bench artefact, not the flood's doing).
                time.sleep(2.5)
                knock = ["knock", "-6", "-d", "500", self.alice.server_address6, "40000", "50000", "60000"]
                self.box.run(self.alice.namespace, knock)
                ok += connect(self.alice, timeout=2, family=6).connected
            if flood.poll() is not None:
                raise RuntimeError("first_step_set: the flood ended before the trials did")
            self.figures.add(f"first_step.{sizing}.slow_client_ok", ok, f"of {trials}")
        finally:
            flood.kill()
            flood.wait(10)
        log(
            f"first-step set, {sizing} sizing, run {run + 1}: per spoofed first knock {cost[0]:.1f} us of the "
            f"machine ({cost[1]:.1f} us the sender's) with 100k sources, {full[0]:.1f} us ({full[1]:.1f}) with "
            f"{self.flood_sources:,}; "
            f"{entries:,} sources in {memory / 2**20:.1f} MiB; slow client (knock -d 500) got in {ok}/{trials}"
        )

    def _resize_set(self, name: str, size: str) -> None:
        """Put a set of another size under `name`, in place: the rules keep referring to it."""
        spare = f"{name}-b"
        script = f"create {spare} hash:ip family inet6 {size}\nswap {name} {spare}\ndestroy {spare}\n"
        self.box.run(self.box.server, ["ipset", "restore"], input=script, check=True)

    def _flood6(self, sources: int, prefix: str, seconds: float) -> subprocess.Popen:
        """The C sender at full rate from `sources` spoofed IPv6 sources at 40000/tcp, from bob's
        namespace (sources: `prefix` with the last 32 bits counting up from 1)."""
        return self.box.spawn(
            self.bob.namespace,
            [str(FLOOD), self.bob.server_address6, "tcp", "40000", str(seconds), f"{prefix}1", str(sources)],
            stdout=subprocess.PIPE,
            text=True,
        )

    def _spoofed_first_knock_cost(self, flood: subprocess.Popen, seconds: float) -> tuple[float, float]:
        """(The machine's busy CPU, the sender's CPU) per first knock that reached the recording
        rule, in microseconds, over `seconds` of a running flood. On a veth link the receive path
        runs in the sender's context, so the sender's CPU includes the kernel's set work, and
        the other engineers' load on the machine hardly touches it (`ip netns exec` execs the
        sender: the Popen's pid is the sender's)."""
        recorded0, busy0, cpu0 = self._recorded(40000, 6), busy_cpu_seconds(), cpu_seconds([flood.pid])
        time.sleep(seconds)
        recorded1, busy1, cpu1 = self._recorded(40000, 6), busy_cpu_seconds(), cpu_seconds([flood.pid])
        packets = max(1, recorded1 - recorded0)
        return (busy1 - busy0) * 1e6 / packets, (cpu1 - cpu0) * 1e6 / packets

    def _set_size(self, name: str) -> tuple[int, int]:
        """(Bytes of kernel memory, elements) of a set, as `ipset list -t` shows them."""
        listed = self.box.run(self.box.server, ["ipset", "list", "-t", name], check=True).stdout
        fields = dict(line.split(": ", 1) for line in listed.splitlines() if ": " in line)
        return int(fields["Size in memory"]), int(fields["Number of entries"])

    def _settled(self, name: str, flood: subprocess.Popen) -> int:
        """Wait until the set stops growing (every source of the flood is in, or it is full)."""
        last, deadline = -1, time.monotonic() + 60
        while time.monotonic() < deadline and flood.poll() is None:
            time.sleep(1.0)
            entries = self._set_size(name)[1]
            if entries >= 0.99 * self.flood_sources or entries <= last:
                return entries
            last = entries
        log(f"  first_step_set: the set was still growing after a minute ({last:,} sources)")
        return last


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent not idle (all CPUs, every namespace: the sender,
    softirq work and the loop alike), from /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _tracked(daemon_log: Path) -> int:
    for line in daemon_log.read_text().splitlines():
        if "attempts and" in line:
            return int(line.split("passed back; ")[1].split()[0])
    raise RuntimeError("the daemon did not report what it tracked")


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def ratio(report: dict, name: str, over: str, base: str) -> None:
    figures = report["figures"]
    runs_over, runs_base = figures[over]["runs"], figures[base]["runs"]
    pairs = [a / b for a, b in zip(runs_over, runs_base, strict=True) if b]
    if not pairs:
        # Every baseline run measured 0 (CPU time is counted in clock ticks): no ratio to give.
        report["ratios"].pop(name, None)
        return
    report["ratios"][name] = {
        "median": statistics.median(pairs),
        "min": min(pairs),
        "max": max(pairs),
        "of": over,
        "to": base,
    }


def render(report: dict) -> str:
    f, r = report["figures"], report["ratios"]

    def fig(name, fmt="{:,.0f}"):
        s = f[name]
        return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}..{fmt.format(s['max'])})"

    def baseline(name, fmt="{:.2f}"):
        """The same figure measured with --fleet-baseline's checkout, in the same run."""
        return f"{fig(name + '.baseline', fmt)} (baseline checkout)" if name + ".baseline" in f else ""

    def rat(name):
        if name not in r:
            return "— (baseline 0)"
        s = r[name]
        return f"{s['median']:.2f} ({s['min']:.2f}..{s['max']:.2f})"

    lines = [
        f"nfknock benchmarks — {provenance(report)}"
        f"{'; SMOKE RUN (figures not meaningful)' if report['smoke'] else ''}; "
        f"each figure: median (min..max) of its run's repeats",
        "",
        "| measurement | nfknock | baseline | ratio | goal |",
        "|---|---|---|---|---|",
    ]
    rows = []

    def row(make) -> None:
        """A table row, when the run measured what it shows (bench/run.py --only ...)."""
        try:
            rows.append(make())
        except KeyError:
            pass

    for proto in ("udp", "tcp"):
        row(
            lambda proto=proto: (
                f"| first knocks decided/s, {proto.upper()} flood to a knock door's first port, 100k sources, "
                f"defaults (the kernel records the first step) | "
                f"{fig(f'throughput.{proto}.kernel')} | {fig(f'throughput.{proto}.bare')} (drop-only loop) | "
                f"{rat(f'throughput.{proto}.kernel')} | >= 0.8 |"
            )
        )
        row(
            lambda proto=proto: (
                f"| the same, one host core (RPS and the loop on one CPU, the sender on the other) | "
                f"{fig(f'one_core.{proto}.kernel')} | {fig(f'one_core.{proto}.bare')} (drop-only loop) | "
                f"{rat(f'one_core.{proto}')} | >= 0.8 |"
            )
        )
        row(
            lambda proto=proto: (
                f"| the machine's busy CPU per decided first knock, us ({proto.upper()}; sender included) | "
                f"{fig(f'host_cpu.{proto}.kernel', '{:.2f}')} | {fig(f'host_cpu.{proto}.bare', '{:.2f}')} | "
                f"{rat(f'host_cpu.{proto}.kernel')} | |"
            )
        )
        row(
            lambda proto=proto: (
                f"| verdicts/s, {proto.upper()} flood to a first step the daemon decides, 100k sources | "
                f"{fig(f'throughput.{proto}.nfknock')} | {fig(f'throughput.{proto}.bare')} (drop-only loop) | "
                f"{rat(f'throughput.{proto}')} | |"
            )
        )
        row(
            lambda proto=proto: (
                f"| the same, `--workers 2` | {fig(f'throughput.{proto}.nfknock2')} | "
                f"{fig(f'throughput.{proto}.bare')} (one drop-only loop); two loops sharded the same way: "
                f"{fig(f'throughput.{proto}.bare2')} | {rat(f'throughput.{proto}.workers2')}; "
                f"1 -> 2 workers: {rat(f'throughput.{proto}.scaling')}x | |"
            )
        )
        row(
            lambda proto=proto: (
                f"| CPU per verdict, us ({proto.upper()}; 1 / 2 loops) | "
                f"{fig(f'verdict_cpu.{proto}.nfknock', '{:.1f}')} / {fig(f'verdict_cpu.{proto}.nfknock2', '{:.1f}')} | "
                f"{fig(f'verdict_cpu.{proto}.bare', '{:.1f}')} / {fig(f'verdict_cpu.{proto}.bare2', '{:.1f}')} | "
                f"{rat(f'verdict_cpu.{proto}')} | |"
            )
        )
    row(
        lambda: (
            f"| knock to connect, ms (stock knock client) | {fig('knock_to_connect.nfknock', '{:.2f}')}, "
            f"{f['knock_to_connect.nfknock.syn_retransmits']['median']:.0f} retransmits | "
            f"{fig('knock_to_connect.knockd', '{:.1f}')} (knockd 0.8), "
            f"{f['knock_to_connect.knockd.syn_retransmits']['median']:.0f} retransmits | "
            f"knockd takes {1 / r['knock_to_connect']['median']:,.0f}x as long | < 1 ms, no retransmit |"
        )
    )
    row(
        lambda: (
            f"| established TCP, Gbit/s (iperf3) | {fig('established.nfknock', '{:.2f}')} | "
            f"{fig('established.none', '{:.2f}')} (no firewall) | {rat('established')} | >= 0.95 |"
        )
    )
    row(
        lambda: (
            f"| new connections/s, granted client, one at a time | {fig('connection_rate.nfknock')} | "
            f"{fig('connection_rate.none')} (no nfknock) | {rat('connection_rate')} | |"
        )
    )
    row(
        lambda: (
            f"| the same through an accept-only queue loop | {fig('connection_rate.nfknock')} | "
            f"{fig('connection_rate.bare_accept')} (queue round trip alone) | "
            f"{rat('connection_rate.queue')} | |"
        )
    )
    lines += rows
    for name in sorted(n for n in f if n.startswith("memory.") and n.endswith(".rss_mib")):
        base = name.removesuffix(".rss_mib")
        _, label, size, _ = name.split(".")
        lines.append(
            f"| RSS after {int(size):,} spoofed first knocks ({label}), MiB | {fig(name, '{:.1f}')} | "
            f"{fig(base + '.tracked')} tracked | {fig(base + '.bytes_per_source')} bytes/source | bounded |"
        )
    if "syn_flood.nfknock.ok" in f:
        lines.append(
            f"| SYN flood at 22 from 1M spoofed sources: a knocked client's connects that succeed | "
            f"{fig('syn_flood.nfknock.ok')}, median {fig('syn_flood.nfknock.ms', '{:.2f}')} ms | "
            f"{fig('syn_flood.kernel_rule.ok')}, median {fig('syn_flood.kernel_rule.ms', '{:.2f}')} ms "
            f"(knockd's kernel rule) | | 20/20, <= 5 ms |"
        )
    openers = (("knock", "stock knock"), ("fwknop", "stock fwknop"), ("spa_0.1ms", "SPA packet, SYN 0.1 ms later"))
    for who, label in openers:
        if f"first_syn.{who}.workers1" in f:
            lines.append(
                f"| SYN flood at 22 from 1M spoofed sources: door opened ({label}), then connect: on the first SYN | "
                f"{fig(f'first_syn.{who}.workers1')} (1 process); {fig(f'first_syn.{who}.workers2')} (--workers 2) "
                f"| | | >= 19/20 |"
            )
    if "knock_flood.nfknock.ok" in f:
        lines.append(
            f"| flood at the first knock port, 1M spoofed sources: knock then connect, successes | "
            f"{fig('knock_flood.nfknock.ok')} (nfknock knock, defaults) | {fig('knock_flood.stock_x8.ok')} "
            f"(stock knock, each step 8 times) | | >= 9/10, stock >= 8/10 |"
        )
    for target, where in (("later", "the third step (60000)"), ("tripwire", "a tripwire port (60005)")):
        if f"later_flood.{target}.nfknock.ok" in f:
            lines += [
                f"| flood at {where}, 100k spoofed sources on the client's link: knock then connect, successes | "
                f"{fig(f'later_flood.{target}.nfknock.ok')} (nfknock knock, defaults); "
                f"{fig(f'later_flood.{target}.stock_x3.ok')} (stock knock, each step 3 times) | "
                f"{fig(f'later_flood.{target}.knockd.ok')} (knockd, stock knock) | | >= 9/10, stock >= 8/10 |",
                f"| the same flood: packets/s reaching nfknock's queue | {fig(f'later_flood.{target}.queued')} | "
                f"{fig(f'later_flood.{target}.arrived')} (arriving on the link) | | |",
            ]
    if "later_flood.rotating_first.nfknock.ok" in f and "later_flood.rotating_shared.nfknock.ok" in f:
        lines += [
            "| flood at a rotating door's current first step, 100k spoofed sources on the client's link: knock "
            f"then connect, successes | {fig('later_flood.rotating_first.nfknock.ok')} (nfknock knock, defaults); "
            f"{fig('later_flood.rotating_first.stock_x3.ok')} (stock knock, each step 3 times) | "
            f"{fig('later_flood.rotating_shared.nfknock.ok')}; {fig('later_flood.rotating_shared.stock_x3.ok')} "
            "(the same, a second door sharing the range: steps queued for everyone, as before; knockd has no "
            "rotating doors) | | >= 9/10, stock >= 8/10 |",
            f"| the same flood: packets/s reaching nfknock's queue | {fig('later_flood.rotating_first.queued')} | "
            f"{fig('later_flood.rotating_shared.queued')} (range shared) of "
            f"{fig('later_flood.rotating_first.arrived')} (arriving on the link) | | |",
        ]
    if "later_rate.kernel" in f:
        lines += [
            f"| decided/s, TCP flood at the third step (60000), 100k sources | {fig('later_rate.kernel')} (kernel "
            f"drops strangers' later steps) | {fig('later_rate.bare')} (drop-only loop) | {rat('later_rate.kernel')} "
            f"| >= 0.8 |",
            f"| verdicts/s, TCP flood at a later step the kernel cannot gate (47000), 100k sources | "
            f"{fig('later_rate.loop')}, {fig('later_rate.loop_cpu', '{:.2f}')} us CPU each | "
            f"{fig('later_rate.loop_bare')}, {fig('later_rate.loop_bare_cpu', '{:.2f}')} us (drop-only loop) | "
            f"{rat('later_rate.loop')} | >= 0.8 |",
        ]
    if "flood_knock.seconds" in f:  # reports from before this measurement lack it
        during = f["flood_knock.during"]["runs"]
        lines.append(
            f"| client knock+connect during a SYN flood from 1M spoofed sources, s to get in "
            f"(2 s connect timeout per lost knock) | {fig('flood_knock.seconds', '{:.1f}')}, "
            f"{fig('flood_knock.attempts')} knocks | in during the flood in {sum(during):.0f} of "
            f"{len(during)} runs | | |"
        )
    for sizing, what in (
        ("old", "before (65,536 buckets, maxelem 262,144)"),
        ("new", "current (262,144 buckets, maxelem 1,310,720)"),
    ):
        if f"first_step.{sizing}.slow_client_ok" not in f:
            continue
        filled, unfilled = f"first_step.{sizing}.filled", f"first_step.{sizing}.unfilled"
        lines += [
            f"| first-step set, {what} sizing: us of the machine's CPU per spoofed IPv6 first knock with 1M "
            f"sources (set filled), the sender's own in brackets | {fig(filled + '.host_us', '{:.1f}')} "
            f"({fig(filled + '.sender_us', '{:.1f}')}) | {fig(unfilled + '.host_us', '{:.1f}')} "
            f"({fig(unfilled + '.sender_us', '{:.1f}')}) with 100k (unfilled) | "
            f"{f[filled + '.host_us']['median'] / f[unfilled + '.host_us']['median']:.2f} "
            f"({f[filled + '.sender_us']['median'] / f[unfilled + '.sender_us']['median']:.2f}) | flat |",
            f"| the same set during the 1M-source flood: kernel memory; slow client (`knock -d 500`, IPv6) "
            f"gets in | {fig(f'first_step.{sizing}.memory_mib', '{:.1f}')} MiB for "
            f"{fig(f'first_step.{sizing}.entries')} sources | {fig(f'first_step.{sizing}.slow_client_ok')} of "
            f"{f[f'first_step.{sizing}.slow_client_ok']['unit'][3:]} | | >= 9/10 |",
        ]
    if "fleet.grant_propagation.median" in f:
        lines += [
            f"| fleet: CPU per 3-step knock, us | {fig('fleet.cpu_per_knock.fleet')} (member of 2) | "
            f"{fig('fleet.cpu_per_knock.single')} (single host) | {rat('fleet.cpu_per_knock')} | |",
            f"| fleet: CPU per SYN of a granted client, us | {fig('fleet.cpu_per_syn.fleet')} | "
            f"{fig('fleet.cpu_per_syn.single')} (single host) | {rat('fleet.cpu_per_syn')} | |",
            f"| fleet: new connections/s, granted client, one at a time | {fig('fleet.connection_rate.fleet')} | "
            f"{fig('fleet.connection_rate.single')} (single host) | | |",
            f"| fleet: Redis commands during a 100k spoofed-SYN flood at 22 | "
            f"{fig('fleet.redis_calls_during_syn_flood')} (heartbeats) | | | none per SYN |",
            f"| fleet: knock to connect on the same member, ms | {fig('fleet.knock_to_connect.fleet', '{:.2f}')} | "
            f"{fig('fleet.knock_to_connect.single', '{:.2f}')} (single host) | | |",
            f"| fleet: grant reaches the other member (its kernel set), ms (median; max of 100) | "
            f"{fig('fleet.grant_propagation.median', '{:.2f}')}; "
            f"{fig('fleet.grant_propagation.max', '{:.2f}')} | "
            f"{baseline('fleet.grant_propagation.median')} | | <= 5 ms |",
            f"| fleet: revoke reaches the other member (its kernel set), ms (median; max of 100) | "
            f"{fig('fleet.revoke_propagation.median', '{:.2f}')}; "
            f"{fig('fleet.revoke_propagation.max', '{:.2f}')} | {baseline('fleet.revoke_propagation.median')} | "
            f"| < 100 ms |",
            f"| fleet: CPU per grant and revoke, ms, member a; b | "
            f"{fig('fleet.cpu_per_grant_and_revoke.a', '{:.1f}')}; "
            f"{fig('fleet.cpu_per_grant_and_revoke.b', '{:.1f}')} | "
            f"{baseline('fleet.cpu_per_grant_and_revoke.a', '{:.1f}')}; "
            f"{baseline('fleet.cpu_per_grant_and_revoke.b', '{:.1f}')} | | |",
            f"| fleet: SYN to member B 5 ms after the knock on A, accepted first time | "
            f"{fig('fleet.first_syn_on_other_member')} of {f['fleet.first_syn_on_other_member']['unit'][3:]} | | "
            f"| >= 19/20 |",
        ]
    for name in sorted(n for n in f if n.startswith("self_healing.") and n.endswith(".closed")):
        backend, operation = name.split(".")[1], ".".join(name.split(".")[2:-1])
        back = name.removesuffix(".closed") + ".back"
        lines.append(
            f"| another program flushes nfknock's rules ({backend} tables, `{operation}`): ms until the protected "
            f"ports are closed again; until the whole chain is back (`bench/self_healing.py`, "
            f"{len(f[name]['runs'])} trials) | {fig(name, '{:.1f}')}; {fig(back, '{:.1f}')} | "
            f"without the watcher: open until nfknock restarts | | |"
        )
    lines += spa_flood_rows(f)
    return "\n".join(lines) + "\n"


MEASUREMENTS = (
    "throughput",
    "one_core",
    "knock_to_connect",
    "established",
    "connection_rate",
    "memory",
    "flood_knock",
    "syn_flood",
    "first_syn",
    "knock_flood",
    "later_flood",
    "later_rate",
    "first_step_set",
    "fleet",
    "spa_flood",
)
RATIOS = [
    ("throughput.udp.kernel", "throughput.udp.kernel", "throughput.udp.bare"),
    ("throughput.tcp.kernel", "throughput.tcp.kernel", "throughput.tcp.bare"),
    ("one_core.udp", "one_core.udp.kernel", "one_core.udp.bare"),
    ("one_core.tcp", "one_core.tcp.kernel", "one_core.tcp.bare"),
    ("host_cpu.udp.kernel", "host_cpu.udp.kernel", "host_cpu.udp.bare"),
    ("host_cpu.tcp.kernel", "host_cpu.tcp.kernel", "host_cpu.tcp.bare"),
    ("throughput.udp", "throughput.udp.nfknock", "throughput.udp.bare"),
    ("throughput.tcp", "throughput.tcp.nfknock", "throughput.tcp.bare"),
    ("throughput.udp.workers2", "throughput.udp.nfknock2", "throughput.udp.bare"),
    ("throughput.tcp.workers2", "throughput.tcp.nfknock2", "throughput.tcp.bare"),
    ("throughput.udp.scaling", "throughput.udp.nfknock2", "throughput.udp.nfknock"),
    ("throughput.tcp.scaling", "throughput.tcp.nfknock2", "throughput.tcp.nfknock"),
    ("later_rate.kernel", "later_rate.kernel", "later_rate.bare"),
    ("later_rate.loop", "later_rate.loop", "later_rate.loop_bare"),
    ("later_rate.loop_cpu", "later_rate.loop_cpu", "later_rate.loop_bare_cpu"),
    ("verdict_cpu.udp", "verdict_cpu.udp.nfknock", "verdict_cpu.udp.bare"),
    ("verdict_cpu.tcp", "verdict_cpu.tcp.nfknock", "verdict_cpu.tcp.bare"),
    ("knock_to_connect", "knock_to_connect.nfknock", "knock_to_connect.knockd"),
    ("established", "established.nfknock", "established.none"),
    ("connection_rate", "connection_rate.nfknock", "connection_rate.none"),
    ("connection_rate.queue", "connection_rate.nfknock", "connection_rate.bare_accept"),
    ("fleet.cpu_per_knock", "fleet.cpu_per_knock.fleet", "fleet.cpu_per_knock.single"),
    ("fleet.cpu_per_syn", "fleet.cpu_per_syn.fleet", "fleet.cpu_per_syn.single"),
]


def add_ratios(report: dict) -> None:
    """Ratios of figures measured side by side in one run (never of figures from different runs)."""
    figures = report["figures"]
    for name, over, base in RATIOS:
        if over in figures and base in figures and figures[over].get("measured") == figures[base].get("measured"):
            ratio(report, name, over, base)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="one short run of each measurement")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement (default 5)")
    parser.add_argument("--out", default=str(BENCH / "results"), help="where report.json/.md go")
    parser.add_argument("--render", metavar="REPORT_JSON", help="only turn an existing report.json into markdown")
    parser.add_argument("--only", choices=MEASUREMENTS, action="append", help="run only these measurements")
    parser.add_argument(
        "--fresh", action="store_true", help="start a new report instead of replacing the measured figures in OUT"
    )
    parser.add_argument(
        "--merge", metavar="REPORT_JSON", nargs="+", help="merge these reports' figures into OUT/report.json (no run)"
    )
    parser.add_argument("--readme", action="store_true", help="write OUT/report.md into README.md's generated block")
    parser.add_argument(
        "--fleet-baseline",
        metavar="DIR",
        help="fleet: also run the propagation with members from this checkout (an older commit: "
        "git worktree add DIR COMMIT), interleaved with this one, as its baseline",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.render:
        report = json.loads(Path(args.render).read_text())
        add_ratios(report)
        print(render(report), end="")
        return 0
    if args.merge:
        report = json.loads((out / "report.json").read_text())
        for name in args.merge:
            report = merge(report, stamp(json.loads(Path(name).read_text())))
        write(out, report)
        return 0
    if args.readme:
        for document in QUOTING:
            document.write_text(with_block(document.read_text(), (out / "report.md").read_text()))
            print(
                f"{document.relative_to(REPO)}: the block between {BEGIN!r} and {END!r} now holds {out / 'report.md'}"
            )
        return 0
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces, iptables, NFQUEUE)")
    for tool in ("knock", "knockd", "iperf3", "gcc", "iptables-legacy"):
        if not shutil.which(tool):
            parser.error(f"missing {tool}: run scripts/setup.sh")
    repeat = 1 if args.smoke else args.repeat
    FLOOD.parent.mkdir(exist_ok=True)
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(FLOOD), str(BENCH / "flood.c")], check=True)
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(SPA_FLOOD), str(BENCH / "spaflood.c")], check=True)
    workdir = Path(tempfile.mkdtemp(prefix="nfknock-bench-"))
    try:
        with Sandbox(clients_wanted=2) as box:
            bench = Bench(box, workdir, args.smoke, repeat)
            bench.fleet_baseline = Path(args.fleet_baseline).resolve() if args.fleet_baseline else None
            for name in args.only or MEASUREMENTS:
                getattr(bench, name)()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = stamp(
        {
            "machine": machine(),
            "commit": commit_of(REPO),
            "smoke": args.smoke,
            "repeat": repeat,
            "ratios": {},
            "figures": {name: bench.figures.summary(name) for name in bench.figures.values},
        }
    )
    kept = out / "report.json"
    if kept.exists() and not args.fresh:
        report = merge(json.loads(kept.read_text()), report)
    write(out, report)
    return 0


def write(out: Path, report: dict) -> None:
    """report.json and its rendering, report.md, side by side (the README quotes report.md)."""
    report["ratios"] = {}
    add_ratios(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render(report))
    print(render(report))


if __name__ == "__main__":
    sys.exit(main())
