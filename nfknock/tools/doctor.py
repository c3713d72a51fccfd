"""`nfknock doctor`: checks a host for what would make nfknock fail or leak, one line each.

The checks are pure functions over what `gather()` reads from the host (commands' output,
/proc), so each can be tested with made-up inputs; file modes are judged on disk by
`trust.why_unsafe`, the check `run` uses.

A diagnosis changes nothing: the rules are read with `iptables-*-save`, which dumps only the
tables that exist, and the legacy tools are not run at all in a namespace without legacy tables
(`iptables-legacy -S` would create the filter table, and every iptables-nft command would warn
"iptables-legacy tables present" from then on).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..daemon.stats import QUEUE_PROC, parse_queue_table
from ..doors.first_steps import MarkHistory, decide
from ..doors.rules import KEY_SUFFIX, Door, SpaDoor
from ..errors import RulesError
from ..extras import SERVER, SERVER_MODULES, absent
from ..firewall import FLAVOURS, resolve_flavour
from ..firewall.host import chain_queues, iptables_flavour, other_flavour_chain, spans
from ..firewall.legacy import legacy_tables
from ..firewall.plan import CHAIN, FORWARD_CHAIN, PASS_MARK
from ..firewall.shards import queues
from ..loading import load_rules, rule_files
from ..trust import why_unsafe
from .export import COVERS_DESTINATIONS, NFT_INCLUDE, Header, parse_header, protected_ports
from .export import destinations as gateway_destinations
from .export import digest as base_digest
from .managers import Manager, find_managers

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
    rules_s: dict[tuple[str, int], str] = field(default_factory=dict)  # (flavour, family) -> filter, `-S` style
    conntrack: bool = False
    queues: str = ""  # /proc/net/netfilter/nfnetlink_queue
    saved: dict[tuple[str, int], str] = field(default_factory=dict)  # (flavour, family) -> `-save`, all tables
    local_ports: tuple[int, int] | None = None  # net.ipv4.ip_local_port_range
    reserved_ports: str = ""  # net.ipv4.ip_local_reserved_ports
    missing_modules: tuple[str, ...] = ()  # of the server extra, in this Python
    forwarding: dict[int, bool | None] = field(default_factory=dict)  # family -> the forwarding sysctl (gateway)
    managers: list[Manager] = field(default_factory=list)  # firewall managers in use (managers.py)


def filter_rules(saved: str) -> str:
    """The filter table of `iptables-save` output, as `iptables -S` prints it."""
    out, table = [], None
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif table != "filter" or line.startswith("#"):
            continue
        elif line.startswith(":"):
            name, policy = (line[1:].split() + ["-"])[:2]
            out.append(f"-P {name} {policy}" if policy != "-" else f"-N {name}")
        elif line.startswith("-A "):
            out.append(line)
    return "".join(f"{line}\n" for line in out)


def check_flavour(host: HostState, chosen: str) -> list[Finding]:
    if host.flavour is None:
        return [Finding(WARN, f"no 'iptables' command found; --firewall auto falls back to {chosen}")]
    return [
        Finding(
            OK,
            f"this host's iptables is the {host.flavour} flavour; --firewall auto uses the "
            f"{resolve_flavour('auto', lambda: host.flavour)} backend",
        )
    ]


def check_server_extra(host: HostState, chosen: str) -> list[Finding]:
    needed = [m for m in SERVER_MODULES if m != "iptc" or chosen == "legacy"]  # nft runs commands instead
    missing = [SERVER_MODULES[m] for m in needed if m in host.missing_modules]
    if missing:
        return [
            Finding(
                FAIL,
                f"nfknock run needs the {SERVER} extra: pip install 'nfknock[{SERVER}]' "
                f"({', '.join(missing)} not installed)",
            )
        ]
    return [Finding(OK, f"the {SERVER} extra is installed ({', '.join(SERVER_MODULES[m] for m in needed)})")]


def check_leftovers(host: HostState, chosen: str, queue_num: int = 0, workers: int = 1) -> list[Finding]:
    """nfknock's chain in either flavour: in the chosen one `run` replaces it (whatever queues it
    names); in the other one it stays, and the kernel applies it too: to our queues, or to
    queues nobody listens to, where it drops the knocks our daemon waits for (firewall.
    other_flavour_chain says which)."""
    out = []
    ours = set(range(queue_num, queue_num + 2 * workers))
    listened = set(parse_queue_table(host.queues))
    for flavour in FLAVOURS:
        chain = {
            family: [line for line in text.splitlines() if line.startswith(f"-A {CHAIN} ")]
            for (held, family), text in sorted(host.rules_s.items())
            if held == flavour and f"-N {CHAIN}" in text.splitlines()
        }
        if not chain:
            continue
        tools = ", ".join(f"{'iptables' if family == 4 else 'ip6tables'}-{flavour} -S {CHAIN}" for family in chain)
        if flavour == chosen:
            out += [
                Finding(
                    OK,
                    f"nfknock's chain is installed ({'iptables' if family == 4 else 'ip6tables'}-{flavour})"
                    f"{f', queueing to {spans(chain_queues({family: lines}))}' if lines else ''}: a daemon runs, "
                    "or was killed (then 'nfknock run' replaces it, whatever its queues, or 'nfknock down' removes it)",
                )
                for family, lines in chain.items()
            ]
            continue
        who = f"nfknock on --queue-num {queue_num}"
        text = other_flavour_chain(flavour, chain, ours, listened, who)
        if text is None:
            text = f"the {flavour} tables hold an empty NFKNOCK chain; 'nfknock down --firewall {flavour}' removes it"
        out.append(Finding(WARN, f"{text} ({tools})"))
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
        protected = {p.key for d in doors for p in d.protect}  # closed in both families
        for number, rule in enumerate((r for r in text.splitlines() if r.startswith("-A INPUT ")), start=1):
            if rule.split()[-2:] == ["-j", CHAIN]:
                break
            if not rule.endswith("-j ACCEPT") or re.search(r"--ctstate (RELATED,)?ESTABLISHED(,RELATED)?\b", rule):
                continue
            if re.search(r"(^| )-i lo( |$)", rule):  # the host's own connections: nfknock leaves them alone too
                continue
            proto = re.search(r"-p (\w+)", rule)
            ports = _ports_of(rule)
            hit = sorted(
                f"{port}/{p}"
                for p, port in protected
                if (proto is None or proto.group(1) == p) and (ports is None or any(a <= port <= b for a, b in ports))
            )
            if hit:
                out.append(
                    Finding(
                        FAIL,
                        f"INPUT rule {number} accepts {', '.join(hit)} before nfknock's chain (IPv{family}): {rule}",
                    )
                )
    return out or [Finding(OK, "no INPUT rule ahead of nfknock's chain accepts a protected port")]


def _intervals(text: str) -> list[tuple[int, int]]:
    """`1000,2000-2010` (ip_local_reserved_ports) as [(1000, 1000), (2000, 2010)]."""
    out = []
    for part in text.replace(",", " ").split():
        first, _, last = part.partition("-")
        if first.isdigit() and (not last or last.isdigit()):
            out.append((int(first), int(last or first)))
    return out


def check_local_ports(
    doors: tuple[Door, ...], local_ports: tuple[int, int] | None, reserved: str = ""
) -> list[Finding]:
    """Knock, rotating and tripwire ports in the kernel's ephemeral range are ports the host's own
    connections and services may be given (40000-60000 are in Linux's default 32768-60999)."""
    if local_ports is None:
        return []
    low, high = local_ports
    taken = _intervals(reserved)

    def clash(first: int, last: int) -> bool:
        first, last = max(first, low), min(last, high)
        return first <= last and not any(a <= first and last <= b for a, b in taken)

    out = []
    for door in doors:
        what, spans = [], []
        for label, ranges in (
            ("knock port", [(p.proto, p.port, p.port) for p in door.knock_ports]),
            ("rotating range", list(door.knock_ranges)),
            ("tripwire ports", list(door.tripwire_ranges)),
        ):
            hit = [(proto, a, b) for proto, a, b in ranges if clash(a, b)]
            if hit:
                what.append(
                    f"{label}{'s' if label == 'knock port' and len(hit) > 1 else ''} "
                    + " ".join(f"{a}/{proto}" if a == b else f"{a}-{b}/{proto}" for proto, a, b in hit)
                )
                spans += [(max(a, low), min(b, high)) for _, a, b in hit]
        if what:
            merged: list[list[int]] = []
            for a, b in sorted(spans):
                if merged and a <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            ports = ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in merged)
            out.append(
                Finding(
                    WARN,
                    f"door {door.name}: {'; '.join(what)} in the local port range {low}-{high} "
                    "(net.ipv4.ip_local_port_range): the kernel gives these ports to the host's own "
                    "connections and services, whose new inbound connections there nfknock would "
                    f"queue; add {ports} to net.ipv4.ip_local_reserved_ports, or move the door",
                )
            )
    return out or [Finding(OK, f"no knock or tripwire port is in the local port range {low}-{high}")]


_MARK_OPTION = re.compile(
    r"(?<!\S)--(set-xmark|set-mark|mark|tproxy-mark|nfmask|ctmask|or-mark|xor-mark|and-mark)"
    r"\s+(\S+)"
)


def _covers(option: str, value: str, bit: int) -> bool:
    try:
        if option in ("nfmask", "ctmask", "or-mark", "xor-mark"):
            return bool(int(value, 0) & bit)
        if option == "and-mark":
            return not int(value, 0) & bit
        _, _, mask = value.partition("/")
        return bool((int(mask, 0) if mask else 0xFFFFFFFF) & bit)
    except ValueError:
        return False


def check_pass_mark(host: HostState, bit: int = PASS_MARK) -> list[Finding]:
    """Other rules that set or match nfknock's pass-mark bit: a packet the host marks that way
    returns from our chain unexamined; a rule that clears it undoes the hand-back."""
    out = []
    for (flavour, family), text in sorted(host.saved.items()):
        tool = f"{'iptables' if family == 4 else 'ip6tables'}-{flavour}"
        table = "filter"
        for line in text.splitlines():
            if line.startswith("*"):
                table = line[1:].strip()
                continue
            if not line.startswith("-A ") or line.split()[1] == CHAIN:
                continue
            target = line.split(" -j ", 1)[1].split()[0] if " -j " in line else ""
            if target == "HMARK" or any(_covers(option, value, bit) for option, value in _MARK_OPTION.findall(line)):
                out.append(
                    Finding(
                        WARN,
                        f"{tool} -t {table}: a rule uses mark bit {bit:#x}, nfknock's pass mark "
                        f"(a packet carrying it skips the knock checks): {line}; pick a free bit "
                        "with --pass-mark",
                    )
                )
    return out or [Finding(OK, f"no other iptables rule uses the pass-mark bit {bit:#x}")]


def _fix(manager: Manager, rules: Path, pass_mark: int, where: str | None) -> str:
    """The command(s) that put a current base rule where `manager` reads it."""
    command = f"nfknock export {manager.export} --rules {rules.absolute()}"
    if pass_mark != PASS_MARK:
        command += f" --pass-mark {pass_mark:#x}"
    if manager.export == "nftables":
        if where is None:
            where = NFT_INCLUDE
            return f'{command} > {where}, add `include "{where}"` to /etc/nftables.conf, then {manager.reload}'
        return f"{command} > {where}, then {manager.reload}"
    if manager.export == "firewalld":
        return f"{command} > {where} (or merge its rules into yours), then {manager.reload}"
    if manager.export == "iptables":
        return f"put the output of `{command}` in {where} (its *security section), then {manager.reload}"
    return f"put the lines `{command}` prints in {where}, after '# End required lines', then {manager.reload}"


def _stale(
    header: Header, ports: tuple[tuple[str, int], ...], pass_mark: int, dests: tuple[str, ...] = ()
) -> str | None:
    """Why a base rule no longer matches the doors, or None when it does (`dests`: the gateway
    destinations it should close, where the manager's rule covers them)."""
    if (
        header.ports == ports
        and header.pass_mark == pass_mark
        and header.destinations == dests
        and header.digest == base_digest(ports, pass_mark, dests)
    ):
        return None
    reasons = []
    open_ = [f"{proto}/{port}" for proto, port in ports if (proto, port) not in header.ports]
    open_ += [dest for dest in dests if dest not in header.destinations]
    extra = [f"{proto}/{port}" for proto, port in header.ports if (proto, port) not in ports]
    extra += [dest for dest in header.destinations if dest not in dests]
    if open_:
        reasons.append(f"it leaves {' '.join(open_)} open through a reload")
    if extra:
        reasons.append(f"it still closes {' '.join(extra)}, which no door protects")
    if header.pass_mark != pass_mark:
        reasons.append(f"it lets pass mark {header.pass_mark:#x} through, nfknock sets {pass_mark:#x}")
    return "; ".join(reasons) or "its digest does not match its ports (edited by hand?)"


def check_base_rules(
    managers: list[Manager], doors: tuple[Door, ...], rules: Path, pass_mark: int = PASS_MARK
) -> list[Finding]:
    """Each firewall manager in use should hold nfknock's base rule (tools/export.py), current
    with the doors: a reload of the manager can take nfknock's chain away, and only that rule
    keeps the protected ports closed meanwhile."""
    if not doors:
        return []  # the rules check says why
    if not managers:
        return [Finding(OK, "no firewall manager (nftables.service, netfilter-persistent, firewalld, ufw) found")]
    ports = protected_ports(doors)
    out = []
    for manager in managers:
        found = {path: parse_header(text) for path, text in manager.files.items() if text is not None}
        held = {path: header for path, header in found.items() if header is not None}
        wanted = list(held) if manager.any_of else list(manager.files)
        if manager.any_of and not held:
            out.append(
                Finding(
                    WARN,
                    f"{manager.name}: {manager.why}, and no nfknock base rule is in {', '.join(manager.files)}: "
                    f"`{manager.reload}` opens the protected ports until nfknock's chain is back; fix: "
                    f"{_fix(manager, rules, pass_mark, None)}",
                )
            )
            continue
        for path in wanted:
            header = held.get(path)
            if header is None:
                out.append(
                    Finding(
                        WARN,
                        f"{manager.name}: {manager.why}, and {path} holds no nfknock base rule: "
                        f"`{manager.reload}` opens the protected ports until nfknock's chain is back; fix: "
                        f"{_fix(manager, rules, pass_mark, path)}",
                    )
                )
                continue
            dests = gateway_destinations(doors) if manager.export in COVERS_DESTINATIONS else ()
            why = _stale(header, ports, pass_mark, dests)
            if why:
                out.append(
                    Finding(
                        WARN,
                        f"{manager.name}: the nfknock base rule in {path} is stale ({why}); fix: "
                        f"{_fix(manager, rules, pass_mark, path)}",
                    )
                )
            else:
                out.append(Finding(OK, f"{manager.name}: the nfknock base rule in {path} matches the doors"))
    return out


def check_conntrack(host: HostState) -> list[Finding]:
    if host.conntrack:
        return [Finding(OK, "conntrack is available (established connections bypass the queue)")]
    return [Finding(FAIL, "conntrack is not available: nfknock needs the nf_conntrack module")]


def check_queue(host: HostState, queue_num: int, workers: int = 1) -> list[Finding]:
    """nfknock binds two queues per worker: N+2i (knocks, strangers) and N+2i+1 (granted sources)."""
    table = parse_queue_table(host.queues)
    findings = []
    main, grant = queues(queue_num, 0)
    numbered = [(main, ""), (grant, " (the grant queue)")] if workers == 1 else []
    for shard in range(workers if workers > 1 else 0):
        main, grant = queues(queue_num, shard)
        numbered += [(main, f" (worker {shard})"), (grant, f" (worker {shard}'s grant queue)")]
    for number, role in numbered:
        held = table.get(number)
        if held is not None:
            findings.append(
                Finding(
                    FAIL,
                    f"NFQUEUE {number}{role} is held by netlink port {held.peer_portid} (another nfknock "
                    "or NFQUEUE listener): pick another with --queue-num",
                )
            )
        else:
            findings.append(Finding(OK, f"NFQUEUE {number}{role} is free"))
    return findings


def check_rules(path: Path) -> tuple[list[Finding], tuple[Door, ...]]:
    try:
        ruleset = load_rules(path)
    except RulesError as exc:
        return [Finding(FAIL, line) for line in exc.lines], ()
    return [Finding(OK, f"{path}: {len(ruleset.doors)} door(s) valid")], ruleset.doors


def check_first_steps(doors: tuple[Door, ...]) -> list[Finding]:
    """Knock doors whose first knocks the daemon decides: a flood of spoofed first knocks there
    reaches the queue and competes with the clients' knocks, where the kernel would have
    recorded it (first_steps.py). Nearly always a port collision the administrator can undo."""
    first_steps = decide(doors, MarkHistory())  # as a start with no rules in place decides
    out = [
        Finding(
            WARN,
            f"door {name}: its first knocks reach the daemon instead of the kernel's first-step set: "
            f"{reason}; a flood of first knocks there competes with clients' knocks in the queue "
            "(give the door ports of its own)",
        )
        for name, reason in sorted(first_steps.in_daemon.items())
    ]
    recorded = sum(len(group.doors) for group in first_steps.groups)
    return out or (
        [Finding(OK, f"the kernel records the first knocks of {recorded} knock door(s)")] if recorded else []
    )


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
            out.append(
                Finding(WARN, f"{path} is readable by group or others: the knock sequences are secrets (chmod go-r)")
            )
    return out or [Finding(OK, "rules and key files are root's and not readable by others")]


FORWARDING_SYSCTL = {4: "net.ipv4.ip_forward", 6: "net.ipv6.conf.all.forwarding"}


def _accepts_destination(rule: str, dest) -> bool:
    """Whether a FORWARD rule (iptables -S) may accept new connections to `dest`: an ACCEPT that
    is not limited to established traffic, whose -d, -p and --dport (if any) cover it."""
    if not rule.endswith("-j ACCEPT") or re.search(r"--ctstate (RELATED,)?ESTABLISHED(,RELATED)?\b", rule):
        return False
    address = re.search(r"(^| )-d (\S+)", rule)
    if address is not None:
        try:
            if dest.host not in ipaddress.ip_network(address.group(2), strict=False):
                return False
        except (ValueError, TypeError):
            return False
    proto = re.search(r"-p (\w+)", rule)
    ports = _ports_of(rule)
    return (proto is None or proto.group(1) == dest.proto) and (
        ports is None or any(a <= dest.port <= b for a, b in ports)
    )


def check_gateway(host: HostState, chosen: str, doors: tuple[Door, ...]) -> list[Finding]:
    """Gateway doors (docs/gateway.md): the family's forwarding sysctl must be on (else nothing
    reaches the destinations), no FORWARD rule ahead of nfknock's jump may accept them, and a
    FORWARD policy of ACCEPT leaves them open whenever nfknock's chain is not there (before the
    first start, after `nfknock down`)."""
    destinations = [dest for door in doors for dest in door.destinations]
    if not destinations:
        return []
    out = []
    for family in (4, 6):
        mine = [dest for dest in destinations if dest.family == family]
        if not mine:
            continue
        name = FORWARDING_SYSCTL[family]
        on = host.forwarding.get(family)
        if on is False:
            out.append(
                Finding(
                    WARN,
                    f"{name} is 0: the gateway doors' IPv{family} destinations are unreachable "
                    f"(sysctl -w {name}=1, and in /etc/sysctl.d)",
                )
            )
        elif on:
            out.append(Finding(OK, f"{name} is 1: this host forwards to the gateway doors' IPv{family} destinations"))
        text = host.rules_s.get((chosen, family), "")
        lines = text.splitlines()
        if "-P FORWARD ACCEPT" in lines:
            out.append(
                Finding(
                    WARN,
                    f"the FORWARD policy is ACCEPT (IPv{family}): without nfknock's chain (before "
                    "its first start, after `nfknock down`) the gateway destinations are open "
                    "to everyone; set it to DROP or add a base rule",
                )
            )
        for number, rule in enumerate((r for r in lines if r.startswith("-A FORWARD ")), start=1):
            if rule.split()[-2:] == ["-j", FORWARD_CHAIN]:
                break
            hit = [str(dest) for dest in mine if _accepts_destination(rule, dest)]
            if hit:
                out.append(
                    Finding(
                        FAIL,
                        f"FORWARD rule {number} accepts {', '.join(hit)} before nfknock's chain (IPv{family}): {rule}",
                    )
                )
    if not any(finding.level == FAIL for finding in out):
        out.append(Finding(OK, "no FORWARD rule ahead of nfknock's chain accepts a gateway destination"))
    return out  # fmt: skip


def read_forwarding() -> dict[int, bool | None]:
    """The forwarding sysctls, per family (None: unreadable)."""
    found: dict[int, bool | None] = {}
    for family, name in FORWARDING_SYSCTL.items():
        try:
            found[family] = Path("/proc/sys", *name.split(".")).read_text().strip() == "1"
        except OSError:
            found[family] = None
    return found


def gather() -> HostState:
    def run(argv):
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return result.stdout if result.returncode == 0 else ""
        except (OSError, subprocess.SubprocessError):
            return ""

    host = HostState(iptables_flavour(), missing_modules=tuple(absent(SERVER_MODULES)))
    for flavour in FLAVOURS:
        for family, tool in ((4, "iptables"), (6, "ip6tables")):
            if flavour == "legacy" and not legacy_tables(family):
                saved = ""  # no legacy table exists: running the tool could only create one
            elif shutil.which(f"{tool}-{flavour}-save"):
                saved = run([f"{tool}-{flavour}-save"])
            else:
                continue
            host.saved[(flavour, family)] = saved
            host.rules_s[(flavour, family)] = filter_rules(saved)
    host.local_ports, host.reserved_ports = read_local_ports()
    host.forwarding = read_forwarding()
    host.managers = find_managers()
    host.conntrack = (
        Path("/sys/module/nf_conntrack").exists()
        or subprocess.run(["modprobe", "-n", "-q", "nf_conntrack"], capture_output=True).returncode == 0
        if shutil.which("modprobe")
        else Path("/sys/module/nf_conntrack").exists()
    )
    try:
        host.queues = QUEUE_PROC.read_text()
    except OSError:
        host.queues = ""
    return host


def read_local_ports() -> tuple[tuple[int, int] | None, str]:
    """net.ipv4.ip_local_port_range (None if unreadable) and ip_local_reserved_ports, from /proc."""
    try:
        low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return None, ""
    try:
        reserved = Path("/proc/sys/net/ipv4/ip_local_reserved_ports").read_text().strip()
    except OSError:
        reserved = ""
    return (low, high), reserved


def _secret_files(door) -> list[Path]:
    """Every key or secret file a door reads: whoever reads one can open the door."""
    files = [getattr(door, "keys_file", None), getattr(getattr(door, "rotate", None), "secret_file", None)]
    files += [key.file for key in getattr(door, "keys", ())]
    keys_dir = getattr(door, "keys_dir", None)
    if keys_dir is not None:
        try:
            files += [p for p in keys_dir.iterdir() if p.name.endswith(KEY_SUFFIX)]
        except OSError:
            pass  # the rules check reports an unreadable keys_dir
    return [path for path in files if path is not None]


def check_redis(facts: Any) -> list[Finding]:
    """The fleet's Redis deployment (fleet/deployment.py judges, the member's start log says the
    same): `facts` is a RedisFacts, or a string saying why Redis could not be asked."""
    from ..fleet.deployment import ERROR, OK, risks

    if isinstance(facts, str):
        return [Finding(FAIL, f"fleet: {facts}")]
    level = {OK: OK, ERROR: FAIL}
    return [Finding(level.get(risk.level, WARN), f"fleet: {risk.text}") for risk in risks(facts)]


def gather_redis(url: str, password_file: str | None) -> Any:
    """Ask the Redis at `url` about its deployment: a RedisFacts, or why it cannot be asked."""
    from dataclasses import replace

    from ..errors import UsageError
    from ..fleet.config import read_password
    from ..fleet.deployment import read_facts
    from ..fleet.link import FleetConfig, _reason, _redis_client, check_url

    try:
        check_url(url)
        password = read_password(password_file)
    except UsageError as exc:
        return str(exc)
    config = FleetConfig(url, b"", password)
    try:
        client = _redis_client(config)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - whatever stops it is the finding
        return f"cannot reach Redis at {config.where} ({_reason(exc)})"
    try:
        anonymous = _redis_client(replace(config, password=None)) if config.password else None
        return read_facts(client, anonymous, bool(config.password))
    finally:
        client.close()


def diagnose(
    rules: Path,
    queue_num: int,
    chosen: str,
    host: HostState | None = None,
    pass_mark: int = PASS_MARK,
    workers: int = 1,
) -> list[Finding]:
    host = host or gather()
    chosen = resolve_flavour(chosen, lambda: host.flavour)
    rule_findings, doors = check_rules(rules)
    try:
        paths = [rules, *rule_files(rules)] if rules.is_dir() else [rules]
    except RulesError:
        paths = []
    keys = frozenset(path for door in doors for path in _secret_files(door))
    key_dirs = {door.keys_dir for door in doors if isinstance(door, SpaDoor) and door.keys_dir is not None}
    paths += sorted(keys) + sorted(key_dirs)
    return (
        check_flavour(host, chosen)
        + check_server_extra(host, chosen)
        + check_leftovers(host, chosen, queue_num, workers)
        + check_earlier_accepts(host, chosen, doors)
        + check_gateway(host, chosen, doors)
        + check_conntrack(host)
        + check_queue(host, queue_num, workers)
        + check_pass_mark(host, pass_mark)
        + rule_findings
        + check_first_steps(doors)
        + check_local_ports(doors, host.local_ports, host.reserved_ports)
        + check_modes(paths, keys)
        + check_base_rules(host.managers, doors, rules, pass_mark)
    )
