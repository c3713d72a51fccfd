"""The scaffolding split over worker processes, on a real kernel: with two workers, every packet
the chain queues reaches a queue of the worker `shards.shard_of` names for its source (the u32
match on the last byte of the source address, IPv4 and IPv6), whatever its port and protocol;
iptables shows the u32 rules as the plan writes them, and the backend reads back what it wrote.
Both backends. The daemon is not involved: a stand-in binds the four queues and drops."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from nfknock.doors.rules import parse_door
from nfknock.firewall.plan import granted_set
from nfknock.firewall.shards import queues, shard_of
from support.decisions import fresh_plan
from support.sandbox import entered

BASE, WORKERS = 60, 2  # queues 60..63: no other test's
DOOR = {"name": "d", "sequence": [40000, "50000/udp"], "protect": ["22/tcp"], "tripwire": 0}
HELPER = str(REPO / "tests" / "support" / "shard_queues.py")
TCP, UDP = socket.IPPROTO_TCP, socket.IPPROTO_UDP
# Sources on either side of the boundary between the workers' ranges (0..127 and 128..255), and
# the sandbox's own client addresses (last byte 2), on the first and second client.
EXTRA = {0: ["10.199.1.127", "fd00:199:1::7f"], 1: ["10.199.2.128", "10.199.2.254", "fd00:199:2::80", "fd00:199:2::fe"]}


@pytest.fixture(params=["legacy", "nft"])
def flavour(request):
    return request.param


def helper(sandbox, *args: str) -> subprocess.CompletedProcess:
    result = sandbox.run(sandbox.server, [sys.executable, HELPER, *args], cwd=REPO)
    assert result.returncode == 0, result.stderr
    return result


class Recorder:
    """The four queues bound by a stand-in that records each packet and drops it."""

    def __init__(self, sandbox, path: Path):
        self.path = path
        self.out = path.open("w")
        self.process = sandbox.spawn(
            sandbox.server, [sys.executable, HELPER, "listen", str(BASE), str(WORKERS)], stdout=self.out, cwd=REPO
        )
        self.wait(lambda: "ready" in self.lines(), "the queues bound")

    def lines(self) -> list[str]:
        return self.path.read_text().splitlines()

    def seen(self, source: str) -> set[tuple[int, int, int]]:
        """(queue, protocol, port) of every packet from `source` so far."""
        records = [json.loads(line) for line in self.lines() if line.startswith("{")]
        return {(r["queue"], r["proto"], r["dport"]) for r in records if r["source"] == source}

    def sources(self) -> set[str]:
        return {json.loads(line)["source"] for line in self.lines() if line.startswith("{")}

    def wait(self, done, what: str, timeout: float = 10) -> None:
        end = time.monotonic() + timeout
        while not done():
            if self.process.poll() is not None:
                raise RuntimeError(f"the queue stand-in exited ({self.process.returncode}) before {what}")
            if time.monotonic() > end:
                raise TimeoutError(f"not seen: {what}; recorded:\n" + "\n".join(self.lines()))
            time.sleep(0.02)

    def wait_for(self, source: str, *wanted: tuple[int, int, int]) -> None:
        self.wait(lambda: set(wanted) <= self.seen(source), f"{source}: {wanted}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.out.close()


def send(namespace: str, source: str, proto: int, server: str, port: int) -> None:
    """One UDP datagram, or one TCP SYN (a connect that is abandoned at once), from `source`."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    with entered(namespace):
        sock = socket.socket(family, socket.SOCK_DGRAM if proto == UDP else socket.SOCK_STREAM)
    with sock:
        sock.bind((source, 0))
        if proto == UDP:
            sock.sendto(b"knock", (server, port))
        else:
            sock.setblocking(False)
            sock.connect_ex((server, port))  # the SYN leaves now; closing sends nothing more


def in_set(sandbox, name: str, source: str) -> bool:
    return sandbox.run(sandbox.server, ["ipset", "test", name, source]).returncode == 0


def wait_in_set(sandbox, name: str, source: str) -> None:
    end = time.monotonic() + 10
    while not in_set(sandbox, name, source):
        assert time.monotonic() < end, f"{source} never entered {name}"
        time.sleep(0.02)


def test_each_source_reaches_only_the_queues_of_its_worker(sandbox, flavour, tmp_path):
    clients = sandbox.clients[:2]
    for index, addresses in EXTRA.items():  # the sandbox's own addresses all end in .2 / ::2
        client = clients[index]
        for address in addresses:
            near = sandbox.run(
                client.namespace, ["ip", "-o", "route", "get", client.server(6 if ":" in address else 4)]
            )
            device = near.stdout.split(" dev ")[1].split()[0]
            prefix = "/64" if ":" in address else "/24"
            extra = ["nodad"] if ":" in address else []
            sandbox.run(client.namespace, ["ip", "addr", "add", address + prefix, "dev", device, *extra], check=True)
    sources = [
        (client, address)
        for index, client in enumerate(clients)
        for address in [client.address, client.address6, *EXTRA[index]]
    ]
    assert {shard_of(address, WORKERS) for _, address in sources} == {0, 1}

    expected = fresh_plan((parse_door(DOOR),), BASE, workers=WORKERS)
    wanted = {family: [str(spec) for spec in specs] for family, specs in expected.items()}
    assert all(any("-m u32 --u32" in line for line in lines) for lines in wanted.values())
    recorder = None
    try:
        installed = json.loads(helper(sandbox, "apply", flavour, str(BASE), str(WORKERS), json.dumps(DOOR)).stdout)
        # The backend reads back exactly what it wrote: no spurious difference for `nfknock check`.
        assert {int(family): rules for family, rules in installed["installed"].items()} == wanted
        for family, tool in ((4, "iptables"), (6, "ip6tables")):
            shown = sandbox.run(sandbox.server, [f"{tool}-{flavour}", "-S", "NFKNOCK"], check=True).stdout
            assert [line for line in shown.splitlines() if line.startswith("-A ")] == wanted[family]
        recorder = Recorder(sandbox, tmp_path / "queued.jsonl")

        for client, source in sources:
            family = 6 if ":" in source else 4
            server = client.server(family)
            main, grant = queues(BASE, shard_of(source, WORKERS))
            # The knock: its first step lands in the kernel's set (no queue), the second is queued ...
            send(client.namespace, source, TCP, server, 40000)
            wait_in_set(sandbox, f"nfknock-q{BASE}-tcp40000-v{family}", source)
            send(client.namespace, source, UDP, server, 50000)
            recorder.wait_for(source, (main, UDP, 50000))
            # ... a new connection from a stranger goes to the main queue ...
            send(client.namespace, source, TCP, server, 22)
            recorder.wait_for(source, (main, TCP, 22))
            # ... and one from a source in the granted set to the grant queue; its knocks to the main one.
            sandbox.run(sandbox.server, ["ipset", "add", granted_set(BASE, family), source], check=True)
            send(client.namespace, source, TCP, server, 22)
            send(client.namespace, source, TCP, server, 40000)
            recorder.wait_for(source, (grant, TCP, 22), (main, TCP, 40000))

        # Each source on its own worker's queues only, and nothing else queued at all.
        for _, source in sources:
            main, grant = queues(BASE, shard_of(source, WORKERS))
            assert recorder.seen(source) == {(main, UDP, 50000), (main, TCP, 22), (grant, TCP, 22), (main, TCP, 40000)}
        assert recorder.sources() == {address for _, address in sources}
    finally:
        if recorder is not None:
            recorder.close()
        removed = sandbox.run(sandbox.server, [sys.executable, HELPER, "remove", flavour], cwd=REPO)
    assert removed.returncode == 0, removed.stderr
    for tool in ("iptables", "ip6tables"):
        left = sandbox.run(sandbox.server, [f"{tool}-{flavour}", "-S"], check=True).stdout
        assert "NFKNOCK" not in left
