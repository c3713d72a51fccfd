"""Gateway doors (docs/gateway.md) across the pure rooms: the rules that declare destinations
behind this host, the engine's verdict on a forwarded packet, SPA NAT access and force_nat, and
the fixed FORWARD/nat scaffolding of both backends. Time is written into each test."""

from __future__ import annotations

import base64

import pytest
from pydantic import ValidationError

from nfknock.doors.describe import as_line
from nfknock.doors.engine import Verdict
from nfknock.doors.events import ConnectionAccepted, ConnectionRefused, SpaRefused
from nfknock.doors.packet import Packet
from nfknock.doors.rules import KnockDoor, SpaDoor, parse_door
from nfknock.doors.spa import encode, generate_keys
from nfknock.firewall.nft import gateway_script
from nfknock.firewall.plan import FORWARD_CHAIN, NAT_CHAIN, gateway_plan
from nfknock.loading import load_secrets
from support.decisions import fresh_engine, fresh_plan

ALICE, BOB = "10.199.1.2", "10.199.2.2"
BASTION = "10.199.1.1"
INNER = "10.0.0.5"
SYN = 0x02
WALL = 1_800_000_000.0


def gateway(**overrides) -> KnockDoor:
    fields = dict(
        name="gw",
        sequence=[7001, 7002, 7003],
        forward=[f"{INNER}:22/tcp", "[fd00::5]:22/tcp"],
        publish=[{"port": "2222/tcp", "to": f"{INNER}:5432"}],
    )
    fields.update(overrides)
    return KnockDoor.model_validate(fields)


def syn(dst: str, port: int, src: str = ALICE, family: int = 4) -> Packet:
    """A SYN; one to an address other than the bastion's came through the FORWARD hook."""
    forwarded = dst not in (BASTION, "fd00:199:1::1")
    return Packet(src=src, dst=dst, proto="tcp", sport=40000, dport=port, flags=SYN, family=family, forwarded=forwarded)


def open_door(engine, src: str = ALICE, now: float = 10.0) -> None:
    for i, port in enumerate((7001, 7002, 7003)):
        engine.handle(syn(BASTION, port, src), now + i * 0.1)


# -- rules ---------------------------------------------------------------------------------


def test_destinations_are_routed_and_published_ones():
    door = gateway()
    assert [str(d) for d in door.destinations] == ["10.0.0.5:22/tcp", "[fd00::5]:22/tcp", "10.0.0.5:5432/tcp"]
    assert door.protect == ()  # a gateway door needs no port of this host


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"forward": ["fd00::5:22"]}, "expected a destination like"),
        ({"forward": ["10.0.0.0/24:22"]}, "expected a destination like"),
        ({"forward": ["10.0.0.5:70000"]}, "outside 1..65535"),
        ({"forward": ["10.0.0.5:22/icmp"]}, "protocol must be tcp or udp"),
        ({"forward": ["10.0.0.5:22", "10.0.0.5:22/tcp"]}, "forward lists a destination twice"),
        ({"publish": [{"port": "53/udp", "to": "10.0.0.5:53/tcp"}]}, "the protocols differ"),
        ({"publish": [{"port": 7001, "to": "10.0.0.5:22"}]}, "both a knock port and a published port"),
        ({"protect": [2222], "publish": [{"port": 2222, "to": "10.0.0.5:22"}]}, "both a protected port"),
        ({"family": "ipv4", "forward": ["[fd00::5]:22"]}, "cannot be reached by a door of family ipv4"),
        ({"forward": [], "publish": []}, "protect: required"),
    ],
)
def test_a_bad_destination_is_refused_with_its_reason(fields, reason):
    data = {"name": "gw", "sequence": [7001, 7002], **fields}
    with pytest.raises(ValidationError) as info:
        parse_door(data)
    assert reason in str(info.value)


def test_the_door_line_names_its_destinations():
    line = as_line(gateway())
    assert "forward 10.0.0.5:22/tcp [fd00::5]:22/tcp" in line and "publish 2222/tcp->10.0.0.5:5432/tcp" in line


# -- engine --------------------------------------------------------------------------------


def test_a_knock_grant_opens_every_destination_of_the_door_for_its_source_only():
    engine = fresh_engine((gateway(),))
    assert engine.handle(syn(INNER, 22), 1.0).verdict is Verdict.DROP
    open_door(engine)
    accepted = engine.handle(syn(INNER, 22), 11.0)
    assert accepted.verdict is Verdict.ACCEPT
    assert accepted.events == (ConnectionAccepted(ALICE, "gw", f"{INNER}:22/tcp", True),)
    assert engine.handle(syn(INNER, 5432), 11.0).verdict is Verdict.ACCEPT  # published: after the DNAT
    assert engine.handle(syn(INNER, 22, src=BOB), 11.0).events == (ConnectionRefused(BOB, f"{INNER}:22/tcp"),)
    assert engine.handle(syn(INNER, 23), 11.0).verdict is Verdict.DROP  # not a destination: never ours
    assert engine.handle(syn(INNER, 22), 10.0 + 31).verdict is Verdict.DROP  # open_for is over


def test_a_forwarded_packet_never_uses_a_grant_of_a_door_without_that_destination():
    local = KnockDoor.model_validate(dict(name="ssh", sequence=[6001, 6002, 6003], protect=["22/tcp"]))
    engine = fresh_engine((local, gateway()))
    for i, port in enumerate((6001, 6002, 6003)):
        engine.handle(syn(BASTION, port), 10.0 + i * 0.1)
    assert engine.handle(syn(BASTION, 22), 11.0).verdict is Verdict.ACCEPT  # this host's port 22
    assert engine.handle(syn(INNER, 22), 11.0).verdict is Verdict.DROP  # the one behind it: another door


def test_a_forwarded_packet_is_never_judged_as_a_port_of_this_host():
    """Even to a destination no door lists (a reload under way, a leftover chain): a grant of
    this host's port 22 does not open port 22 of a host behind it."""
    local = KnockDoor.model_validate(dict(name="ssh", sequence=[6001, 6002, 6003], protect=["22/tcp"]))
    engine = fresh_engine((local,))
    for i, port in enumerate((6001, 6002, 6003)):
        engine.handle(syn(BASTION, port), 10.0 + i * 0.1)
    assert engine.handle(syn(BASTION, 22), 11.0).verdict is Verdict.ACCEPT
    refused = engine.handle(syn("10.0.0.9", 22), 11.0)
    assert refused.verdict is Verdict.DROP and refused.events == (ConnectionRefused(ALICE, "10.0.0.9:22/tcp"),)


def test_an_ipv6_destination_is_matched_by_its_address():
    engine = fresh_engine((gateway(),))
    for i, port in enumerate((7001, 7002, 7003)):
        engine.handle(syn("fd00:199:1::1", port, src="fd00:199:1::2", family=6), 10.0 + i * 0.1)
    decision = engine.handle(syn("fd00::5", 22, src="fd00:199:1::2", family=6), 11.0)
    assert decision.verdict is Verdict.ACCEPT and decision.events[0].port == "[fd00::5]:22/tcp"


# -- SPA: NAT access and force_nat ---------------------------------------------------------


@pytest.fixture
def keys_env(monkeypatch):
    encryption, mac = generate_keys()
    monkeypatch.setenv("GWSPA_KEY_BASE64", encryption)
    monkeypatch.setenv("GWSPA_HMAC_KEY_BASE64", mac)


def spa(keys_env, **fields) -> SpaDoor:
    data = dict(kind="spa", name="spaGw", keys_env="GWSPA", forward=[f"{INNER}:22/tcp"], protect=["22/tcp"])
    data.update(fields)
    door = SpaDoor.model_validate(data)
    load_secrets(door)
    return door


def spa_packet(door, ports=(("tcp", 22),), nat=None, src=ALICE) -> Packet:
    payload = encode(door.keyring[0].keys, src, list(ports), WALL, nat=nat)
    return Packet(src, BASTION, "udp", 40000, 62201, 0, payload)


def test_a_nat_access_packet_opens_the_destination_it_asks_for_and_nothing_else(keys_env):
    door = spa(keys_env)
    engine = fresh_engine((door,))
    engine.handle(spa_packet(door, nat=(INNER, 22)), 10.0, WALL)
    assert engine.handle(syn(INNER, 22), 11.0).verdict is Verdict.ACCEPT
    assert engine.handle(syn(BASTION, 22), 11.0).verdict is Verdict.DROP  # this host's port was not asked for
    assert engine.handle(syn(INNER, 22, src=BOB), 11.0).verdict is Verdict.DROP


def test_a_plain_access_packet_does_not_open_the_destinations(keys_env):
    door = spa(keys_env)
    engine = fresh_engine((door,))
    engine.handle(spa_packet(door), 10.0, WALL)
    assert engine.handle(syn(BASTION, 22), 11.0).verdict is Verdict.ACCEPT
    assert engine.handle(syn(INNER, 22), 11.0).verdict is Verdict.DROP


def test_a_nat_access_packet_for_another_destination_is_refused_with_a_reason(keys_env):
    door = spa(keys_env)
    engine = fresh_engine((door,))
    decision = engine.handle(spa_packet(door, nat=("10.0.0.6", 22)), 10.0, WALL)
    (refused,) = [e for e in decision.events if isinstance(e, SpaRefused)]
    assert refused.reason == "destination not allowed" and "10.0.0.6:22/tcp" in refused.detail
    assert engine.handle(syn("10.0.0.6", 22), 11.0).verdict is Verdict.DROP
    assert engine.handle(syn(INNER, 22), 11.0).verdict is Verdict.DROP


def test_a_force_nat_door_sends_every_grant_to_its_destination_only(keys_env):
    door = spa(keys_env, force_nat=f"{INNER}:22/tcp")
    engine = fresh_engine((door,))
    engine.handle(spa_packet(door), 10.0, WALL)  # asks for 22/tcp of this host
    assert engine.handle(syn(INNER, 22), 11.0).verdict is Verdict.ACCEPT
    assert engine.handle(syn(BASTION, 22), 11.0).verdict is Verdict.DROP


def test_a_key_may_reach_only_its_own_destinations(keys_env, tmp_path):
    from nfknock.doors.rules import SpaKey

    door = SpaDoor.model_validate(
        dict(
            kind="spa",
            name="spaGw",
            forward=[f"{INNER}:22/tcp", "10.0.0.6:22/tcp"],
            keys=[{"name": "alice", "env": "GWSPA", "destinations": [f"{INNER}:22/tcp"]}],
        )
    )
    load_secrets(door)
    (alice,) = door.keyring
    assert alice.destinations == frozenset({("tcp", INNER, 22)})
    engine = fresh_engine((door,))
    decision = engine.handle(spa_packet(door, nat=("10.0.0.6", 22)), 10.0, WALL)
    (refused,) = [e for e in decision.events if isinstance(e, SpaRefused)]
    assert refused.reason == "destination not allowed" and "the key's destinations" in refused.detail
    engine.handle(spa_packet(door, nat=(INNER, 22)), 12.0, WALL + 1)
    assert engine.handle(syn(INNER, 22), 13.0).verdict is Verdict.ACCEPT
    assert engine.handle(syn("10.0.0.6", 22), 13.0).verdict is Verdict.DROP
    with pytest.raises(ValidationError) as info:
        SpaDoor.model_validate(
            dict(
                kind="spa",
                name="s",
                forward=[f"{INNER}:22"],
                keys=[SpaKey(name="b", env="GWSPA", destinations=["10.9.9.9:22"])],
            )
        )
    assert "destinations 10.9.9.9:22/tcp not in the door's forward or publish" in str(info.value)


def test_force_nat_must_be_a_destination_of_the_door(keys_env):
    with pytest.raises(ValidationError) as info:
        SpaDoor.model_validate(dict(kind="spa", name="s", keys_env="GWSPA", protect=[22], force_nat="10.0.0.9:22"))
    assert "not one of the door's forward or publish destinations" in str(info.value)


# -- scaffolding ---------------------------------------------------------------------------


def test_the_forward_chain_queues_new_connections_without_bypass_and_drops_the_rest():
    planned = fresh_plan((gateway(),), 7)
    forward = [str(spec) for spec in planned.gateway.forward[4]]
    assert forward[:5] == [
        f"-A {FORWARD_CHAIN} -d 10.0.0.5/32 -p tcp -m tcp --dport 22 "
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        f"-A {FORWARD_CHAIN} -d 10.0.0.5/32 -p tcp -m tcp --dport 22 --tcp-flags FIN,SYN,RST,ACK SYN "
        "-m conntrack --ctstate NEW -m set --match-set nfknock-q7-v4 src -j NFQUEUE --queue-num 8",
        f"-A {FORWARD_CHAIN} -d 10.0.0.5/32 -p tcp -m tcp --dport 22 --tcp-flags FIN,SYN,RST,ACK SYN "
        "-m conntrack --ctstate NEW -m set --match-set nfknock-q7-recent-v4 src "
        "-m limit --limit 100/sec --limit-burst 200 -j NFQUEUE --queue-num 7",
        f"-A {FORWARD_CHAIN} -d 10.0.0.5/32 -p tcp -m tcp --dport 22 --tcp-flags FIN,SYN,RST,ACK SYN "
        "-m conntrack --ctstate NEW -m limit --limit 100/sec --limit-burst 200 -j NFQUEUE --queue-num 7",
        f"-A {FORWARD_CHAIN} -d 10.0.0.5/32 -p tcp -m tcp --dport 22 -j DROP",
    ]
    assert forward[5:] == [line.replace("--dport 22", "--dport 5432") for line in forward[:5]]  # published
    assert len(forward) == 10 and all("bypass" not in line for line in forward)
    assert [str(spec) for spec in planned.gateway.nat[4]] == [
        f"-A {NAT_CHAIN} -p tcp -m tcp --dport 2222 -m addrtype --dst-type LOCAL -j DNAT --to-destination 10.0.0.5:5432"
    ]
    assert [spec.destination for spec in planned.gateway.forward[6]][0] == "fd00::5/128"
    assert planned.gateway.nat[6] == []


def test_doors_without_destinations_plan_no_gateway_chains():
    door = KnockDoor.model_validate(dict(name="ssh", sequence=[6001, 6002], protect=["22/tcp"]))
    assert fresh_plan((door,), 7).gateway.empty


def test_workers_share_the_forward_chain_out_by_source():
    forward = gateway_plan((gateway(),), 7, workers=2).forward[4]
    queued = [spec for spec in forward if spec.target == "NFQUEUE"]
    assert len(queued) == 12 and all(spec.u32 for spec in queued)  # 3 queue rules x 2 destinations x 2 workers


def test_the_nft_backend_replaces_a_gateway_chain_and_its_jump_in_one_restore():
    specs = gateway_plan((gateway(),), 7).nat[4]
    script = gateway_script(NAT_CHAIN, specs, [f"-A PREROUTING -j {NAT_CHAIN}"], True, "eth0")
    assert script.splitlines() == [
        "*nat",
        f":{NAT_CHAIN} - [0:0]",
        f"-D PREROUTING -j {NAT_CHAIN}",
        str(specs[0]),
        f"-I PREROUTING 1 -i eth0 -j {NAT_CHAIN}",
        "COMMIT",
    ]
    removal = gateway_script(FORWARD_CHAIN, None, [f"-A FORWARD -j {FORWARD_CHAIN}"], True)
    assert removal.splitlines() == [
        "*filter",
        f"-D FORWARD -j {FORWARD_CHAIN}",
        f"-F {FORWARD_CHAIN}",
        f"-X {FORWARD_CHAIN}",
        "COMMIT",
    ]


def test_the_nat_access_field_round_trips_through_the_codec():
    encryption, mac = generate_keys()
    from nfknock.doors.spa import Keys, decode

    keys = Keys(base64.b64decode(encryption), base64.b64decode(mac))
    request = decode(encode(keys, ALICE, [("tcp", 2222)], WALL, nat=("fd00::5", 22)), keys)
    assert request.nat == ("fd00::5", 22)


# -- what the operator sees ----------------------------------------------------------------


def test_metrics_count_forwarded_connections_by_destination():
    from collections import Counter

    from nfknock.daemon.metrics import tally

    counter: Counter = Counter()
    tally(
        counter, [ConnectionAccepted(ALICE, "gw", f"{INNER}:22/tcp", True), ConnectionAccepted(ALICE, "ssh", "22/tcp")]
    )
    assert counter[("forwarded", ("gw", f"{INNER}:22/tcp"))] == 1
    assert not any(name == "forwarded" and labels[0] == "ssh" for name, labels in counter)


def test_status_shows_a_doors_destinations():
    from nfknock.tools.statusview import _protects

    door = {"protect": ["22/tcp"], "forward": ["10.0.0.5:22/tcp"], "publish": ["2222/tcp -> 10.0.0.5:5432/tcp"]}
    assert _protects(door) == "22/tcp fwd 10.0.0.5:22/tcp pub 2222/tcp -> 10.0.0.5:5432/tcp"


# -- doctor --------------------------------------------------------------------------------


def test_doctor_says_forwarding_is_off_and_an_earlier_forward_accept_lets_strangers_through():
    from nfknock.tools.doctor import FAIL, OK, WARN, HostState, check_gateway

    rules = (
        "-P FORWARD ACCEPT\n"
        "-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"  # harmless
        "-A FORWARD -d 10.0.0.0/24 -p tcp -m tcp --dport 20:30 -j ACCEPT\n"
        "-A FORWARD -d 10.9.0.0/24 -j ACCEPT\n"  # another network: harmless
        "-A FORWARD -j NFKNOCK-FWD\n"
        "-A FORWARD -j ACCEPT\n"  # after our jump: harmless
    )
    host = HostState("legacy", {("legacy", 4): rules}, forwarding={4: False, 6: True})
    findings = check_gateway(host, "legacy", (gateway(forward=[f"{INNER}:22/tcp"]),))
    levels = {(f.level, f.text.split(" ")[0]) for f in findings}
    assert (WARN, "net.ipv4.ip_forward") in levels
    assert any(f.level == WARN and "FORWARD policy is ACCEPT" in f.text for f in findings)
    (failed,) = [f for f in findings if f.level == FAIL]
    assert "FORWARD rule 2 accepts 10.0.0.5:22/tcp" in failed.text
    quiet = HostState("legacy", {("legacy", 4): "-P FORWARD DROP\n-A FORWARD -j NFKNOCK-FWD\n"}, forwarding={4: True})
    assert {f.level for f in check_gateway(quiet, "legacy", (gateway(forward=[f"{INNER}:22/tcp"]),))} == {OK}


def test_doctor_has_nothing_to_say_about_doors_without_destinations():
    from nfknock.tools.doctor import HostState, check_gateway

    door = KnockDoor.model_validate(dict(name="ssh", sequence=[6001, 6002], protect=["22/tcp"]))
    assert check_gateway(HostState("legacy", forwarding={4: False}), "legacy", (door,)) == []


# -- import-fwknop -------------------------------------------------------------------------


def test_import_fwknop_maps_force_nat_to_a_key_that_reaches_its_destination_only(tmp_path):
    from nfknock.loading import load_rules
    from nfknock.tools.fwknop_import import import_fwknop

    encryption, mac = generate_keys()
    text = (
        f"SOURCE ANY\nKEY_BASE64 {encryption}\nHMAC_KEY_BASE64 {mac}\nOPEN_PORTS tcp/22\nREQUIRE_USERNAME alice\n"
        f"ENABLE_IPT_FORWARDING Y\n\n"
        f"SOURCE ANY\nKEY_BASE64 {encryption}\nHMAC_KEY_BASE64 {generate_keys()[1]}\nOPEN_PORTS tcp/22\n"
        f"REQUIRE_USERNAME bob\nFORCE_NAT {INNER} 22\nFORCE_SNAT 10.0.0.1\n"
    )
    imported = import_fwknop(text, "spaGw", tmp_path / "keys", ["22/tcp"])
    assert imported.door["forward"] == [f"{INNER}:22/tcp"] and imported.door["protect"] == ["22/tcp"]
    assert "FORCE_NAT: 10.0.0.5:22/tcp" in imported.key_files["bob"]
    assert not any("FORCE_NAT" in line or "ENABLE_IPT_FORWARDING" in line for line in imported.unmapped)
    assert any("FORCE_SNAT" in line and "never rewrites sources" in line for line in imported.unmapped)
    assert any("ENABLE_IPT_FORWARDING" in note for note in imported.notes)
    # What it wrote loads, and bob's grants go to the destination only.
    (tmp_path / "keys").mkdir(mode=0o700)
    for name, key_text in imported.key_files.items():
        path = tmp_path / "keys" / f"{name}.keys"
        path.write_text(key_text)
        path.chmod(0o600)
    rules = tmp_path / "doors.yaml"
    rules.write_text(imported.yaml())
    rules.chmod(0o600)
    (door,) = load_rules(rules).doors
    bob = next(key for key in door.keyring if key.name == "bob")
    assert str(bob.force_nat) == f"{INNER}:22/tcp"
    engine = fresh_engine((door,))
    payload = encode(bob.keys, ALICE, [("tcp", 22)], WALL, user="bob")
    engine.handle(Packet(ALICE, BASTION, "udp", 40000, 62201, 0, payload), 10.0, WALL)
    assert engine.handle(syn(INNER, 22), 11.0).verdict is Verdict.ACCEPT
    assert engine.handle(syn(BASTION, 22), 11.0).verdict is Verdict.DROP


# -- export: the managers' base rules ------------------------------------------------------


def test_the_nftables_base_rule_closes_the_destinations_in_a_forward_chain_of_its_own():
    from nfknock.tools.export import export, parse_header

    text = export("nftables", (gateway(),), "/etc/nfknock/rules")
    lines = text.splitlines()
    at = lines.index("\tchain forward {")
    assert lines[at + 1 :] == [
        "\t\t# after iptables' FORWARD (priority filter), where nfknock's gateway chain is",
        "\t\ttype filter hook forward priority filter + 10; policy accept;",
        "\t\tct state established,related accept",
        "\t\tmeta mark & 0x20000000 == 0x20000000 accept",
        "\t\tip daddr 10.0.0.5 tcp dport 22 drop",
        "\t\tip daddr 10.0.0.5 tcp dport 5432 drop",
        "\t\tip6 daddr fd00::5 tcp dport 22 drop",
        "\t}",
        "}",
    ]
    header = parse_header(text)
    assert header is not None
    assert header.destinations == ("10.0.0.5:22/tcp", "10.0.0.5:5432/tcp", "[fd00::5]:22/tcp")


def test_firewalld_closes_each_destination_in_its_family_and_iptables_says_it_does_not():
    from nfknock.tools.export import export, parse_header

    xml = export("firewalld", (gateway(),), "/etc/nfknock/rules")
    assert (
        '<rule ipv="ipv6" table="security" chain="FORWARD" priority="0">-d fd00::5/128 -p tcp -m tcp --dport 22 '
        "-m conntrack ! --ctstate RELATED,ESTABLISHED -m mark ! --mark 0x20000000/0x20000000 -j DROP</rule>"
    ) in xml
    assert xml.count('chain="FORWARD"') == 3
    text = export("iptables", (gateway(),), "/etc/nfknock/rules")
    assert "FORWARD -d" not in text and "Not covered here: the gateway destinations" in text
    assert parse_header(text).destinations == ()


def test_doctor_calls_a_base_rule_without_a_new_destination_stale(tmp_path):
    from nfknock.tools.doctor import WARN, check_base_rules
    from nfknock.tools.export import export
    from nfknock.tools.managers import Manager

    before = export("nftables", (gateway(forward=[f"{INNER}:22/tcp"]),), "r")
    manager = Manager("nftables.service", "nftables", "enabled", "systemctl reload nftables", {"/x.nft": before})
    findings = check_base_rules([manager], (gateway(),), tmp_path)
    (stale,) = findings
    assert stale.level == WARN and "leaves [fd00::5]:22/tcp open through a reload" in stale.text
    now = {"/x.nft": export("nftables", (gateway(),), "r")}
    current = Manager("nftables.service", "nftables", "enabled", "systemctl reload nftables", now)
    assert "matches the doors" in check_base_rules([current], (gateway(),), tmp_path)[0].text
