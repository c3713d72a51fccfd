"""What nfknock must not touch: the host's own connections that happen to use a knock port as
their local port (40000-60000 lie in Linux's default ephemeral range), and knocks that conntrack
calls INVALID must still count. Every test runs with both firewall backends."""

import socket
import struct
import threading

import pytest
from conftest import connect

from support.sandbox import entered

pytestmark = pytest.mark.parametrize("server", ["legacy", "nft"], indirect=True)


class Peer:
    """A TCP echo listener and a UDP echo socket in a client namespace."""

    def __init__(self, client, tcp_port: int = 8080, udp_port: int = 5353):
        with entered(client.namespace):
            self.tcp = socket.create_server((client.address, tcp_port))
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((client.address, udp_port))
        self.tcp.settimeout(10)
        self.udp.settimeout(10)
        self.threads = [
            threading.Thread(target=self._tcp, daemon=True),
            threading.Thread(target=self._udp, daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def _tcp(self):
        try:
            conn, _ = self.tcp.accept()
            with conn:
                conn.settimeout(10)
                while data := conn.recv(1024):
                    conn.sendall(data)
        except OSError:
            pass

    def _udp(self):
        try:
            data, peer = self.udp.recvfrom(1024)
            self.udp.sendto(data, peer)
        except OSError:
            pass

    def close(self):
        self.tcp.close()
        self.udp.close()


def from_local_port(namespace: str, kind: int, local: tuple[str, int]) -> socket.socket:
    with entered(namespace):
        sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(local)  # before connect: the kernel would pick such a port from its ephemeral range
    sock.settimeout(3)
    return sock


def test_host_connections_from_knock_ports_get_their_replies(server, alice):
    # The seed door (TCP 40000 50000 60000) and a door with UDP steps, such as 50000/udp.
    server.write_rules(
        "doors:\n  - {name: udpDoor, sequence: [50000/udp, 51000/udp], protect: [2222/tcp]}\n", "udp.yaml"
    )
    server.start()
    sandbox = server.sandbox
    peer = Peer(alice)
    try:
        tcp = from_local_port(sandbox.server, socket.SOCK_STREAM, (alice.server_address, 40000))
        with tcp:
            tcp.connect((alice.address, 8080))  # the SYN-ACK comes back to port 40000
            tcp.sendall(b"outbound\n")
            assert tcp.recv(64) == b"outbound\n"
        udp = from_local_port(sandbox.server, socket.SOCK_DGRAM, (alice.server_address, 50000))
        with udp:
            udp.sendto(b"query", (alice.address, 5353))  # a DNS-like reply to port 50000
            assert udp.recvfrom(64)[0] == b"query"
    finally:
        peer.close()
    log = server.log_text()
    assert "Stage 1" not in log  # replies are not knocks
    assert not connect(alice, timeout=1).connected  # and the door stayed shut


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def send_tcp(client, dport: int, flags: int) -> None:
    """One bare TCP segment with the given flags, as a knock client with odd flags sends it."""
    src, dst = socket.inet_aton(client.address), socket.inet_aton(client.server_address)
    header = struct.pack("!HHIIBBHHH", 44444, dport, 1, 0, 5 << 4, flags, 1024, 0, 0)
    pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(header))
    header = header[:16] + struct.pack("!H", _checksum(pseudo + header)) + header[18:]
    with entered(client.namespace):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    with sock:
        sock.sendto(header, (client.server_address, 0))


def test_knocks_that_conntrack_calls_invalid_still_count(server, alice):
    """A lone FIN is INVALID to conntrack (no connection, not a SYN): it must still be queued."""
    server.write_rules("""\
doors:
  - name: finDoor
    sequence: [40000, 50000, 60000]
    protect: [22/tcp]
    tcp_flags: fin,!syn,!ack
""")
    server.start()
    for port in (40000, 50000, 60000):
        send_tcp(alice, port, 0x01)  # FIN
    server.wait_log("finDoor: OPEN SESAME", timeout=5)
    assert connect(alice, timeout=3).connected
