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
    result = os.stat_result((stat.S_IFREG | 0o666, 0, 0, 1, 0, 0, 0, 0, 0, 0))
    (finding,) = check_modes([path], {path: result})
    assert finding.level == FAIL and "chmod go-w" in finding.text
    readable = os.stat_result((stat.S_IFREG | 0o644, 0, 0, 1, 0, 0, 0, 0, 0, 0))
    assert check_modes([path], {path: readable})[0].level == WARN
    private = os.stat_result((stat.S_IFREG | 0o600, 0, 0, 1, 0, 0, 0, 0, 0, 0))
    assert check_modes([path], {path: private})[0].level == OK


def test_diagnose_reports_broken_rules_line_by_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("doors:\n  - {name: a, sequence: [70000], protect: [22]}\n")
    host = HostState("nf_tables", conntrack=True)
    findings = diagnose(tmp_path, 0, "auto", host)
    assert any(f.level == FAIL and "port 70000 is outside 1..65535" in f.text for f in findings)
    assert findings[0].text.endswith("--firewall auto uses the nft backend")


def test_key_files_readable_by_others_fail(tmp_path):
    keys = tmp_path / "spa.keys"
    keys.write_text("")
    readable = os.stat_result((stat.S_IFREG | 0o644, 0, 0, 1, 0, 0, 0, 0, 0, 0))
    (finding,) = check_modes([keys], {keys: readable}, frozenset({keys}))
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
