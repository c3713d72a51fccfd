"""Scaffolding that heals itself, on a real kernel: while nfknock runs, the everyday operations
that take its rules away (`nft flush ruleset`, `iptables -F INPUT`, `iptables -F NFKNOCK`, a
restore of a file saved before nfknock started) are noticed and undone: the rules come back
exactly, a host that never knocked is shut out again (how many of its connects every 2 ms got
through meanwhile is printed, a figure for bench/self_healing.py), a granted client keeps its
access, a fresh knock works right after, the log says it once, status and the metrics count it.
Both backends, IPv4 and IPv6."""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time
import urllib.request

import pytest
from conftest import connect

from support.sandbox import entered

pytestmark = pytest.mark.parametrize("server", ["legacy", "nft"], indirect=True)
SEQUENCE = ("40000", "50000", "60000")
WARNING = "nfknock's rules were changed"
METRICS_PORT = 9476
OPERATIONS = ("nft flush ruleset", "iptables -F INPUT", "iptables -F NFKNOCK", "iptables-restore < saved")
EVERY = 0.002  # seconds between the stranger's connects
GIVE_UP = 0.1  # seconds a connect may take before the prober closes it (a retransmit is 1 s away)


class Prober:
    """A stranger that starts a new connection to the port every EVERY seconds, from its own
    namespace, and counts those that the server accepts."""

    def __init__(self, client, family: int, port: int = 22):
        self.client, self.family, self.port = client, family, port
        self.connected = 0
        self.tried = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        kind = socket.AF_INET6 if self.family == 6 else socket.AF_INET
        pending = selectors.DefaultSelector()
        with entered(self.client.namespace):  # sockets belong to the namespace they are made in
            next_at = time.monotonic()
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_at:
                    next_at += EVERY
                    sock = socket.socket(kind, socket.SOCK_STREAM)
                    sock.setblocking(False)
                    sock.connect_ex((self.client.server(self.family), self.port))
                    pending.register(sock, selectors.EVENT_WRITE, now)
                    self.tried += 1
                for key, _ in pending.select(max(0.0, next_at - time.monotonic())):
                    pending.unregister(key.fileobj)
                    if key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                        self.connected += 1
                    key.fileobj.close()
                for key in list(pending.get_map().values()):
                    if time.monotonic() - key.data > GIVE_UP:
                        pending.unregister(key.fileobj)
                        key.fileobj.close()
        for key in list(pending.get_map().values()):
            key.fileobj.close()


def tool(server, family: int, restore: bool = False) -> str:
    name = ("ip6tables" if family == 6 else "iptables") + ("-restore" if restore else "")
    return f"{name}-{server.flavour}" if not restore else name.replace("-restore", f"-{server.flavour}-restore")


def knock(server, client, family: int) -> None:
    result = server.sandbox.run(
        client.namespace, ["knock", *(["-6"] if family == 6 else []), client.server(family), *SEQUENCE]
    )
    assert result.returncode == 0, result.stderr


def status(server) -> dict:
    sock = str(server.workdir / "nfknock.sock")
    result = server.nfknock("status", "--json", "--control-socket", sock)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def metric(server, name: str) -> float | None:
    with entered(server.sandbox.server):
        text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("operation", OPERATIONS)
def test_rules_taken_away_come_back_at_once(server, alice, bob, mallory, family, operation):
    box = server.sandbox
    touches_us = not (operation == "nft flush ruleset" and server.flavour == "legacy")  # other tables
    # The admin's own rule, saved before nfknock started (netfilter-persistent's rules file).
    box.run(box.server, [tool(server, family), "-A", "INPUT", "-p", "udp", "--dport", "9", "-j", "ACCEPT"], check=True)
    saved = box.run(box.server, [tool(server, family).replace(f"-{server.flavour}", f"-{server.flavour}-save")]).stdout
    server.start("--metrics-port", str(METRICS_PORT))
    rules = server.iptables(family)
    assert any(line.startswith("-A INPUT") for line in rules)
    assert not connect(bob, family=family, timeout=0.5).connected
    knock(server, alice, family)
    assert connect(alice, family=family).connected
    with entered(alice.namespace):
        held = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET)
    held.settimeout(3)
    held.connect((alice.server(family), 22))
    assert held.recv(16) == b"hello\n"

    with Prober(bob, family) as prober:
        time.sleep(0.2)
        if operation == "nft flush ruleset":
            argv = ["nft", "flush", "ruleset"]
            box.run(box.server, argv, check=True)
        elif operation == "iptables-restore < saved":
            box.run(box.server, [tool(server, family, restore=True)], input=saved, check=True)
        else:
            box.run(box.server, [tool(server, family), "-F", operation.split()[-1]], check=True)
        time.sleep(0.3)
    window = f"{server.flavour} IPv{family} {operation}: {prober.connected} of {prober.tried} connects got through"
    print(window)
    assert prober.tried > 100

    assert server.iptables(family) == rules  # all of it back, the jump first in INPUT
    held.sendall(b"ping\n")
    assert held.recv(16) == b"ping\n"  # the granted client's session lives on
    held.close()
    assert connect(alice, family=family).connected  # and its grant still opens
    assert not connect(bob, family=family, timeout=0.5).connected  # the stranger is shut out again
    knock(server, mallory, family)
    assert connect(mallory, family=family).connected  # a fresh knock works

    warnings = [line for line in server.log_text().splitlines() if WARNING in line]
    assert len(warnings) == (1 if touches_us else 0), warnings
    watch = status(server)["scaffolding"]
    assert watch["restored"] == (1 if touches_us else 0)
    assert watch["failed"] == 0
    assert metric(server, "nfknock_scaffolding_restored_total") == (1 if touches_us else 0)
    # How many got through is a figure of the machine's timing, printed above and measured by
    # bench/self_healing.py (the README states it), not asserted here: at most 2 on legacy tables,
    # 2 to 9 on nf_tables, where the kernel holds the ruleset's lock for an RCU grace period after
    # a transaction that deleted rules (nfknock/firewall/watch.py).


def granted_members(server, family: int = 4) -> set[str]:
    out = server.sandbox.run(server.sandbox.server, ["ipset", "list", f"nfknock-q7-v{family}"], check=True).stdout
    return {line.split()[0] for line in out.split("Members:", 1)[1].splitlines() if line.strip()}


def test_sets_destroyed_while_unreferenced_come_back_and_the_granted_set_is_refilled(server, alice, bob, mallory):
    """A flush leaves nfknock's sets unreferenced, and netfilter-persistent's ipset plugin (or an
    admin) may destroy them before the daemon is back: the daemon is held (SIGSTOP) over both
    steps here, so that its quick repair fails and the slow one has to re-create the sets."""
    import signal

    box = server.sandbox
    server.start()
    rules = server.iptables(4)
    knock(server, alice, 4)
    assert connect(alice).connected
    assert alice.address in granted_members(server)
    server.process.send_signal(signal.SIGSTOP)
    try:
        if server.flavour == "nft":
            box.run(box.server, ["nft", "flush", "ruleset"], check=True)
        else:
            for family in (4, 6):
                tool = f"{'ip6tables' if family == 6 else 'iptables'}-legacy"
                box.run(box.server, [tool, "-F", "NFKNOCK"], check=True)
        listed = box.run(box.server, ["ipset", "list", "-n"], check=True).stdout.split()
        ours = [name for name in listed if name.startswith("nfknock-")]
        assert "nfknock-q7-v4" in ours
        for name in ours:
            box.run(box.server, ["ipset", "destroy", name], check=True)
    finally:
        server.process.send_signal(signal.SIGCONT)
    server.wait_log("the sets were re-created and the granted set refilled")
    assert server.iptables(4) == rules
    assert granted_members(server) == {alice.address}  # refilled from the grants the daemon holds
    assert connect(alice).connected
    assert not connect(bob, timeout=0.5).connected
    knock(server, mallory, 4)
    assert connect(mallory).connected


def test_with_workers_the_supervisor_puts_the_rules_back(server, bob, mallory):
    box = server.sandbox
    server.start("--workers", "2")
    rules = server.iptables(4)
    tool = f"iptables-{server.flavour}"
    box.run(box.server, [tool, "-F", "INPUT"], check=True)
    server.wait_log(WARNING)
    assert server.iptables(4) == rules
    assert not connect(bob, timeout=0.5).connected
    knock(server, mallory, 4)
    assert connect(mallory).connected
    watch = status(server)["scaffolding"]
    assert watch["restored"] == 1 and "jump from INPUT" in watch["last"]
