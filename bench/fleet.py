"""Fleet-mode figures for bench/run.py (`Bench.fleet`): what sharing through Redis costs per knock
and per SYN beside single-host mode, and how long a grant and a revocation take to reach another
member. Two bastions and a client on one bridge, Redis on the hub (tests/support/sandbox.Lan).

- Cost: the daemon's CPU time (all its threads, Redis link included; clock ticks, so the figures
  are coarse) per 3-step knock, and per SYN of a granted client opening connections one at a
  time (with that rate); Redis commands counted during a spoofed SYN flood at the protected port
  (the SYN path must never reach Redis).
- Propagation: knock on A (SYNs sent from this process), then read B's kernel set of granted
  sources over netlink until the source is in it (what routes the client's SYN at B; B's engine
  is then checked to hold the grant); the same for a revoke on A, until the source left B's set.
  Each look costs tens of microseconds; asking B's control socket instead cost B's own loop a
  millisecond or more per look, and the figures measured that too.
- First SYN: knock on A, wait 5 ms, connect to B with a timeout shorter than TCP's first
  retransmission: did B accept the very first SYN? (the issue's goal: >= 19 of 20)
- Baseline (`bench/run.py --fleet-baseline DIR`): the propagation figures again with the members
  run from another checkout (an older commit), in the same run, named `...baseline`.
"""

from __future__ import annotations

import base64
import secrets
import socket
import statistics
import subprocess
import time
from pathlib import Path

from nfknock.daemon.control import call
from support.sandbox import (
    EchoService,
    Lan,
    RedisServer,
    SynFlood,
    connect,
    cpu_seconds,
    entered,
    nfknock_argv,
    process_tree,
    queue_counters,
    wait_for_line,
)

QUEUE = 5
RULES = """\
doors:
  - name: openSSH
    sequence: [40000, 50000, 60000]
    protect: [22/tcp]
    seq_timeout: 10m
    open_for: 10m
"""


class FleetBench:
    def __init__(self, figures, workdir: Path, smoke: bool, log, tree: Path | None = None):
        """`tree`: run the members from that checkout (a baseline), propagation only."""
        self.figures, self.workdir, self.smoke, self.log = figures, workdir, smoke, log
        self.tree = tree
        self.suffix = "" if tree is None else ".baseline"
        self.workdir.mkdir(parents=True)
        (self.workdir / "rules").mkdir(mode=0o700)
        (self.workdir / "rules" / "doors.yaml").write_text(RULES)
        self.key_file = self.workdir / "fleet.key"
        self.key_file.write_text(base64.b64encode(secrets.token_bytes(48)).decode())
        self.password_file = self.workdir / "redis.password"

    def run(self) -> None:
        with Lan(servers_wanted=2, clients_wanted=1) as lan:
            self.lan = lan
            self.client_a, self.client_b = lan.client(0, server=0), lan.client(0, server=1)
            redis = RedisServer(lan, secrets.token_hex(12))
            self.password_file.write_text(redis.password)
            for path in (self.key_file, self.password_file):
                path.chmod(0o600)
            redis.start()
            self.redis = redis
            services = [EchoService(lan.server(i)) for i in range(2)]
            try:
                if self.tree is None:
                    for mode in ("single", "fleet"):
                        self._costs(mode)
                self._propagation()
            finally:
                for service in services:
                    service.close()
                redis.kill()

    # -- members ---------------------------------------------------------------------------

    def _start(self, index: int, fleet: bool) -> subprocess.Popen:
        log = self.workdir / f"member{index}.log"
        log.unlink(missing_ok=True)
        argv = ["run", "--rules", str(self.workdir / "rules"), "--queue-num", str(QUEUE), "--log-file", str(log)]
        argv += ["--control-socket", str(self._socket(index)), "--state-dir", str(self.workdir / f"state{index}")]
        if fleet:
            argv += ["--cluster", self.redis.url, "--cluster-key-file", str(self.key_file)]
            argv += ["--cluster-password-file", str(self.password_file), "--cluster-member", "ab"[index]]
        where = {} if self.tree is None else {"cwd": self.tree}  # `python -m nfknock` imports from the cwd first
        process = self.lan.spawn(
            self.lan.server(index), nfknock_argv(*argv), stderr=subprocess.PIPE, text=True, **where
        )
        wait_for_line(log, "ready:", process)  # the control socket is there
        if fleet:
            wait_for_line(log, "reachable; sharing", process)
        return process

    def _socket(self, index: int) -> Path:
        return self.workdir / f"member{index}.sock"

    def _stop(self, index: int, process: subprocess.Popen) -> None:
        process.terminate()
        process.wait(30)
        self.lan.run(self.lan.server(index), nfknock_argv("down"))

    def _knock(self, client) -> None:
        """Three SYNs from the client's namespace, no subprocess (its start-up would dominate)."""
        for port in (40000, 50000, 60000):
            with entered(client.namespace):
                sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex((client.server_address, port))
            sock.close()

    def _has_grant(self, index: int, address: str) -> bool:
        return any(g["source"] == address for g in call(self._socket(index), {"cmd": "status"})["grants"])

    def _redis_calls(self) -> int:
        out = self.redis.cli("INFO", "commandstats").stdout
        return sum(int(line.split("calls=")[1].split(",")[0]) for line in out.splitlines() if "calls=" in line)

    # -- cost per knock and per SYN ----------------------------------------------------------

    def _costs(self, mode: str) -> None:
        fleet = mode == "fleet"
        members = [self._start(0, fleet)] + ([self._start(1, fleet)] if fleet else [])
        pids = process_tree(members[0].pid)  # with its workers
        try:
            knocks = 50 if self.smoke else 300
            cpu = cpu_seconds(pids)
            for _ in range(knocks):
                self._knock(self.client_a)
                time.sleep(0.002)
            time.sleep(0.3)
            per_knock = (cpu_seconds(pids) - cpu) / knocks * 1e6
            self.figures.add(f"fleet.cpu_per_knock.{mode}", per_knock, "us")
            # A granted client's new connections, one at a time: each SYN's verdict in either mode.
            self._knock(self.client_a)
            time.sleep(0.1)
            connects = 100 if self.smoke else 1000
            cpu, start = cpu_seconds(pids), time.monotonic()
            for _ in range(connects):
                if not connect(self.client_a, timeout=3).connected:
                    raise RuntimeError(f"{mode}: a granted client could not connect")
            rate = connects / (time.monotonic() - start)
            per_syn = (cpu_seconds(pids) - cpu) / connects * 1e6
            self.figures.add(f"fleet.connection_rate.{mode}", rate, "connections/s")
            self.figures.add(f"fleet.cpu_per_syn.{mode}", per_syn, "us")
            # Spoofed SYNs at the protected port: none may turn into a Redis command.
            flood = SynFlood(self.client_a.namespace, self.client_a.server_address, 22)
            calls = self._redis_calls()
            ids = queue_counters(self.lan.server(0), QUEUE).id_sequence
            sent = 0
            for batch in range(20 if self.smoke else 100):
                sent += flood.send(0x0B000001 + batch * 1000, 1000)
                time.sleep(0.01)
            flood.close()
            time.sleep(0.5)
            packets = queue_counters(self.lan.server(0), QUEUE).id_sequence - ids
            extra = ""
            if fleet:
                redis_calls = self._redis_calls() - calls - 1  # minus our own INFO
                self.figures.add("fleet.redis_calls_during_syn_flood", redis_calls, "commands")
                extra = f", {redis_calls} Redis commands meanwhile (heartbeats)"
            times = []
            for _ in range(5 if self.smoke else 20):
                self.lan.run(
                    self.client_a.namespace, ["knock", self.client_a.server_address, "40000", "50000", "60000"]
                )
                attempt = connect(self.client_a, timeout=3)
                if attempt.connected:
                    times.append(attempt.seconds * 1000)
            self.figures.add(f"fleet.knock_to_connect.{mode}", statistics.median(times), "ms")
            self.log(
                f"fleet costs, {mode}: {per_knock:.0f} us CPU per 3-step knock; granted client {rate:,.0f} "
                f"connections/s, {per_syn:.0f} us CPU per SYN; spoofed SYN flood: {packets} of {sent} queued"
                f"{extra}; knock to connect {statistics.median(times):.2f} ms"
            )
        finally:
            for index, process in enumerate(members):
                self._stop(index, process)

    # -- propagation ----------------------------------------------------------------------------

    def _propagation(self) -> None:
        trials = 10 if self.smoke else 100
        members = [self._start(0, True), self._start(1, True)]
        address = self.client_a.address
        grant_ms, revoke_ms = [], []
        # The probe: member b's kernel set of granted sources, read over netlink (tens of us), not
        # b's status over its control socket (a millisecond or more of b's own loop per look, which
        # the figure measured too). The set is what routes the client's SYN at b: when the source
        # is in it, b has applied the grant.
        from pyroute2 import IPSet  # type: ignore[import-untyped]

        from nfknock.firewall.plan import granted_set

        with entered(self.lan.server(1)):
            probe = IPSet()
        in_b = granted_set(QUEUE, 4)
        try:
            pids = [process_tree(member.pid) for member in members]
            cpu = [cpu_seconds(tree) for tree in pids]
            for _ in range(trials):
                self._knock(self.client_a)
                start = time.monotonic()
                while not probe.test(in_b, address):
                    if time.monotonic() - start > 5:
                        raise RuntimeError("the grant never reached member b")
                grant_ms.append((time.monotonic() - start) * 1000)
                if not self._has_grant(1, address):
                    raise RuntimeError("member b's kernel set holds a source its daemon has no grant for")
                call(self._socket(0), {"cmd": "revoke", "address": address, "door": None})
                start = time.monotonic()
                while probe.test(in_b, address):
                    if time.monotonic() - start > 5:
                        raise RuntimeError("the revocation never reached member b")
                revoke_ms.append((time.monotonic() - start) * 1000)
                time.sleep(0.01)
            time.sleep(0.3)  # what the last revoke set off (acknowledgements, disk, conntrack)
            # CPU per grant-and-revoke (all threads; the kernel's work on their behalf too): less
            # sensitive to a loaded machine than the latencies above.
            per_cycle = [(cpu_seconds(tree) - before) / trials * 1000 for tree, before in zip(pids, cpu, strict=True)]
            first = 0
            runs = 5 if self.smoke else 20
            for _ in range(runs):
                self._knock(self.client_a)
                time.sleep(0.005)
                first += connect(self.client_b, timeout=0.9).connected  # before TCP's 1 s retransmission
                call(self._socket(0), {"cmd": "revoke", "address": address, "door": None})
                while self._has_grant(1, address) or self._has_grant(0, address):
                    time.sleep(0.005)
        finally:
            probe.close()
            for index, process in enumerate(members):
                self._stop(index, process)
        for name, values in (("grant", grant_ms), ("revoke", revoke_ms)):
            self.figures.add(f"fleet.{name}_propagation.median{self.suffix}", statistics.median(values), "ms")
            self.figures.add(f"fleet.{name}_propagation.max{self.suffix}", max(values), "ms")
        for name, value in zip(("a", "b"), per_cycle, strict=True):
            self.figures.add(f"fleet.cpu_per_grant_and_revoke.{name}{self.suffix}", value, "ms")
        self.figures.add(f"fleet.first_syn_on_other_member{self.suffix}", first, f"of {runs}")
        which = "" if self.tree is None else f" (baseline: members run from {self.tree})"
        self.log(
            f"fleet propagation{which} over {trials}: grant median {statistics.median(grant_ms):.2f} ms, max "
            f"{max(grant_ms):.2f} ms; revoke median {statistics.median(revoke_ms):.2f} ms, "
            f"max {max(revoke_ms):.2f} ms; CPU per grant and revoke {per_cycle[0]:.1f} ms (a), "
            f"{per_cycle[1]:.1f} ms (b); "
            f"SYN to the other member 5 ms after the knock accepted first time in {first}/{runs}"
        )
