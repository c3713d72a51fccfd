"""deploy/nfknock.service and deploy/modules-load.d/nfknock.conf as files: what the unit promises
(docs/systemd.md) agrees with the code, and the sandbox scores what the docs say. The unit's
behaviour under the real systemd is deploy/systemd/unit.sh (CI's systemd step)."""

import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest

from nfknock.cli import build_parser
from nfknock.daemon.control import DEFAULT_SOCKET
from nfknock.errors import RulesError
from nfknock.firewall.plan import RuleSpec

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "nfknock.service"
MODULES = DEPLOY / "modules-load.d" / "nfknock.conf"
MAX_EXPOSURE = 2.5  # systemd 252 scores Debian's knockd unit 7.4, fwknop-server's 9.6

# The kernel module behind each match (-m) and target (-j) nfknock's chain can hold; the
# built-in targets need none. A new match or target without a line here fails the test below.
XT_MODULES = {
    "tcp": "xt_tcpudp",
    "udp": "xt_tcpudp",
    "mark": "xt_mark",
    "MARK": "xt_mark",
    "conntrack": "xt_conntrack",
    "set": "xt_set",
    "SET": "xt_set",
    "u32": "xt_u32",
    "limit": "xt_limit",
    "NFQUEUE": "xt_NFQUEUE",
    "DNAT": "xt_nat",  # gateway doors' published ports (the nat table)
}
BUILT_IN = {"ACCEPT", "DROP", "RETURN"}


def settings() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            values.setdefault(key, []).append(value)
    return values


def modules() -> set[str]:
    return {line.strip() for line in MODULES.read_text().splitlines() if line.strip() and not line.startswith("#")}


def test_every_match_and_target_of_the_chain_has_its_module_loaded_at_boot():
    """The unit has no CAP_SYS_MODULE: whatever nfknock's rules use must be in modules-load.d."""
    spec = RuleSpec(
        "NFQUEUE",
        proto="tcp",
        dport=1,
        ctstate="NEW",
        queue_num=1,
        tcp_flags=("SYN", "SYN"),
        mark=1,
        match_set="s",
        in_interface="eth0",
        limit=("1/s", 1),
        set_mark=(1, 1),
        add_set=("s", 1),
        del_set="s",
        u32="0>>22&0x3C@12&0xFF=0:127",
        destination="10.0.0.5",
        to_destination="10.0.0.5:22",
    )
    unset = [f.name for f in fields(RuleSpec) if getattr(spec, f.name) is None]
    assert not unset, f"set every field of RuleSpec here, so that its match is checked: {unset}"
    source = "\n".join(path.read_text() for path in (Path(__file__).parents[2] / "nfknock" / "firewall").glob("*.py"))
    used = set(re.findall(r"-m (\w+)", str(spec))) | {"udp"}
    used |= set(re.findall(r'RuleSpec\(\s*"([A-Z]+)"', source)) | set(re.findall(r'target="([A-Z]+)"', source))
    unknown = used - XT_MODULES.keys() - BUILT_IN
    assert not unknown, f"which kernel module serves {unknown}? add it to XT_MODULES and {MODULES.name}"
    needed = {XT_MODULES[name] for name in used if name in XT_MODULES}
    needed |= {"ip_set_" + kind.replace(":", "_").replace(",", "") for kind in re.findall(r"\bhash:[a-z,]+", source)}
    needed |= {"nfnetlink_queue", "nf_conntrack", "ip_set", "ip_tables", "ip6_tables", "nf_tables", "nft_compat"}
    if "DNAT" in used:  # the nat table in both flavours
        needed |= {"nf_nat", "iptable_nat", "ip6table_nat", "nft_chain_nat"}
    assert needed <= modules(), f"missing from {MODULES}: {sorted(needed - modules())}"


def test_no_cap_sys_module_and_modules_loaded_before_the_unit_starts():
    values = settings()
    assert values["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_NET_RAW"]
    assert "systemd-modules-load.service" in " ".join(values["After"])
    assert values["ProtectKernelModules"] == ["yes"]


def test_a_start_that_fails_on_the_rules_is_not_retried():
    """Rules that do not load exit with RulesError's status (after closing what they could read):
    a restart would fail the same way, every RestartSec, for as long as the file is broken."""
    assert settings()["RestartPreventExitStatus"] == [str(RulesError.exit_code)]


def test_reload_checks_the_rules_the_daemon_reads_as_strictly_as_the_daemon_before_it_signals():
    values = settings()
    (start,) = values["ExecStart"]
    (reload,) = values["ExecReload"]
    rules = re.search(r"nfknock run --rules (\S+)", start).group(1)
    check = re.search(r"nfknock (check .*?) >/dev/null && kill -HUP \"\$\$MAINPID\"", reload)
    assert check, reload
    args = build_parser().parse_args(check.group(1).split())
    assert args.strict and args.rules == rules


def test_the_writable_paths_are_the_ones_the_daemon_writes_by_default():
    values = settings()
    assert values["ProtectSystem"] == ["strict"]
    run = build_parser().parse_args(["run"])
    assert Path("/var/lib") / values["StateDirectory"][0] == Path(run.state_dir)
    assert Path("/run") / values["RuntimeDirectory"][0] == Path(DEFAULT_SOCKET).parent
    assert Path(run.control_socket) == Path(DEFAULT_SOCKET)
    assert values["RuntimeDirectoryMode"] == values["StateDirectoryMode"] == ["0700"]


def test_watchdog_and_documentation():
    values = settings()
    assert values["WatchdogSec"] == ["30s"]
    assert values["LimitCORE"] == ["0"]  # a core file of the daemon would hold its keys
    assert values["Documentation"] == ["man:nfknock(8)"]
    assert "PartOf" not in values  # a manager's stop must not stop nfknock (the unit says why)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_security_scores_the_unit_at_most_2_5(tmp_path):
    copy = tmp_path / "nfknock.service"
    copy.write_text(UNIT.read_text())
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for nfknock.service: (\d+\.\d+)", result.stdout)
    assert found, result.stdout[-500:] + result.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout
