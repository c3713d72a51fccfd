"""Scaffolding in the legacy iptables tables, through python-iptables.

Legacy tables are replaced whole by the kernel on commit, so each `apply`/`remove` is one
transaction: the chain's old content, any number of leftover jumps and the new rules change
together, and there is no moment in which a protected port is open or a knock port unqueued.
iptc is not thread-safe: call from one thread only.
"""

from __future__ import annotations

import subprocess

from ..errors import FirewallError
from ..extras import load_iptc
from .backend import GATEWAY_CHAINS, PerFamily
from .host import legacy_tables
from .nft import describe_failure
from .plan import CHAIN, RuleSpec

LEGACY_TOOLS = {4: ("iptables-legacy", "iptables-legacy-restore"), 6: ("ip6tables-legacy", "ip6tables-legacy-restore")}


def _classes(family: int):
    iptc = load_iptc()
    if family == 4:
        return iptc, iptc.Table(iptc.Table.FILTER), iptc.Rule
    return iptc, iptc.Table6(iptc.Table6.FILTER), iptc.Rule6


TIMEOUT = 30  # seconds for one iptables-legacy command (the gateway chains)


class LegacyFirewall(PerFamily):
    name = "legacy"

    def _exists(self, family: int) -> bool:
        return "filter" in legacy_tables(family)

    def _rules(self, family: int) -> list[str]:
        if not self._exists(family):
            return []
        iptc, table, _ = _classes(family)
        table.refresh()
        if not table.is_chain(CHAIN):
            return []
        return [str(_spec_of(rule)) for rule in iptc.Chain(table, CHAIN).rules]

    def _jumps(self, family: int) -> int:
        if not self._exists(family):
            return 0
        iptc, table, _ = _classes(family)
        table.refresh()
        return sum(1 for rule in iptc.Chain(table, "INPUT").rules if rule.target.name == CHAIN)

    def _transaction(self, family: int, specs: list[RuleSpec] | None) -> None:
        if specs is None and not self._exists(family):
            return  # nothing to remove, and no table to create by looking
        iptc, table, rule_class = _classes(family)
        table.autocommit = False
        try:
            table.refresh()
            builtin_input = iptc.Chain(table, "INPUT")
            for rule in [r for r in builtin_input.rules if r.target.name == CHAIN]:
                builtin_input.delete_rule(rule)
            if table.is_chain(CHAIN):
                chain = iptc.Chain(table, CHAIN)
                chain.flush()
            else:
                chain = table.create_chain(CHAIN) if specs is not None else None
            if specs is None:
                if chain is not None:
                    chain.delete()
            else:
                for spec in specs:
                    chain.append_rule(_rule_of(rule_class, spec))
                jump = rule_class()
                if self.interface:
                    set_in_interface(jump, self.interface)
                jump.create_target(CHAIN)
                builtin_input.insert_rule(jump, 0)
            table.commit()
        except (iptc.IPTCError, ValueError) as exc:
            raise FirewallError(f"{'ip6tables' if family == 6 else 'iptables'} (legacy): {exc}") from None
        finally:
            table.autocommit = True
            table.refresh()

    def _gateway(self, family: int, chain: str, specs: list[RuleSpec] | None) -> bool:
        # Through iptables-legacy-restore, not python-iptables: its IPv6 DNAT target does not
        # load ("can't find target DNAT"), and one restore is one transaction of the table too.
        table = GATEWAY_CHAINS[chain][0]
        if specs is None and table not in legacy_tables(family):
            return False  # nothing to remove, and no table to create by looking
        tools = LEGACY_TOOLS[family]

        def run(argv: list[str], stdin: str | None) -> str:
            try:
                result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                raise FirewallError(f"{argv[0]} did not finish within {TIMEOUT} s") from None
            except (OSError, subprocess.SubprocessError) as exc:
                raise FirewallError(f"{argv[0]}: cannot run: {getattr(exc, 'strerror', None) or exc}") from None
            if result.returncode != 0:
                raise FirewallError(describe_failure(argv[0], result.returncode, result.stderr or ""))
            return result.stdout

        return self._gateway_by_restore(tools, family, chain, specs, run)


IFNAMSIZ = 16


def set_in_interface(rule, name: str) -> None:
    """`-i name` on a python-iptables rule. Its IPv6 rules (ip6tc, 1.0.x) write the interface mask
    as 0x01 bytes instead of 0xff, and the kernel compares names under that mask: only the lowest
    bit of each character counts, so `-i lo` also matched a veth whose name agreed in those bits
    (seen on a real kernel: a RETURN for `lo` let a stranger's IPv6 SYN through). The mask is
    written here as iptables writes it, for both families."""
    rule.in_interface = name
    entry = getattr(rule.entry, "ipv6", None) or rule.entry.ip
    length = len(name) + 1 if not name.endswith("+") else len(name) - 1
    entry.iniface_mask = b"\xff" * length + b"\x00" * (IFNAMSIZ - length)


def _rule_of(rule_class, spec: RuleSpec):
    rule = rule_class()
    if spec.in_interface:
        set_in_interface(rule, spec.in_interface)
    if spec.destination:
        rule.dst = spec.destination
    if spec.proto:
        rule.protocol = spec.proto
        match = rule.create_match(spec.proto)
        if spec.dport is not None:
            match.dport = f"{spec.dport[0]}:{spec.dport[1]}" if isinstance(spec.dport, tuple) else str(spec.dport)
        if spec.tcp_flags:
            match.tcp_flags = list(spec.tcp_flags)
    if spec.mark is not None:
        rule.create_match("mark").mark = f"{spec.mark:#x}/{spec.mark:#x}"
    if spec.dst_local:
        rule.create_match("addrtype").dst_type = "LOCAL"
    if spec.ctstate:
        rule.create_match("conntrack").ctstate = spec.ctstate
    if spec.match_set:
        rule.create_match("set").match_set = [spec.match_set, spec.match_dirs]
    if spec.u32:
        rule.create_match("u32").u32 = spec.u32  # in RuleSpec.__str__'s order: before the limit
    if spec.limit:
        limit = rule.create_match("limit")
        limit.limit = spec.limit[0]
        limit.limit_burst = str(spec.limit[1])
    target = rule.create_target(spec.target)
    if spec.set_mark is not None:
        target.set_xmark = f"{spec.set_mark[0]:#x}/{spec.set_mark[1]:#x}"
    if spec.add_set is not None:
        target.add_set = [spec.add_set[0], "src"]
        target.exist = ""
        target.timeout = str(spec.add_set[1])
    if spec.del_set is not None:
        target.del_set = [spec.del_set, "src"]
    if spec.queue_num is not None:
        target.queue_num = str(spec.queue_num)
    if spec.to_destination is not None:
        target.to_destination = spec.to_destination
    return rule


def _spec_of(rule) -> RuleSpec:
    """Read a kernel rule back into a RuleSpec (to show and compare what is installed)."""
    params = {m.name: m.get_all_parameters() for m in rule.matches}
    target = rule.target.get_all_parameters()
    proto = rule.protocol if rule.protocol in ("tcp", "udp") else None
    ports = params.get(proto, {}) if proto else {}
    dport = ports.get("dport", [None])[0]
    if dport is not None:
        first, _, last = dport.partition(":")
        dport = (int(first), int(last)) if last else int(first)
    ctstate = params.get("conntrack", {}).get("ctstate")
    queue = target.get("queue-num")
    flags = ports.get("tcp-flags")
    mark = params.get("mark", {}).get("mark")
    match_set = params.get("set", {}).get("match-set")
    u32 = params.get("u32", {}).get("u32")  # unquoted (shlex) and in iptables' own form
    limit = params.get("limit", {})
    xmark = target.get("set-xmark")
    value, _, mask = xmark[0].partition("/") if xmark else ("", "", "")
    add_set = target.get("add-set")
    del_set = target.get("del-set")
    return RuleSpec(
        target=rule.target.name,
        proto=proto,
        dport=dport,
        ctstate=ctstate[0] if ctstate else None,
        queue_num=int(queue[0]) if queue else None,
        tcp_flags=tuple(flags) if flags else None,
        mark=int(mark[0].split("/")[0], 16) if mark else None,
        match_set=match_set[0] if match_set else None,
        match_dirs=match_set[1] if match_set else "src",
        in_interface=rule.in_interface,
        limit=(limit["limit"][0], int(limit["limit-burst"][0])) if "limit" in limit else None,
        set_mark=(int(value, 16), int(mask, 16)) if xmark else None,
        add_set=(add_set[0], int(target.get("timeout", ["0"])[0])) if add_set else None,
        del_set=del_set[0] if del_set else None,
        u32=u32[0] if u32 else None,
    )
