"""doctor's checks over made-up host states: each problem gets one line and the right level."""

import os
import stat

from nfknock.doctor import (FAIL, OK, WARN, HostState, check_earlier_accepts, check_leftovers, check_modes,
                            check_queue, diagnose)
from nfknock.rules import Door

SEED = Door.model_validate(dict(name="openSSH", sequence=[40000, 50000, 60000], protect=["22/tcp"]))
WITH_CHAIN = "-P INPUT ACCEPT\n-N NFKNOCK\n-A INPUT -j NFKNOCK\n-A NFKNOCK -p tcp -j DROP\n"


def test_accept_ahead_of_our_jump_is_a_failure():
    host = HostState("nf_tables", {("nft", 4): "-P INPUT ACCEPT\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\n"
                                                "-A INPUT -j NFKNOCK\n"})
    (finding,) = check_earlier_accepts(host, "nft", (SEED,))
    assert finding.level == FAIL and "INPUT rule 1 accepts 22/tcp" in finding.text


def test_harmless_earlier_rules_pass():
    rules = ("-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
             "-A INPUT -p tcp -m multiport --dports 80,443 -j ACCEPT\n"
             "-A INPUT -p udp -j ACCEPT\n"
             "-A INPUT -j NFKNOCK\n"
             "-A INPUT -j ACCEPT\n")  # after our jump: fine
    (finding,) = check_earlier_accepts(HostState("legacy", {("legacy", 4): rules}), "legacy", (SEED,))
    assert finding.level == OK


def test_port_ranges_and_catch_alls_are_caught():
    for rule in ("-A INPUT -j ACCEPT", "-A INPUT -p tcp -m tcp --dport 20:30 -j ACCEPT",
                 "-A INPUT -s 10.0.0.0/8 -j ACCEPT"):
        (finding,) = check_earlier_accepts(HostState("legacy", {("legacy", 6): rule + "\n"}), "legacy", (SEED,))
        assert finding.level == FAIL and "(IPv6)" in finding.text, rule


def test_leftovers_in_the_other_flavour_are_reported():
    host = HostState("nf_tables", {("legacy", 4): WITH_CHAIN, ("nft", 4): "-P INPUT ACCEPT\n"})
    (finding,) = check_leftovers(host, "nft")
    assert finding.level == WARN and "iptables-legacy -S NFKNOCK" in finding.text
    assert check_leftovers(HostState("nf_tables"), "nft")[0].level == OK


def test_held_queue_is_a_failure():
    queues = "    0  4242     0 2 65531     0     0        0  1\n"
    assert check_queue(HostState(None, queues=queues), 0)[0].level == FAIL
    assert check_queue(HostState(None, queues=queues), 1)[0].level == OK


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
    from nfknock.spa import generate_keys

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
        f"{keys} holds keys and is readable by group or others (chmod 600)"]


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
        f"{link} (-> {target}) is writable by group or others: anyone who can edit it decides who gets in "
        "(chmod go-w)"]
