"""The CLI as a user meets it: exit codes and one-line messages."""

from pathlib import Path

import pytest

from nfknock.cli import _knock_steps, build_parser, main, parse
from nfknock.errors import NfknockError, RulesError, UsageError

RULES = str(Path(__file__).resolve().parents[2] / "rules")


def test_check_prints_the_doors_and_the_rules(capsys):
    assert main(["check", "--rules", RULES, "--queue-num", "5", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "door openSSH" in out
    assert "sequence       40000/tcp 50000/tcp 60000/tcp" in out
    # the third step is queued only for sources mid-attempt (later_steps.py)
    assert "--dport 60000 -m set --match-set nfknock-q5-midway-v4 src -j NFQUEUE --queue-num 5" in out
    assert "--dport 40000 --tcp-flags SYN,ACK SYN -j SET --add-set nfknock-q5-tcp40000-v4 src" in out


def test_check_with_bad_rules_exits_2_with_one_line_per_problem(tmp_path, capsys):
    (tmp_path / "x.yaml").write_text("doors:\n  - name: a\n    sequence: [1]\n    protect: [1]\n")
    assert main(["check", "--rules", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"nfknock: {tmp_path / 'x.yaml'}: door 'a': 1/tcp is both a knock port and a protected port"]


def test_check_strict_refuses_what_the_daemon_refuses(tmp_path, capsys):
    """A rules file others may write: a warning for `check` (it also serves to read others'
    files), an error with --strict, as a start or reload of the daemon would refuse it (the unit's
    ExecReload runs `check --strict` so that such a reload fails)."""
    rules = tmp_path / "rules"
    rules.mkdir(mode=0o700)
    (rules / "ssh.yaml").write_text((Path(RULES) / "ssh.yaml").read_text())
    (rules / "ssh.yaml").chmod(0o666)
    assert main(["check", "--rules", str(rules)]) == 0
    assert "warning:" in capsys.readouterr().err
    assert main(["check", "--strict", "--rules", str(rules)]) == 2
    assert f"{rules / 'ssh.yaml'}: not trusted" in capsys.readouterr().err
    (rules / "ssh.yaml").chmod(0o600)
    assert main(["check", "--strict", "--rules", str(rules)]) == 0


def test_check_shows_each_workers_share_of_the_queued_packets(capsys):
    assert main(["check", "--rules", RULES, "--queue-num", "5", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    midway = "-m set --match-set nfknock-q5-midway-v4 src"
    assert f'--dport 60000 {midway} -m u32 --u32 "0xc&0xff=0x0:0x7f" -j NFQUEUE --queue-num 5' in out
    assert f'--dport 60000 {midway} -m u32 --u32 "0xc&0xff=0x80:0xff" -j NFQUEUE --queue-num 7' in out


def test_auto_workers_are_one_per_usable_cpu_at_most_16():
    import os

    args = parse(build_parser(), ["run", "--workers", "auto"])
    assert args.workers == min(16, len(os.sched_getaffinity(0)))
    assert parse(build_parser(), ["run"]).workers == 1


def test_workers_whose_queues_would_pass_65535_are_refused(capsys):
    assert main(["check", "--rules", RULES, "--queue-num", "65533", "--workers", "2"]) == 2
    assert "--queue-num 65533 with --workers 2 needs queues up to 65536: at most 65535" in capsys.readouterr().err


def test_run_with_missing_rules_exits_2_before_touching_anything(tmp_path, capsys):
    # its own state directory: the host's /var/lib/nfknock may hold last good rules
    assert main(["run", "--rules", str(tmp_path / "none"), "--state-dir", str(tmp_path / "state")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--queue-num", "70000"],
        ["run", "--queue-num", "x"],
        ["run", "--max-sources", "0"],
        ["run", "--workers", "0"],
        ["run", "--workers", "17"],
        ["knock", "h", "1", "--delay=-5"],
        ["check", "extra"],
    ],
)
def test_bad_numbers_are_refused_by_argparse(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "must be" in err or "unrecognized arguments: extra" in err


def parse_knock(*argv):
    return _knock_steps(parse(build_parser(), ["knock", "host", *argv]))


def test_knock_steps_from_ports_and_from_a_door():
    assert [str(s) for s in parse_knock("1", "2/udp")] == ["1/tcp", "2/udp"]
    assert [str(s) for s in parse_knock("-u", "1", "2/tcp")] == ["1/udp", "2/tcp"]
    assert [str(s) for s in parse_knock("-u", "1", "2:tcp", "3:udp")] == ["1/udp", "2/tcp", "3/udp"]  # knock's
    assert [s.port for s in parse_knock("--door", "openSSH", "--rules", RULES)] == [40000, 50000, 60000]
    assert [s.port for s in parse_knock("--door", "openSSH", "--rules", RULES, "--close")] == [60000, 50000, 40000]


@pytest.mark.parametrize(
    "argv,error,message",
    [
        ((), UsageError, "nothing to knock: give PORT[/PROTO]... or --door NAME --rules DIR"),
        (("70000",), UsageError, "port '70000': port 70000 is outside 1..65535"),
        (("1/icmp",), UsageError, "port '1/icmp': protocol must be tcp or udp, got 'icmp'"),
        (("--door", "openSSH"), UsageError, "--door needs --rules DIR to find the door"),
        (("--door", "nope", "--rules", RULES), RulesError, "no door named 'nope' (doors: openSSH)"),
        (("1", "--door", "openSSH", "--rules", RULES), UsageError, "give either PORTs or --door, not both"),
        (("1", "--close"), UsageError, "--close needs --door"),
    ],
)
def test_knock_mistakes_are_named(argv, error, message):
    with pytest.raises(NfknockError) as info:
        parse_knock(*argv)
    assert type(info.value) is error  # the class decides the exit code the user gets
    assert info.value.exit_code == 2
    assert str(info.value) == message


def test_unresolvable_host_is_a_usage_error(capsys):
    assert main(["knock", "no-such-host.invalid", "1"]) == 2
    assert "cannot resolve 'no-such-host.invalid'" in capsys.readouterr().err


@pytest.mark.prints_keys  # keygen's job: stderr and logs are still checked
def test_keygen_prints_fwknop_style_keys_that_work(capsys):
    import base64

    from nfknock.doors.spa import Keys, decode, encode

    assert main(["keygen"]) == 0
    lines = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    keys = Keys(base64.b64decode(lines["KEY_BASE64"]), base64.b64decode(lines["HMAC_KEY_BASE64"]))
    assert len(keys.encryption) == 32 and len(keys.hmac) == 64
    assert decode(encode(keys, "10.0.0.2", [("tcp", 22)], now=0), keys).ports == (("tcp", 22),)


def test_schema_describes_both_door_kinds(capsys):
    import json

    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "doors" in schema["properties"]
    assert {"KnockDoor", "RotatingDoor", "SpaDoor"} <= set(schema["$defs"])


def test_down_tries_both_flavours_and_fails_loudly_if_one_fails(monkeypatch, capsys):
    from nfknock import firewall
    from nfknock.errors import FirewallError

    tried = []

    class Fake:
        def __init__(self, flavour):
            self.flavour = flavour

        def installed(self):
            return {4: [], 6: []}

        def remove(self):
            tried.append(self.flavour)
            if self.flavour == "legacy":
                raise FirewallError("legacy rules not removed: IPv6: ip6tables (legacy): Permission denied")
            return True

    monkeypatch.setattr(firewall, "make_firewall", lambda flavour: Fake(flavour))
    assert main(["down"]) == 1
    assert tried == ["legacy", "nft"]
    captured = capsys.readouterr()
    assert captured.err == "nfknock: legacy: legacy rules not removed: IPv6: ip6tables (legacy): Permission denied\n"
    assert "scaffolding removed (nft)" in captured.out


@pytest.mark.parametrize("value", ["0x3", "0", "0x100000000", "banana", "-1"])
@pytest.mark.parametrize("verb", ["run", "check", "doctor"])
def test_pass_mark_must_be_one_bit(verb, value, capsys):
    with pytest.raises(SystemExit) as info:
        main([verb, "--pass-mark", value])
    assert info.value.code == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert error.endswith(
        f"argument --pass-mark: pass mark must be a single bit of the 32-bit packet mark, "
        f"such as 0x20000000; got {value!r}"
    )


def test_check_shows_the_chosen_pass_mark_and_warns_about_ephemeral_ports(monkeypatch, capsys):
    from nfknock.tools import doctor

    monkeypatch.setattr(doctor, "read_local_ports", lambda: ((32768, 60999), ""))
    assert main(["check", "--rules", RULES, "--pass-mark", "0x100"]) == 0
    captured = capsys.readouterr()
    assert "-A NFKNOCK -m mark --mark 0x100/0x100 -j RETURN" in captured.out
    assert "0x20000000" not in captured.out
    (warning,) = captured.err.splitlines()
    assert warning.startswith("nfknock: warning: door openSSH: knock ports 40000/tcp 50000/tcp 60000/tcp; ")
    monkeypatch.setattr(doctor, "read_local_ports", lambda: ((1024, 4999), ""))
    assert main(["check", "--rules", RULES]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "--mark 0x20000000/0x20000000" in captured.out


def test_run_hands_the_pass_mark_to_the_daemon(monkeypatch, tmp_path):
    import nfknock.daemon as daemon

    seen = {}

    class FakeDaemon:
        def __init__(self, config, *args, **kwargs):
            seen["pass_mark"] = config.pass_mark

        def run(self):
            pass

    monkeypatch.setattr(daemon, "Daemon", FakeDaemon)
    assert (
        main(["run", "--rules", RULES, "--firewall", "nft", "--pass-mark", "0x40", "--log-file", str(tmp_path / "log")])
        == 0
    )
    assert seen["pass_mark"] == 0x40
    assert main(["run", "--rules", RULES, "--firewall", "nft", "--log-file", str(tmp_path / "log")]) == 0
    assert seen["pass_mark"] == 0x20000000


def test_doctor_warns_about_other_users_of_the_pass_mark(monkeypatch, capsys):
    from nfknock.tools import doctor

    host = doctor.HostState(
        "nf_tables",
        conntrack=True,
        saved={("nft", 4): "*mangle\n-A PREROUTING -j MARK --set-xmark 0x40/0x40\nCOMMIT\n"},
    )
    monkeypatch.setattr(doctor, "gather", lambda: host)
    main(["doctor", "--rules", RULES, "--pass-mark", "0x40"])
    assert "warn iptables-nft -t mangle: a rule uses mark bit 0x40" in capsys.readouterr().out
    main(["doctor", "--rules", RULES])
    assert "ok   no other iptables rule uses the pass-mark bit 0x20000000" in capsys.readouterr().out


@pytest.fixture
def spa_rules(tmp_path, monkeypatch):
    from nfknock.doors.spa import generate_keys

    encryption, mac = generate_keys()
    monkeypatch.setenv("CLISPA_KEY_BASE64", encryption)
    monkeypatch.setenv("CLISPA_HMAC_KEY_BASE64", mac)
    (tmp_path / "spa.yaml").write_text("doors: [{name: s, kind: spa, keys_env: CLISPA, protect: [22]}]\n")
    return str(tmp_path)


@pytest.mark.parametrize(
    "argv,message",
    [
        (("--access", "99999/tcp"), "nfknock: --access: port '99999/tcp': port 99999 is outside 1..65535"),
        (("--access", "22/tcp", "ssh"), "nfknock: --access: port 'ssh': expected a port like 40000 or 40000/udp"),
        (("--access", "22/icmp"), "nfknock: --access: port '22/icmp': protocol must be tcp or udp"),
        (("--allow-ip", "10.0.0.300"), "nfknock: --allow-ip: '10.0.0.300' is not an IP address"),
    ],
)
def test_spa_argument_mistakes_are_one_named_line(spa_rules, argv, message, capsys):
    assert main(["spa", "127.0.0.1", "--door", "s", "--rules", spa_rules, *argv]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(message)


def test_grant_duration_mistake_is_one_named_line(capsys):
    assert main(["grant", "192.0.2.1", "--door", "s", "--for", "25h", "--control-socket", "/nonexistent"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "nfknock: --for: duration '25h' must be more than 0 and at most 24h"
    ]


def test_spa_on_a_team_door_needs_a_key_name(tmp_path, monkeypatch, capsys):
    from nfknock.doors.spa import generate_keys

    for prefix in ("ALICE", "BOB"):
        encryption, mac = generate_keys()
        monkeypatch.setenv(f"{prefix}_KEY_BASE64", encryption)
        monkeypatch.setenv(f"{prefix}_HMAC_KEY_BASE64", mac)
    (tmp_path / "spa.yaml").write_text(
        "doors: [{name: t, kind: spa, keys: [{name: alice, env: ALICE}, {name: bob, env: BOB}], protect: [22]}]\n"
    )
    assert main(["spa", "192.0.2.1", "--door", "t", "--rules", str(tmp_path)]) == 2
    assert "door 't' has 2 keys: pick one with --key (alice, bob)" in capsys.readouterr().err
    assert main(["spa", "192.0.2.1", "--door", "t", "--rules", str(tmp_path), "--key", "carol"]) == 2
    assert "door 't' has no key 'carol' (keys: alice, bob)" in capsys.readouterr().err


def test_revoke_takes_an_address_or_a_key(capsys):
    assert main(["revoke", "--control-socket", "/nonexistent"]) == 2
    assert "give an ADDRESS or --key NAME" in capsys.readouterr().err


# -- check --json, doctor --json: what CI scripts parse -------------------------------------

CHECK_KEYS = ["ok", "exit_code", "errors", "warnings", "doors", "rules_installed"]
DOCTOR_KEYS = ["ok", "exit_code", "errors", "findings", "counts"]


def json_out(capsys) -> dict:
    import json

    captured = capsys.readouterr()
    assert captured.err == ""  # everything a script needs is in the JSON
    return json.loads(captured.out)


def test_check_json_has_the_doors_and_the_rules(monkeypatch, capsys):
    from nfknock.tools import doctor

    monkeypatch.setattr(doctor, "read_local_ports", lambda: ((32768, 60999), ""))
    assert main(["check", "--rules", RULES, "--queue-num", "5", "--json"]) == 0
    report = json_out(capsys)
    assert list(report) == CHECK_KEYS
    assert report["ok"] is True and report["exit_code"] == 0 and report["errors"] == []
    (door,) = report["doors"]
    assert (door["name"], door["kind"]) == ("openSSH", "knock")
    assert door["file"].endswith("ssh.yaml") and door["fields"]["sequence"] == "40000/tcp 50000/tcp 60000/tcp"
    assert any(
        "--dport 60000" in rule and rule.endswith("-j NFQUEUE --queue-num 5")
        for rule in report["rules_installed"]["iptables"]
    )
    assert set(report["rules_installed"]) == {"iptables", "ip6tables"}
    assert any("ip_local_reserved_ports" in line for line in report["warnings"])


def test_check_json_reports_bad_rules_with_the_same_exit_code(tmp_path, capsys):
    (tmp_path / "x.yaml").write_text("doors:\n  - name: a\n    sequence: [1]\n    protect: [1]\n")
    assert main(["check", "--rules", str(tmp_path), "--json"]) == 2
    report = json_out(capsys)
    assert list(report) == CHECK_KEYS
    assert (report["ok"], report["exit_code"], report["doors"]) == (False, 2, [])
    assert report["errors"] == [f"{tmp_path / 'x.yaml'}: door 'a': 1/tcp is both a knock port and a protected port"]
    assert main(["check", "--rules", RULES, "--queue-num", "65533", "--workers", "2", "--json"]) == 2
    assert json_out(capsys)["errors"] == ["--queue-num 65533 with --workers 2 needs queues up to 65536: at most 65535"]


def test_doctor_json_lists_the_findings_and_exits_as_the_text_does(monkeypatch, capsys):
    from nfknock.tools import doctor

    healthy = doctor.HostState("nf_tables", conntrack=True)
    monkeypatch.setattr(doctor, "gather", lambda: healthy)
    code = main(["doctor", "--rules", RULES])
    text = capsys.readouterr().out
    assert main(["doctor", "--rules", RULES, "--json"]) == code
    report = json_out(capsys)
    assert list(report) == DOCTOR_KEYS
    assert [
        f"{row['level'].upper() if row['level'] == 'fail' else row['level']:<4} {row['text']}"
        for row in report["findings"]
    ] == text.splitlines()
    assert report["ok"] is (code == 0) and report["exit_code"] == code
    assert sum(report["counts"].values()) == len(report["findings"])

    monkeypatch.setattr(doctor, "gather", lambda: doctor.HostState("nf_tables", conntrack=False))
    assert main(["doctor", "--rules", RULES, "--json"]) == 1
    report = json_out(capsys)
    assert report["ok"] is False and report["counts"]["fail"] >= 1
    assert {"level": "fail", "text": "conntrack is not available: nfknock needs the nf_conntrack module"} in report[
        "findings"
    ]
    assert main(["doctor", "--rules", RULES, "--queue-num", "65534", "--workers", "2", "--json"]) == 2
    report = json_out(capsys)
    assert (report["ok"], report["findings"], report["errors"]) == (
        False,
        [],
        ["--queue-num 65534 with --workers 2 needs queues up to 65537: at most 65535"],
    )


def test_spa_repeat_sends_the_same_packet_n_times_apart():
    """`nfknock spa --repeat N`: copies of one packet (harmless replays), COPY_SPACING apart."""
    import socket

    from nfknock.doors.spa import Keys, decode
    from nfknock.tools.client import COPY_SPACING, send_spa

    keys = Keys(b"k" * 32, b"h" * 64)
    slept = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(5)
        send_spa("127.0.0.1", keys, server.getsockname()[1], [("tcp", 22)], copies=3, sleep=slept.append)
        copies = [server.recv(2048) for _ in range(3)]
    assert len(set(copies)) == 1 and decode(copies[0], keys).ports == (("tcp", 22),)
    assert slept == [COPY_SPACING, COPY_SPACING]
    with pytest.raises(SystemExit):
        main(["spa", "127.0.0.1", "--door", "s", "--rules", "/nonexistent", "--repeat", "21"])
