"""`nfknock export MANAGER`: the host firewall manager's own base rule for the protected ports.

Why: nfknock's chain lives in the kernel next to the rules of the host's firewall manager, and
every reload of that manager can take the chain away (`flush ruleset`, iptables-restore). A
base rule in the manager's own configuration keeps the protected ports closed through such a
reload, with no window: the manager loads it in the same atomic step that flushed nfknock.

What the base rule does: it drops every packet to a protected port (tcp and udp, both address
families) unless it arrives on `lo`, belongs to an established or related connection, or carries
nfknock's pass mark. nfknock sets the pass mark on every packet it lets through (its queue verdict
ACCEPT, and the rule that takes back a session the host has), so while nfknock's chain is in
place the base rule never drops what nfknock accepted; while it is not, nothing new gets in.
The rule only ever drops: the rest of the manager's rules still decide on what it lets past.

Ordering, the one thing to get right: a packet must pass every base chain hooked at input, and
an accept in one table only moves the packet on to the next. nfknock's chain hangs off INPUT of
the iptables `filter` table (priority 0 in either flavour). A rule that ran before it would see
a granted client's SYN unmarked and drop it. So each manager's rule is placed where it runs
after nfknock's chain whatever was loaded first:
- nftables.service: a table of its own whose input chain has priority `filter + 10` (chains of
  equal priority run in an order set by when they were created, which reloads change);
- netfilter-persistent and firewalld: the iptables `security` table's INPUT (priority 50), a
  table neither nfknock nor the usual rules.v4 use; appended as a section of its own;
- ufw: ufw's own `ufw-before-input` chain, which INPUT reaches only after nfknock's jump at
  position 1 in the same table (nfknock's ACCEPT ends the table; it never reaches ufw's chains).

Each output starts with a comment naming the rules it came from and a line `doctor` reads
(`parse_header`): the protected ports, the pass mark and a digest of both, so a base rule that no
longer matches the doors is reported as stale. No native nft `queue` statement is used (kernels
without CONFIG_NFT_QUEUE lack it); nothing here is secret (ports and a mark bit).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from ..doors.rules import Door
from ..firewall.plan import PASS_MARK

MANAGERS = ("nftables", "iptables", "firewalld", "ufw")

NFT_TABLE = "nfknock_base"

# Where each manager's snippet goes, as README's recipes say; doctor looks there.
NFT_INCLUDE = "/etc/nftables.d/nfknock.nft"


@dataclass(frozen=True)
class Header:
    """What an exported snippet says about itself (its `nfknock-base:` line)."""

    ports: tuple[tuple[str, int], ...]
    pass_mark: int
    digest: str
    destinations: tuple[str, ...] = ()  # gateway doors' (docs/gateway.md), where the manager's rule covers them


def protected_ports(doors: tuple[Door, ...]) -> tuple[tuple[str, int], ...]:
    """Every port a door protects, sorted: closed in both families, as the chain closes them."""
    return tuple(sorted({p.key for door in doors for p in door.protect}))


# The managers whose base rule also closes the gateway doors' destinations (a forward hook of
# their own, per family); iptables' and ufw's text serves both families' files, and an address
# of one family would break the other's.
COVERS_DESTINATIONS = ("nftables", "firewalld")


def destinations(doors: tuple[Door, ...]) -> tuple[str, ...]:
    """Every destination behind this host a door opens (docs/gateway.md), as text, sorted."""
    return tuple(sorted({str(dest) for door in doors for dest in door.destinations}))


def _port_list(ports: tuple[tuple[str, int], ...]) -> str:
    return " ".join(f"{proto}/{port}" for proto, port in ports)


def digest(ports: tuple[tuple[str, int], ...], pass_mark: int, dests: tuple[str, ...] = ()) -> str:
    """A short digest of what the base rule depends on: the protected ports and the pass mark
    (and the destinations it closes, when it closes any)."""
    text = f"v1 {_port_list(tuple(sorted(ports)))} {pass_mark:#x}"
    if dests:
        text += f" to {' '.join(sorted(dests))}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def header_line(ports: tuple[tuple[str, int], ...], pass_mark: int, dests: tuple[str, ...] = ()) -> str:
    to = f"; destinations {' '.join(dests)}" if dests else ""
    sums = digest(ports, pass_mark, dests)
    return f"nfknock-base: ports {_port_list(ports)}{to}; pass mark {pass_mark:#x}; digest {sums}"


_HEADER = re.compile(
    r"nfknock-base: ports (?P<ports>[a-z0-9/ ]*)(?:; destinations (?P<dests>[0-9a-fA-F.:\[\]/ tcpud]*))?; "
    r"pass mark (?P<mark>0x[0-9a-f]+); digest (?P<digest>[0-9a-f]{16})"
)


def parse_header(text: str) -> Header | None:
    """The first `nfknock-base:` line of a file's text (any comment syntax), or None."""
    found = _HEADER.search(text)
    if found is None:
        return None
    ports = []
    for item in found["ports"].split():
        proto, _, port = item.partition("/")
        if proto not in ("tcp", "udp") or not port.isdigit():
            return None
        ports.append((proto, int(port)))
    dests = tuple(found["dests"].split()) if found["dests"] else ()
    return Header(tuple(ports), int(found["mark"], 16), found["digest"], dests)


def _intro(manager: str, source: str, doors: tuple[Door, ...], pass_mark: int, comment: str) -> list[str]:
    ports = protected_ports(doors)
    names = ", ".join(door.name for door in doors)
    dests = destinations(doors)
    lines = [
        f"{comment} Generated by `nfknock export {manager}` from {source} (doors: {names}).",
        f"{comment} Regenerate it when the doors change; `nfknock doctor` says when it is stale.",
        f"{comment} {header_line(ports, pass_mark, dests if manager in COVERS_DESTINATIONS else ())}",
    ]
    if dests and manager not in COVERS_DESTINATIONS:
        lines.append(
            f"{comment} Not covered here: the gateway destinations {' '.join(dests)}; set the FORWARD "
            "policy to DROP (docs/gateway.md)."
        )
    return lines


def _forward_rule(dest, pass_mark: int) -> str:
    """The iptables form of the base rule for one destination behind this host (FORWARD)."""
    prefix = 32 if dest.family == 4 else 128
    return (
        f"-d {dest.host}/{prefix} -p {dest.proto} -m {dest.proto} --dport {dest.port} -m conntrack ! --ctstate "
        f"RELATED,ESTABLISHED -m mark ! --mark {pass_mark:#x}/{pass_mark:#x} -j DROP"
    )


def _gateway_destinations(doors: tuple[Door, ...]) -> list:
    return sorted({dest for door in doors for dest in door.destinations}, key=str)


def _iptables_rule(chain: str, proto: str, port: int, pass_mark: int) -> str:
    return (
        f"-A {chain} ! -i lo -p {proto} -m {proto} --dport {port} -m conntrack ! --ctstate RELATED,ESTABLISHED "
        f"-m mark ! --mark {pass_mark:#x}/{pass_mark:#x} -j DROP"
    )


def nftables(doors: tuple[Door, ...], source: str, pass_mark: int = PASS_MARK) -> str:
    """An nft file for nftables.service: include it from /etc/nftables.conf (after `flush
    ruleset`). It also loads on its own (`nft -f`), idempotently: the table is made, deleted and
    made again in the same transaction."""
    ports = protected_ports(doors)
    lines = _intro("nftables", source, doors, pass_mark, "#")
    lines += [
        f'# Include it from /etc/nftables.conf: include "{NFT_INCLUDE}"',
        f"table inet {NFT_TABLE}",
        f"delete table inet {NFT_TABLE}",
        f"table inet {NFT_TABLE} {{",
        "\tchain input {",
        "\t\t# after iptables' INPUT (priority filter), where nfknock's chain is, whichever came first",
        "\t\ttype filter hook input priority filter + 10; policy accept;",
        '\t\tiifname "lo" accept',
        "\t\tct state established,related accept",
        f"\t\tmeta mark & {pass_mark:#x} == {pass_mark:#x} accept",
    ]
    for proto in ("tcp", "udp"):
        numbers = [str(port) for kind, port in ports if kind == proto]
        if numbers:
            lines.append(f"\t\t{proto} dport {{ {', '.join(numbers)} }} drop")
    lines.append("\t}")
    dests = _gateway_destinations(doors)
    if dests:
        lines += [
            "\tchain forward {",
            "\t\t# after iptables' FORWARD (priority filter), where nfknock's gateway chain is",
            "\t\ttype filter hook forward priority filter + 10; policy accept;",
            "\t\tct state established,related accept",
            f"\t\tmeta mark & {pass_mark:#x} == {pass_mark:#x} accept",
            *(f"\t\t{'ip' if d.family == 4 else 'ip6'} daddr {d.host} {d.proto} dport {d.port} drop" for d in dests),
            "\t}",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def iptables(doors: tuple[Door, ...], source: str, pass_mark: int = PASS_MARK) -> str:
    """A `*security` table section for iptables-restore: append it to /etc/iptables/rules.v4 and
    to rules.v6 (the same text serves both families). netfilter-persistent restores each table
    whole, so the rule is back in the same step that flushed nfknock's chain from `filter`."""
    lines = _intro("iptables", source, doors, pass_mark, "#")
    lines += [
        "# Append it to /etc/iptables/rules.v4 and /etc/iptables/rules.v6 (a table of its own: security).",
        "*security",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
    ]
    lines += [_iptables_rule("INPUT", proto, port, pass_mark) for proto, port in protected_ports(doors)]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def firewalld(doors: tuple[Door, ...], source: str, pass_mark: int = PASS_MARK) -> str:
    """/etc/firewalld/direct.xml: one direct rule per port and family in the security table."""
    lines = ['<?xml version="1.0" encoding="utf-8"?>']
    # an XML comment may not hold "--"
    lines += [f"<!--{line[1:].replace('--', '- -')} -->" for line in _intro("firewalld", source, doors, pass_mark, "#")]
    lines += ["<!-- Save it as /etc/firewalld/direct.xml (or merge its rules into yours). -->", "<direct>"]
    for ipv in ("ipv4", "ipv6"):
        for proto, port in protected_ports(doors):
            args = _iptables_rule("INPUT", proto, port, pass_mark).removeprefix("-A INPUT ")
            lines.append(f'  <rule ipv="{ipv}" table="security" chain="INPUT" priority="0">{args}</rule>')
    for dest in _gateway_destinations(doors):
        args = _forward_rule(dest, pass_mark)
        ipv = f"ipv{dest.family}"
        lines.append(f'  <rule ipv="{ipv}" table="security" chain="FORWARD" priority="0">{args}</rule>')
    lines.append("</direct>")
    return "\n".join(lines) + "\n"


def ufw(doors: tuple[Door, ...], source: str, pass_mark: int = PASS_MARK) -> str:
    """Lines for /etc/ufw/before.rules and before6.rules (the same for both), right after their
    `# End required lines`: in ufw's own chain, which ufw loads from those files whenever it
    starts or reloads (not tested against ufw itself: whether its reload leaves a gap between
    flushing that chain and refilling it depends on ufw's version)."""
    lines = _intro("ufw", source, doors, pass_mark, "#")
    lines.append("# Put these lines in /etc/ufw/before.rules and /etc/ufw/before6.rules, after '# End required lines'.")
    lines += [_iptables_rule("ufw-before-input", proto, port, pass_mark) for proto, port in protected_ports(doors)]
    return "\n".join(lines) + "\n"


RENDER = {"nftables": nftables, "iptables": iptables, "firewalld": firewalld, "ufw": ufw}


def export(manager: str, doors: tuple[Door, ...], source: str, pass_mark: int = PASS_MARK) -> str:
    """The base rule for `manager` (one of MANAGERS)."""
    return RENDER[manager](doors, source, pass_mark)
