"""Which rules and key files nfknock trusts (sshd's StrictModes): `run` refuses the others,
`check` warns about them. Files under pytest's tmp_path (0644, below the sticky /tmp) are fine."""

import os

import pytest

from nfknock.cli import main
from nfknock.doors.spa import generate_keys
from nfknock.errors import RulesError
from nfknock.loading import load_rules
from nfknock.trust import why_unsafe

DOOR = "doors:\n  - {name: a, sequence: [1, 2], protect: [22]}\n"


def rules_in(directory, mode=0o644):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "doors.yaml"
    path.write_text(DOOR)
    path.chmod(mode)
    return path


def refused(path):
    with pytest.raises(RulesError) as info:
        load_rules(path, strict=True)
    return list(info.value.lines)


def test_ordinary_files_under_tmp_are_trusted(tmp_path):
    path = rules_in(tmp_path / "rules")
    assert why_unsafe(path) is None and why_unsafe(path.parent) is None
    assert [d.name for d in load_rules(path.parent, strict=True).doors] == ["a"]
    assert load_rules(path).warnings == ()


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_file_writable_by_group_or_others_is_refused_when_strict(tmp_path, mode):
    path = rules_in(tmp_path / "rules", mode)
    line = f"{path}: not trusted: {path} is writable by group or others: anyone who can edit it decides who gets in"
    (error,) = refused(path.parent)
    assert error.startswith(line)
    (warning,) = load_rules(path.parent).warnings  # check: loads, and says so
    assert warning == error


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o1777])
def test_writable_rules_directory_is_refused_even_sticky(tmp_path, mode):
    path = rules_in(tmp_path / "rules")
    path.parent.chmod(mode)
    assert refused(path.parent) == [
        f"{path.parent}: not trusted: directory {path.parent} is writable by group or "
        "others: anyone who can edit it decides who gets in (chmod go-w)"
    ]
    assert refused(path) == [
        f"{path}: not trusted: directory {path.parent} is writable by group or "
        "others: anyone who can edit it decides who gets in (chmod go-w)"
    ]


def test_world_writable_ancestor_is_accepted_only_with_the_sticky_bit(tmp_path):
    path = rules_in(tmp_path / "shared" / "rules")
    (tmp_path / "shared").chmod(0o1777)
    assert load_rules(path, strict=True).doors
    (tmp_path / "shared").chmod(0o777)
    assert f"directory {tmp_path / 'shared'} is writable by group or others" in refused(path)[0]


def test_owner_must_be_root_or_us(tmp_path):
    path = rules_in(tmp_path / "rules")
    os.chown(path, 4321, -1)
    assert f"{path} is owned by uid 4321, not root" in refused(path)[0]
    os.chown(path, 0, -1)
    os.chown(path.parent, 4321, -1)
    assert f"directory {path.parent} is owned by uid 4321, not root" in refused(path)[0]


def test_a_symlink_is_judged_by_its_target(tmp_path):
    target = rules_in(tmp_path / "elsewhere")
    (tmp_path / "rules").mkdir()
    link = tmp_path / "rules" / "doors.yaml"
    link.symlink_to(target)
    assert load_rules(tmp_path / "rules", strict=True).doors  # the link's own 0777 means nothing
    target.chmod(0o666)
    assert f"{link} (-> {target}) is writable by group or others" in refused(tmp_path / "rules")[0]
    target.chmod(0o644)
    target.parent.chmod(0o777)  # the directory holding the target, not the link
    assert f"directory {target.parent} is writable by group or others" in refused(tmp_path / "rules")[0]


def test_untrusted_file_is_not_read_when_strict(tmp_path):
    path = rules_in(tmp_path / "rules", 0o666)
    path.write_text("doors: [\n")  # broken too: only the trust problem is reported
    (line,) = refused(path)
    assert "not trusted" in line and "invalid YAML" not in line


@pytest.fixture
def key_file(tmp_path):
    encryption, mac = generate_keys()
    keys = tmp_path / "keys" / "spa.keys"
    keys.parent.mkdir()
    keys.write_text(f"KEY_BASE64: {encryption}\nHMAC_KEY_BASE64: {mac}\n")
    keys.chmod(0o600)
    (tmp_path / "doors.yaml").write_text(f"doors:\n  - {{name: s, kind: spa, keys_file: {keys}, protect: [22]}}\n")
    (tmp_path / "rot.yaml").write_text(
        f"doors:\n  - {{name: r, rotate: {{secret_file: {keys}.rot}}, protect: [2222]}}\n"
    )
    keys.with_name("spa.keys.rot").write_text("c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0\n")
    keys.with_name("spa.keys.rot").chmod(0o600)
    return keys


@pytest.mark.parametrize("which", ["keys", "secret"])
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_key_files_readable_or_writable_by_others_are_refused_when_strict(tmp_path, key_file, which, mode):
    ruleset = load_rules(tmp_path, strict=True)
    assert ruleset.door("s").keyring[0].keys.hmac and ruleset.door("r").rotate.secret == b"secret" * 4
    target = key_file if which == "keys" else key_file.with_name("spa.keys.rot")
    target.chmod(mode)
    door, field = ("s", "keys_file") if which == "keys" else ("r", "rotate: secret_file")
    (line,) = refused(tmp_path)
    assert line.startswith(
        f"{tmp_path / ('doors.yaml' if door == 's' else 'rot.yaml')}: door {door!r}: {field}: not trusted: {target} "
    )
    assert ("readable" if mode & 0o44 else "writable") in line
    assert load_rules(tmp_path).warnings == (line,)


def test_check_warns_and_still_shows_the_doors(tmp_path, capsys):
    path = rules_in(tmp_path / "rules", 0o666)
    assert main(["check", "--rules", str(path)]) == 0
    out = capsys.readouterr()
    assert out.err.splitlines() == [
        f"nfknock: warning: {path}: not trusted: {path} is writable by group or others: "
        "anyone who can edit it decides who gets in (chmod go-w)"
    ]
    assert "door a" in out.out
