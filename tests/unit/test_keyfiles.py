"""Per-person SPA keys on disk: key files with settings (rules.read_key_file), a door's keys
list and keys_dir (loading), and `nfknock keygen --name` (keyfiles)."""

import stat

import pytest

from nfknock.cli import main
from nfknock.doors.spa import generate_keys
from nfknock.errors import RulesError
from nfknock.loading import load_rules


def key_text(*settings):
    encryption, mac = generate_keys()
    return "\n".join([f"KEY_BASE64: {encryption}", f"HMAC_KEY_BASE64: {mac}", *settings]) + "\n"


def write(path, text, mode=0o600):
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def team(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    rules = tmp_path / "rules"
    rules.mkdir(mode=0o700)
    write(rules / "spa.yaml", f"doors:\n  - {{name: team, kind: spa, keys_dir: {keys}, protect: [22/tcp, 80/tcp]}}\n")
    return keys, rules


def test_a_keys_dir_gives_one_named_key_per_file(team):
    keys, rules = team
    write(keys / "alice.keys", key_text("USERNAME: alice", "SOURCES: 10.0.1.0/24, fd00::/64", "EXPIRES: 2027-01-31"))
    write(keys / "bob.keys", key_text("# bob's laptop", "PORTS: 22/tcp", "OPEN_FOR: 10s", "MAX_OPEN_FOR: 5m"))
    write(keys / "README", "not a key file: ignored\n")
    ring = {key.name: key for key in load_rules(rules, strict=True).door("team").keyring}
    assert set(ring) == {"alice", "bob"}
    assert ring["alice"].username == "alice" and [str(n) for n in ring["alice"].sources] == ["10.0.1.0/24", "fd00::/64"]
    assert ring["alice"].ports is None and ring["alice"].open_for == ring["alice"].max_open_for == 30.0
    assert ring["bob"].ports == frozenset({("tcp", 22)}) and (ring["bob"].open_for, ring["bob"].max_open_for) == (
        10.0,
        300.0,
    )


@pytest.mark.parametrize(
    "settings,message",
    [
        (("EXPIRE: 2027-01-31",), "alice.keys: line 3: unknown setting 'EXPIRE'"),
        (("EXPIRES: 31/01/2027",), "alice.keys: line 3: EXPIRES: invalid expiry (value not shown)"),
        (("PORTS: 443/tcp",), "key 'alice': ports 443/tcp not in the door's protect"),
        (("SOURCES: 10.0.1.1/24",), "alice.keys: line 3: SOURCES: invalid network (value not shown)"),
        (("OPEN_FOR: 1m", "MAX_OPEN_FOR: 10s"), "max_open_for 10s is below its open_for 60s"),
    ],
)
def test_a_bad_key_file_is_refused_naming_it(team, settings, message):
    keys, rules = team
    write(keys / "alice.keys", key_text(*settings))
    with pytest.raises(RulesError) as info:
        load_rules(rules)
    assert message in str(info.value) and "door 'team'" in str(info.value)


def test_two_keys_with_one_hmac_key_are_refused(team):
    keys, rules = team
    text = key_text()
    write(keys / "alice.keys", text)
    write(keys / "bob.keys", text)
    with pytest.raises(RulesError, match="keys 'alice' and 'bob' have the same HMAC key"):
        load_rules(rules)


def test_a_key_file_others_can_read_is_refused_by_run(team):
    keys, rules = team
    write(keys / "alice.keys", key_text(), mode=0o644)
    with pytest.raises(RulesError, match="alice.keys holds keys and is readable by group or others"):
        load_rules(rules, strict=True)
    assert any("alice.keys holds keys" in line for line in load_rules(rules).warnings)  # check: a warning


def test_an_empty_keys_dir_is_no_error(team):
    """Removing the last person and reloading must take effect, not keep the old rules."""
    keys, rules = team
    ruleset = load_rules(rules, strict=True)
    assert ruleset.door("team").keyring == ()
    assert any("holds no *.keys file" in line for line in load_rules(rules).warnings)


def test_a_keys_list_with_settings_in_the_rules_and_a_single_key_beside_it(tmp_path):
    alice = write(tmp_path / "alice.keys", key_text("USERNAME: alice"))
    single = write(tmp_path / "spa.keys", key_text())
    write(
        tmp_path / "spa.yaml",
        f"""\
doors:
  - name: team
    kind: spa
    keys_file: {single}
    keys:
      - {{name: alice, file: {alice}, expires: "2027-01-31T18:00:00+01:00", ports: [22/tcp]}}
    protect: [22/tcp, 80/tcp]
    max_open_for: 1h
""",
    )
    ring = load_rules(tmp_path / "spa.yaml").door("team").keyring
    assert [key.name for key in ring] == ["default", "alice"]
    assert ring[0].max_open_for == 3600.0 and ring[1].username == "alice"
    assert ring[1].expires == 1801414800.0  # 17:00 UTC


@pytest.mark.parametrize(
    "door,message",
    [
        ("{name: t, kind: spa, protect: [22]}", "give keys_dir, keys, keys_file or keys_env"),
        ("{name: t, kind: spa, keys_dir: /k, protect: [22], max_open_for: 10s}", "max_open_for 10s is below open_for"),
        (
            "{name: t, kind: spa, keys: [{name: a, env: A}, {name: a, env: B}], protect: [22]}",
            "keys: 'a' is named twice",
        ),
        ("{name: t, kind: spa, keys: [{name: a, env: A, ports: [80]}], protect: [22]}", "ports 80/tcp not in the door"),
        ("{name: t, kind: spa, keys: [{name: a}], protect: [22]}", "give exactly one of file or env"),
    ],
)
def test_door_level_key_checks(tmp_path, door, message):
    write(tmp_path / "spa.yaml", f"doors:\n  - {door}\n")
    with pytest.raises(RulesError) as info:
        load_rules(tmp_path / "spa.yaml")
    assert message in str(info.value)


@pytest.mark.prints_keys  # keygen's job: stderr and logs are still checked
def test_keygen_name_writes_a_key_file_for_the_keys_dir_and_prints_the_client_command(team, capsys):
    keys, rules = team
    code = main(["keygen", "--name", "alice", "--dir", str(keys), "--username", "alice", "--ports", "22/tcp"])
    out = capsys.readouterr().out
    assert code == 0
    path = keys / "alice.keys"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (key,) = load_rules(rules, strict=True).door("team").keyring
    assert key.name == "alice" and key.username == "alice"
    assert out.startswith("fwknop -A tcp/22 -a CLIENT_IP -D SERVER -U alice --use-hmac --key-base64-rijndael ")
    assert key.keys.hmac.hex() not in out  # base64 in the line, of course; never anything else
    assert main(["keygen", "--name", "alice", "--dir", str(keys)]) == 2  # never overwritten
    assert "exists already" in capsys.readouterr().err
    assert main(["keygen", "--name", "bob", "--dir", str(keys), "--expires", "soon"]) == 2
    assert "invalid expiry 'soon'" in capsys.readouterr().err and not (keys / "bob.keys").exists()


@pytest.mark.parametrize(
    "line,message",
    [
        ("HMAC_KEY_BASE64={key}", "line 3: not a 'NAME: value' line (the line is not shown"),
        ("{key}", "line 3: not a 'NAME: value' line (the line is not shown"),
        ("SOURCES: {key}", "line 3: SOURCES: invalid network (value not shown)"),
        ("EXPIRES: {key}", "line 3: EXPIRES: invalid expiry (value not shown)"),
        ("PORTS: 22/tcp, {key}", "line 3: PORTS: expected a port like 40000 or 40000/udp, got (value not shown)"),
        ("USERNAME: {key}", "line 3: USERNAME: String should have at most 64 characters"),
    ],
)
def test_a_key_on_a_wrong_line_is_never_quoted(team, line, message):
    """A key file holds keys: its errors name the line and what is wrong, never the text (0.x
    quoted `KEY_BASE64=<key>` whole in the 'reload refused' log line)."""
    from support.secretcheck import Registry

    keys, rules = team
    _, mac = generate_keys()
    write(keys / "alice.keys", key_text(line.format(key=mac)))
    with pytest.raises(RulesError) as info:
        load_rules(rules)
    text = str(info.value)
    assert message in text and "alice.keys" in text
    registry = Registry()
    registry.register(mac, *(key_text().split()[1::2]))
    assert registry.leaks(text) == []
