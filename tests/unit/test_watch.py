"""The kernel side of the scaffolding watcher (firewall/watch.py), without a kernel: nf_tables
notifications read from bytes built here, and the restore input of each repair."""

import struct

from nfknock.firewall.plan import CHAIN, RuleSpec
from nfknock.firewall.watch import Damage, parse_messages, repair_script

DELTABLE, DELCHAIN, NEWRULE, DELRULE, NEWGEN = 2, 5, 6, 8, 15
IPV4, IPV6 = 2, 10


def attr(kind: int, payload: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def text(value: str) -> bytes:
    return value.encode() + b"\0"


def message(msg: int, family: int, *attrs: bytes) -> bytes:
    body = struct.pack("=BBH", family, 0, 0) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), (10 << 8) | msg, 0, 0, 0) + body


def newgen(pid: int, name: str = "nft", portid: int = 0) -> bytes:
    raw = message(NEWGEN, 0, attr(1, struct.pack(">I", 7)), attr(2, struct.pack(">I", pid)), attr(3, text(name)))
    return raw[:12] + struct.pack("=I", portid) + raw[16:]


def jump_rule_expressions(chain: str = CHAIN) -> bytes:
    verdict = attr(1, struct.pack(">i", -3)) + attr(2, text(chain))  # NFT_JUMP to our chain
    data = attr(2 | 0x8000, attr(2 | 0x8000, verdict))
    element = attr(1 | 0x8000, attr(1, text("immediate")) + attr(2 | 0x8000, data))
    return attr(4 | 0x8000, element)


def test_a_flushed_ruleset_is_the_filter_table_deleted_in_both_families():
    data = (
        message(DELTABLE, IPV4, attr(1, text("filter")))
        + message(DELTABLE, IPV6, attr(1, text("filter")))
        + message(DELTABLE, IPV4, attr(1, text("nat")))
        + newgen(4242, "nft")
    )
    found, who, open_batch, committed = parse_messages(data, set())
    assert {(d.family, d.what, d.chain, d.jump, d.gateway) for d in found} == {
        (4, "table filter deleted", True, True, ""),
        (6, "table filter deleted", True, True, ""),
        (4, "table nat deleted", False, False, "NFKNOCK-NAT"),  # a gateway door's published ports
    }
    assert who == ["pid 4242 (nft)"]
    assert not open_batch and committed == [4242]


def test_a_deleted_rule_in_input_is_damage_only_when_it_jumps_to_our_chain():
    ours = message(DELRULE, IPV4, attr(1, text("filter")), attr(2, text("INPUT")), jump_rule_expressions())
    other = message(DELRULE, IPV4, attr(1, text("filter")), attr(2, text("INPUT")), attr(4 | 0x8000, b""))
    found, _, _, _ = parse_messages(other + newgen(1), set())
    assert found == []
    found, _, _, _ = parse_messages(ours + newgen(1), set())
    assert found == [Damage(4, f"the jump from INPUT to {CHAIN} deleted", chain=False, jump=True)]


def test_any_change_to_our_chain_is_damage_but_rules_added_elsewhere_are_not():
    flushed = message(DELRULE, IPV6, attr(1, text("filter")), attr(2, text(CHAIN)))
    added = message(NEWRULE, IPV6, attr(1, text("filter")), attr(2, text(CHAIN)))
    elsewhere = message(NEWRULE, IPV4, attr(1, text("filter")), attr(2, text("INPUT")), jump_rule_expressions())
    assert [d.chain for d in parse_messages(flushed + newgen(1), set())[0]] == [True]
    assert [d.chain for d in parse_messages(added + newgen(1), set())[0]] == [True]
    assert parse_messages(elsewhere + newgen(1), set())[0] == []  # a second jump to us opens nothing
    chain_gone = message(DELCHAIN, IPV4, attr(1, text("filter")), attr(3, text(CHAIN)))
    assert parse_messages(chain_gone + newgen(1), set())[0] == [Damage(4, f"chain {CHAIN} deleted", True, True)]


def test_our_own_transactions_are_not_damage_and_an_unfinished_one_waits():
    ours = message(DELTABLE, IPV4, attr(1, text("filter"))) + newgen(77, "iptables-nft-re")
    found, who, open_batch, committed = parse_messages(ours, {77})
    assert found == [] and who == [] and committed == [77]
    found, _, open_batch, _ = parse_messages(message(DELTABLE, IPV4, attr(1, text("filter"))), set())
    assert found == [] and open_batch  # judged once its NEWGEN is read


def test_in_a_container_our_transactions_are_known_by_their_netlink_port_id():
    """In a pid namespace the kernel's NEWGEN names the global pid (400077), which the daemon
    does not know; the header's port id is the helper's pid as the daemon sees it (77)."""
    ours = message(DELTABLE, IPV4, attr(1, text("filter"))) + newgen(400077, "iptables-nft-re", portid=77)
    found, who, _, committed = parse_messages(ours, {77})
    assert found == [] and who == [] and 77 in committed
    theirs = message(DELTABLE, IPV4, attr(1, text("filter"))) + newgen(400078, "nft", portid=78)
    found, who, _, _ = parse_messages(theirs, {77})
    assert found and who == ["pid 400078 (nft)"]


SPECS = [
    RuleSpec("ACCEPT", proto="tcp", dport=22, ctstate="RELATED,ESTABLISHED"),
    RuleSpec("NFQUEUE", proto="tcp", dport=22, ctstate="NEW", queue_num=7),
    RuleSpec("DROP", proto="tcp", dport=22),
]


def test_a_lost_jump_is_put_back_alone():
    scripts = repair_script(SPECS, Damage(4, "", chain=False, jump=True), None, {("tcp", 22)})
    assert scripts == [f"*filter\n-I INPUT 1 -j {CHAIN}\nCOMMIT\n"]
    scripts = repair_script(SPECS, Damage(4, "", chain=False, jump=True), "eth0")
    assert scripts == [f"*filter\n-I INPUT 1 -i eth0 -j {CHAIN}\nCOMMIT\n"]


def test_a_refill_closes_the_protected_ports_with_native_rules_first():
    """The first transaction may use nothing nf_tables runs through its xtables layer (no
    conntrack, set, NFQUEUE): those wait for a grace period while the port is open."""
    first, whole = repair_script(SPECS, Damage(4, "", chain=True, jump=True), None, {("tcp", 22), ("udp", 53)})
    assert first.splitlines() == [
        "*filter",
        f":{CHAIN} - [0:0]",
        f"-A {CHAIN} -p tcp -m tcp --dport 22 -j DROP",
        f"-A {CHAIN} -p udp -m udp --dport 53 -j DROP",
        f"-I INPUT 1 -j {CHAIN}",
        "COMMIT",
    ]
    lines = whole.splitlines()
    assert lines[:3] == ["*filter", f":{CHAIN} - [0:0]", f"-D INPUT -j {CHAIN}"]  # the jump the first put in
    assert lines[3:6] == [str(spec) for spec in SPECS]
    assert lines[-2:] == [f"-I INPUT 1 -j {CHAIN}", "COMMIT"]


def test_a_refill_keeps_a_jump_that_is_still_there():
    first, _ = repair_script(SPECS, Damage(4, "", chain=True, jump=False), None, {("tcp", 22)})
    assert "-I INPUT" not in first
    (only,) = repair_script(SPECS, Damage(4, "", chain=True, jump=False), None)  # legacy: one transaction
    assert only.splitlines()[2] == f"-D INPUT -j {CHAIN}" and only.splitlines()[-2] == f"-I INPUT 1 -j {CHAIN}"


def test_a_gateway_chain_or_its_jump_deleted_is_gateway_damage_only():
    forward = attr(1, text("filter")), attr(2, text("FORWARD"))
    data = (
        message(DELRULE, IPV4, *forward, jump_rule_expressions("NFKNOCK-FWD"))
        + message(DELRULE, IPV4, *forward, jump_rule_expressions("DOCKER-USER"))  # not ours: no damage
        + message(DELRULE, IPV6, attr(1, text("nat")), attr(2, text("NFKNOCK-NAT")))
        + newgen(4242, "ufw")
    )
    found, _, _, _ = parse_messages(data, set())
    assert {(d.family, d.what, d.chain, d.jump, d.gateway) for d in found} == {
        (4, "the jump from FORWARD to NFKNOCK-FWD deleted", False, False, "NFKNOCK-FWD"),
        (6, "rules of NFKNOCK-NAT changed", False, False, "NFKNOCK-NAT"),
    }
