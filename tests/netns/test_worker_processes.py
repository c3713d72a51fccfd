"""`nfknock run --workers 2` on a real kernel: each source is decided by the worker its address
belongs to, and the workers behave as one daemon: one status, one revoke, one reload, one replay
record; a grant for an address another worker owns opens there; a worker or supervisor that dies
leaves every protected port closed."""

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import replace

import pytest
from conftest import SEED, connect, knock, spa_door

from nfknock.firewall.shards import shard_of
from support.sandbox import ip, queue_counters

pytestmark = pytest.mark.parametrize("server", ["legacy", "nft"], indirect=True)
SEQUENCE, CLOSE = ("40000", "50000", "60000"), ("60000", "50000", "40000")


@pytest.fixture
def carol(sandbox):
    """The second client, moved to an address whose last byte puts it on worker 1 of 2 (the
    sandbox's clients all end in .2, which is worker 0's)."""
    client = sandbox.clients[1]
    moved = replace(client, address="10.199.2.200", address6="fd00:199:2::c8")
    shown = subprocess.run(["ip", "-n", client.namespace, "-o", "-4", "addr", "show"], capture_output=True, text=True)
    device = next(line.split()[1] for line in shown.stdout.splitlines() if f" {client.address}/" in line)
    for old, new, prefix in ((client.address, moved.address, 24), (client.address6, moved.address6, 64)):
        ip("-n", client.namespace, "addr", "del", f"{old}/{prefix}", "dev", device)  # first: a secondary
        ip("-n", client.namespace, "addr", "add", f"{new}/{prefix}", "dev", device, "nodad")  # goes with it
    assert shard_of(moved.address, 2) == 1 and shard_of(moved.address6, 2) == 1
    return moved


def status(server) -> dict:
    result = server.nfknock("status", "--json", "--control-socket", str(server.workdir / "nfknock.sock"))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def worker_pids(server) -> list[int]:
    line = server.wait_log("ready:")
    return [int(pid) for pid in re.search(r"pids ([\d ]+)\)", line).group(1).split()]


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to collect it has ended)."""
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_each_source_is_decided_by_its_worker_and_the_workers_act_as_one_daemon(server, alice, carol, mallory):
    assert shard_of(alice.address, 2) == 0
    server.start("--workers", "2")
    assert len(worker_pids(server)) == 2
    before = {queue: queue_counters(server.sandbox.server, queue).id_sequence for queue in (7, 9)}
    knock(server.sandbox, alice, *SEQUENCE)
    after_alice = {queue: queue_counters(server.sandbox.server, queue).id_sequence for queue in (7, 9)}
    knock(server.sandbox, carol, *SEQUENCE)
    after_carol = {queue: queue_counters(server.sandbox.server, queue).id_sequence for queue in (7, 9)}
    # Alice's knocks went to worker 0's queue (7) only, Carol's to worker 1's (9) only (the first
    # knock stays in the kernel: first_steps.py).
    assert after_alice[7] - before[7] == 2 and after_alice[9] == before[9]
    assert after_carol[9] - after_alice[9] == 2 and after_carol[7] == after_alice[7]
    assert connect(alice).connected and connect(carol).connected
    assert not connect(mallory, timeout=1).connected

    answer = status(server)
    assert answer["workers"] == 2
    assert {row["source"] for row in answer["grants"]} == {alice.address, carol.address}
    assert answer["packets"]["accept"] >= 2

    socket_path = str(server.workdir / "nfknock.sock")
    assert server.nfknock("revoke", carol.address, "--control-socket", socket_path).returncode == 0
    assert not connect(carol, timeout=1).connected
    assert connect(alice).connected
    assert (
        server.nfknock(
            "grant", carol.address, "--door", "openSSH", "--for", "60", "--control-socket", socket_path
        ).returncode
        == 0
    )
    assert connect(carol).connected
    knock(server.sandbox, carol, *CLOSE)
    server.wait_log(f"{carol.address}: openSSH: closed")
    assert not connect(carol, timeout=1).connected


def test_a_reload_reaches_every_worker(server, alice, carol):
    server.start("--workers", "2")
    server.write_rules(SEED.replace("40000, 50000, 60000]", "41000, 51000, 61000]"))
    server.process.send_signal(signal.SIGHUP)
    server.wait_log("reloaded")
    for client in (alice, carol):
        knock(server.sandbox, client, *SEQUENCE)
        assert not connect(client, timeout=1).connected
        knock(server.sandbox, client, "41000", "51000", "61000")
        assert connect(client).connected


def test_a_rotating_sequence_used_through_one_worker_is_refused_through_the_other(rotating, alice, carol):
    from support.sandbox import nfknock_argv

    rotating.start("--workers", "2")
    result = rotating.sandbox.run(
        alice.namespace, nfknock_argv("otp", "--door", "rotSSH", "--rules", str(rotating.rules))
    )
    ports = result.stdout.split()
    knock(rotating.sandbox, alice, *ports)
    assert connect(alice).connected
    knock(rotating.sandbox, carol, *ports)  # sniffed and replayed from an address of worker 1
    rotating.wait_log(f"{carol.address}: rotSSH: sequence already used in this window")
    assert not connect(carol, timeout=1).connected
    assert rotating.log_text().count("OPEN SESAME") == 1


def test_an_spa_packet_used_through_one_worker_is_refused_through_the_other(server, alice, carol, tmp_path):
    """With trust_inner_address (clients behind NAT) the packet's own address is not checked, so
    a captured packet sent again from another address is refused by the replay record alone,
    which the worker that saw it first made."""
    from test_spa_doors import fwknop, send_raw

    spa_door(server, tmp_path, "trust_inner_address: true")
    server.start("--workers", "2")
    packet_file = tmp_path / "packet"
    fwknop(server, alice, save=packet_file)
    server.wait_log(f"{alice.address}: spaSSH: OPEN SESAME")
    send_raw(carol, packet_file.read_text().strip().encode())  # from worker 1's address
    assert "SPA packet refused: replay" in server.wait_log(f"{carol.address}: spaSSH: SPA packet refused")
    assert not connect(carol, timeout=1).connected
    assert connect(alice).connected


def test_an_spa_packet_used_under_workers_stays_used_without_them(server, alice, carol, tmp_path):
    from test_spa_doors import fwknop, send_raw

    spa_door(server, tmp_path, "trust_inner_address: true")
    server.start("--workers", "2")
    packet_file = tmp_path / "packet"
    fwknop(server, alice, save=packet_file)
    server.wait_log(f"{alice.address}: spaSSH: OPEN SESAME")
    assert server.stop() == 0
    server.start("--workers", "1")  # the same --state-dir
    send_raw(carol, packet_file.read_text().strip().encode())
    assert "SPA packet refused: replay" in server.wait_log(f"{carol.address}: spaSSH: SPA packet refused")
    assert not connect(carol, timeout=1).connected


def test_a_reload_larger_than_a_socket_buffer_reaches_every_worker(server, alice, carol):
    sources = "\n".join(f"      - 10.{i // 250}.{i % 250}.0/24" for i in range(30000))
    server.write_rules(
        "doors:\n  - name: big\n    sequence: [1111, 2222]\n    protect: [8080/tcp]\n"
        f"    sources:\n{sources}\n      - 10.199.0.0/16\n",
        name="big.yaml",
    )
    server.start("--workers", "2")
    server.write_rules(SEED.replace("40000, 50000, 60000]", "41000, 51000, 61000]"))
    server.process.send_signal(signal.SIGHUP)
    server.wait_log("reloaded", timeout=60)
    for client in (alice, carol):
        knock(server.sandbox, client, "41000", "51000", "61000")
        assert connect(client).connected


def test_a_worker_that_dies_stops_the_daemon_with_every_port_closed(server, alice, carol):
    server.start("--workers", "2")
    knock(server.sandbox, alice, *SEQUENCE)
    knock(server.sandbox, carol, *SEQUENCE)
    assert connect(alice).connected and connect(carol).connected
    pids = worker_pids(server)
    os.kill(pids[1], signal.SIGKILL)
    assert server.process.wait(20) != 0
    assert "worker 1" in server.log_text()
    assert not any(alive(pid) for pid in pids)
    assert any("NFQUEUE" in rule for rule in server.iptables())  # the rules stay: closed, not open
    assert not connect(alice, timeout=1).connected and not connect(carol, timeout=1).connected


def test_a_killed_supervisor_takes_its_workers_with_it(server, alice):
    server.start("--workers", "2")
    knock(server.sandbox, alice, *SEQUENCE)
    assert connect(alice).connected
    pids = worker_pids(server)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)
    end = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < end:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids)
    assert not connect(alice, timeout=1).connected


def test_a_stop_signal_to_every_process_at_once_is_a_clean_stop(server, alice):
    """As systemd stops a service: SIGTERM to the whole control group."""
    server.start("--workers", "2")
    supervisor = int(re.search(r"ready: pid (\d+)", server.wait_log("ready:")).group(1))
    for pid in (supervisor, *worker_pids(server)):
        os.kill(pid, signal.SIGTERM)
    assert server.process.wait(20) == 0
    assert "nfknock stopped by a signal" in server.log_text()
    assert any("NFQUEUE" in rule for rule in server.iptables())
    assert not connect(alice, timeout=1).connected


def test_ipv6_sources_are_sharded_too_and_metrics_count_every_worker(server, alice, carol):
    import urllib.request

    from support.sandbox import entered

    server.start("--workers", "2", "--metrics-port", "9471")
    before = queue_counters(server.sandbox.server, 9).id_sequence
    result = server.sandbox.run(carol.namespace, ["knock", "-6", carol.server_address6, *SEQUENCE])
    assert result.returncode == 0, result.stderr
    assert queue_counters(server.sandbox.server, 9).id_sequence - before == 2  # worker 1's queue
    assert connect(carol, family=6, timeout=3).connected
    assert not connect(carol, timeout=1).connected  # the grant is for the IPv6 address
    knock(server.sandbox, alice, *SEQUENCE)
    assert connect(alice).connected
    assert {row["source"] for row in status(server)["grants"]} == {alice.address, carol.address6}
    with entered(server.sandbox.server):
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        body = opener.open("http://127.0.0.1:9471/metrics", timeout=5).read().decode()
    assert 'nfknock_active_grants{door="openSSH"} 2.0' in body
    assert 'nfknock_packets_total{verdict="accept"} 2.0' in body
    # Memory of every process (bounded by --max-sources): the supervisor's and each worker's.
    assert "process_resident_memory_bytes " in body
    for worker in ("0", "1"):
        assert f'nfknock_worker_resident_memory_bytes{{worker="{worker}"}} ' in body
    assert 'nfknock_lockouts_total{door="openSSH"} 0.0' in body  # there from the start, at 0


def test_a_stopped_worker_is_named_in_the_log_status_and_metrics_until_it_answers_again(server, alice, carol):
    """SIGSTOP on one worker (a debugger, an admin's mistake): its shard is closed, which is the
    safe side, but it must not be silent. The supervisor names the worker, its queues and what
    it means, keeps answering status for the others, and says when the worker answers again;
    it neither kills nor restarts it (a debugger session is not a crash)."""
    import urllib.request

    from support.sandbox import entered

    def scrape() -> str:
        with entered(server.sandbox.server):
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            return opener.open("http://127.0.0.1:9471/metrics", timeout=10).read().decode()

    server.start("--workers", "2", "--metrics-port", "9471")
    pids = worker_pids(server)
    knock(server.sandbox, carol, *SEQUENCE)
    assert connect(carol).connected
    os.kill(pids[1], signal.SIGSTOP)
    try:
        line = server.wait_log(f"worker 1 (pid {pids[1]}, queues 9-10) has not answered", timeout=60)
        assert "stopped" in line and "closed" in line and "128-255" in line
        assert not connect(carol, timeout=1).connected  # its shard: closed, never open
        answer = status(server)  # the other worker still answers
        assert [(row["worker"], row["pid"], row["queues"]) for row in answer["stuck_workers"]] == [
            (1, pids[1], [9, 10])
        ]
        text = server.nfknock("status", "--control-socket", str(server.workdir / "nfknock.sock"))
        assert text.returncode == 0, text.stderr
        assert f"worker 1 (pid {pids[1]}, queues 9-10) has not answered" in text.stdout
        body = scrape()
        assert 'nfknock_worker_up{worker="0"} 1.0' in body and 'nfknock_worker_up{worker="1"} 0.0' in body
        knock(server.sandbox, alice, *SEQUENCE)  # worker 0's shard is served as before
        assert connect(alice).connected
        assert alive(pids[1])  # not killed, not restarted
    finally:
        os.kill(pids[1], signal.SIGCONT)
    server.wait_log(f"worker 1 (pid {pids[1]}, queues 9-10) answers again", timeout=60)
    assert status(server)["stuck_workers"] == []
    assert 'nfknock_worker_up{worker="1"} 1.0' in scrape()
    knock(server.sandbox, carol, *SEQUENCE)
    assert connect(carol).connected


# -- SPA packets refused after their HMAC: used, for every worker and after a restart ------------


def spa_outcome(server, client, after: int = 0, timeout: float = 20) -> str:
    """The (after+1)-th thing the SPA door said about `client`'s packets: opened, or refused."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        lines = [
            line
            for line in server.log_text().splitlines()
            if f"{client.address}: spaSSH: " in line and ("OPEN SESAME" in line or "SPA packet refused" in line)
        ]
        if len(lines) > after:
            return lines[after]
        time.sleep(0.02)
    raise TimeoutError(f"the door said nothing about {client.address}:\n{server.log_text()}")


def widen(server) -> None:
    """The operator lets the door open 2222/tcp too."""
    rules = server.rules / "doors.yaml"
    server.write_rules(rules.read_text().replace("protect: [22/tcp]", "protect: [22/tcp, 2222/tcp]"))


def refused_for_its_ports(server, client, tmp_path) -> bytes:
    """A genuine packet (stock fwknop) asking for 22 and 2222, which the door does not protect yet."""
    from test_spa_doors import fwknop

    packet_file = tmp_path / "packet"
    fwknop(server, client, access="tcp/22,tcp/2222", save=packet_file)
    assert "SPA packet refused: port not allowed" in spa_outcome(server, client)
    return packet_file.read_text().strip().encode()


def test_an_spa_packet_refused_through_one_worker_stays_used_through_the_other_after_the_door_widens(
    server, alice, carol, tmp_path
):
    from test_spa_doors import send_raw

    spa_door(server, tmp_path, "trust_inner_address: true")
    server.start("--workers", "2")
    wire = refused_for_its_ports(server, alice, tmp_path)
    widen(server)
    server.process.send_signal(signal.SIGHUP)
    server.wait_log("reloaded")
    send_raw(carol, wire)  # captured, and sent again from worker 1's address
    assert "SPA packet refused: replay" in spa_outcome(server, carol)
    assert not connect(carol, timeout=1).connected
    assert "OPEN SESAME" not in server.log_text()


def test_an_spa_packet_refused_as_from_the_future_is_refused_through_the_other_worker_when_its_time_comes(
    server, alice, carol, tmp_path
):
    import base64

    from test_spa_doors import send_raw

    from nfknock.doors.spa import Keys, encode

    spa_door(server, tmp_path, "trust_inner_address: true", "max_age: 5s")
    server.start("--workers", "2")
    keys = Keys(base64.b64decode(server.keys[0]), base64.b64decode(server.keys[1]))
    stamped = time.time() + 10  # 10 s ahead: refused; from 5 s before that time on it would be fresh
    wire = encode(keys, alice.address, [("tcp", 22)], stamped)
    send_raw(alice, wire)
    assert "SPA packet refused: from the future" in spa_outcome(server, alice)
    time.sleep(max(0.0, stamped - 4 - time.time()))
    send_raw(carol, wire)  # now within max_age, from worker 1's address
    assert "SPA packet refused: replay" in spa_outcome(server, carol)
    assert not connect(carol, timeout=1).connected


@pytest.mark.parametrize("before, after", [(1, 1), (2, 2), (2, 1), (1, 2)])
def test_an_spa_packet_refused_before_a_restart_stays_used_after_it(server, alice, tmp_path, before, after):
    from test_spa_doors import send_raw

    spa_door(server, tmp_path)
    server.start("--workers", str(before))
    wire = refused_for_its_ports(server, alice, tmp_path)
    assert server.stop() == 0
    widen(server)
    server.start("--workers", str(after))  # the same --state-dir
    send_raw(alice, wire)  # from its own source
    assert "SPA packet refused: replay" in spa_outcome(server, alice, after=1)
    assert not connect(alice, timeout=1).connected
