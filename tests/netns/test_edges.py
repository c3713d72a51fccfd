"""The edges of a protected port on a real kernel: SYN-cookie ACKs from strangers, sessions that
lose their conntrack entry, the host's own connections, and handshakes a revoke interrupts."""

from __future__ import annotations

import random
import socket
import sys
import time

import dpkt
import pytest
from conftest import connect, echoes, hold, knock

from support.sandbox import entered

pytestmark = pytest.mark.parametrize("server", ["legacy", "nft"], indirect=True)


def sysctl(server, setting: str) -> None:
    result = server.sandbox.run(server.sandbox.server, ["sysctl", "-q", "-w", setting], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def in_conntrack(server, code: str) -> str:
    """Run pyroute2 code against the server namespace's conntrack table, in a process started in
    that namespace (pyroute2's netlink socket does not follow a thread's setns); its stdout."""
    program = f"from pyroute2 import Conntrack\nfrom pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple\ntable = Conntrack()\n{code}\n"
    result = server.sandbox.run(server.sandbox.server, [sys.executable, "-c", program], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def flush_conntrack(server) -> None:
    """What `conntrack -F` does, in the server's namespace."""
    in_conntrack(server, "table.flush()")


def established_peers(server, port: int = 22) -> set[tuple[str, int]]:
    """`ss` in the server's namespace: the peers (address, port) of its established connections
    on `port` (an IPv4 peer of the dual-stack service as its plain address)."""
    result = server.sandbox.run(
        server.sandbox.server,
        ["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    peers = set()
    for line in result.stdout.splitlines():
        address, _, number = line.split()[-1].rpartition(":")
        peers.add((address.strip("[]").removeprefix("::ffff:"), int(number)))
    return peers


class RawTcp:
    """A client that writes its own TCP segments (its kernel's RSTs held back by a rule in its own
    namespace) and reads the server's answers: enough to complete a handshake by hand."""

    def __init__(self, server, client):
        self.client = client
        self.sandbox = server.sandbox
        self.sport = random.randint(20000, 30000)
        rst = ["OUTPUT", "-p", "tcp", "--sport", str(self.sport), "--tcp-flags", "RST", "RST", "-j", "DROP"]
        result = self.sandbox.run(client.namespace, ["iptables-nft", "-A", *rst], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        with entered(client.namespace):
            self.send_sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self.recv_sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
        self.recv_sock.settimeout(0.2)

    def send(self, flags: int, seq: int, ack: int = 0, data: bytes = b"") -> None:
        segment = dpkt.tcp.TCP(sport=self.sport, dport=22, seq=seq, ack=ack, flags=flags, off=5, win=64240, data=data)
        packet = dpkt.ip.IP(
            src=socket.inet_aton(self.client.address),
            dst=socket.inet_aton(self.client.server_address),
            p=dpkt.ip.IP_PROTO_TCP,
            ttl=64,
            data=segment,
        )
        self.send_sock.sendto(bytes(packet), (self.client.server_address, 0))

    def syn_ack(self, timeout: float = 3.0) -> int | None:
        """The sequence number of the server's SYN-ACK to our port, if one comes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.recv_sock.recv(2048)
            except TimeoutError:
                continue
            segment = dpkt.ip.IP(data).data
            if isinstance(segment, dpkt.tcp.TCP) and segment.dport == self.sport and segment.sport == 22:
                if segment.flags & dpkt.tcp.TH_SYN and segment.flags & dpkt.tcp.TH_ACK:
                    return segment.seq
        return None

    def close(self) -> None:
        self.send_sock.close()
        self.recv_sock.close()


def test_a_strangers_valid_syn_cookie_opens_nothing(server, mallory):
    """With SYN cookies always on (or a listener whose queue a flood overflowed), an ACK that
    reaches the listener is checked as a cookie. Mallory gets a genuine cookie (before nfknock
    runs) and answers it once the chain is in: no connection may open, and no data reach the
    service."""
    sysctl(server, "net.ipv4.tcp_syncookies=2")
    raw = RawTcp(server, mallory)
    try:
        isn = 1000
        raw.send(dpkt.tcp.TH_SYN, isn)
        cookie = raw.syn_ack()
        assert cookie is not None, "the server sent no SYN-ACK: no cookie to test with"
        server.start()
        flush_conntrack(server)  # nothing of the SYN above is remembered: only the cookie
        raw.send(dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH, isn + 1, (cookie + 1) & 0xFFFFFFFF, b"ping\n")
        time.sleep(0.5)  # the ACK's fate is decided as it arrives; give the service time to accept
        assert (mallory.address, raw.sport) not in established_peers(server)
    finally:
        raw.close()


def test_a_session_survives_a_conntrack_flush(server, alice):
    """The same rule must not cut the sessions the host has: after `conntrack -F` their next
    packet is a NEW mid-stream ACK, and it passes because it belongs to an open socket."""
    server.start()
    knock(server.sandbox, alice, "40000", "50000", "60000")
    session = hold(alice)
    try:
        name = f"nfknock-q{server.queue_num}-s22-v4"
        deadline = time.monotonic() + 20
        while (
            alice.address
            not in server.sandbox.run(
                server.sandbox.server, ["ipset", "list", name], capture_output=True, text=True
            ).stdout
        ):
            assert time.monotonic() < deadline, f"the session never reached {name}"
            time.sleep(0.2)
        flush_conntrack(server)
        assert echoes(session)
    finally:
        session.close()


def test_the_hosts_own_connections_to_a_protected_port_are_left_alone(server, alice):
    """Health checks and local port forwards: loopback and the host's own address reach the
    service without a knock, while a stranger from outside does not."""
    server.start()
    for address, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6), (alice.server_address, None)):
        with entered(server.sandbox.server):
            sock = socket.socket(family or socket.AF_INET)
        sock.settimeout(2)
        try:
            sock.connect((address, 22))
            assert sock.recv(16) == b"hello\n", address
        finally:
            sock.close()
    assert not connect(alice, timeout=1).connected


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_handshake_begun_during_a_grant_does_not_complete_after_a_revoke(server, alice, workers):
    """Alice's SYN is accepted during her grant, but the server's SYN-ACK is held back (a rule in
    her own namespace) until the operator has revoked her: the handshake she then completes must
    not become a connection, and no data may reach the service."""
    server.start("--workers", workers)
    knock(server.sandbox, alice, "40000", "50000", "60000")
    hold_back = ["INPUT", "-p", "tcp", "--sport", "22", "--tcp-flags", "SYN,ACK", "SYN,ACK", "-j", "DROP"]
    server.sandbox.run(alice.namespace, ["iptables-nft", "-A", *hold_back], check=True)
    with entered(alice.namespace):
        sock = socket.socket()
    sock.setblocking(False)
    try:
        assert sock.connect_ex((alice.server_address, 22)) == 115  # EINPROGRESS: the SYN is out
        port = sock.getsockname()[1]
        tracked = f"print(len(list(table.dump_entries(tuple_orig=NFCTAttrTuple(saddr='{alice.address}', proto=6, sport={port})))))"
        deadline = time.monotonic() + 10
        while in_conntrack(server, tracked).strip() == "0":  # the SYN was accepted: conntrack follows it
            assert time.monotonic() < deadline, "the SYN of the granted client never passed"
            time.sleep(0.05)
        revoked = server.nfknock("revoke", alice.address, "--control-socket", str(server.workdir / "nfknock.sock"))
        assert revoked.returncode == 0, revoked.stderr
        server.sandbox.run(alice.namespace, ["iptables-nft", "-D", *hold_back], check=True)
        sock.setblocking(True)
        sock.settimeout(4)  # the server resends its SYN-ACK after 1 s and 3 s
        try:
            greeting = sock.recv(16)
        except OSError:
            greeting = b""
        assert greeting != b"hello\n"
        assert not [peer for peer in established_peers(server) if peer == (alice.address, port)]
    finally:
        sock.close()
