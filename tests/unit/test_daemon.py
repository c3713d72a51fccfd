"""The verdict callback: exactly one verdict per packet, drop unless the engine accepts."""

import logging
import socket

import dpkt
import pytest

from nfknock.daemon import Daemon, DaemonConfig
from nfknock.doors.first_steps import GRACE, MarkHistory, decide
from nfknock.doors.packet import parse
from nfknock.errors import PacketError
from nfknock.firewall.plan import PASS_MARK, RuleSpec, scaffolding
from nfknock.loading import load_rules
from support.decisions import fresh
from support.fakes import FakeFirewall, Numbered, Queued, Wire

SEED = load_rules(__import__("pathlib").Path(__file__).resolve().parents[2] / "rules")


def syn(dport, src="10.0.0.2"):
    seg = dpkt.tcp.TCP(sport=40000, dport=dport, flags=dpkt.tcp.TH_SYN)
    ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton("10.0.0.1"), p=6, data=seg)
    ip.len = len(ip)
    return bytes(ip)


@pytest.fixture
def daemon(tmp_path):
    (tmp_path / "ssh.yaml").write_text((SEED.origin["openSSH"]).read_text())
    clock = iter(range(1000, 100000)).__next__
    return Daemon(
        DaemonConfig(tmp_path), FakeFirewall(), logger=logging.getLogger("test-nfknock"), clock=lambda: float(clock())
    )


def a_worker(config, claims, logger):
    """Worker `config.shard` of a daemon with workers, seeded as its supervisor seeds it."""
    import time

    from nfknock.daemon.reload import read
    from nfknock.daemon.worker import Worker, WorkerSeed

    ruleset = read(config)
    seed = WorkerSeed(config, FakeFirewall(), logger, time.monotonic, time.time, ruleset, fresh(ruleset.doors))
    return Worker(seed, config.shard, claims)


def verdicts(daemon, payload):
    queued = Queued(payload)
    daemon.on_packet(queued)
    return queued.verdicts


def test_knock_then_connect(daemon):
    assert verdicts(daemon, syn(22)) == ["drop"]
    for port in (40000, 50000, 60000):
        assert verdicts(daemon, syn(port)) == ["drop"]
    assert verdicts(daemon, syn(22)) == ["accept"]


@pytest.mark.parametrize("payload", [b"", b"\x45", b"garbage" * 10, syn(22)[:22]])
def test_garbage_gets_one_drop_and_is_counted(daemon, payload):
    assert verdicts(daemon, payload) == ["drop"]
    assert sum(daemon.unparsable.values()) == 1


def test_every_corrupted_packet_gets_one_verdict_and_none_is_accepted(tmp_path):
    """Real packets (a knock, a SYN to the protected port) with bytes overwritten and bits
    flipped: a packet parse() refuses is dropped and counted by reason; no corrupted packet is
    ever accepted by a daemon that granted nothing, and none is an internal error."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    (tmp_path / "ssh.yaml").write_text((SEED.origin["openSSH"]).read_text())
    real = [syn(22), syn(40000), syn(22, src="10.0.0.3")]

    @settings(max_examples=500, deadline=None)
    @given(
        st.sampled_from(real),
        st.binary(max_size=40),
        st.integers(0, 39),
        st.lists(st.tuples(st.integers(0, 39), st.integers(1, 255)), max_size=3),
    )
    def check(packet, noise, at, flips):
        data = bytearray(packet)
        data[at : at + len(noise)] = noise
        for position, mask in flips:
            if position < len(data):
                data[position] ^= mask
        fresh = Daemon(
            DaemonConfig(tmp_path), FakeFirewall(), logger=logging.getLogger("test-nfknock"), clock=lambda: 1000.0
        )
        try:
            parse(bytes(data))
            refused = False
        except PacketError:
            refused = True
        got = verdicts(fresh, bytes(data))
        assert len(got) == 1 and got != ["accept"]
        assert fresh.errors == 0
        if refused:
            assert got == ["drop"] and sum(fresh.unparsable.values()) == 1

    check()


def test_an_engine_crash_drops_the_packet_and_the_loop_goes_on(daemon, monkeypatch, caplog):
    real_handle = daemon.engine.handle
    crashes = []

    def explode_once(packet, now, wall):  # Engine.handle's signature: a wrong call fails here, not below
        if not crashes:
            crashes.append(packet)
            raise RuntimeError("bug in the engine")
        return real_handle(packet, now, wall)

    monkeypatch.setattr(daemon.engine, "handle", explode_once)
    with caplog.at_level(logging.ERROR, logger="test-nfknock"):
        assert verdicts(daemon, syn(40000)) == ["drop"]
    assert crashes and crashes[0].dport == 40000
    assert daemon.errors == 1
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage() == "internal error on a packet (dropped; 1 so far)"
    assert record.exc_info[0] is RuntimeError and str(record.exc_info[1]) == "bug in the engine"
    # The loop goes on: the next packets are judged by the engine as usual (the crashed first
    # knock was lost, so the whole sequence is knocked again) and the client gets in.
    for port in (40000, 50000, 60000):
        assert verdicts(daemon, syn(port)) == ["drop"]
    assert verdicts(daemon, syn(22)) == ["accept"]
    assert daemon.errors == 1


def test_tripwire_packets_go_back_to_the_firewall_with_our_mark_added(daemon):
    queued = Queued(syn(40001), mark=0x5)
    daemon.on_packet(queued)
    assert queued.verdicts == ["repeat"]
    assert queued.mark == 0x5 | PASS_MARK


def test_an_accepted_connection_carries_our_mark_for_the_hosts_base_rule(daemon):
    """The firewall manager's base rule (nfknock export) lets through only marked new connections:
    an accept without the mark would be dropped there, whatever nfknock decided."""
    for port in (40000, 50000, 60000):
        daemon.on_packet(Queued(syn(port)))
    queued = Queued(syn(22), mark=0x5)
    daemon.on_packet(queued)
    assert queued.verdicts == ["accept"]
    assert queued.mark == 0x5 | PASS_MARK


def test_a_failing_verdict_call_falls_back_to_drop(daemon):
    class Broken(Queued):
        def accept(self):
            raise OSError("netlink hiccup")

    for port in (40000, 50000, 60000):
        daemon.on_packet(Queued(syn(port)))
    broken = Broken(syn(22))
    daemon.on_packet(broken)
    assert broken.verdicts == ["drop"] and daemon.errors == 1


def test_a_failing_drop_is_swallowed(daemon):
    class Broken(Queued):
        def drop(self):
            raise OSError("netlink gone")

    daemon.on_packet(Broken(syn(22)))
    assert daemon.errors == 1


def test_reload_with_bad_rules_keeps_old_rules_and_firewall(daemon, caplog):
    (daemon.config.rules_path / "ssh.yaml").write_text("doors: [\n")
    with caplog.at_level(logging.ERROR, logger="test-nfknock"):
        assert daemon.reload() is False
    assert "reload refused, keeping the current rules" in caplog.text
    assert daemon.firewall.calls == []
    assert [d.name for d in daemon.ruleset.doors] == ["openSSH"]


def test_reload_installs_the_new_scaffolding(daemon):
    text = (daemon.config.rules_path / "ssh.yaml").read_text().replace("22/tcp", "2222/tcp")
    (daemon.config.rules_path / "ssh.yaml").write_text(text)
    assert daemon.reload() is True
    (call,) = daemon.firewall.calls
    assert RuleSpec("DROP", "tcp", 2222) in call[1][4] and RuleSpec("DROP", "tcp", 2222) in call[1][6]


def test_the_metrics_follow_reloads_refused_and_taken(daemon):
    """nfknock_last_reload_successful and the doors whose series exist, through a refused
    reload (old rules stay) and a taken one (a renamed door: new series, old ones gone)."""
    before = daemon.snapshot(0.0)
    assert before.reload[0] is True and [d.name for d in before.doors] == ["openSSH"]
    path = daemon.config.rules_path / "ssh.yaml"
    good = path.read_text()
    path.write_text("doors: [\n")
    assert daemon.reload() is False
    refused = daemon.snapshot(0.0)
    assert refused.reload == (False, before.reload[1]) and [d.name for d in refused.doors] == ["openSSH"]
    path.write_text(good.replace("openSSH", "webSSH"))
    assert daemon.reload() is True
    taken = daemon.snapshot(0.0)
    assert taken.reload[0] is True and taken.reload[1] >= before.reload[1]
    assert [d.name for d in taken.doors] == ["webSSH"]


def test_sd_notify_reaches_the_socket_systemd_names(tmp_path, monkeypatch):
    import socket as sockets

    from nfknock.daemon.config import sd_notify

    path = tmp_path / "notify"
    listener = sockets.socket(sockets.AF_UNIX, sockets.SOCK_DGRAM)
    listener.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    sd_notify("READY=1")
    assert listener.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    sd_notify("READY=1")  # without systemd: nothing, no error
    listener.close()


@pytest.mark.needs_tools("systemd-analyze")
def test_systemd_unit_verifies(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    unit = (repo / "deploy" / "nfknock.service").read_text()
    lines = unit.splitlines()
    assert "Type=notify" in lines and not any(line.startswith("ExecStopPost") for line in lines)
    local = tmp_path / "nfknock.service"
    local.write_text(unit.replace("/usr/local/bin/nfknock", str(Path(sys.executable).parent / "nfknock")))
    # --man=no: Documentation=man:nfknock(8) is installed by the package, not on the test host
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(local)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "error",
    [
        RecursionError("maximum recursion depth exceeded"),
        ValueError("day is out of range"),
        MemoryError(),
        RuntimeError("a bug"),
    ],
)
def test_reload_refuses_any_error_and_keeps_the_old_rules(daemon, caplog, monkeypatch, error):
    def broken(path, strict=False):
        raise error

    monkeypatch.setattr("nfknock.daemon.reload.load_rules", broken)
    with caplog.at_level(logging.ERROR, logger="test-nfknock"):
        assert daemon.reload() is False
    assert (
        f"reload refused, keeping the current rules: {daemon.config.rules_path}: unexpected "
        f"{type(error).__name__}" in caplog.text
    )
    assert daemon.firewall.calls == []
    for port in (40000, 50000, 60000):
        daemon.on_packet(Queued(syn(port)))
    assert verdicts(daemon, syn(22)) == ["accept"]  # the old door still works


def test_a_firewall_failure_on_reload_puts_the_old_rules_back(daemon, caplog):
    from nfknock.errors import FirewallError

    calls = daemon.firewall.calls

    def apply(plan):
        calls.append(("apply", plan))
        if len(calls) == 1:
            raise FirewallError("iptables-nft-restore exited with status 4")

    daemon.firewall.apply = apply
    text = (daemon.config.rules_path / "ssh.yaml").read_text().replace("22/tcp", "2222/tcp")
    (daemon.config.rules_path / "ssh.yaml").write_text(text)
    with caplog.at_level(logging.ERROR, logger="test-nfknock"):
        assert daemon.reload() is False
    assert "exited with status 4" in caplog.text
    assert len(calls) == 2 and RuleSpec("DROP", "tcp", 22) in calls[1][1][4]  # the old plan, again
    assert [p.port for p in daemon.ruleset.doors[0].protect] == [22]


def test_the_replay_cache_is_kept_in_the_state_dir(tmp_path):
    from nfknock.daemon.store import ReplayStore

    store = ReplayStore(tmp_path / "state")
    assert store.load() == {}
    store.save({"spa:ab": 12.5, "rotation:rot:7": 99.0})
    assert ReplayStore(tmp_path / "state").load() == {"spa:ab": 12.5, "rotation:rot:7": 99.0}
    assert not (tmp_path / "state" / "replay.tmp").exists()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"spa:ab": "soon"}'])
def test_an_unreadable_replay_cache_stops_the_start(tmp_path, content):
    from nfknock.errors import NfknockError

    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "ssh.yaml").write_text(SEED.origin["openSSH"].read_text())
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "replay.json").write_text(content)
    with pytest.raises(NfknockError, match="cannot read the replay cache"):
        Daemon(DaemonConfig(tmp_path / "rules", state_dir=tmp_path / "state"), FakeFirewall())


def test_a_state_dir_others_can_write_is_refused_before_anything_is_touched(tmp_path):
    """Whoever can write it can delete the records of used SPA packets."""
    from nfknock.errors import UsageError

    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "ssh.yaml").write_text(SEED.origin["openSSH"].read_text())
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    firewall = FakeFirewall()
    with pytest.raises(UsageError, match=f"--state-dir {state}: not trusted: .*writable by group or others"):
        Daemon(DaemonConfig(tmp_path / "rules", state_dir=state), firewall)
    assert firewall.calls == []


def test_records_left_by_workers_are_honoured_by_a_single_process(tmp_path):
    """An SPA packet used under --workers stays used after a restart without them."""
    from nfknock.daemon.claims import SUBDIR, ReplayClaims

    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "ssh.yaml").write_text(SEED.origin["openSSH"].read_text())
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    assert Daemon(DaemonConfig(tmp_path / "rules", state_dir=state), FakeFirewall()).claims is None
    ReplayClaims(state / SUBDIR)  # what a run with workers leaves
    single = Daemon(DaemonConfig(tmp_path / "rules", state_dir=state), FakeFirewall())
    assert single.claims is not None and single.engine.replays.shared


TWINS = """\
doors:
  - {name: A, sequence: [40000, 50000, 60000], protect: [22/tcp]}
  - {name: B, sequence: [41000, 50000, 61000], protect: [2222/tcp]}
"""
TWINS_AND_C = TWINS + "  - {name: C, sequence: [39000, 50000, 62000], protect: [3333/tcp]}\n"


@pytest.mark.parametrize("first, then", [(TWINS, TWINS_AND_C), (TWINS_AND_C, TWINS)])
def test_a_second_step_marked_before_a_reload_counts_for_the_door_that_marked_it(tmp_path, first, then):
    """The kernel marked a second step with the bit of A's first step; the packet waited in the
    queue while a reload added or removed a twin. The new engine must read the bit as A's, as
    the rules that marked it meant, never as another door's (found by an attack run: the bits
    used to be renumbered in port order)."""
    (tmp_path / "doors.yaml").write_text(first)
    daemon = Daemon(DaemonConfig(tmp_path), FakeFirewall(), logger=logging.getLogger("test-nfknock"))
    a_bit = next(g.bit for g in daemon.first_steps.groups if "A" in g.doors)
    daemon.reloader.start(MarkHistory())  # as run() does before installing them
    (tmp_path / "doors.yaml").write_text(then)
    assert daemon.reload() is True
    marked = Queued(syn(50000), mark=daemon.verdicts.first_seen_marks[a_bit])
    daemon.on_packet(marked)
    assert verdicts(daemon, syn(60000)) == ["drop"]
    assert verdicts(daemon, syn(22)) == ["accept"]  # A opened: its first step was the one seen
    for door in ("B", "C"):
        assert not any(door in g.doors and g.bit == a_bit for g in daemon.first_steps.groups)
    assert verdicts(daemon, syn(61000)) + verdicts(daemon, syn(62000)) == ["drop", "drop"]
    assert verdicts(daemon, syn(2222)) + verdicts(daemon, syn(3333)) == ["drop", "drop"]


def test_a_daemon_keeps_to_the_mark_bits_of_the_rules_it_finds_in_place(tmp_path):
    """Rules left by an earlier run mark packets until the new ones replace them: a restart
    with another rule set reads what their bits mean and keeps to it."""
    (tmp_path / "doors.yaml").write_text(TWINS)
    doors = load_rules(tmp_path).doors
    left = {4: [str(s) for s in scaffolding(doors, 0, first_steps=fresh(doors))], 6: []}
    (tmp_path / "doors.yaml").write_text(TWINS_AND_C)
    daemon = Daemon(DaemonConfig(tmp_path), FakeFirewall(left), logger=logging.getLogger("test-nfknock"))
    held = daemon.scaffold.marks_installed()
    groups = {g.first[1]: g.bit for g in decide(daemon.ruleset.doors, held).groups}
    assert groups == {39000: 2, 40000: 0, 41000: 1}


def test_a_reload_that_sends_a_doors_first_knocks_back_to_the_daemon_says_so(tmp_path, caplog):
    (tmp_path / "doors.yaml").write_text(TWINS)
    daemon = Daemon(DaemonConfig(tmp_path), FakeFirewall(), logger=logging.getLogger("test-nfknock"))
    (tmp_path / "doors.yaml").write_text(TWINS + "  - {name: D, sequence: [1000, 40000, 2000], protect: [23/tcp]}\n")
    with caplog.at_level(logging.WARNING, logger="test-nfknock"):
        assert daemon.reload() is True
    assert "door A: its first knocks go to the daemon, not the kernel: 40000/tcp is also door D's port" in caplog.text
    assert "door B:" in caplog.text and "door D:" in caplog.text  # D is new, and the daemon's
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="test-nfknock"):
        assert daemon.reload() is True  # nothing moved: nothing to say again
    assert "its first knocks go to the daemon" not in caplog.text


# -- route first, decide after: the granted set before disk work and before the next packet --------


class Journal(list):
    """One list for everything the daemon does to the outside, in order."""

    def link(self):
        journal = self

        class Link:
            def add(self, name, address, timeout):
                journal.append(("set add", address))

            def delete(self, name, address):
                journal.append(("set del", address))

            def close(self):
                pass

        return Link()

    def judge(self, daemon, payload):
        journal = self

        class Judged(Queued):
            def accept(self):
                journal.append(("accept", payload[-4:]))

            def drop(self):
                journal.append(("drop", payload[-4:]))

        daemon.on_packet(Judged(payload))
        return journal[-1][0]


def udp(dport, data, src="10.0.0.2"):
    ip = dpkt.ip.IP(
        src=socket.inet_aton(src),
        dst=socket.inet_aton("10.0.0.1"),
        p=17,
        data=dpkt.udp.UDP(sport=50000, dport=dport, data=data),
    )
    ip.data.ulen = len(ip.data)
    ip.len = len(ip)
    return bytes(ip)


def journalled(daemon, journal):
    from nfknock.firewall.granted import GrantedSets

    daemon.granted = GrantedSets(0, daemon.log, link=journal.link)
    daemon.granted.connect()
    return daemon


@pytest.fixture
def spa(tmp_path, monkeypatch):
    """A single-process daemon with one SPA door and a replay cache on disk; returns it and a
    maker of SPA packets from 10.0.0.2 for 22/tcp."""
    import base64
    import time

    from nfknock.doors.spa import Keys, encode, generate_keys

    encryption, mac = generate_keys()
    monkeypatch.setenv("UNITSPA_KEY_BASE64", encryption)
    monkeypatch.setenv("UNITSPA_HMAC_KEY_BASE64", mac)
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "spa.yaml").write_text(
        "doors: [{name: spaSSH, kind: spa, keys_env: UNITSPA, protect: [22/tcp]}]\n"
    )
    (tmp_path / "state").mkdir(mode=0o700)
    keys = Keys(base64.b64decode(encryption), base64.b64decode(mac), "sha256")

    def daemon(claims=None, **config):
        config.setdefault("state_dir", tmp_path / "state")
        config = DaemonConfig(tmp_path / "rules", **config)
        if config.workers > 1:
            return a_worker(config, claims, logging.getLogger("t-spa"))
        return Daemon(config, FakeFirewall(), logger=logging.getLogger("t-spa"), claims=claims)

    return daemon, lambda: udp(62201, encode(keys, "10.0.0.2", [("tcp", 22)], time.time()))


def test_a_single_process_after_a_run_with_workers_opens_for_a_fresh_spa_packet(spa, tmp_path):
    """The records a workers run left are honoured, and a packet nobody used still opens: its own
    record must not be mistaken for someone else's (it was, and every SPA packet was refused)."""
    from nfknock.daemon.claims import SUBDIR, ReplayClaims

    make, packet = spa
    ReplayClaims(tmp_path / "state" / SUBDIR)  # what a run with --workers leaves

    def judge(daemon, wire):
        verdict = journal.judge(daemon, wire)
        assert daemon.store_sink.writer.wait_idle()
        daemon.settle(daemon.clock())
        return verdict

    daemon = journalled(make(), journal := Journal())
    assert daemon.claims is not None
    wire = packet()
    assert judge(daemon, wire) == "drop"  # the SPA packet itself
    assert judge(daemon, syn(22)) == "accept"
    restarted = journalled(make(), journal)  # the same bytes after a restart: a replay, as before
    judge(restarted, wire)
    assert judge(restarted, syn(22)) == "drop"


def test_a_knock_grant_is_in_the_kernels_set_before_the_next_packet_is_judged(daemon):
    """The client's SYN right behind its last knock must find its source in the granted set (it
    then reaches the grant queue, out of a SYN flood's way), not wait for the end of the turn."""
    journal = Journal()
    journalled(daemon, journal)
    for port in (40000, 50000, 60000):
        assert journal.judge(daemon, syn(port)) == "drop"
    assert journal[-2:] == [("set add", "10.0.0.2"), ("drop", syn(60000)[-4:])]  # before the knock's verdict
    assert journal.judge(daemon, syn(22)) == "accept"
    daemon.granted.flush()
    assert journal.count(("set add", "10.0.0.2")) == 1  # one message per grant


def test_an_spa_packet_opens_once_its_replay_record_is_durable_and_its_syn_waits_for_that(spa, monkeypatch):
    """Route first, write after, grant last. The source enters the granted set at once; the
    replay cache is written by a thread, off the verdict path (the loop judges other packets
    meanwhile); the client's SYN is held, without a verdict, until the record is durable, and
    then accepted: never before the write."""
    import threading

    make, packet = spa
    daemon = journalled(make(), journal := Journal())
    gate = threading.Event()

    def save(entries):
        gate.wait(5)
        journal.append(("save", len(entries)))

    monkeypatch.setattr(daemon.store, "save", save)
    assert journal.judge(daemon, packet()) == "drop"
    assert [entry[0] for entry in journal] == ["set add", "drop"]  # the verdict did not wait for the disk
    assert journal.judge(daemon, syn(22, src="10.0.0.66")) == "drop"  # the loop goes on meanwhile
    held = len(journal)
    journal.judge(daemon, syn(22))
    daemon.settle(daemon.clock())
    assert len(journal) == held  # the SYN waits
    gate.set()
    assert daemon.store_sink.writer.wait_idle()
    daemon.settle(daemon.clock())
    assert [entry[0] for entry in journal[held:]] == ["save", "accept"]
    assert journal.judge(daemon, syn(22)) == "accept"


def test_a_replay_record_that_cannot_be_written_opens_nothing(spa, monkeypatch, caplog):
    """DESIGN rule 11: the durable record before the grant takes effect. The SYN held meanwhile
    is dropped once the write failed, and the source leaves the set again."""
    make, packet = spa
    daemon = journalled(make(), journal := Journal())

    def full(entries):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(daemon.store, "save", full)
    with caplog.at_level(logging.INFO, logger="t-spa"):
        assert journal.judge(daemon, packet()) == "drop"
        journal.judge(daemon, syn(22))
        assert daemon.store_sink.writer.wait_idle()
        daemon.settle(daemon.clock())
    daemon.granted.flush()
    assert [entry[0] for entry in journal] == ["set add", "drop", "drop", "set del"]
    assert daemon.engine.grants(daemon.clock()) == []
    assert "replay record not written" in caplog.text and "No space left on device" in caplog.text
    assert "OPEN SESAME" not in caplog.text


@pytest.mark.parametrize("answer", ["ours", "taken", "unwritable"])
def test_a_workers_claim_waits_with_the_source_in_the_set(spa, answer):
    """With --workers the record is a claim in the shared directory: the source is routed before
    it is made; a claim lost (another worker used the packet) or not written takes it out again."""
    make, packet = spa

    class Claims:
        directory = "used"

        def claim(self, record, expires, wall):
            journal.append(("claim", answer))
            if answer == "unwritable":
                raise OSError(30, "Read-only file system")
            return answer == "ours"

    journal = Journal()
    daemon = journalled(make(claims=Claims(), workers=2, shard=1, state_dir=None), journal)
    assert journal.judge(daemon, packet()) == "drop"
    assert journal.judge(daemon, syn(22)) == ("accept" if answer == "ours" else "drop")
    daemon.granted.flush()
    kinds = [entry[0] for entry in journal]
    if answer == "ours":
        assert kinds == ["set add", "claim", "drop", "accept"]
    else:
        assert kinds == ["set add", "claim", "drop", "drop", "set del"]


# -- SPA records across workers: every packet that passed its HMAC is used for all ------------

SPA_DOOR = "doors:\n  - {name: spaSSH, kind: spa, keys_env: DAEMONSPA, trust_inner_address: true, protect: [%s]}\n"


def spa_udp(payload, src):
    datagram = dpkt.udp.UDP(sport=40000, dport=62201, data=payload)
    datagram.ulen = len(datagram)
    ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton("10.0.0.1"), p=17, data=datagram)
    ip.len = len(ip)
    return bytes(ip)


@pytest.fixture
def spa_keys(monkeypatch):
    from nfknock.doors.spa import Keys, generate_keys

    encryption, mac = generate_keys()
    monkeypatch.setenv("DAEMONSPA_KEY_BASE64", encryption)
    monkeypatch.setenv("DAEMONSPA_HMAC_KEY_BASE64", mac)
    import base64

    return Keys(base64.b64decode(encryption), base64.b64decode(mac))


def spa_worker(tmp_path, claims, shard, protect="22/tcp", fleet=None):
    """Worker `shard` of two, with its own copy of the rules (a reload may have widened them)."""
    rules = tmp_path / f"rules-{shard}"
    rules.mkdir()
    (rules / "spa.yaml").write_text(SPA_DOOR % protect)
    worker = a_worker(DaemonConfig(rules, workers=2, shard=shard), claims, logging.getLogger("test-nfknock"))
    worker.fleet = fleet
    return worker


class HeardByTheFleet:
    """Stands in for a FleetMember: what the daemon would ask Redis."""

    def __init__(self):
        self.heard = []

    def on_events(self, events, now, wall):
        self.heard += events
        return []


@pytest.mark.parametrize("in_a_fleet", [False, True])
def test_an_spa_packet_refused_by_one_worker_is_a_replay_for_the_other_after_the_door_widens(
    tmp_path, spa_keys, caplog, in_a_fleet
):
    import time

    from nfknock.daemon.claims import ReplayClaims
    from nfknock.doors.events import ClaimNeeded
    from nfknock.doors.spa import encode

    claims = ReplayClaims(tmp_path / "used")
    fleet = HeardByTheFleet() if in_a_fleet else None
    narrow = spa_worker(tmp_path, claims, 0, fleet=fleet)
    wide = spa_worker(tmp_path, claims, 1, "22/tcp, 2222/tcp", fleet=fleet)
    packet = encode(spa_keys, "10.0.0.2", [("tcp", 22), ("tcp", 2222)], time.time())
    with caplog.at_level(logging.INFO, "test-nfknock"):
        assert verdicts(narrow, spa_udp(packet, "10.0.0.2")) == ["drop"]
        assert "SPA packet refused: port not allowed" in caplog.text
        assert verdicts(wide, spa_udp(packet, "10.0.0.200")) == ["drop"]  # captured, sent from the other shard
        assert "10.0.0.200: spaSSH: SPA packet refused: replay" in caplog.text
    assert verdicts(wide, syn(22, src="10.0.0.200")) == ["drop"]
    if in_a_fleet:  # refused here, on disk: Redis was never asked (it may have forgotten)
        assert not any(isinstance(event, ClaimNeeded) for event in fleet.heard)
        fresh = encode(spa_keys, "10.0.0.200", [("tcp", 22)], time.time())
        verdicts(wide, spa_udp(fresh, "10.0.0.200"))
        assert [type(event) for event in fleet.heard].count(ClaimNeeded) == 1  # ours here: the fleet decides


def test_an_spa_packet_whose_record_cannot_be_written_opens_nothing(tmp_path, spa_keys, caplog, monkeypatch):
    import errno
    import time

    from nfknock.daemon.claims import ReplayClaims
    from nfknock.doors.spa import encode

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    claims = ReplayClaims(tmp_path / "used")
    worker = spa_worker(tmp_path, claims, 0)
    monkeypatch.setattr(claims, "claim", full)
    with caplog.at_level(logging.INFO, "test-nfknock"):
        refused = encode(spa_keys, "10.0.0.2", [("tcp", 2222)], time.time())
        assert verdicts(worker, spa_udp(refused, "10.0.0.2")) == ["drop"]
        assert "cannot write a replay record" in caplog.text  # said, and the loop goes on
        good = encode(spa_keys, "10.0.0.2", [("tcp", 22)], time.time())
        assert verdicts(worker, spa_udp(good, "10.0.0.2")) == ["drop"]
        assert "SPA packet refused: replay record not written" in caplog.text
    assert verdicts(worker, syn(22)) == ["drop"]
    assert worker.errors == 0


def test_reloads_that_swap_twins_keep_every_door_in_the_kernel(tmp_path, caplog):
    """The daemon holds one mark history and retires it at each reload: a meaning leaves GRACE
    seconds after the rules that marked with it were replaced. Reloads a few seconds apart that
    swap one twin of A for another never run out of bits on A's second port (they did after
    MARK_BITS - 1 reloads, and A's first knocks went to the daemon until a restart), and A keeps
    its bit throughout."""
    now = [1000.0]
    (tmp_path / "doors.yaml").write_text(TWINS)
    daemon = Daemon(
        DaemonConfig(tmp_path), FakeFirewall(), logger=logging.getLogger("test-nfknock"), clock=lambda: now[0]
    )
    daemon.reloader.start(MarkHistory())  # as run() does
    a_bit = next(g.bit for g in daemon.first_steps.groups if "A" in g.doors)
    for n in range(12):
        now[0] += GRACE
        twin = f"  - {{name: T{n}, sequence: [{39000 - n}, 50000, 62000], protect: [3333/tcp]}}\n"
        (tmp_path / "doors.yaml").write_text(TWINS + twin)
        with caplog.at_level(logging.WARNING, logger="test-nfknock"):
            assert daemon.reload() is True
        assert daemon.first_steps.in_daemon == {}, n
        assert next(g.bit for g in daemon.first_steps.groups if "A" in g.doors) == a_bit
    assert "its first knocks go to the daemon" not in caplog.text
    assert len(daemon.mark_history.past) <= 2


def test_a_syn_behind_a_claim_in_flight_waits_for_the_answer_and_gets_one_verdict(tmp_path, spa_keys):
    """Fleet mode: an SPA packet's grant waits for the fleet's answer (one Redis round trip). The
    client's first SYN, sent meanwhile, is held (no verdict yet), not refused: once the answer
    grants, it is accepted; a stranger's SYN is refused at once; a SYN whose claim is lost is
    refused when the answer comes. Each held packet gets exactly one verdict."""
    import time

    from nfknock.daemon.claims import ReplayClaims
    from nfknock.doors.events import ClaimNeeded
    from nfknock.doors.spa import encode

    fleet = HeardByTheFleet()
    worker = spa_worker(tmp_path, ReplayClaims(tmp_path / "used"), 0, fleet=fleet)
    now = worker.clock()
    for answer, client in (("ours", "10.0.0.2"), ("taken", "10.0.0.4")):
        assert verdicts(worker, spa_udp(encode(spa_keys, client, [("tcp", 22)], time.time()), client)) == ["drop"]
        (claim,) = [event for event in fleet.heard if isinstance(event, ClaimNeeded) and event.src == client]
        held = Queued(syn(22, src=client))
        worker.on_packet(held)
        assert held.verdicts == []  # waits for the answer
        assert verdicts(worker, syn(22, src="10.0.0.66")) == ["drop"]  # a stranger is not held
        worker.verdicts.release(now)
        assert held.verdicts == []  # still no answer
        worker.sinks.consume(worker.engine.claimed(claim, answer, now), now)  # what FleetMember.step does
        worker.verdicts.release(now)
        assert held.verdicts == (["accept"] if answer == "ours" else ["drop"])
        worker.verdicts.release(now)
        assert len(held.verdicts) == 1
    assert worker.verdicts.held == {}


def test_held_connections_are_dropped_at_a_stop(tmp_path, spa_keys):
    import time

    from nfknock.daemon.claims import ReplayClaims
    from nfknock.doors.spa import encode

    worker = spa_worker(tmp_path, ReplayClaims(tmp_path / "used"), 0, fleet=HeardByTheFleet())
    verdicts(worker, spa_udp(encode(spa_keys, "10.0.0.2", [("tcp", 22)], time.time()), "10.0.0.2"))
    held = [Queued(syn(22)) for _ in range(12)]
    for queued in held:
        worker.on_packet(queued)
    assert [q.verdicts for q in held[8:]] == [["drop"]] * 4  # beyond HELD_PER_SOURCE: refused at once
    worker.verdicts.drop_held()
    assert all(q.verdicts == ["drop"] for q in held)


def test_while_the_loop_runs_a_queue_its_drops_wait_for_one_batch_and_accepts_do_not(daemon):
    """daemon/drops.py: the drops of a turn leave as one batch verdict naming the last of them;
    an accept leaves at once; each packet gets exactly one verdict."""
    from nfknock.daemon.drops import DeferredDrops
    from nfknock.doors.engine import Verdict

    wire = Wire()
    drops = daemon.verdicts.drops = DeferredDrops(logging.getLogger("test-nfknock"), write=wire)
    ids = iter(range(100, 200))
    drops.serve(41, 7)
    stranger = Numbered(syn(22, src="10.9.9.9"), next(ids))
    knocks = [Numbered(syn(port), next(ids)) for port in (40000, 50000, 60000)]
    client = Numbered(syn(22), next(ids))
    for queued in [stranger, *knocks, client]:
        daemon.on_packet(queued)
    assert client.verdicts == ["accept"]
    assert stranger.verdicts == [] and [k.verdicts for k in knocks] == [[]] * 3  # in the kernel's queue still
    drops.flush()
    assert wire.last_ids == [knocks[-1].id]  # the four drops, in one message
    assert daemon.handled[Verdict.DROP] == 4 and daemon.handled[Verdict.ACCEPT] == 1
    late = Numbered(syn(22, src="10.9.9.8"), next(ids))  # outside a queue's run: at once
    daemon.on_packet(late)
    assert late.verdicts == ["drop"] and len(wire.sent) == 1


def test_without_a_loop_every_drop_is_given_at_once(daemon):
    assert daemon.verdicts.drops is None  # until a loop's hook_into
    assert verdicts(daemon, syn(22, src="10.9.9.9")) == ["drop"]


def test_no_batch_verdict_covers_a_held_connection(tmp_path, spa_keys):
    """A batch drops every packet queued up to the id it names: while a SYN waits for its claim,
    drops are given one by one, and a batch sent later names only ids below the held one."""
    import time

    from nfknock.daemon.claims import ReplayClaims
    from nfknock.daemon.drops import DeferredDrops
    from nfknock.doors.spa import encode

    worker = spa_worker(tmp_path, ReplayClaims(tmp_path / "used"), 0, fleet=HeardByTheFleet())
    wire = Wire()
    drops = worker.verdicts.drops = DeferredDrops(logging.getLogger("test-nfknock"), write=wire)
    ids = iter(range(1, 100))
    drops.serve(41, 7)
    before = Numbered(syn(22, src="10.9.9.9"), next(ids))
    spa = Numbered(spa_udp(encode(spa_keys, "10.0.0.2", [("tcp", 22)], time.time()), "10.0.0.2"), next(ids))
    held = Numbered(syn(22, src="10.0.0.2"), next(ids))
    after = Numbered(syn(22, src="10.9.9.8"), next(ids))
    for queued in (before, spa, held, after):
        worker.on_packet(queued)
    assert held.verdicts == [] and after.verdicts == ["drop"]  # held; the stranger after it: at once
    drops.flush()
    assert wire.last_ids == [spa.id] and spa.id < held.id
    worker.verdicts.drop_held()
    assert held.verdicts == ["drop"]


def test_in_a_loop_a_grant_ends_on_the_first_turn_past_its_deadline(tmp_path, caplog):
    """Judge.expire takes the deadline the loop read at the top of the turn instead of walking
    the engine's tables again: a grant still ends (and says so) on the first turn past it."""
    from nfknock.daemon.loop import Loop

    (tmp_path / "ssh.yaml").write_text((SEED.origin["openSSH"]).read_text())
    now = [1000.0]
    log = logging.getLogger("test-nfknock")
    daemon = Daemon(DaemonConfig(tmp_path), FakeFirewall(), logger=log, clock=lambda: now[0])
    loop = Loop(daemon.clock, log)
    daemon.hook_into(loop)
    for port in (40000, 50000, 60000):
        assert verdicts(daemon, syn(port)) == ["drop"]
    with caplog.at_level(logging.INFO, logger="test-nfknock"):
        for now[0] in (1010.0, 1029.0, 1031.0):  # the grant: 30 s from 1000 + three clock ticks
            loop.turn_deadline = daemon.engine.next_deadline()  # as Loop.run, before its select
            daemon.expire(now[0])
            if now[0] < 1031:
                assert "command timeout" not in caplog.text
                assert verdicts(daemon, syn(22)) == ["accept"]
    assert "10.0.0.2: openSSH: command timeout (open_for over, new connections refused)" in caplog.text
    assert daemon.engine.grants(now[0]) == []
