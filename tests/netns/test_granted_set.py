"""The kernel's set of granted sources, on a real kernel: a knock puts the client in it, close
and revoke take it out; a flood of strangers at the protected port is shed by the kernel before
the queue; a granted client's connections go to a queue of their own, its first SYN included.
Both backends."""

import json
import select
import socket
import time

import pytest
from conftest import connect, knock, spa_door

from nfknock.firewall.shards import queues, shard_of
from support.sandbox import SynFlood, entered, queue_counters

pytestmark = pytest.mark.parametrize("server", ["legacy", "nft"], indirect=True)
SEQUENCE, CLOSE = ("40000", "50000", "60000"), ("60000", "50000", "40000")


def members(server, family: int = 4) -> set[str]:
    out = server.sandbox.run(server.sandbox.server, ["ipset", "list", f"nfknock-q7-v{family}"], check=True).stdout
    return {line.split()[0] for line in out.split("Members:", 1)[1].splitlines() if line.strip()}


def wait_members(server, wanted: set[str], family: int = 4) -> set[str]:
    end = time.monotonic() + 10
    while (found := members(server, family)) != wanted and time.monotonic() < end:
        time.sleep(0.05)
    return found


def test_a_grant_puts_the_source_in_the_set_and_close_and_revoke_take_it_out(server, alice, bob):
    server.start()
    assert members(server) == set()
    knock(server.sandbox, alice, *SEQUENCE)
    assert wait_members(server, {alice.address}) == {alice.address}
    assert connect(alice).connected
    knock(server.sandbox, alice, *CLOSE)
    assert wait_members(server, set()) == set()
    knock(server.sandbox, bob, *SEQUENCE)
    assert wait_members(server, {bob.address}) == {bob.address}
    socket_path = str(server.workdir / "nfknock.sock")
    assert server.nfknock("revoke", bob.address, "--control-socket", socket_path).returncode == 0
    assert wait_members(server, set()) == set()
    assert not connect(bob, timeout=1).connected


def test_being_in_the_set_opens_nothing_by_itself(server, bob):
    """The set only routes to the daemon's queue: an element the daemon did not put there (or
    one it has revoked) gets the daemon's verdict, which is drop."""
    server.start("-v")
    server.sandbox.run(server.sandbox.server, ["ipset", "add", "nfknock-q7-v4", bob.address], check=True)
    assert not connect(bob, timeout=1).connected
    assert f"{bob.address}: refused new connection to 22/tcp" in server.wait_log("refused new connection")


def test_a_syn_flood_from_strangers_is_shed_before_the_queue(server, alice, mallory):
    server.start("-v")
    knock(server.sandbox, alice, *SEQUENCE)
    assert wait_members(server, {alice.address}) == {alice.address}
    main_before = queue_counters(server.sandbox.server, 7).id_sequence
    grant_before = queue_counters(server.sandbox.server, 8).id_sequence
    flood = SynFlood(mallory.namespace, mallory.server_address, 22)
    started = time.monotonic()
    try:
        sent = flood.send(0x0B000000, 200_000)  # 11.0.0.0 upwards: strangers
    finally:
        flood.close()
    elapsed = time.monotonic() - started
    assert connect(alice).connected
    main = queue_counters(server.sandbox.server, 7).id_sequence - main_before
    grant = queue_counters(server.sandbox.server, 8).id_sequence - grant_before
    # The kernel's limit: a burst of 200, then 100 a second (a little slack for timer rounding).
    assert sent > 150_000
    assert main <= 200 + 100 * (elapsed + 1), (main, elapsed)
    assert grant == 1  # alice's one connection, and nothing of the flood
    status = json.loads(
        server.nfknock("status", "--json", "--control-socket", str(server.workdir / "nfknock.sock")).stdout
    )
    assert [g["source"] for g in status["grants"]] == [alice.address]


def _greeted(sock: socket.socket) -> bool:
    """Whether the non-blocking connect on `sock` completed (on the SYN it sent) and the service
    greeted it."""
    if not select.select([], [sock], [], 10)[1] or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
        return False
    sock.setblocking(True)
    sock.settimeout(3)
    return sock.recv(16) == b"hello\n"


def _wait_for(path, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path.name} never appeared"
        time.sleep(0.01)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("door", ["knock", "spa"])
def test_the_first_syn_after_the_door_opens_reaches_the_grant_queue(server, alice, tmp_path, door, workers):
    """Route first, decide after. The daemon is held where it logs the last knock's grant, or
    writes the SPA packet's replay record (one process) or claims it (workers), and the client's
    SYN is sent then: it must reach the grant queue, which no flood reaches, and not the main
    queue through the strangers' limit, which a SYN flood at 22 keeps empty (its first SYN was
    lost, TCP retried after 1 s). Once the daemon goes on, that very SYN is accepted."""
    gate = tmp_path / "gate"
    if door == "spa":
        spa_door(server, tmp_path)
        target = "nfknock.daemon.claims.ReplayClaims.claim" if workers == 2 else "nfknock.daemon.store.ReplayStore.save"
        call = 1
    else:
        target, call = "nfknock.daemon.sinks.log_events", 2  # the third knock's (the kernel records the first)
    server.start("--workers", str(workers), fault=("--hold", target, call, gate))
    if door == "spa":
        encryption, mac = server.keys
        argv = ["fwknop", "-A", "tcp/22", "-a", alice.address, "-D", alice.server_address, "--use-hmac"]
        argv += ["--rc-file", "/dev/null", "--key-base64-rijndael", encryption, "--key-base64-hmac", mac]
        assert server.sandbox.run(alice.namespace, argv).returncode == 0
    else:
        knock(server.sandbox, alice, *SEQUENCE)
    _wait_for(gate.with_name("gate.held"))
    main, grant = queues(server.queue_num, shard_of(alice.address, workers))
    before = {q: queue_counters(server.sandbox.server, q).id_sequence for q in (main, grant)}
    with entered(alice.namespace):
        sock = socket.socket()
    try:
        sock.setblocking(False)
        sock.connect_ex((alice.server_address, 22))  # one SYN, while the daemon is held
        end = time.monotonic() + 10
        while sum(queue_counters(server.sandbox.server, q).id_sequence - before[q] for q in before) == 0:
            assert time.monotonic() < end, "the SYN reached neither queue"
            time.sleep(0.01)
        queued = {q: queue_counters(server.sandbox.server, q).id_sequence - before[q] for q in before}
        gate.touch()
        assert queued == {main: 0, grant: 1}
        assert _greeted(sock)
    finally:
        gate.touch()
        sock.close()


def _syn_rule_counts(server) -> tuple[int, int]:
    """Packets counted so far by the rules that send strangers' SYNs at 22 to the main queue:
    (through the recent set's bucket, through the strangers' limit), all workers' copies."""
    listed = server.sandbox.run(
        server.sandbox.server,
        [f"iptables-{server.flavour}", "-w", "-L", "NFKNOCK", "-v", "-x", "-n"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    recent = limited = 0
    for line in listed.splitlines():
        if "dpt:22 " not in line + " " or "NFQUEUE" not in line or "limit:" not in line:
            continue
        if f"nfknock-q{server.queue_num}-recent-v4" in line:
            recent += int(line.split()[0])
        elif "match-set" not in line:
            limited += int(line.split()[0])
    return recent, limited


@pytest.mark.parametrize("workers", [1, 2])
def test_a_syn_that_beats_the_daemon_to_the_last_knock_takes_the_recent_bucket(server, alice, tmp_path, workers):
    """The SYN right behind the last knock often reaches the kernel before the daemon has read
    that knock: not granted yet, it used to meet the strangers' limit, which a SYN flood at 22
    keeps empty. The knock noted alice as recent, so her SYN goes through a bucket no SYN flood
    alone touches, into the same queue behind her knock, and is accepted once the knock opened
    the door. The daemon is held before it judges the last knock; nothing here is timed."""
    gate = tmp_path / "gate"
    # Engine.handle's second call in alice's process: the third knock (the kernel records the first)
    server.start("--workers", str(workers), fault=("--hold", "nfknock.doors.engine.Engine.handle", 2, gate))
    knock(server.sandbox, alice, *SEQUENCE)
    _wait_for(gate.with_name("gate.held"))
    before = _syn_rule_counts(server)
    main, _ = queues(server.queue_num, shard_of(alice.address, workers))
    queued = queue_counters(server.sandbox.server, main).id_sequence
    with entered(alice.namespace):
        sock = socket.socket()
    try:
        sock.setblocking(False)
        sock.connect_ex((alice.server_address, 22))  # one SYN, while the last knock waits
        end = time.monotonic() + 10
        while queue_counters(server.sandbox.server, main).id_sequence == queued:
            assert time.monotonic() < end, "the SYN never reached the main queue"
            time.sleep(0.01)
        after = _syn_rule_counts(server)
        gate.touch()
        assert (after[0] - before[0], after[1] - before[1]) == (1, 0)
        assert _greeted(sock)
    finally:
        gate.touch()
        sock.close()
