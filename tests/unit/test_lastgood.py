"""Last good rules (daemon/lastgood.py): the copy kept in the state directory, the start on it
when the rules on disk do not load, and the rules that only close when there is no copy."""

import base64
import json
import logging
import os
import stat

import pytest

from nfknock.daemon.lastgood import (
    FILE_NAME,
    LastGood,
    Store,
    closed_gated_plan,
    closed_plan,
    readable_destinations,
    readable_ports,
    starting_rules,
)
from nfknock.doors.spa import generate_keys
from nfknock.errors import RulesError
from nfknock.loading import load_rules
from nfknock.tools.statusview import render_status

WALL = 1_800_000_000.0


def write(path, text, mode=0o600):
    path.write_text(text)
    path.chmod(mode)
    return path


def key_text():
    encryption, mac = generate_keys()
    return f"KEY_BASE64: {encryption}\nHMAC_KEY_BASE64: {mac}\n"


@pytest.fixture
def host(tmp_path):
    """/etc/nfknock and /var/lib/nfknock in miniature: a knock door, an SPA door with a keys
    file, one with a keys_dir and a rotating door with a secret file."""
    etc = tmp_path / "etc"
    etc.mkdir(mode=0o700)
    rules = etc / "rules"
    rules.mkdir(mode=0o700)
    team = etc / "team"
    team.mkdir(mode=0o700)
    write(etc / "spa.keys", key_text())
    write(team / "alice.keys", key_text())
    write(etc / "rotate.secret", base64.b64encode(os.urandom(32)).decode() + "\n")
    write(
        rules / "10-ssh.yaml",
        "doors:\n"
        "  - name: openSSH\n"
        "    sequence: [41001, 42002, 43003]\n"
        "    protect: [22/tcp]\n"
        f"  - {{name: spaSSH, kind: spa, keys_file: {etc / 'spa.keys'}, protect: [22/tcp]}}\n",
    )
    write(
        rules / "20-more.yaml",
        f"doors:\n  - {{name: team, kind: spa, port: 62202/udp, keys_dir: {team}, protect: [2222/tcp]}}\n"
        f"  - {{name: rot, rotate: {{secret_file: {etc / 'rotate.secret'}, ports: 30000-30999}}, protect: [443]}}\n",
    )
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    return etc, rules, state


def keep(rules, state):
    assert Store(state).save(rules, load_rules(rules, strict=True), WALL)


def break_rules(rules):
    write(rules / "10-ssh.yaml", "doors:\n  - name: openSSH\n    sequence: [41001, 42002\n    protect: [22/tcp]\n")


def start(rules, state, caplog=None, closed=None):
    applied = [] if closed is None else closed
    return starting_rules(rules, state, logging.getLogger("t"), applied.append, 0, 0x40000000, lambda: WALL + 60)


def test_the_copy_gives_back_the_same_doors_and_keys(host):
    etc, rules, state = host
    keep(rules, state)
    ruleset, about = Store(state).load()
    original = load_rules(rules, strict=True)
    assert [d.name for d in ruleset.doors] == ["openSSH", "spaSSH", "team", "rot"]
    spa, team, rot = ruleset.doors[1], ruleset.doors[2], ruleset.doors[3]
    assert spa.keyring[0].keys == original.doors[1].keyring[0].keys
    assert [k.name for k in team.keyring] == ["alice"] and team.keyring[0].keys == original.doors[2].keyring[0].keys
    assert rot.rotate.secret == original.doors[3].rotate.secret
    assert about["saved"] == WALL and about["source"] == str(rules)
    assert about["doors"] == ["openSSH", "spaSSH", "team", "rot"]


def test_the_copy_is_private_and_the_written_out_rules_are_gone(host):
    etc, rules, state = host
    keep(rules, state)
    Store(state).load()
    copy = state / FILE_NAME
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert sorted(p.name for p in state.iterdir()) == [FILE_NAME]  # no tmp file, no rules directory left


def test_the_copy_survives_what_breaks_the_originals(host):
    """A key file gone or readable by others, the rotation secret deleted, a rules file broken:
    the copy still loads (it holds its own copies of the key files)."""
    etc, rules, state = host
    keep(rules, state)
    (etc / "spa.keys").chmod(0o644)
    (etc / "team" / "alice.keys").unlink()
    (etc / "rotate.secret").unlink()
    break_rules(rules)
    with pytest.raises(RulesError):
        load_rules(rules, strict=True)
    ruleset, _ = Store(state).load()
    assert len(ruleset.doors) == 4


def test_a_missing_state_directory_is_made_root_only(host):
    etc, rules, state = host
    keep(rules, state / "new")
    assert stat.S_IMODE((state / "new").stat().st_mode) == 0o700 and (state / "new" / FILE_NAME).exists()


def test_keys_from_the_environment_stay_there(host, monkeypatch):
    etc, rules, state = host
    encryption, mac = generate_keys()
    monkeypatch.setenv("ENVSPA_KEY_BASE64", encryption)
    monkeypatch.setenv("ENVSPA_HMAC_KEY_BASE64", mac)
    door = "{name: envspa, kind: spa, port: 62203/udp, keys_env: ENVSPA, protect: [22]}"
    write(rules / "30-env.yaml", f"doors:\n  - {door}\n")
    keep(rules, state)
    assert encryption not in (state / FILE_NAME).read_text()
    assert Store(state).load()[0].doors[-1].keyring[0].keys.encryption == base64.b64decode(encryption)


def test_rules_changed_while_loaded_are_not_kept(host):
    etc, rules, state = host
    loaded = load_rules(rules, strict=True)
    write(etc / "spa.keys", key_text())  # another key since the load
    assert not Store(state).save(rules, loaded, WALL)
    assert not (state / FILE_NAME).exists()


def test_a_copy_others_can_read_is_not_used(host):
    etc, rules, state = host
    keep(rules, state)
    (state / FILE_NAME).chmod(0o644)
    break_rules(rules)
    with pytest.raises(RulesError):
        start(rules, state)


def test_a_garbled_copy_is_no_crash(host):
    etc, rules, state = host
    write(state / FILE_NAME, "{not json")
    break_rules(rules)
    closed = []
    with pytest.raises(RulesError) as error:
        start(rules, state, closed=closed)
    assert any("cannot read" in line for line in error.value.lines)
    assert closed  # closed all the same


def test_good_rules_start_as_always_and_are_kept(host):
    etc, rules, state = host
    ruleset, last_good = start(rules, state)
    assert last_good.degraded is None and last_good.status() is None
    last_good.installed(ruleset, wait=True)
    assert last_good.saved == 1 and (state / FILE_NAME).exists()
    assert last_good.ready_status(4) == "guarding 4 door(s)"


def test_broken_rules_start_on_the_last_good_ones_loudly(host, caplog):
    etc, rules, state = host
    keep(rules, state)
    break_rules(rules)
    with caplog.at_level(logging.ERROR):
        ruleset, last_good = start(rules, state)
    assert [d.name for d in ruleset.doors] == ["openSSH", "spaSSH", "team", "rot"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("10-ssh.yaml" in line and "invalid YAML" in line for line in errors)
    assert any(line.startswith("STARTING ON THE LAST GOOD RULES") for line in errors)
    status = last_good.status()
    assert status["running_on"] == "last good rules" and "10-ssh.yaml" in status["reason"]
    assert status["saved"] == WALL and status["rules"] == str(rules)
    assert last_good.ready_status(4).startswith("DEGRADED: on the last good rules")
    assert render_status({"degraded": status})[1].startswith("DEGRADED: running on the last good rules (kept 2027-")
    last_good.installed(ruleset, wait=True)  # the fallback is not copied over itself
    assert last_good.saved == 0 and last_good.degraded is not None


def test_a_reload_that_loads_ends_the_degraded_state(host, caplog):
    etc, rules, state = host
    keep(rules, state)
    before = (state / FILE_NAME).read_text()
    break_rules(rules)
    notified = []
    ruleset, last_good = starting_rules(
        rules, state, logging.getLogger("t"), [].append, 0, 0x40000000, lambda: WALL + 60, notified.append
    )
    write(rules / "10-ssh.yaml", "doors:\n  - {name: openSSH, sequence: [41001, 42002], protect: [22/tcp]}\n")
    last_good.installed(load_rules(rules, strict=True), wait=True)
    assert last_good.degraded is None and last_good.status() is None
    assert notified == ["STATUS=guarding 3 door(s)"]
    assert (state / FILE_NAME).read_text() != before and json.loads(before)["doors"][0] == "openSSH"


def test_no_copy_closes_the_ports_it_can_read_and_fails(host, caplog):
    etc, rules, state = host
    break_rules(rules)
    closed = []
    with caplog.at_level(logging.ERROR), pytest.raises(RulesError) as error:
        start(rules, state, closed=closed)
    assert closed == [closed_plan((("tcp", 22), ("tcp", 2222), ("tcp", 443)), 0, 0x40000000)]
    assert error.value.lines[0].startswith(f"{rules / '10-ssh.yaml'}: invalid YAML")
    assert error.value.lines[-1] == (
        f"no last good rules (none in {state}): installed rules that keep 22/tcp, 2222/tcp, "
        "443/tcp closed (no door opens them)"
    )
    assert caplog.records == []  # the CLI prints the lines: not twice


def test_no_state_dir_closes_too(host):
    etc, rules, state = host
    break_rules(rules)
    closed = []
    with pytest.raises(RulesError) as error:
        starting_rules(rules, None, logging.getLogger("t"), closed.append, 0, 0x40000000)
    assert "no --state-dir" in error.value.lines[-1] and closed


def test_nothing_readable_installs_nothing(tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir(mode=0o700)
    write(rules / "a.yaml", "doors: [{{{{")
    closed = []
    with pytest.raises(RulesError) as error:
        start(rules, tmp_path, closed=closed)
    assert closed == [] and "no protected port readable: nothing installed" in error.value.lines[-1]


def test_a_failure_to_close_is_said(host):
    etc, rules, state = host
    break_rules(rules)

    def refuse(plan):
        raise OSError("iptables: not found")

    with pytest.raises(RulesError) as error:
        starting_rules(rules, None, logging.getLogger("t"), refuse, 0, 1)
    assert "could not install rules closing 22/tcp" in error.value.lines[-1]


@pytest.mark.parametrize(
    "text,ports",
    [
        ("doors:\n  - {name: a, sequence: [1, 2], protect: [22/tcp, 53/udp]}\n"
         "  - {name: b, kind: bogus, protect: 8080}\n",
         [("tcp", 22), ("udp", 53), ("tcp", 8080)]),
        ("doors:\n  - name: a\n    sequence: [1, 2\n    protect: [22/tcp, 443]  # ssh\n",
         [("tcp", 22), ("tcp", 443)]),
        ("doors:\n  - name: a\n    protect:\n      - 22/tcp\n      - 2222\n    sequence: [1,\n",
         [("tcp", 22), ("tcp", 2222)]),
        ("doors:\n\t- name: a\n  protect: [22/TCP, 70000, x/tcp, 0]\n", [("tcp", 22)]),
        ("doors: []\n", []),
    ],
)  # fmt: skip
def test_readable_ports_of_a_broken_file(tmp_path, text, ports):
    write(tmp_path / "r.yaml", text)
    assert list(readable_ports(tmp_path / "r.yaml")) == ports


def test_readable_ports_of_nothing(tmp_path):
    assert readable_ports(tmp_path / "none") == ()


def test_the_closed_plan_only_closes():
    plan = closed_plan((("tcp", 22), ("udp", 53)), 7, 0x40000000)
    for family in (4, 6):
        targets = [spec.target for spec in plan[family]]
        assert "NFQUEUE" not in targets and targets[0] == "RETURN"  # the host's own (lo) first
        drops = [(spec.proto, spec.dport) for spec in plan[family] if spec.target == "DROP"]
        assert drops == [("tcp", 22), ("udp", 53)]


def test_readable_destinations_of_a_broken_file(tmp_path):
    write(
        tmp_path / "r.yaml",
        "doors:\n  - name: gw\n    sequence: [1, 2\n"
        '    forward: [10.0.0.5:22/tcp, "[fd00::5]:22/tcp"]  # ssh\n'
        "    publish: [{port: 2222/tcp, to: 10.0.0.7:22/tcp}, {port: 53/udp, to: '[fd00::7]:53'}]\n"
        "  - name: b\n    forward:\n      - 10.0.0.9:53/udp\n      - 999.1.1.1:22\n    protect: [22]\n",
    )
    assert [str(dest) for dest in readable_destinations(tmp_path / "r.yaml")] == [
        "10.0.0.5:22/tcp",
        "[fd00::5]:22/tcp",
        "10.0.0.7:22/tcp",
        "[fd00::7]:53/tcp",  # no protocol named: both closed
        "[fd00::7]:53/udp",
        "10.0.0.9:53/udp",
    ]
    assert readable_destinations(tmp_path / "none") == ()


def test_the_closed_plan_closes_destinations_without_queue_or_dnat(tmp_path):
    write(tmp_path / "r.yaml", "doors:\n  - forward: [10.0.0.5:22/tcp, '[fd00::5]:22/udp']\n")
    plan = closed_gated_plan((("tcp", 22),), readable_destinations(tmp_path / "r.yaml"), 7, 0x40000000)
    assert [str(spec) for spec in plan.gateway.forward[4]] == [
        "-A NFKNOCK-FWD -d 10.0.0.5/32 -p tcp -m tcp --dport 22 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A NFKNOCK-FWD -d 10.0.0.5/32 -p tcp -m tcp --dport 22 -j DROP",
    ]
    assert [spec.target for spec in plan.gateway.forward[6]] == ["ACCEPT", "DROP"]
    assert not any(plan.gateway.nat.values())
    assert not hasattr(closed_gated_plan((("tcp", 22),), (), 7, 0), "gateway")  # leaves the chains there alone


def test_a_failed_save_is_a_warning_not_a_stop(host, caplog):
    etc, rules, state = host
    blocker = write(state / "file", "a file where the state directory should be")
    last_good = LastGood(blocker, rules, logging.getLogger("t"))
    with caplog.at_level(logging.WARNING):
        last_good.installed(load_rules(rules, strict=True), wait=True)
    assert last_good.saved == 0
    assert any("cannot keep the last good rules" in r.getMessage() for r in caplog.records)
