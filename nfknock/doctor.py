"""`nfknock doctor`: checks a host for what would make nfknock fail or leak, one line each.

The checks are pure functions over what `gather()` reads from the host (commands' output,
/proc), so each can be tested with made-up inputs; file modes are judged on disk by
`trust.why_unsafe`, the check `run` uses.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RulesError
from .firewall import CHAIN, FLAVOURS, iptables_flavour
from .rules import Door, load_rules, rule_files
from .trust import why_unsafe

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass(frozen=True)
class Finding:
    level: str
    text: str

    def __str__(self) -> str:
        return f"{self.level:<4} {self.text}"


@dataclass
class HostState:
    flavour: str | None  # of the host's `iptables` command
    rules_s: dict[tuple[str, int], str] = field(default_factory=dict)  # (flavour, family) -> `-S` output
    conntrack: bool = False
    queues: str = ""  # /proc/net/netfilter/nfnetlink_queue


def check_flavour(host: HostState, chosen: str) -> list[Finding]:
    if host.flavour is None:
        return [Finding(WARN, f"no 'iptables' command found; --firewall auto falls back to {chosen}")]
    return [Finding(OK, f"this host's iptables is the {host.flavour} flavour; --firewall auto uses the "
                        f"{'nft' if host.flavour == 'nf_tables' else 'legacy'} backend")]


def check_leftovers(host: HostState, chosen: str) -> list[Finding]:
    out = []
    for (flavour, family), text in sorted(host.rules_s.items()):
        if f"-N {CHAIN}" not in text.splitlines():
            continue
        tool = f"{'iptables' if family == 4 else 'ip6tables'}-{flavour}"
        if flavour == chosen:
            out.append(Finding(OK, f"nfknock's chain is installed ({tool}): a daemon runs, or was killed "
                                   "(then 'nfknock run' or 'nfknock down' cleans up)"))
        else:
            out.append(Finding(WARN, f"nfknock rules are left in the {flavour} tables ({tool} -S {CHAIN}); "
                                     "'nfknock down' removes them"))
    return out or [Finding(OK, "no nfknock rules are installed")]


_DPORT = re.compile(r"--dports? (\S+)")


def _ports_of(rule: str) -> list[tuple[int, int]] | None:
    """Port ranges a rule matches, None for any port."""
    match = _DPORT.search(rule)
    if not match:
        return None
    ranges = []
    for part in match.group(1).split(","):
        first, _, last = part.partition(":")
        ranges.append((int(first), int(last or first)))
    return ranges


def check_earlier_accepts(host: HostState, chosen: str, doors: tuple[Door, ...]) -> list[Finding]:
    """An ACCEPT ahead of our jump in the same table lets connections past nfknock."""
    out = []
    for family in (4, 6):
        text = host.rules_s.get((chosen, family), "")
        protected = {p.key for d in doors if family in d.families for p in d.protect}
        for number, rule in enumerate((r for r in text.splitlines() if r.startswith("-A INPUT ")), start=1):
            if rule.split()[-2:] == ["-j", CHAIN]:
                break
            if not rule.endswith("-j ACCEPT") or re.search(r"--ctstate (RELATED,)?ESTABLISHED(,RELATED)?\b", rule):
                continue
            proto = re.search(r"-p (\w+)", rule)
            ports = _ports_of(rule)
            hit = sorted(
                f"{port}/{p}" for p, port in protected
                if (proto is None or proto.group(1) == p)
                and (ports is None or any(a <= port <= b for a, b in ports))
            )
            if hit:
                out.append(Finding(FAIL, f"INPUT rule {number} accepts {', '.join(hit)} before nfknock's chain "
                                         f"(IPv{family}): {rule}"))
    return out or [Finding(OK, "no INPUT rule ahead of nfknock's chain accepts a protected port")]


def check_conntrack(host: HostState) -> list[Finding]:
    if host.conntrack:
        return [Finding(OK, "conntrack is available (established connections bypass the queue)")]
    return [Finding(FAIL, "conntrack is not available: nfknock needs the nf_conntrack module")]


def check_queue(host: HostState, queue_num: int) -> list[Finding]:
    for line in host.queues.splitlines():
        fields = line.split()
        if fields and fields[0].isdigit() and int(fields[0]) == queue_num:
            return [Finding(FAIL, f"NFQUEUE {queue_num} is held by netlink port {fields[1]} (another nfknock "
                                  "or NFQUEUE listener): pick another with --queue-num")]
    return [Finding(OK, f"NFQUEUE {queue_num} is free")]


def check_rules(path: Path) -> tuple[list[Finding], tuple[Door, ...]]:
    try:
        ruleset = load_rules(path)
    except RulesError as exc:
        return [Finding(FAIL, line) for line in exc.lines], ()
    return [Finding(OK, f"{path}: {len(ruleset.doors)} door(s) valid")], ruleset.doors


def check_modes(paths: list[Path], keys: frozenset = frozenset()) -> list[Finding]:
    """Rules decide who gets in and key files are secrets: each is judged by the same
    `trust.why_unsafe` that makes `run` refuse it (symlinks resolved: the target counts)."""
    out = []
    for path in paths:
        reason = why_unsafe(path, secret=path in keys)
        if reason:
            if Finding(FAIL, reason) not in out:  # a directory shared by many files: once
                out.append(Finding(FAIL, reason))
            continue
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue
        if mode & (stat.S_IRGRP | stat.S_IROTH) and not stat.S_ISDIR(mode):
            out.append(Finding(WARN, f"{path} is readable by group or others: the knock sequences are secrets "
                                     "(chmod go-r)"))
    return out or [Finding(OK, "rules and key files are root's and not readable by others")]


def gather() -> HostState:
    def run(argv):
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return result.stdout if result.returncode == 0 else ""
        except (OSError, subprocess.SubprocessError):
            return ""

    host = HostState(iptables_flavour())
    for flavour in FLAVOURS:
        for family, tool in ((4, "iptables"), (6, "ip6tables")):
            if shutil.which(f"{tool}-{flavour}"):
                host.rules_s[(flavour, family)] = run([f"{tool}-{flavour}", "-S"])
    host.conntrack = (
        Path("/sys/module/nf_conntrack").exists()
        or subprocess.run(["modprobe", "-n", "-q", "nf_conntrack"], capture_output=True).returncode == 0
        if shutil.which("modprobe") else Path("/sys/module/nf_conntrack").exists()
    )
    try:
        host.queues = Path("/proc/net/netfilter/nfnetlink_queue").read_text()
    except OSError:
        host.queues = ""
    return host


def diagnose(rules: Path, queue_num: int, chosen: str, host: HostState | None = None) -> list[Finding]:
    host = host or gather()
    if chosen == "auto":
        chosen = "nft" if host.flavour == "nf_tables" else "legacy"
    rule_findings, doors = check_rules(rules)
    try:
        paths = [rules, *rule_files(rules)] if rules.is_dir() else [rules]
    except RulesError:
        paths = []
    keys = frozenset(
        path for door in doors
        for path in (getattr(door, "keys_file", None), getattr(getattr(door, "rotate", None), "secret_file", None))
        if path is not None
    )
    paths += sorted(keys)
    return (
        check_flavour(host, chosen)
        + check_leftovers(host, chosen)
        + check_earlier_accepts(host, chosen, doors)
        + check_conntrack(host)
        + check_queue(host, queue_num)
        + rule_findings
        + check_modes(paths, keys)
    )
