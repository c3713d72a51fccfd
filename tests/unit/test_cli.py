"""The CLI as a user meets it: exit codes and one-line messages."""

import pytest

from nfknock.cli import _knock_steps, build_parser, main, parse
from nfknock.errors import NfknockError, RulesError, UsageError
from pathlib import Path

RULES = str(Path(__file__).resolve().parents[2] / "rules")


def test_check_prints_the_doors_and_the_rules(capsys):
    assert main(["check", "--rules", RULES, "--queue-num", "5"]) == 0
    out = capsys.readouterr().out
    assert "door openSSH" in out
    assert "sequence       40000/tcp 50000/tcp 60000/tcp" in out
    assert "--dport 40000 -j NFQUEUE --queue-num 5" in out


def test_check_with_bad_rules_exits_2_with_one_line_per_problem(tmp_path, capsys):
    (tmp_path / "x.yaml").write_text("doors:\n  - name: a\n    sequence: [1]\n    protect: [1]\n")
    assert main(["check", "--rules", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"nfknock: {tmp_path / 'x.yaml'}: door 'a': 1/tcp is both a knock port and a protected port"]


def test_run_with_missing_rules_exits_2_before_touching_anything(tmp_path, capsys):
    assert main(["run", "--rules", str(tmp_path / "none")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["run", "--queue-num", "70000"],
    ["run", "--queue-num", "x"],
    ["run", "--max-sources", "0"],
    ["knock", "h", "1", "--delay=-5"],
    ["check", "extra"],
])
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
    assert [s.port for s in parse_knock("--door", "openSSH", "--rules", RULES)] == [40000, 50000, 60000]
    assert [s.port for s in parse_knock("--door", "openSSH", "--rules", RULES, "--close")] == [60000, 50000, 40000]


@pytest.mark.parametrize("argv,error,message", [
    ((), UsageError, "nothing to knock: give PORT[/PROTO]... or --door NAME --rules DIR"),
    (("70000",), UsageError, "port '70000': port 70000 is outside 1..65535"),
    (("1/icmp",), UsageError, "port '1/icmp': protocol must be tcp or udp, got 'icmp'"),
    (("--door", "openSSH"), UsageError, "--door needs --rules DIR to find the door"),
    (("--door", "nope", "--rules", RULES), RulesError, "no door named 'nope' (doors: openSSH)"),
    (("1", "--door", "openSSH", "--rules", RULES), UsageError, "give either PORTs or --door, not both"),
    (("1", "--close"), UsageError, "--close needs --door"),
])
def test_knock_mistakes_are_named(argv, error, message):
    with pytest.raises(NfknockError) as info:
        parse_knock(*argv)
    assert type(info.value) is error  # the class decides the exit code the user gets
    assert info.value.exit_code == 2
    assert str(info.value) == message


def test_unresolvable_host_is_a_usage_error(capsys):
    assert main(["knock", "no-such-host.invalid", "1"]) == 2
    assert "cannot resolve 'no-such-host.invalid'" in capsys.readouterr().err


def test_keygen_prints_fwknop_style_keys_that_work(capsys):
    import base64

    from nfknock.spa import Keys, decode, encode

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
    assert {"Door", "SpaDoor"} <= set(schema["$defs"])
