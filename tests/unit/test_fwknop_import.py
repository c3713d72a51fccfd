"""import-fwknop on real access.conf files: the Debian package's default and a multi-stanza team
file. What maps becomes one SPA door and a key file per stanza that `nfknock check` accepts;
what does not is listed by line."""

import base64
import stat
from pathlib import Path

from nfknock.cli import main
from nfknock.doors.rules import parse_expiry
from nfknock.loading import load_rules

CONFS = Path(__file__).parent / "fwknop_conf"


def run_import(tmp_path, name, capsys, *extra):
    rules = tmp_path / "rules"
    rules.mkdir(mode=0o700)
    code = main(
        [
            "import-fwknop",
            str(CONFS / name),
            "--keys-dir",
            str(tmp_path / "keys"),
            "-o",
            str(rules / "fwknop.yaml"),
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    return rules, err


def test_debian_default_gives_a_door_check_accepts(tmp_path, capsys):
    rules, err = run_import(tmp_path, "debian-default.conf", capsys)
    assert main(["check", "--rules", str(rules)]) == 0
    assert "keys           stanza1" in capsys.readouterr().out
    door = load_rules(rules, strict=True).door("fwknop")
    assert [str(p) for p in door.protect] == ["22/tcp"]
    (key,) = door.keyring
    assert key.name == "stanza1" and key.sources == () and key.ports is None
    # __CHANGEME__ placeholders: fresh keys, said so, by line
    assert "line 205: the encryption key is a placeholder" in err
    assert "line 206: the HMAC key is a placeholder" in err
    assert "fwknopd honours fwknop -f up to 300s" in err
    assert stat.S_IMODE((tmp_path / "keys" / "stanza1.keys").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700


def test_a_team_file_maps_stanzas_to_keys_and_lists_the_rest_by_line(tmp_path, capsys):
    rules, err = run_import(tmp_path, "team.conf", capsys, "--door", "bastion")
    assert main(["check", "--rules", str(rules)]) == 0
    door = load_rules(rules, strict=True).door("bastion")
    assert [str(p) for p in door.protect] == ["22/tcp", "443/tcp"]
    keys = {key.name: key for key in door.keyring}
    assert set(keys) == {"alice", "bob", "stanza4"}
    alice, bob, passphrase = keys["alice"], keys["bob"], keys["stanza4"]
    assert [str(n) for n in alice.sources] == ["10.0.1.0/24", "192.168.7.7/32"]
    assert alice.username == "alice" and alice.ports == frozenset({("tcp", 22)})
    assert (alice.open_for, alice.max_open_for) == (60.0, 600.0)
    assert alice.expires == parse_expiry("2027-01-31")
    assert alice.keys.encryption == base64.b64decode("D5N6vZhMdlaxJGoqpKJDtKCa8b9Lz94rLPz6A7pzk4k=")
    assert bob.keys.digest == "sha512" and bob.ports == frozenset({("tcp", 22), ("tcp", 443)})
    assert bob.expires == 1801353600 and bob.sources == ()
    assert passphrase.keys.encryption == b"a passphrase long enough"  # KEY: used as it is, as fwknop does
    not_imported = [line for line in err.splitlines() if line.endswith("NOT IMPORTED")]
    for where in (
        "line 2: %include_keys",
        "line 19: ENABLE_CMD_EXEC Y (commands",
        "line 20: CMD_EXEC_USER nobody (commands",
        "line 23: stanza 3 (SOURCE ANY): a GPG-only stanza",
        "line 32: FORCE_NAT",
        "line 34: stanza 5 (SOURCE 10.0.9.0/24): same HMAC key as the stanza of line 13 (key bob)",
    ):
        assert any(where in line for line in not_imported), where


def test_nothing_is_overwritten(tmp_path, capsys):
    run_import(tmp_path, "team.conf", capsys)
    before = (tmp_path / "keys" / "alice.keys").read_text()
    code = main(["import-fwknop", str(CONFS / "team.conf"), "--keys-dir", str(tmp_path / "keys")])
    assert code == 2 and "alice.keys exists already" in capsys.readouterr().err
    assert (tmp_path / "keys" / "alice.keys").read_text() == before
