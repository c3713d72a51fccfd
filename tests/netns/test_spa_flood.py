"""SPA under a junk flood, on a real kernel (firewall/spa_shape.py): what cannot be an fwknop
Rijndael packet (random bytes, wrong lengths, base64 that does not start the way fwknop's
ciphertext does) is dropped by the kernel and never reaches the queue, while the stock fwknop
client's packets are queued (the one without an HMAC too: refused by the daemon, in its log) and
the one with an HMAC opens, also with --workers 2 and on IPv6. A team door with 20 keys opens for
its last key, and junk from a client's own address, the kind that reaches the daemon included,
never locks that client out."""

from __future__ import annotations

import base64
import os
import socket
import time

import pytest
from conftest import connect, spa_door
from test_spa_doors import fwknop

from nfknock.doors.spa import Keys, encode, generate_keys
from nfknock.firewall.shards import queues
from nfknock.firewall.spa_shape import spa_shape
from support.sandbox import entered, queue_counters

pytestmark = pytest.mark.parametrize("server", ["legacy", "nft"], indirect=True)

SPA_PORT = 62201
REAL_LENGTH = len(encode(Keys(b"k" * 32, b"h" * 64), "10.199.1.2", [("tcp", 22)], 1_800_000_000))


def queued(server, workers: int = 1) -> int:
    """Packets the daemon's main queue(s) have taken so far (ids handed out)."""
    total = 0
    for shard in range(workers):
        counters = queue_counters(server.sandbox.server, queues(server.queue_num, shard)[0])
        assert counters is not None, "queue not bound"
        total += counters.id_sequence
    return total


def send(client, payloads: list[bytes], family: int = 4) -> None:
    with entered(client.namespace):
        sock = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for payload in payloads:
            sock.sendto(payload, (client.server(family), SPA_PORT))
    finally:
        sock.close()


def b64_junk(length: int, first: str) -> bytes:
    text = base64.b64encode(os.urandom(length)).decode().rstrip("=")
    return (first + text)[:length].encode()


def junk() -> list[bytes]:
    """What no fwknop client sends: each of these is the kernel's to drop."""
    random_bytes = [os.urandom(REAL_LENGTH) for _ in range(100)]  # the length of a real packet
    lengths = [os.urandom(n) for n in (0, 1, 60, 139, 600, 1400)]
    # base64 of a real packet's length whose first character no Rijndael packet has (a GPG-mode
    # packet's, or junk's); base64 that starts right but is too short for any packet.
    wrong_start = [b64_junk(REAL_LENGTH, first) for first in "AQgwU0+"[:-1]]
    short = [b64_junk(139, "8"), b64_junk(100, "/")]
    return random_bytes + lengths + wrong_start + short


@pytest.fixture
def spa_server(server, tmp_path):
    return spa_door(server, tmp_path)


@pytest.mark.parametrize("workers", [1, 2])
def test_junk_is_dropped_by_the_kernel_and_the_stock_client_opens(spa_server, alice, mallory, workers):
    spa_server.start("--workers", str(workers))
    rules = "\n".join(spa_server.iptables())
    assert spa_shape("udp", 4) in rules and f"--dport {SPA_PORT} -j DROP" in rules
    before = queued(spa_server, workers)
    send(mallory, junk())
    send(alice, junk())
    assert queued(spa_server, workers) == before  # not one packet of junk reached the queue
    fwknop(spa_server, alice)
    assert queued(spa_server, workers) == before + 1
    assert connect(alice, timeout=3).connected
    assert "SPA packet refused" not in spa_server.log_text()


def test_a_packet_without_hmac_still_reaches_the_daemon_and_is_refused_there(spa_server, alice):
    """Shape is all the kernel checks: fwknop's packet without an HMAC has it, and the daemon
    says why it refuses it (in the log, where an admin looks)."""
    spa_server.start()
    before = queued(spa_server)
    argv = [
        "fwknop",
        *("-A", "tcp/22", "-a", alice.address, "-D", alice.server_address, "--rc-file", "/dev/null"),
        *("--key-base64-rijndael", spa_server.keys[0]),
    ]
    result = spa_server.sandbox.run(alice.namespace, argv)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SPA packet refused: bad hmac" in spa_server.wait_log("SPA packet refused")
    assert queued(spa_server) == before + 1
    assert not connect(alice, timeout=1).connected


def test_ipv6_junk_is_dropped_and_our_packet_opens(spa_server, alice):
    spa_server.start()
    assert any(spa_shape("udp", 6) in line for line in spa_server.iptables(6))
    before = queued(spa_server)
    send(alice, junk(), family=6)
    assert queued(spa_server) == before
    keys = Keys(base64.b64decode(spa_server.keys[0]), base64.b64decode(spa_server.keys[1]))

    send(alice, [encode(keys, alice.address6, [("tcp", 22)], time.time())], family=6)
    assert queued(spa_server) == before + 1
    assert connect(alice, timeout=3, family=6).connected


def test_a_team_door_with_20_keys_opens_for_its_last_key_and_junk_locks_nobody_out(server, tmp_path, alice):
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir(mode=0o700)
    pairs = {}
    for i in range(20):
        pairs[f"k{i:02d}"] = generate_keys()
        path = keys_dir / f"k{i:02d}.keys"
        path.write_text(f"KEY_BASE64: {pairs[f'k{i:02d}'][0]}\nHMAC_KEY_BASE64: {pairs[f'k{i:02d}'][1]}\n")
        path.chmod(0o600)
    server.write_rules(f"""\
doors:
  - name: team
    kind: spa
    keys_dir: {keys_dir}
    protect: [22/tcp]
    lockout: {{failures: 3, window: 10m, lock_for: 10m}}
""")
    server.start()

    # Well-formed junk from alice's own address: the shape of a real packet, made with keys the
    # door does not have. It reaches the daemon (only an HMAC tells it apart) and is refused,
    # many times the lockout's failures: none of it counts against alice.
    strangers = [Keys(os.urandom(32), os.urandom(64)) for _ in range(4)]
    before = queued(server)
    forged = [encode(strangers[i % 4], alice.address, [("tcp", 22)], time.time()) for i in range(12)]
    send(alice, forged + junk())
    assert queued(server) == before + len(forged)
    server.wait_log("SPA packet refused", after=len(forged) - 1)
    assert "HMAC matches none of the door's 20 keys" in server.log_text()
    assert "locked out" not in server.log_text()
    encryption, mac = pairs["k19"]
    last = Keys(base64.b64decode(encryption), base64.b64decode(mac))
    send(alice, [encode(last, alice.address, [("tcp", 22)], time.time())])
    assert "k19" in server.wait_log("OPEN SESAME")
    assert connect(alice, timeout=3).connected
