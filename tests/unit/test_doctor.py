"""doctor's checks over made-up host states: each problem gets one line and the right level."""

import pytest

from nfknock.doors.rules import KnockDoor, RotatingDoor, parse_door
from nfknock.tools.doctor import (
    FAIL,
    OK,
    WARN,
    Finding,
    HostState,
    check_earlier_accepts,
    check_first_steps,
    check_leftovers,
    check_modes,
    check_queue,
    check_server_extra,
    diagnose,
)

SEED = KnockDoor.model_validate(dict(name="openSSH", sequence=[40000, 50000, 60000], protect=["22/tcp"]))
WITH_CHAIN = "-P INPUT ACCEPT\n-N NFKNOCK\n-A INPUT -j NFKNOCK\n-A NFKNOCK -p tcp -j DROP\n"


def test_accept_ahead_of_our_jump_is_a_failure():
    host = HostState(
        "nf_tables", {("nft", 4): "-P INPUT ACCEPT\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\n-A INPUT -j NFKNOCK\n"}
    )
    (finding,) = check_earlier_accepts(host, "nft", (SEED,))
    assert finding.level == FAIL and "INPUT rule 1 accepts 22/tcp" in finding.text


def test_harmless_earlier_rules_pass():
    rules = (
        "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
        "-A INPUT -i lo -j ACCEPT\n"  # the host's own connections: nfknock leaves them alone too
        "-A INPUT -p tcp -m multiport --dports 80,443 -j ACCEPT\n"
        "-A INPUT -p udp -j ACCEPT\n"
        "-A INPUT -j NFKNOCK\n"
        "-A INPUT -j ACCEPT\n"
    )  # after our jump: fine
    (finding,) = check_earlier_accepts(HostState("legacy", {("legacy", 4): rules}), "legacy", (SEED,))
    assert finding.level == OK


def test_port_ranges_and_catch_alls_are_caught():
    for rule in (
        "-A INPUT -j ACCEPT",
        "-A INPUT -p tcp -m tcp --dport 20:30 -j ACCEPT",
        "-A INPUT -s 10.0.0.0/8 -j ACCEPT",
    ):
        (finding,) = check_earlier_accepts(HostState("legacy", {("legacy", 6): rule + "\n"}), "legacy", (SEED,))
        assert finding.level == FAIL and "(IPv6)" in finding.text, rule


def test_an_ipv4_door_s_port_accepted_ahead_of_the_ip6tables_jump_is_a_failure():
    """The port is closed in both families whatever the door listens on, so an IPv6 ACCEPT ahead
    of the chain undoes it."""
    ipv4_door = KnockDoor.model_validate(dict(name="v4", sequence=[1, 2], protect=["22/tcp"], family="ipv4"))
    rules = "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\n-A INPUT -j NFKNOCK\n"
    (finding,) = check_earlier_accepts(HostState("legacy", {("legacy", 6): rules}), "legacy", (ipv4_door,))
    assert finding.level == FAIL and "(IPv6)" in finding.text


def test_leftovers_in_the_other_flavour_are_reported():
    host = HostState("nf_tables", {("legacy", 4): WITH_CHAIN, ("nft", 4): "-P INPUT ACCEPT\n"})
    (finding,) = check_leftovers(host, "nft")
    assert finding.level == WARN and "iptables-legacy -S NFKNOCK" in finding.text
    assert check_leftovers(HostState("nf_tables"), "nft")[0].level == OK


def test_held_queue_is_a_failure():
    queues = "    0  4242     0 2 65531     0     0        0  1\n"
    assert check_queue(HostState(None, queues=queues), 0)[0].level == FAIL
    assert check_queue(HostState(None, queues=queues), 1)[0].level == OK
    grant_queue = check_queue(HostState(None, queues="    1  4242     0 2 65531     0     0        0  1\n"), 0)
    assert [f.level for f in grant_queue] == [OK, FAIL] and "the grant queue" in grant_queue[1].text


def test_rules_writable_by_others_fail_and_readable_warn(tmp_path):
    path = tmp_path / "doors.yaml"
    path.write_text("")
    path.chmod(0o666)
    (finding,) = check_modes([path])
    assert finding.level == FAIL and f"{path} is writable by group or others" in finding.text
    assert "chmod go-w" in finding.text
    path.chmod(0o644)
    assert check_modes([path])[0].level == WARN
    path.chmod(0o600)
    assert check_modes([path])[0].level == OK


def test_symlinks_are_judged_by_their_target(tmp_path):
    # lstat() of a symlink says 0777 on Linux: every link looked world-writable, no target was checked.
    target = tmp_path / "real.yaml"
    target.write_text("")
    target.chmod(0o600)
    link = tmp_path / "doors.yaml"
    link.symlink_to(target)
    assert [f.level for f in check_modes([link])] == [OK]
    target.chmod(0o666)
    (finding,) = check_modes([link])
    assert finding.level == FAIL and f"{link} (-> {target}) is writable by group or others" in finding.text


def test_writable_directory_fails_once_for_all_its_files(tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    for name in ("a.yaml", "b.yaml"):
        (rules / name).write_text("")
        (rules / name).chmod(0o600)
    rules.chmod(0o777)
    findings = check_modes([rules, rules / "a.yaml", rules / "b.yaml"])
    assert [(f.level, f.text.split(" is ")[0]) for f in findings] == [(FAIL, f"directory {rules}")]


def test_diagnose_reports_broken_rules_line_by_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("doors:\n  - {name: a, sequence: [70000], protect: [22]}\n")
    host = HostState("nf_tables", conntrack=True)
    findings = diagnose(tmp_path, 0, "auto", host)
    assert any(f.level == FAIL and "port 70000 is outside 1..65535" in f.text for f in findings)
    assert findings[0].text.endswith("--firewall auto uses the nft backend")


def test_key_files_readable_by_others_fail(tmp_path):
    keys = tmp_path / "spa.keys"
    keys.write_text("")
    keys.chmod(0o644)
    (finding,) = check_modes([keys], frozenset({keys}))
    assert finding.level == FAIL and "holds keys" in finding.text


def test_diagnose_looks_at_the_key_files_the_doors_name(tmp_path):
    from nfknock.doors.spa import generate_keys

    keys = tmp_path / "spa.keys"
    encryption, mac = generate_keys()
    keys.write_text(f"KEY_BASE64: {encryption}\nHMAC_KEY_BASE64: {mac}\n")
    keys.chmod(0o644)
    rules = tmp_path / "rules"
    rules.mkdir(mode=0o700)
    (rules / "spa.yaml").write_text(f"doors:\n  - {{name: s, kind: spa, keys_file: {keys}, protect: [22]}}\n")
    (rules / "spa.yaml").chmod(0o600)
    findings = diagnose(rules, 0, "auto", HostState("nf_tables", conntrack=True))
    assert [f.text for f in findings if f.level == FAIL] == [
        f"{keys} holds keys and is readable by group or others (chmod 600)"
    ]


def test_save_output_is_read_as_the_filter_table_in_s_style():
    from nfknock.tools.doctor import filter_rules

    saved = (
        "# Generated by iptables-nft-save v1.8.9\n*mangle\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j MARK "
        "--set-xmark 0x1/0xffffffff\nCOMMIT\n*filter\n:INPUT DROP [1:2]\n:NFKNOCK - [0:0]\n"
        "-A INPUT -j NFKNOCK\nCOMMIT\n"
    )
    assert filter_rules(saved) == "-P INPUT DROP\n-N NFKNOCK\n-A INPUT -j NFKNOCK\n"
    assert filter_rules("") == ""


def test_gather_runs_no_legacy_tool_where_no_legacy_table_exists(monkeypatch):
    """`iptables-legacy -S` would create the filter table: a diagnosis must change nothing."""
    import subprocess

    from nfknock.tools import doctor

    ran = []

    def fake_run(argv, **kwargs):
        ran.append(argv[0])
        return subprocess.CompletedProcess(argv, 0, "*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n", "")

    monkeypatch.setattr(doctor, "legacy_tables", lambda family: set())
    monkeypatch.setattr(doctor.subprocess, "run", fake_run)
    monkeypatch.setattr(doctor.shutil, "which", lambda name: f"/usr/sbin/{name}")
    host = doctor.gather()
    assert not [tool for tool in ran if "legacy" in tool]
    assert {"iptables-nft-save", "ip6tables-nft-save"} <= set(ran)
    assert not [tool for tool in ran if tool.endswith(("tables-nft", "tables-legacy"))]  # only -save tools
    assert host.rules_s[("legacy", 4)] == "" and host.rules_s[("nft", 4)] == "-P INPUT ACCEPT\n"


def test_legacy_backend_does_not_open_a_table_that_does_not_exist(monkeypatch):
    from nfknock.firewall import legacy

    def no_iptc(family):
        raise AssertionError("iptc opened a table")

    monkeypatch.setattr(legacy, "legacy_tables", lambda family: set())
    monkeypatch.setattr(legacy, "_classes", no_iptc)
    firewall = legacy.LegacyFirewall()
    assert firewall.remove() is False
    assert firewall.installed() == {4: [], 6: []}


MARKS = """\
*mangle
:PREROUTING ACCEPT [0:0]
-A PREROUTING -p udp -j MARK --set-xmark 0x20000000/0x20000000
-A PREROUTING -j MARK --set-xmark 0x4000/0x4000
-A PREROUTING -m mark --mark 0x1/0xffff -j ACCEPT
-A PREROUTING -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
COMMIT
*filter
:INPUT ACCEPT [0:0]
:NFKNOCK - [0:0]
-A INPUT -m mark --mark 0x5 -j ACCEPT
-A NFKNOCK -m mark --mark 0x20000000/0x20000000 -j RETURN
-A INPUT -m recent --mask 255.255.255.255 --name x -j DROP
COMMIT
"""


def test_other_users_of_the_pass_mark_bit_are_named():
    from nfknock.tools.doctor import check_pass_mark

    host = HostState(
        "nf_tables",
        saved={
            ("nft", 4): MARKS,
            ("legacy", 6): "*raw\n-A OUTPUT -j HMARK --hmark-tuple src --hmark-mod 4 --hmark-offset 1\nCOMMIT\n",
        },
    )
    findings = check_pass_mark(host)
    assert [f.level for f in findings] == [WARN] * 4
    texts = [f.text for f in findings]
    assert texts[0].startswith("ip6tables-legacy -t raw: a rule uses mark bit 0x20000000")
    assert "iptables-nft -t mangle" in texts[1] and "--set-xmark 0x20000000/0x20000000" in texts[1]
    assert "--restore-mark" in texts[2]
    assert "iptables-nft -t filter" in texts[3] and "--mark 0x5 -j ACCEPT" in texts[3]  # full mask: covers it
    assert not any("NFKNOCK" in t for t in texts)  # our own chain is not a clash
    assert not any("0x4000/0x4000" in t or "0x1/0xffff" in t for t in texts)
    (ok,) = check_pass_mark(
        HostState("nf_tables", saved={("nft", 4): MARKS.split("-A PREROUTING -j CONNMARK")[0]}), 0x10000000
    )
    assert ok.level == OK and "0x10000000" in ok.text


def test_knock_tripwire_and_rotating_ports_in_the_local_port_range_warn(monkeypatch):
    import base64

    from nfknock.tools.doctor import check_local_ports

    (finding,) = check_local_ports((SEED,), (32768, 60999))
    assert finding.level == WARN
    assert finding.text.startswith(
        "door openSSH: knock ports 40000/tcp 50000/tcp 60000/tcp; tripwire ports "
        "39984-40016/tcp 49984-50016/tcp 59984-60016/tcp in the local port range "
        "32768-60999 (net.ipv4.ip_local_port_range)"
    )
    assert "add 39984-40016,49984-50016,59984-60016 to net.ipv4.ip_local_reserved_ports" in finding.text
    # Reserved ports are never handed out by the kernel: no warning for them.
    assert check_local_ports((SEED,), (32768, 60999), "39984-40016,49984-50016,59984-60016")[0].level == OK
    assert check_local_ports((SEED,), (32768, 39999))[0].text.startswith(
        "door openSSH: tripwire ports 39984-40016/tcp in"
    )
    assert check_local_ports((SEED,), (61000, 65000))[0].level == OK
    assert check_local_ports((SEED,), None) == []
    monkeypatch.setenv("T_SECRET", base64.b64encode(b"s" * 32).decode())
    rotating = RotatingDoor.model_validate(
        dict(name="r", rotate={"secret_env": "T_SECRET", "ports": "30000-39999"}, protect=["22/tcp"], tripwire=0)
    )
    (finding,) = check_local_ports((rotating,), (32768, 60999))
    assert "rotating range 30000-39999/tcp in the local port range" in finding.text
    assert "add 32768-39999 to" in finding.text


def test_diagnose_follows_a_rules_symlink(tmp_path):
    target = tmp_path / "ssh.yaml"
    target.write_text("doors:\n  - {name: a, sequence: [1, 2], protect: [22]}\n")
    target.chmod(0o600)
    link = tmp_path / "rules.yaml"
    link.symlink_to(target)
    findings = diagnose(link, 0, "auto", HostState("nf_tables", conntrack=True))
    assert [f.text for f in findings if f.level != OK] == []
    target.chmod(0o620)
    assert [f.text for f in diagnose(link, 0, "auto", HostState("nf_tables", conntrack=True)) if f.level == FAIL] == [
        f"{link} (-> {target}) is writable by group or others: anyone who can edit it decides who gets in (chmod go-w)"
    ]


@pytest.mark.parametrize(
    ("missing", "chosen", "level", "text"),
    [
        ((), "nft", OK, "the server extra is installed (netfilterqueue, pyroute2)"),
        ((), "legacy", OK, "the server extra is installed (netfilterqueue, python-iptables, pyroute2)"),
        (("iptc",), "nft", OK, "the server extra is installed (netfilterqueue, pyroute2)"),
        (
            ("iptc",),
            "legacy",
            FAIL,
            "nfknock run needs the server extra: pip install 'nfknock[server]' (python-iptables not installed)",
        ),
        (
            ("netfilterqueue", "iptc"),
            "legacy",
            FAIL,
            "nfknock run needs the server extra: pip install "
            "'nfknock[server]' (netfilterqueue, python-iptables not installed)",
        ),
    ],
)
def test_a_client_only_install_fails_the_server_extra_check(missing, chosen, level, text):
    assert check_server_extra(HostState("nf_tables", missing_modules=missing), chosen) == [Finding(level, text)]


def test_every_workers_queues_are_checked():
    held = "    9  4242     0 2 65531     0     0        0  1\n"  # worker 1's grant queue of base 6
    findings = check_queue(HostState(None, queues=held), 6, workers=2)
    assert [f.level for f in findings] == [OK, OK, OK, FAIL]
    assert "NFQUEUE 9 (worker 1's grant queue)" in findings[3].text


def test_a_knock_door_whose_first_knocks_reach_the_daemon_is_named_with_the_port_that_keeps_it_there():
    """A flood of first knocks at such a door reaches the queue; the administrator is told which
    door, and which other door's port collides, so the door can be given ports of its own."""

    def knock_door(name, sequence, protect="22/tcp"):
        return parse_door({"name": name, "sequence": sequence, "protect": [protect]})

    plain = knock_door("openSSH", [40000, 50000, 60000])
    twin = knock_door("twin", [41000, 50000, 61000], "2222/tcp")
    assert [str(f) for f in check_first_steps((plain, twin))] == [
        "ok   the kernel records the first knocks of 2 knock door(s)"
    ]
    other = knock_door("other", [44000, 40000, 48000], "2223/tcp")
    findings = [str(f) for f in check_first_steps((plain, twin, other))]
    assert findings[0].startswith(
        "warn door openSSH: its first knocks reach the daemon instead of the kernel's first-step set: "
        "40000/tcp is also door other's port (as its second step)"
    )
    # the twin shares 50000 with openSSH, now the daemon's: the twin's first knocks are the daemon's too
    assert findings[2].startswith(
        "warn door twin: its first knocks reach the daemon instead of the kernel's first-step set: its second "
        "step 50000/tcp is also door openSSH's, whose first step the daemon decides (40000/tcp is also door "
        "other's port (as its second step))"
    )
    assert findings[1].startswith("warn door other:")
    assert check_first_steps(()) == []


def test_a_chain_of_the_other_flavour_that_queues_to_nobody_names_its_queues_and_the_fix():
    """After a switch of --firewall and --queue-num without 'nfknock down': the old chain drops
    the knocks the new daemon waits for."""
    old = WITH_CHAIN + "-A NFKNOCK -p tcp -m tcp --dport 40000 -j NFQUEUE --queue-num 7\n"
    running = "    20  4242     0 2 65531     0     0        0  1\n    21  4242     0 2 65531     0     0        0  1\n"
    host = HostState("nf_tables", {("legacy", 4): old, ("nft", 4): WITH_CHAIN}, queues=running)
    theirs, ours = check_leftovers(host, "nft", queue_num=20)  # legacy first
    assert theirs.level == WARN and "iptables-legacy -S NFKNOCK" in theirs.text
    assert "queues 7" in theirs.text and "no process listens on 7" in theirs.text
    assert "never reach nfknock on --queue-num 20 (queues 20-21)" in theirs.text
    assert "'nfknock down --firewall legacy'" in theirs.text
    assert ours.level == OK  # the chosen flavour's chain: 'nfknock run' replaces it


def test_the_fleets_redis_deployment_gets_a_line_per_risk():
    from nfknock.fleet.deployment import RedisFacts
    from nfknock.tools.doctor import check_redis

    lines = check_redis(RedisFacts(True, True, "", "no", "everysec", "allkeys-lru"))
    assert [line.level for line in lines] == [FAIL, WARN, FAIL]
    assert "answers without a password" in lines[0].text and "allkeys-lru" in lines[2].text
    assert "restart loses every claim" in lines[1].text
    (unreachable,) = check_redis("cannot reach Redis at redis://10.0.0.1:6379/0 (ConnectionError)")
    assert unreachable.level == FAIL and "cannot reach Redis" in unreachable.text
