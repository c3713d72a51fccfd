"""Looking changes nothing: `nfknock doctor` (and `nfknock down` with nothing installed) in a
fresh network namespace leave the kernel's tables exactly as they were. Opening a legacy table
through iptc or `iptables-legacy -S` creates it, and from then on every iptables-nft command
warns "iptables-legacy tables present"."""

import shutil

import pytest
from conftest import REPO

from support.sandbox import Sandbox, nfknock_argv


@pytest.fixture
def namespace(kernel):
    with Sandbox(clients_wanted=0) as box:
        yield box


def snapshot(box) -> dict[str, str]:
    """Every view of the namespace's tables that does not itself create one."""

    def run(*argv):
        result = box.run(box.server, list(argv))
        lines = result.stdout.splitlines() + result.stderr.splitlines()
        return "\n".join(line for line in lines if not line.startswith(("# Generated", "# Completed")))

    views = {
        "ip_tables_names": run("cat", "/proc/net/ip_tables_names"),
        "ip6_tables_names": run("cat", "/proc/net/ip6_tables_names"),
    }
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-nft-save", "ip6tables-nft-save"):
        views[tool] = run(tool)
    if shutil.which("nft"):
        views["nft"] = run("nft", "list", "ruleset")
    return views


def nfknock(box, *args):
    return box.run(box.server, nfknock_argv(*args), cwd=REPO)


@pytest.mark.parametrize("firewall", ["auto", "legacy", "nft"])
def test_doctor_and_down_create_no_table_in_a_fresh_namespace(namespace, firewall):
    before = snapshot(namespace)
    assert before["ip_tables_names"] == "" and before["ip6_tables_names"] == ""
    doctor = nfknock(namespace, "doctor", "--rules", str(REPO / "rules"), "--firewall", firewall)
    assert "no nfknock rules are installed" in doctor.stdout, doctor.stderr
    assert snapshot(namespace) == before
    down = nfknock(namespace, "down")
    assert down.returncode == 0 and "no nfknock rules were installed" in down.stdout, down.stderr
    assert snapshot(namespace) == before


def test_doctor_changes_nothing_where_both_flavours_have_rules(namespace):
    box = namespace
    for argv in (
        ["iptables-legacy", "-A", "INPUT", "-p", "tcp", "--dport", "2222", "-j", "ACCEPT"],
        ["ip6tables-legacy", "-t", "mangle", "-A", "PREROUTING", "-j", "MARK", "--set-mark", "0x1"],
        ["iptables-nft", "-A", "INPUT", "-p", "tcp", "--dport", "3333", "-j", "DROP"],
        ["ip6tables-nft", "-N", "MINE"],
    ):
        box.run(box.server, argv, check=True)
    before = snapshot(box)
    before_s = box.run(box.server, ["iptables-legacy", "-S"]).stdout  # the filter table exists already
    doctor = nfknock(box, "doctor", "--rules", str(REPO / "rules"))
    assert "INPUT rule 1 accepts 22/tcp" not in doctor.stdout  # the 2222 rule is seen and harmless
    assert "ip6tables-legacy -t mangle: a rule uses mark bit 0x20000000" in doctor.stdout
    assert snapshot(box) == before
    assert box.run(box.server, ["iptables-legacy", "-S"]).stdout == before_s
