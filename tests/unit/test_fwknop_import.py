"""import-fwknop on real access.conf files: the Debian package's default and a multi-stanza team
file. What maps becomes one SPA door and a key file per stanza that `nfknock check` accepts;
what does not is listed by line."""

import base64
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from nfknock.cli import main
from nfknock.doors.rules import parse_expiry
from nfknock.loading import load_rules

CONFS = Path(__file__).parent / "fwknop_conf"
REPO = Path(__file__).resolve().parents[2]


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
    # FORCE_NAT (docs/gateway.md): the door forwards to it, and that key's grants go there only.
    assert [str(d) for d in door.forward] == ["192.168.1.2:22/tcp"]
    assert str(passphrase.force_nat) == "192.168.1.2:22/tcp"
    not_imported = [line for line in err.splitlines() if line.endswith("NOT IMPORTED")]
    for where in (
        "line 2: %include_keys",
        "line 19: ENABLE_CMD_EXEC (commands",  # keyword and line, never a value: access.conf holds keys
        "line 20: CMD_EXEC_USER (commands",
        "line 23: stanza 3 (SOURCE ANY): a GPG-only stanza",
        "line 34: stanza 5 (SOURCE 10.0.9.0/24): same HMAC key as the stanza of line 13 (key bob)",
    ):
        assert any(where in line for line in not_imported), where


def test_nothing_is_overwritten(tmp_path, capsys):
    run_import(tmp_path, "team.conf", capsys)
    before = (tmp_path / "keys" / "alice.keys").read_text()
    code = main(["import-fwknop", str(CONFS / "team.conf"), "--keys-dir", str(tmp_path / "keys")])
    assert code == 2 and "alice.keys exists already" in capsys.readouterr().err
    assert (tmp_path / "keys" / "alice.keys").read_text() == before


def test_no_key_or_passphrase_of_access_conf_is_ever_printed(tmp_path, capsys):
    """Keys on the lines nfknock reads, on lines it does not (GPG_DECRYPT_PW, a misspelt keyword,
    a key on a line of its own, `KEY_BASE64=...`), and on the wrong keyword's line: none of them
    reaches stdout or stderr, whatever the import makes of the file."""
    from nfknock.doors.spa import generate_keys
    from support.secretcheck import Registry

    encryption, mac = generate_keys()
    other, passphrase = generate_keys()
    conf = tmp_path / "access.conf"
    conf.write_text(
        f"""\
KEY_BASE64={encryption}
SOURCE              ANY
KEY_BASE64          {encryption}
HMAC_KEY_BASE64     {mac}
GPG_DECRYPT_PW      {passphrase}
HMAC_KYE_BASE64     {other}
{other}

SOURCE              {passphrase}
KEY_BASE64          {other}

SOURCE              ANY
KEY                 a passphrase long enough
HMAC_KEY_BASE64     {other}
OPEN_PORTS          {passphrase}

SOURCE              ANY
KEY                 a passphrase long enough
HMAC_KEY_BASE64     {other}
ACCESS_EXPIRE       {passphrase}
FW_ACCESS_TIMEOUT   {passphrase}
HMAC_DIGEST_TYPE    {passphrase}
"""
    )
    code = main(["import-fwknop", str(conf), "--keys-dir", str(tmp_path / "keys")])
    out, err = capsys.readouterr()
    assert code == 0 and "line 5: GPG_DECRYPT_PW (GPG mode" in err and "line 6: HMAC_KYE_BASE64 (no nfknock" in err
    assert "line 1: a line that is not 'KEYWORD value' (not shown" in err
    assert "line 9: stanza 2 (SOURCE (not an address list; not shown))" in err
    registry = Registry()
    registry.register(encryption, mac, other, passphrase)
    assert registry.leaks(out + err) == []


def test_two_stanzas_never_share_a_key_name(tmp_path, capsys):
    """A username `stanza2` before stanza 2, two stanzas of one user: every stanza gets a key of
    its own (0.x silently kept one of the two)."""
    from nfknock.doors.spa import generate_keys

    stanzas = []
    for user in ("stanza2", None, "alice", "alice"):
        encryption, mac = generate_keys()
        stanzas.append(f"SOURCE ANY\nKEY_BASE64 {encryption}\nHMAC_KEY_BASE64 {mac}\n")
        if user:
            stanzas[-1] += f"REQUIRE_USERNAME {user}\n"
    conf = tmp_path / "access.conf"
    conf.write_text("\n".join(stanzas))
    rules, err = run_import(tmp_path, conf, capsys)
    names = sorted(key.name for key in load_rules(rules, strict=True).door("fwknop").keyring)
    assert names == ["alice", "alice4", "stanza2", "stanza2_2"]
    assert "stanza 4: key alice is another stanza's already: this one is key alice4" in err


@pytest.mark.parametrize("importer", ["import-fwknop", "import-knockd"])
@pytest.mark.parametrize("special", ["fifo", "dev-zero link", "directory", "too big", "binary"])
def test_importers_refuse_what_is_not_a_config_file_in_one_line(tmp_path, importer, special):
    """A FIFO must not hang the command, /dev/zero not eat the memory, a 300 MB file not take a
    gigabyte: one line naming the file, exit 2, no traceback."""
    path = tmp_path / "conf"
    if special == "fifo":
        os.mkfifo(path)
    elif special == "dev-zero link":
        path.symlink_to("/dev/zero")
    elif special == "directory":
        path.mkdir()
    elif special == "too big":
        with open(path, "wb") as stream:
            stream.truncate(300 * 1024 * 1024)  # sparse: costs no disk
    else:
        path.write_bytes(b"SOURCE ANY\n\xff\xfe" + os.urandom(64))
    argv = [sys.executable, "-m", "nfknock", importer, str(path)]
    if importer == "import-fwknop":
        argv += ["--keys-dir", str(tmp_path / "keys")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=REPO)
    why = {
        "fifo": "not a regular file (a FIFO)",
        "dev-zero link": "not a regular file (a character device)",
        "directory": "not a regular file (a directory)",
        "too big": "larger than 1024 KiB",
        "binary": "not UTF-8 text",
    }[special]
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"nfknock: {path}: cannot read: {why}" + result.stderr.split(why, 1)[-1]
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "keys").exists()


def test_an_out_of_range_value_or_an_unwritable_output_is_one_line(tmp_path, capsys):
    from nfknock.doors.spa import generate_keys

    encryption, mac = generate_keys()
    conf = tmp_path / "access.conf"
    keys = f"KEY_BASE64 {encryption}\nHMAC_KEY_BASE64 {mac}\n"
    conf.write_text(f"SOURCE ANY\n{keys}ACCESS_EXPIRE_EPOCH 99999999999999999999\n\nSOURCE ANY\n{keys}")
    out = tmp_path / "missing" / "fwknop.yaml"
    assert main(["import-fwknop", str(conf), "--keys-dir", str(tmp_path / "keys"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "line 4: ACCESS_EXPIRE_EPOCH is not Unix seconds (stanza skipped)" in err
    assert err.splitlines()[-1] == f"nfknock: {out}: cannot write: no such directory (nothing written)"
    assert not (tmp_path / "keys").exists()
