"""The scaffolding plan: what goes into the kernel, as data (no root needed)."""

from nfknock.firewall import CHAIN, PASS_MARK, RuleSpec, scaffolding
from nfknock.rules import Door


def door(**fields):
    base = dict(name="d", sequence=[40000, "50000/udp"], protect=["22/tcp"])
    base.update(fields)
    return Door.model_validate(base)


def test_plan_for_one_door_without_tripwires():
    plan = [str(s) for s in scaffolding((door(tripwire=0),), 3)]
    assert plan == [
        f"-A {CHAIN} -p tcp -m tcp --dport 22 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        f"-A {CHAIN} -p tcp -m tcp --dport 22 --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate NEW -j NFQUEUE --queue-num 3",
        f"-A {CHAIN} -p tcp -m tcp --dport 22 --tcp-flags SYN,ACK ACK -m conntrack --ctstate NEW -j ACCEPT",
        f"-A {CHAIN} -p tcp -m tcp --dport 22 -j DROP",
        f"-A {CHAIN} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        f"-A {CHAIN} -p tcp -m tcp --dport 40000 -j NFQUEUE --queue-num 3",
        f"-A {CHAIN} -p udp -m udp --dport 50000 -j NFQUEUE --queue-num 3",
    ]


def test_tripwires_are_queued_and_marked_packets_return_first():
    plan = scaffolding((door(sequence=[40000, 40010, "50000/udp"], tripwire=8),), 3)
    assert plan[0] == RuleSpec("RETURN", mark=PASS_MARK)
    assert [str(s) for s in plan[-2:]] == [
        f"-A {CHAIN} -p tcp -m tcp --dport 39992:40018 --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate NEW -j NFQUEUE --queue-num 3",
        f"-A {CHAIN} -p udp -m udp --dport 49992:50008 -m conntrack --ctstate NEW -j NFQUEUE --queue-num 3",
    ]


def test_tripwire_ranges_stay_within_port_numbers():
    (first, last) = door(sequence=[2, 65534], tripwire=16).tripwire_ranges
    assert first == ("tcp", 1, 18) and last == ("tcp", 65518, 65535)


def test_no_rule_bypasses_the_queue_and_none_names_a_client():
    plan = scaffolding((door(), door(name="e", sequence=[1, 2], protect=["53/udp"])), 0)
    for spec in plan:
        assert "bypass" not in str(spec)
        assert " -s " not in str(spec)


def test_udp_protected_port_queues_every_new_flow():
    plan = scaffolding((door(protect=["53/udp"], tripwire=0),), 0)
    assert plan[:3] == [
        RuleSpec("ACCEPT", "udp", 53, ctstate="RELATED,ESTABLISHED"),
        RuleSpec("NFQUEUE", "udp", 53, ctstate="NEW", queue_num=0),
        RuleSpec("DROP", "udp", 53),
    ]


def test_shared_ports_appear_once():
    a = door(name="a", sequence=[1, 2], close_sequence=[2, 1])
    b = door(name="b", sequence=[2, 3], protect=["22/tcp"])
    plan = scaffolding((a, b), 0)
    assert sum(1 for s in plan if s.dport == 2) == 1
    assert sum(1 for s in plan if s.dport == 22 and s.target == "DROP") == 1
    assert sum(1 for s in plan if s.target == "RETURN" and s.mark) == 1
    assert sum(1 for s in plan if s.target == "RETURN" and s.ctstate) == 1


def test_plan_covers_the_families_each_door_listens_on():
    from nfknock.firewall import plan

    v4 = door(name="v4", family="ipv4", sequence=[1000, 2000], protect=["22/tcp"], tripwire=0)
    v6 = door(name="v6", family="ipv6", sequence=[3000, 4000], protect=["2222/tcp"], tripwire=0)
    both = plan((v4, v6), 0)
    assert {s.dport for s in both[4]} - {None} == {22, 1000, 2000}
    assert {s.dport for s in both[6]} - {None} == {2222, 3000, 4000}
    assert plan((v4,), 0)[6] == []  # no IPv6 door: no IPv6 chain at all


def test_nft_restore_script_replaces_chain_and_jumps_in_one_transaction():
    from nfknock.firewall.nft import restore_script

    specs = scaffolding((door(tripwire=0),), 3)
    jumps = [f"-A INPUT -j {CHAIN}", f"-A INPUT -i eth1 -j {CHAIN}"]
    script = restore_script(specs, jumps, chain_exists=True, interface="eth0").splitlines()
    assert script[:4] == ["*filter", f":{CHAIN} - [0:0]", f"-D INPUT -j {CHAIN}", f"-D INPUT -i eth1 -j {CHAIN}"]
    assert script[4:-2] == [str(s) for s in specs]
    assert script[-2:] == [f"-I INPUT 1 -i eth0 -j {CHAIN}", "COMMIT"]
    assert restore_script(None, jumps[:1], True).splitlines() == [
        "*filter", f"-D INPUT -j {CHAIN}", f"-F {CHAIN}", f"-X {CHAIN}", "COMMIT"]


def test_established_traffic_on_knock_ports_returns_before_any_knock_rule(monkeypatch):
    """The host's own connections may use a knock port as their local port (40000-60000 are in
    Linux's ephemeral range): their replies are not ours to queue or drop."""
    import base64

    from nfknock.rules import SpaDoor
    from nfknock.spa import generate_keys

    encryption, mac = generate_keys()
    monkeypatch.setenv("T_KEY_BASE64", encryption)
    monkeypatch.setenv("T_HMAC_KEY_BASE64", mac)
    monkeypatch.setenv("T_SECRET", base64.b64encode(b"s" * 32).decode())
    spa = SpaDoor.model_validate(dict(kind="spa", name="s", keys_env="T", protect=["2222/tcp"]))
    rotating = door(name="r", sequence=None, rotate={"secret_env": "T_SECRET", "proto": "udp"}, protect=["23/tcp"])
    for specs in (scaffolding((door(tripwire=8), rotating, spa), 0), scaffolding((door(tripwire=0),), 0)):
        returns = [i for i, s in enumerate(specs) if s == RuleSpec("RETURN", ctstate="RELATED,ESTABLISHED")]
        assert len(returns) == 1
        (cut,) = returns
        # Protected ports keep accepting their established traffic first ...
        assert all(s.dport in (22, 23, 2222) or s.mark for s in specs[:cut])
        # ... and every knock, range, SPA and tripwire rule comes after the cut.
        assert specs[cut + 1:] and all(s.target == "NFQUEUE" and s.dport not in (22, 23, 2222)
                                       for s in specs[cut + 1:])


def test_no_knock_rules_means_no_established_return():
    assert scaffolding((), 0) == []
