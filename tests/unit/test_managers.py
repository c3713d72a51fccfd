"""Which firewall managers a host runs (a made-up /etc), and doctor's verdict on their base rule:
missing, stale (ports or pass mark differ from the doors') or current, with the fixing command."""

from pathlib import Path

from nfknock.doors.rules import KnockDoor
from nfknock.tools.doctor import OK, WARN, Finding, check_base_rules
from nfknock.tools.export import export
from nfknock.tools.managers import find_managers

SSH = KnockDoor.model_validate(dict(name="openSSH", sequence=[40000, 50000, 60000], protect=["22/tcp"]))
MORE = KnockDoor.model_validate(dict(name="more", sequence=[41000, 51000], protect=["2222/tcp"]))
RULES = Path("/etc/nfknock/rules")
STOCK = "#!/usr/sbin/nft -f\n\nflush ruleset\n\ntable inet filter {\n}\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def ok_finding(text: str) -> Finding:
    return Finding(OK, text)


def test_a_host_without_managers_has_nothing_to_check(tmp_path):
    assert find_managers(tmp_path) == []
    assert check_base_rules([], (SSH,), RULES) == [
        ok_finding("no firewall manager (nftables.service, netfilter-persistent, firewalld, ufw) found")
    ]


def test_nftables_service_enabled_without_the_include_is_told_how_to_fix_it(tmp_path):
    write(tmp_path / "nftables.conf", STOCK)
    (tmp_path / "systemd/system/sysinit.target.wants").mkdir(parents=True)
    (tmp_path / "systemd/system/sysinit.target.wants/nftables.service").symlink_to(
        "/lib/systemd/system/nftables.service"
    )
    (manager,) = find_managers(tmp_path)
    assert manager.name == "nftables.service" and manager.why == "nftables.service is enabled"
    (finding,) = check_base_rules([manager], (SSH,), RULES)
    assert finding.level == WARN
    assert finding.text == (
        f"nftables.service: nftables.service is enabled, and no nfknock base rule is in {tmp_path}/nftables.conf: "
        "`systemctl reload nftables` opens the protected ports until nfknock's chain is back; fix: "
        "nfknock export nftables --rules /etc/nfknock/rules > /etc/nftables.d/nfknock.nft, "
        'add `include "/etc/nftables.d/nfknock.nft"` to /etc/nftables.conf, then systemctl reload nftables'
    )


def test_the_include_is_followed_and_judged_current_or_stale(tmp_path):
    snippet = write(tmp_path / "nftables.d" / "nfknock.nft", export("nftables", (SSH,), str(RULES)))
    write(tmp_path / "nftables.conf", STOCK + f'include "{tmp_path}/nftables.d/*.nft"\n')
    managers = find_managers(tmp_path)
    assert check_base_rules(managers, (SSH,), RULES) == [
        ok_finding(f"nftables.service: the nfknock base rule in {snippet} matches the doors")
    ]
    (stale,) = check_base_rules(managers, (SSH, MORE), RULES)  # a door was added since
    assert stale.level == WARN
    assert stale.text == (
        f"nftables.service: the nfknock base rule in {snippet} is stale (it leaves tcp/2222 open through a "
        f"reload); fix: nfknock export nftables --rules /etc/nfknock/rules > {snippet}, then systemctl reload nftables"
    )
    (other_mark,) = check_base_rules(managers, (SSH,), RULES, pass_mark=0x100)
    assert "it lets pass mark 0x20000000 through, nfknock sets 0x100" in other_mark.text
    assert "--pass-mark 0x100 >" in other_mark.text


def test_netfilter_persistent_needs_the_base_rule_in_each_file(tmp_path):
    v4 = write(tmp_path / "iptables" / "rules.v4", "*filter\nCOMMIT\n" + export("iptables", (SSH, MORE), str(RULES)))
    v6 = write(tmp_path / "iptables" / "rules.v6", "*filter\nCOMMIT\n")
    (manager,) = find_managers(tmp_path)
    first, second = check_base_rules([manager], (SSH,), RULES)
    assert first.level == WARN and first.text.startswith(
        f"netfilter-persistent: the nfknock base rule in {v4} is stale "
        "(it still closes tcp/2222, which no door protects)"
    )
    assert second.level == WARN and second.text.startswith(
        f"netfilter-persistent: {v4} and {v6} exist, and {v6} holds no nfknock base rule"
    )
    assert second.text.endswith(
        f"fix: put the output of `nfknock export iptables --rules /etc/nfknock/rules` in {v6} (its *security "
        "section), then netfilter-persistent reload"
    )


def test_ufw_counts_only_when_enabled_and_firewalld_when_installed(tmp_path):
    write(tmp_path / "ufw" / "ufw.conf", "ENABLED=no\n")
    write(tmp_path / "ufw" / "before.rules", "*filter\nCOMMIT\n")
    assert find_managers(tmp_path) == []
    write(tmp_path / "ufw" / "ufw.conf", "# comment\nENABLED=yes\n")
    write(tmp_path / "firewalld" / "firewalld.conf", "FirewallBackend=nftables\n")
    write(tmp_path / "firewalld" / "direct.xml", export("firewalld", (SSH,), str(RULES)))
    firewalld, ufw = find_managers(tmp_path)
    assert (firewalld.name, ufw.name) == ("firewalld", "ufw")
    findings = check_base_rules([firewalld, ufw], (SSH,), RULES)
    assert [f.level for f in findings] == [OK, WARN, WARN]
    assert findings[1].text.startswith(
        f"ufw: ufw is enabled ({tmp_path}/ufw/ufw.conf), and {tmp_path}/ufw/before.rules holds"
    )
    assert f"{tmp_path}/ufw/before6.rules holds no nfknock base rule" in findings[2].text  # missing file: no rule
