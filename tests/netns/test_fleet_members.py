"""Fleet mode on a real kernel with a real redis-server: bastions on one bridge share grants,
revocations and SPA replay records; a Redis outage leaves every member serving its own knocks;
an entry written into Redis without the fleet key opens nothing."""

import base64
import json
import os
import secrets
import select
import shutil
import socket
import time
import urllib.request

import pytest
from conftest import Server, connect

from nfknock.doors.spa import generate_keys
from nfknock.firewall.shards import queues, shard_of
from support.sandbox import EchoService, Lan, RedisServer, entered, nfknock_argv, queue_counters

SEQUENCE = ("40000", "50000", "60000")


@pytest.fixture
def lan(kernel):
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        reason = "missing commands: redis-server, redis-cli (scripts/setup.sh installs them)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"real-kernel tests cannot run under CI=true: {reason}")
        pytest.skip(reason)
    with Lan(servers_wanted=3, clients_wanted=2) as box:
        services = [EchoService(box.server(i)) for i in range(box.servers_wanted)]
        try:
            yield box
        finally:
            for service in services:
                service.close()


@pytest.fixture
def fleet(lan, tmp_path):
    """Redis on the hub, the fleet key and the Redis password in root-only files, and a
    `start(i)` that runs member i (named a, b, c) with an SPA door and the seed knock door."""
    redis = RedisServer(lan, secrets.token_hex(12))
    redis.start()
    key_file, password_file = tmp_path / "fleet.key", tmp_path / "redis.password"
    key_file.write_text(base64.b64encode(secrets.token_bytes(48)).decode() + "\n")
    password_file.write_text(redis.password + "\n")
    encryption, mac = generate_keys()
    spa_keys = tmp_path / "spa.keys"
    spa_keys.write_text(f"KEY_BASE64: {encryption}\nHMAC_KEY_BASE64: {mac}\n")
    for path in (key_file, password_file, spa_keys):
        path.chmod(0o600)
    members: list[Server] = []

    def start(index: int, *extra: str, fault: tuple | None = None) -> Server:
        workdir = tmp_path / f"member{index}"
        workdir.mkdir(exist_ok=True)
        member = Server(lan.view(index), workdir)
        member.write_rules(SEED_RULES.format(keys=spa_keys))
        member.name = "abc"[index]
        seen = member.log_text().count("fleet: Redis at")
        member.start(
            "--cluster",
            redis.url,
            "--cluster-key-file",
            str(key_file),
            "--cluster-password-file",
            str(password_file),
            "--cluster-member",
            member.name,
            *extra,
            fault=fault,
        )
        assert "reachable;" in member.wait_log("fleet: Redis at", after=seen), member.log_text()
        members.append(member)
        return member

    start.redis = redis
    start.spa = (encryption, mac)
    start.key_file = key_file
    yield start
    for member in members:
        if member.process is not None and member.process.poll() is None:
            member.stop()
    redis.kill()


SEED_RULES = """\
doors:
  - name: openSSH
    sequence: [40000, 50000, 60000]
    close_sequence: [60000, 50000, 40000]
    protect: [22/tcp]
    seq_timeout: 15s
    open_for: 60s
    tcp_flags: syn,!ack
  - name: spaSSH
    kind: spa
    keys_file: {keys}
    protect: [22/tcp]
"""


def knock(lan, client):
    result = lan.run(client.namespace, ["knock", client.server_address, *SEQUENCE])
    assert result.returncode == 0, result.stderr


def status(member) -> dict:
    result = member.nfknock("status", "--json", "--control-socket", str(member.workdir / "nfknock.sock"))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def ctl(member, *args):
    return member.nfknock(*args, "--control-socket", str(member.workdir / "nfknock.sock"))


def fwknop(lan, client, keys, save=None):
    argv = ["fwknop", "-A", "tcp/22", "-a", client.address, "-D", client.server_address, "--use-hmac"]
    argv += ["--key-base64-rijndael", keys[0], "--key-base64-hmac", keys[1], "--rc-file", "/dev/null"]
    if save:
        argv += ["--save-packet", str(save)]
    result = lan.run(client.namespace, argv)
    assert result.returncode == 0, result.stdout + result.stderr


def send_udp(client, payload, port=62201):
    with entered(client.namespace):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.sendto(payload, (client.server_address, port))
    sock.close()


def test_a_knock_on_one_member_opens_the_others(lan, fleet):
    fleet(0)
    b, c = fleet(1), fleet(2, "--metrics-port", "9475")
    knock(lan, lan.client(0, server=0))
    attempt = connect(lan.client(0, server=1), timeout=3)  # at once, to another member
    assert attempt.connected and attempt.greeting == b"hello\n"
    assert "10.198.0.101: openSSH: open, granted on fleet member a" in b.log_text()
    assert connect(lan.client(0, server=2), timeout=3).connected
    assert not connect(lan.client(1, server=1), timeout=1).connected  # only the knocker's address
    seen = status(c)["fleet"]
    assert seen["reachable"] and {m["member"] for m in seen["members"]} == {"a", "b", "c"}
    assert [(g["source"], g["door"], g["from"]) for g in seen["shared_grants"]] == [("10.198.0.101", "openSSH", "a")]
    assert "fleet nfknock: Redis" in ctl(c, "status").stdout
    with entered(lan.server(2)):
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        body = opener.open("http://127.0.0.1:9475/metrics", timeout=5).read().decode()
    assert "nfknock_fleet_redis_up 1.0" in body and "nfknock_fleet_members 3.0" in body
    assert "nfknock_fleet_shared_grants 1.0" in body


def test_a_revoke_on_any_member_closes_all(lan, fleet):
    a, b = fleet(0), fleet(1)
    knock(lan, lan.client(0, server=0))
    assert connect(lan.client(0, server=0)).connected
    b.wait_log("granted on fleet member a")
    result = ctl(b, "revoke", "10.198.0.101")
    assert result.returncode == 0, result.stderr
    a.wait_log("10.198.0.101: revoked on fleet member b")
    assert not connect(lan.client(0, server=0), timeout=1).connected
    assert not connect(lan.client(0, server=1), timeout=1).connected


def test_an_spa_packet_replayed_to_another_member_is_refused(lan, fleet, tmp_path):
    a, b = fleet(0), fleet(1)
    saved = tmp_path / "packet"
    fwknop(lan, lan.client(0, server=0), fleet.spa, save=saved)
    a.wait_log("10.198.0.101: spaSSH: OPEN SESAME")
    assert ctl(a, "revoke", "10.198.0.101").returncode == 0  # closed everywhere again
    b.wait_log("revoked on fleet member a")
    send_udp(lan.client(0, server=1), saved.read_text().strip().encode())  # the captured packet, to b
    line = b.wait_log("SPA packet refused")
    assert "replay (used on member a)" in line
    assert not connect(lan.client(0, server=1), timeout=1).connected
    assert status(b)["fleet"]["claims_refused"] == 1


def test_members_serve_locally_while_redis_is_down_and_catch_up(lan, fleet):
    a, b = fleet(0), fleet(1)
    fleet.redis.kill()
    a.wait_log("unreachable")
    b.wait_log("unreachable")
    knock(lan, lan.client(0, server=0))  # a's own knock: served with a's state
    assert connect(lan.client(0, server=0), timeout=3).connected
    fwknop(lan, lan.client(1, server=1), fleet.spa)  # SPA on b: accepted (--cluster-offline accept)
    assert connect(lan.client(1, server=1), timeout=3).connected
    down = status(a)["fleet"]
    assert not down["reachable"] and down["backlog"] >= 1
    assert a.log_text().count("unreachable") == 1  # said once, not at every retry
    fleet.redis.start()  # empty: it kept nothing
    a.wait_log("reachable;", after=1)
    b.wait_log("reachable;", after=1)
    b.wait_log("10.198.0.101: openSSH: open, granted on fleet member a")  # what a did meanwhile
    a.wait_log("10.198.0.102: spaSSH: open, granted on fleet member b")
    assert connect(lan.client(0, server=1), timeout=3).connected
    assert connect(lan.client(1, server=0), timeout=3).connected
    assert a.process.poll() is None and b.process.poll() is None


def test_an_entry_forged_with_redis_cli_opens_nothing(lan, fleet):
    a = fleet(0)
    until = time.time() + 600
    forged = json.dumps(
        {
            "kind": "grant",
            "id": "x1",
            "member": "b",
            "instance": "i",
            "src": "10.198.0.102",
            "door": "openSSH",
            "until": until,
            "ports": None,
        }
    )
    result = fleet.redis.cli("XADD", "nfknock:stream", "*", "e", "AAAA." + forged)
    assert result.returncode == 0 and "-" in result.stdout, result.stdout + result.stderr
    line = a.wait_log("does not verify with the fleet key")
    assert "opens nothing" in line
    assert not connect(lan.client(1, server=0), timeout=1).connected
    assert status(a)["fleet"]["rejected"] >= 1


def test_a_member_with_workers_shares_grants_and_replay_records_like_any_other(lan, fleet, tmp_path):
    """Each worker of b is a fleet member of its own (same name): what the fleet says reaches
    the worker owning the source, and what any worker used is claimed in Redis."""
    a, b = fleet(0), fleet(1, "--workers", "2")
    knock(lan, lan.client(0, server=1))  # decided by one of b's workers
    assert connect(lan.client(0, server=0), timeout=3).connected
    knock(lan, lan.client(1, server=0))
    b.wait_log(f"{lan.client(1).address}: openSSH: open, granted on fleet member a")
    assert connect(lan.client(1, server=1), timeout=3).connected
    saved = tmp_path / "packet"
    fwknop(lan, lan.client(0, server=0), fleet.spa, save=saved)
    a.wait_log("spaSSH: OPEN SESAME")
    send_udp(lan.client(0, server=1), saved.read_text().strip().encode())
    assert "replay (used on member a)" in b.wait_log("SPA packet refused")
    seen = status(b)
    assert seen["workers"] == 2 and {m["member"] for m in seen["fleet"]["members"]} == {"a", "b"}


def test_an_spa_packet_refused_on_one_member_is_refused_on_another_after_the_doors_widen(lan, fleet):
    """Refused on a for a port its door does not open, the packet is used fleet-wide: once the
    operator widens the doors, the captured copy sent to b is a replay there."""
    import signal

    from nfknock.doors.spa import Keys, encode

    a, b = fleet(0), fleet(1)
    alice = lan.client(0, server=0)
    keys = Keys(base64.b64decode(fleet.spa[0]), base64.b64decode(fleet.spa[1]))
    wire = encode(keys, alice.address, [("tcp", 22), ("tcp", 2222)], time.time())
    send_udp(alice, wire)
    assert "SPA packet refused: port not allowed" in a.wait_log("SPA packet refused")
    for member in (a, b):
        rules = member.rules / "doors.yaml"
        text = rules.read_text()
        member.write_rules(text[: text.rindex("protect: [22/tcp]")] + "protect: [22/tcp, 2222/tcp]\n")
        member.process.send_signal(signal.SIGHUP)
        member.wait_log("reloaded")
    send_udp(lan.client(0, server=1), wire)  # the captured packet, to b
    assert "replay (used on member a)" in b.wait_log("SPA packet refused")
    assert "OPEN SESAME" not in b.log_text()
    assert not connect(lan.client(0, server=1), timeout=1).connected


# -- issue 23: a revocation is never undone; a used packet never works twice --------------------


def cut_from_redis(lan, index):
    """Member `index` loses its way to Redis (the hub's address, and only that): a namespace route."""
    route = ["route", "add", "prohibit", f"{lan.hub_address}/32"]
    lan.run(lan.server(index), ["ip", *route], check=True)
    return lambda: lan.run(lan.server(index), ["ip", "route", "del", "prohibit", f"{lan.hub_address}/32"], check=True)


def test_a_revoke_issued_while_cut_off_wins_over_the_grant_read_after_it(lan, fleet):
    """b is cut off from Redis; alice knocks on a; the operator revokes on b; b is back: the
    grant b reads then was issued before the revocation and opens nothing, on b or on a."""
    a, b = fleet(0), fleet(1)
    mend = cut_from_redis(lan, 1)
    b.wait_log("unreachable")
    knock(lan, lan.client(0, server=0))
    assert connect(lan.client(0, server=0), timeout=3).connected
    answer = ctl(b, "revoke", "10.198.0.101")
    assert answer.returncode == 0, answer.stderr
    assert "fleet: NOT confirmed by a" in answer.stdout  # b cannot even publish it yet
    mend()
    b.wait_log("reachable;", after=1)
    a.wait_log("10.198.0.101: revoked on fleet member b")
    time.sleep(0.5)  # b reads what it missed
    assert not connect(lan.client(0, server=1), timeout=1).connected
    assert not connect(lan.client(0, server=0), timeout=1).connected
    assert "not applied: revoked on member b" in b.wait_log("grant from fleet member a not applied")


def test_revoke_names_the_members_that_confirmed_it_and_those_that_did_not(lan, fleet):
    a, c = fleet(0), fleet(2)
    fleet(1)
    knock(lan, lan.client(0, server=0))
    c.wait_log("granted on fleet member a")
    mend = cut_from_redis(lan, 2)
    c.wait_log("unreachable")
    answer = ctl(a, "revoke", "10.198.0.101")
    assert answer.returncode == 0, answer.stderr
    assert "fleet: confirmed by b" in answer.stdout
    assert "fleet: NOT confirmed by c" in answer.stdout and "the door may still be open there" in answer.stdout
    assert connect(lan.client(0, server=2), timeout=3).connected  # indeed: c has not heard of it
    mend()
    c.wait_log("10.198.0.101: revoked on fleet member a")
    assert not connect(lan.client(0, server=2), timeout=1).connected


def test_a_revocation_deleted_from_redis_is_not_undone_by_a_restart_or_a_join(lan, fleet):
    """Someone with the Redis password but not the fleet key deletes the revoke entry (XDEL) and
    its second copy; b restarts (its own copy on disk), later c joins (a put the copy back)."""
    a, b = fleet(0), fleet(1)
    knock(lan, lan.client(0, server=0))
    b.wait_log("10.198.0.101: openSSH: open, granted on fleet member a")
    assert ctl(a, "revoke", "10.198.0.101").returncode == 0
    b.wait_log("10.198.0.101: revoked on fleet member a")
    newest = fleet.redis.cli("XREVRANGE", "nfknock:stream", "+", "-", "COUNT", "1").stdout.split()[0]
    assert fleet.redis.cli("XDEL", "nfknock:stream", newest).stdout.strip() == "1"
    assert fleet.redis.cli("DEL", "nfknock:revoked").stdout.strip() == "1"
    b.stop()
    b = fleet(1)
    assert not connect(lan.client(0, server=1), timeout=1).connected
    end = time.monotonic() + 20  # a puts the second copy back by itself
    while fleet.redis.cli("HLEN", "nfknock:revoked").stdout.strip() == "0" and time.monotonic() < end:
        time.sleep(0.1)
    c = fleet(2)
    time.sleep(1)
    assert "granted on fleet member a" not in c.log_text()
    assert not connect(lan.client(0, server=2), timeout=1).connected
    assert not connect(lan.client(0, server=1), timeout=1).connected


def test_a_packet_used_before_redis_restarted_empty_is_refused_after(lan, fleet, tmp_path):
    """Redis restarted without its data: a notices (the epoch marker is gone), says so, puts its
    live claim back; the captured packet sent to b is a replay."""
    a, b = fleet(0), fleet(1)
    saved = tmp_path / "packet"
    fwknop(lan, lan.client(0, server=0), fleet.spa, save=saved)
    a.wait_log("10.198.0.101: spaSSH: OPEN SESAME")
    assert ctl(a, "revoke", "10.198.0.101").returncode == 0  # closed everywhere again
    b.wait_log("revoked on fleet member a")
    fleet.redis.kill()
    fleet.redis.start()
    assert "put back" in a.wait_log("Redis lost the fleet's data")
    time.sleep(6)  # RECOVERY: every live member has put its claims back
    send_udp(lan.client(0, server=1), saved.read_text().strip().encode())
    assert "replay (used on member a)" in b.wait_log("SPA packet refused")
    assert not connect(lan.client(0, server=1), timeout=1).connected


def test_a_member_with_workers_refuses_a_used_packet_after_a_restart_with_redis_empty(lan, fleet, tmp_path):
    """Item 5: the claims directory is written with --workers and --cluster too."""
    a = fleet(0, "--workers", "2")
    saved = tmp_path / "packet"
    fwknop(lan, lan.client(0, server=0), fleet.spa, save=saved)
    a.wait_log("spaSSH: OPEN SESAME")
    assert ctl(a, "revoke", "10.198.0.101").returncode == 0
    a.stop()
    fleet.redis.kill()
    fleet.redis.start()
    a = fleet(0, "--workers", "2")
    send_udp(lan.client(0, server=0), saved.read_text().strip().encode())
    assert "replay" in a.wait_log("SPA packet refused")
    assert not connect(lan.client(0, server=0), timeout=1).connected


def test_a_member_whose_clock_is_off_refuses_spa_and_says_why(lan, fleet):
    """Item 9: 90 s behind Redis's TIME (more than the 30 s bound): the member cannot check what
    others used, so SPA is refused whatever --cluster-offline says, with an alarm."""
    fleet(0)
    b = fleet(1, fault=("--clock-offset", "-90"))
    time.sleep(2.5)  # a heartbeat: b has compared its clock with Redis's
    fwknop(lan, lan.client(0, server=1), fleet.spa)
    assert not connect(lan.client(0, server=1), timeout=1).connected
    assert "OPEN SESAME" not in b.log_text()
    assert "off Redis's" in b.wait_log("SPA packet refused")
    assert "off Redis's" in b.wait_log("clock is -90s off")


def test_an_evicting_redis_is_said_at_start(lan, fleet):
    fleet.redis.cli("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    a = fleet(0)
    assert "maxmemory-policy is allkeys-lru" in a.wait_log("maxmemory-policy")
    assert status(a)["fleet"]["redis_policy"] == "allkeys-lru"


@pytest.mark.parametrize("workers", [1, 2])
def test_the_first_syn_behind_an_spa_packet_waits_for_the_fleets_answer(lan, fleet, tmp_path, workers):
    """An SPA packet's grant waits for one Redis round trip (its replay claim). The client's
    first SYN, sent meanwhile, is held by the daemon, not dropped (it used to be, and TCP
    retried after a second): once the claim is answered, that very SYN is accepted, and it is
    the only one the queues saw. The claim is held in the fleet link's thread; nothing is timed."""
    gate = tmp_path / "gate"
    a = fleet(0, "--workers", str(workers), fault=("--hold", "nfknock.fleet.link.Link._claim", 1, gate))
    client = lan.client(0, server=0)
    fwknop(lan, client, fleet.spa)
    end = time.monotonic() + 20
    while not gate.with_name("gate.held").exists():
        assert time.monotonic() < end, "the claim never reached the link"
        time.sleep(0.01)
    namespace = lan.server(0)
    pair = queues(a.queue_num, shard_of(client.address, workers))
    before = {q: queue_counters(namespace, q).id_sequence for q in pair}
    with entered(client.namespace):
        sock = socket.socket()
    try:
        sock.setblocking(False)
        sock.connect_ex((client.server_address, 22))  # one SYN, while the claim is in flight
        while sum(queue_counters(namespace, q).id_sequence - before[q] for q in pair) == 0:
            assert time.monotonic() < end, "the SYN reached no queue"
            time.sleep(0.01)
        gate.touch()
        assert select.select([], [sock], [], 10)[1] and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        assert sum(queue_counters(namespace, q).id_sequence - before[q] for q in pair) == 1  # no retransmit
    finally:
        gate.touch()
        sock.close()
    assert "10.198.0.101: spaSSH: OPEN SESAME" in a.log_text()


# -- issue 23, what was left: workers, doctor ----------------------------------------------------


def test_a_member_with_workers_puts_back_what_it_used_before_a_restart_when_redis_loses_it(lan, fleet, tmp_path):
    """a (2 workers) used a packet, then restarted: its workers hold nothing of it in memory, only
    the claims directory on disk does. Redis then restarts empty: a puts the claim back from the
    directory, so the captured packet sent to b is a replay there."""
    a, b = fleet(0, "--workers", "2"), fleet(1)
    saved = tmp_path / "packet"
    fwknop(lan, lan.client(0, server=0), fleet.spa, save=saved)
    a.wait_log("10.198.0.101: spaSSH: OPEN SESAME")
    assert ctl(a, "revoke", "10.198.0.101").returncode == 0
    b.wait_log("revoked on fleet member a")
    a.stop()
    a = fleet(0, "--workers", "2")
    fleet.redis.kill()
    fleet.redis.start()
    assert "put back" in a.wait_log("Redis lost the fleet's data")
    b.wait_log("Redis lost the fleet's data")
    time.sleep(6)  # RECOVERY: every live member has put its claims back
    send_udp(lan.client(0, server=1), saved.read_text().strip().encode())
    assert "replay (used on member a)" in b.wait_log("SPA packet refused")
    assert "spaSSH: OPEN SESAME" not in b.log_text()
    assert not connect(lan.client(0, server=1), timeout=1).connected


def test_revoke_on_a_member_with_workers_is_one_revocation_every_worker_follows(lan, fleet):
    """a's two workers publish the operator's revocation under one id: b applies it once and the
    answer names b as confirmed, whichever worker's view is read."""
    a, b = fleet(0, "--workers", "2"), fleet(1, "--workers", "2")
    knock(lan, lan.client(0, server=0))
    b.wait_log("10.198.0.101: openSSH: open, granted on fleet member a")
    answer = ctl(a, "revoke", "10.198.0.101")
    assert answer.returncode == 0, answer.stderr
    assert "fleet: confirmed by b" in answer.stdout and "NOT confirmed" not in answer.stdout
    assert not connect(lan.client(0, server=1), timeout=1).connected
    time.sleep(2.5)  # b's second copy check (REASSERT) has read what Redis keeps
    assert status(b)["fleet"]["revocations"] == 1
    revoked = fleet.redis.cli("HLEN", "nfknock:revoked").stdout.strip()
    assert revoked == "1"


def test_doctor_says_what_the_redis_deployment_risks(lan, fleet, tmp_path):
    """The same judgement as the start log: no persistence (the test Redis), an evicting policy,
    a Redis that answers without the password; never the password itself."""
    rules = tmp_path / "doctor-rules.yaml"
    rules.write_text(SEED_RULES.format(keys=tmp_path / "spa.keys"))
    password_file = tmp_path / "redis.password"

    def doctor(password=True):
        argv = ["doctor", "--rules", str(rules), "--cluster", fleet.redis.url]
        argv += ["--cluster-password-file", str(password_file)] if password else []
        result = lan.run(lan.server(0), nfknock_argv(*argv))
        assert fleet.redis.password not in result.stdout + result.stderr
        return [line for line in result.stdout.splitlines() if "fleet:" in line], result.returncode

    lines, _ = doctor()
    assert any(line.startswith("ok") and "refuses connections without the password" in line for line in lines)
    assert any(line.startswith("warn") and "restart loses every claim" in line for line in lines)
    assert any(line.startswith("ok") and "noeviction" in line for line in lines)
    fleet.redis.cli("CONFIG", "SET", "maxmemory-policy", "volatile-lru")  # (persistence would write to the cwd)
    lines, code = doctor()
    assert any(line.startswith("FAIL") and "maxmemory-policy is volatile-lru" in line for line in lines)
    assert code == 1
    lines, _ = doctor(password=False)  # the password is needed: doctor cannot even ask
    assert any(line.startswith("FAIL") and "cannot reach Redis" in line for line in lines)
    fleet.redis.cli("CONFIG", "SET", "requirepass", "")  # anyone who reaches it may write now
    lines, _ = doctor(password=False)
    assert any(line.startswith("FAIL") and "answers without a password" in line for line in lines)


def _claims(fleet) -> list[str]:
    """The fleet's replay claims in Redis, as anyone with the Redis password lists them."""
    return fleet.redis.cli("--scan", "--pattern", "nfknock:used:*").stdout.split()


def _used_entries(fleet) -> list[str]:
    """Stream ids of the used entries (their body is signed, not secret: JSON after the tag)."""
    lines = fleet.redis.cli("XRANGE", "nfknock:stream", "-", "+").stdout.splitlines()
    return [lines[n - 2] for n, line in enumerate(lines) if '"kind":"used"' in line and n >= 2]


def test_a_claim_deleted_by_hand_reopens_nothing_on_any_member(lan, fleet, tmp_path):
    """Someone with the Redis password (not the fleet key) deletes the claim of a packet right
    after a accepted it: the captured packet sent to b is a replay all the same (b keeps the used
    entry it read from the stream). Deleted again, the claim is put back at the next heartbeat
    of a member holding it (a, or b, which told the fleet of the copy it refused), said at error
    level. c, restarted after the claims and the used entries were deleted (XDEL), still refuses
    the packet (its own copy, on disk)."""
    a, b, c = fleet(0), fleet(1), fleet(2)
    saved = tmp_path / "packet"
    fwknop(lan, lan.client(0, server=0), fleet.spa, save=saved)
    a.wait_log("10.198.0.101: spaSSH: OPEN SESAME")
    claims = _claims(fleet)
    assert claims and fleet.redis.cli("DEL", *claims).stdout.strip() == str(len(claims))
    assert ctl(a, "revoke", "10.198.0.101").returncode == 0  # closed everywhere again
    for member in (b, c):
        member.wait_log("10.198.0.101: revoked on fleet member a")
    send_udp(lan.client(0, server=1), saved.read_text().strip().encode())  # the captured packet, to b
    assert "replay (used on member a)" in b.wait_log("SPA packet refused")
    assert not connect(lan.client(0, server=1), timeout=1).connected
    assert status(b)["fleet"]["used_elsewhere"] == 1
    assert fleet.redis.cli("DEL", *claims).stdout.strip() == str(len(claims))  # b's claim of the copy, too
    end = time.monotonic() + 10
    while not set(claims) <= set(_claims(fleet)) and time.monotonic() < end:
        time.sleep(0.1)
    assert set(claims) <= set(_claims(fleet))
    said = "live claim(s) of this member were gone from Redis before their time"
    while said not in a.log_text() + b.log_text() and time.monotonic() < end:
        time.sleep(0.1)
    assert said in a.log_text() + b.log_text()
    assert any("claims deleted" in status(member)["fleet"]["alarms"] for member in (a, b))
    c.stop()
    fleet.redis.cli("DEL", *claims)
    used = _used_entries(fleet)  # a's (b refused the copy from its own copy of a's record)
    assert used and fleet.redis.cli("XDEL", "nfknock:stream", *used).stdout.strip() == str(len(used))
    c = fleet(2)
    assert f"{len(used)} record(s) used on other members kept from before" in c.log_text()
    send_udp(lan.client(0, server=2), saved.read_text().strip().encode())
    assert "replay (used on member a)" in c.wait_log("SPA packet refused")
    assert not connect(lan.client(0, server=2), timeout=1).connected
    assert "OPEN SESAME" not in b.log_text() + c.log_text()


def test_entries_deleted_from_the_stream_while_a_member_was_down_are_noticed(lan, fleet, tmp_path):
    """c is down while someone deletes a's used entry (XDEL) and its claim; a is gone too, so
    the claim stays deleted. c starts, sees a skip in a's numbered entries, says so at error
    level, and with --cluster-offline refuse refuses SPA packets until every record that could
    have been in the deleted entries is over."""
    a, b = fleet(0), fleet(1)
    knock(lan, lan.client(1, server=0))  # a's first entry
    saved = tmp_path / "packet"
    fwknop(lan, lan.client(0, server=0), fleet.spa, save=saved)  # its used entry, then its grant
    a.wait_log("10.198.0.101: spaSSH: OPEN SESAME")
    b.wait_log("10.198.0.101: spaSSH: open, granted on fleet member a")
    a.stop()
    assert ctl(b, "revoke", "10.198.0.101").returncode == 0
    (used,) = _used_entries(fleet)
    assert fleet.redis.cli("XDEL", "nfknock:stream", used).stdout.strip() == "1"
    claims = _claims(fleet)
    assert claims and fleet.redis.cli("DEL", *claims).stdout.strip() == str(len(claims))
    c = fleet(2, "--cluster-offline", "refuse")
    line = c.wait_log("stream entry of member a")
    assert "missing before" in line and "XDEL" in line
    assert "stream gap" in status(c)["fleet"]["alarms"]
    send_udp(lan.client(0, server=2), saved.read_text().strip().encode())
    line = c.wait_log("SPA packet refused")
    assert "fleet unreachable (entries were deleted from the fleet's stream" in line
    assert not connect(lan.client(0, server=2), timeout=1).connected
    send_udp(lan.client(0, server=1), saved.read_text().strip().encode())  # b read it before the XDEL
    assert "replay (used on member a)" in b.wait_log("SPA packet refused")
