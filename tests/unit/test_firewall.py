"""The scaffolding plan: what goes into the kernel, as data (no root needed)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nfknock.doors.first_steps import MARK_BITS
from nfknock.doors.rules import parse_door
from nfknock.firewall.plan import CHAIN, PASS_MARK, SET_PREFIX, MarkBits, RuleSpec, SetName
from support.decisions import fresh_plan, fresh_scaffolding


def door(**fields):
    base = dict(name="d", sequence=[40000, "50000/udp"], protect=["22/tcp"])
    base.update(fields)
    return parse_door({key: value for key, value in base.items() if value is not None})


def test_plan_for_one_door_without_tripwires():
    plan = [str(s) for s in fresh_scaffolding((door(tripwire=0),), 3)]
    assert plan == [
        f"-A {CHAIN} -i lo -j RETURN",  # the host's own connections are the rest of the firewall's
        f"-A {CHAIN} -p tcp -m tcp --dport 22 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        f"-A {CHAIN} -p tcp -m tcp --dport 22 --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate NEW -m set --match-set nfknock-q3-v4 src -j NFQUEUE --queue-num 4",
        # A source that just knocked has a bucket of its own, which a SYN flood alone never empties
        f"-A {CHAIN} -p tcp -m tcp --dport 22 --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate NEW -m set --match-set nfknock-q3-recent-v4 src -m limit --limit 100/sec --limit-burst 200 -j NFQUEUE --queue-num 3",
        f"-A {CHAIN} -p tcp -m tcp --dport 22 --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate NEW -m limit --limit 100/sec --limit-burst 200 -j NFQUEUE --queue-num 3",
        # A NEW mid-stream ACK passes only for a session the host has (not to a listener's cookie check)
        f"-A {CHAIN} -p tcp -m tcp --dport 22 --tcp-flags SYN,ACK ACK -m conntrack --ctstate NEW -m set --match-set nfknock-q3-s22-v4 src,src,dst -j MARK --set-xmark 0x20000000/0x20000000",
        f"-A {CHAIN} -p tcp -m tcp --dport 22 --tcp-flags SYN,ACK ACK -m conntrack --ctstate NEW -m set --match-set nfknock-q3-s22-v4 src,src,dst -j ACCEPT",
        f"-A {CHAIN} -p tcp -m tcp --dport 22 -j DROP",
        f"-A {CHAIN} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        # The first step goes to the kernel's set (the granted still reach the daemon) ...
        f"-A {CHAIN} -p tcp -m tcp --dport 40000 -m set --match-set nfknock-q3-v4 src -j SET --add-set nfknock-q3-recent-v4 src --exist --timeout 3",
        f"-A {CHAIN} -p tcp -m tcp --dport 40000 -m set --match-set nfknock-q3-v4 src -j NFQUEUE --queue-num 3",
        f"-A {CHAIN} -p tcp -m tcp --dport 40000 --tcp-flags SYN,ACK SYN -j SET --add-set nfknock-q3-tcp40000-v4 src --exist --timeout 15",
        f"-A {CHAIN} -p tcp -m tcp --dport 40000 -j DROP",
        # ... and only the second step of a source in that set reaches the daemon, marked.
        f"-A {CHAIN} -p udp -m udp --dport 50000 -j MARK --set-xmark 0x0/0x1e000000",
        f"-A {CHAIN} -p udp -m udp --dport 50000 -m set --match-set nfknock-q3-tcp40000-v4 src -j MARK --set-xmark 0x10000000/0x10000000",
        f"-A {CHAIN} -p udp -m udp --dport 50000 -m mark --mark 0x10000000/0x10000000 -j SET --del-set nfknock-q3-tcp40000-v4 src",
        # every queued knock notes its source as recent first
        f"-A {CHAIN} -p udp -m udp --dport 50000 -m mark --mark 0x10000000/0x10000000 -j SET --add-set nfknock-q3-recent-v4 src --exist --timeout 3",
        f"-A {CHAIN} -p udp -m udp --dport 50000 -m mark --mark 0x10000000/0x10000000 -j NFQUEUE --queue-num 3",
        f"-A {CHAIN} -p udp -m udp --dport 50000 -m set --match-set nfknock-q3-v4 src -j SET --add-set nfknock-q3-recent-v4 src --exist --timeout 3",
        f"-A {CHAIN} -p udp -m udp --dport 50000 -m set --match-set nfknock-q3-v4 src -j NFQUEUE --queue-num 3",
        f"-A {CHAIN} -p udp -m udp --dport 50000 -j DROP",
    ]


def test_tripwires_are_queued_and_marked_packets_return_first():
    # 40000 is also another door's later step: the kernel does not record the first step of d
    doors = (
        door(sequence=[40000, 40010, "50000/udp"], tripwire=8),
        door(name="e", sequence=[1000, 2000, 40000], tripwire=0, protect=["23/tcp"]),
    )
    plan = fresh_scaffolding(doors, 3)
    assert plan[:2] == [RuleSpec("RETURN", in_interface="lo"), RuleSpec("RETURN", mark=PASS_MARK)]
    assert [str(s) for s in plan if s.target == "NFQUEUE" and isinstance(s.dport, tuple)] == [
        f"-A {CHAIN} -p tcp -m tcp --dport 39992:40018 --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate NEW -j NFQUEUE --queue-num 3",
        f"-A {CHAIN} -p udp -m udp --dport 49992:50008 -m conntrack --ctstate NEW -j NFQUEUE --queue-num 3",
    ]


def test_tripwire_ranges_stay_within_port_numbers():
    (first, last) = door(sequence=[2, 65534], tripwire=16).tripwire_ranges
    assert first == ("tcp", 1, 18) and last == ("tcp", 65518, 65535)


def test_no_rule_bypasses_the_queue_and_none_names_a_client():
    plan = fresh_scaffolding((door(), door(name="e", sequence=[1, 2], protect=["53/udp"])), 0)
    for spec in plan:
        assert "bypass" not in str(spec)
        assert " -s " not in str(spec)


def test_udp_protected_port_queues_every_new_flow():
    plan = fresh_scaffolding((door(protect=["53/udp"], tripwire=0),), 0, family=6)
    assert plan[1:6] == [
        RuleSpec("ACCEPT", "udp", 53, ctstate="RELATED,ESTABLISHED"),
        RuleSpec("NFQUEUE", "udp", 53, ctstate="NEW", queue_num=1, match_set="nfknock-q0-v6"),
        RuleSpec(
            "NFQUEUE", "udp", 53, ctstate="NEW", queue_num=0, match_set="nfknock-q0-recent-v6", limit=("100/sec", 200)
        ),
        RuleSpec("NFQUEUE", "udp", 53, ctstate="NEW", queue_num=0, limit=("100/sec", 200)),
        RuleSpec("DROP", "udp", 53),
    ]


def test_granted_sources_go_to_their_own_queue_and_strangers_are_limited_before_the_queue():
    """A flood of strangers can fill the main queue only up to the limit; a granted source's
    new connection goes to the grant queue. Neither rule accepts: the daemon decides both."""
    plan = fresh_scaffolding((door(protect=["22/tcp", "2222/tcp"]),), 5)
    for port in (22, 2222):
        queued = [s for s in plan if s.dport == port and s.target == "NFQUEUE"]
        assert [(s.queue_num, s.match_set, s.limit) for s in queued] == [
            (6, "nfknock-q5-v4", None),
            (5, "nfknock-q5-recent-v4", ("100/sec", 200)),
            (5, None, ("100/sec", 200)),
        ]
    # The only ACCEPT with a set is the mid-stream one, for the host's own sessions (sessions.py).
    assert [s.match_set for s in plan if s.target == "ACCEPT" and (s.match_set or s.limit)] == [
        "nfknock-q5-s22-v4",
        "nfknock-q5-s2222-v4",
    ]


def test_shared_ports_appear_once():
    a = door(name="a", sequence=[1, 2], close_sequence=[2, 1])
    b = door(name="b", sequence=[2, 3], protect=["22/tcp"])
    plan = fresh_scaffolding((a, b), 0)
    assert sum(1 for s in plan if s.dport == 2 and s.target == "NFQUEUE") == 1
    assert sum(1 for s in plan if s.dport == 22 and s.target == "DROP") == 1
    assert sum(1 for s in plan if s.target == "RETURN" and s.mark) == 1
    assert sum(1 for s in plan if s.target == "RETURN" and s.ctstate) == 1


def test_plan_covers_the_families_each_door_listens_on():

    v4 = door(name="v4", family="ipv4", sequence=[1000, 2000], protect=["22/tcp"], tripwire=0)
    v6 = door(name="v6", family="ipv6", sequence=[3000, 4000], protect=["2222/tcp"], tripwire=0)
    both = fresh_plan((v4, v6), 0)
    # Knocks are queued where the door listens; both protected ports are closed in both families.
    assert {s.dport for s in both[4]} - {None} == {22, 2222, 1000, 2000}
    assert {s.dport for s in both[6]} - {None} == {22, 2222, 3000, 4000}
    assert not [s for s in both[4] if s.dport == 2222 and s.target == "NFQUEUE"]
    assert not [s for s in both[6] if s.dport == 22 and s.target == "NFQUEUE"]
    # No IPv6 door: the IPv6 chain only closes the protected port (a service on :: answers IPv6).
    assert [str(s) for s in fresh_plan((v4,), 0)[6]] == [
        f"-A {CHAIN} -i lo -j RETURN",
        f"-A {CHAIN} -p tcp -m tcp --dport 22 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        f"-A {CHAIN} -p tcp -m tcp --dport 22 --tcp-flags SYN,ACK ACK -m conntrack --ctstate NEW -m set --match-set nfknock-q0-s22-v6 src,src,dst -j MARK --set-xmark 0x20000000/0x20000000",
        f"-A {CHAIN} -p tcp -m tcp --dport 22 --tcp-flags SYN,ACK ACK -m conntrack --ctstate NEW -m set --match-set nfknock-q0-s22-v6 src,src,dst -j ACCEPT",
        f"-A {CHAIN} -p tcp -m tcp --dport 22 -j DROP",
    ]


def test_a_port_protected_in_one_family_and_listened_for_in_the_other_is_queued_where_it_listens():

    v4 = door(name="v4", family="ipv4", sequence=[1000, 2000], protect=["22/tcp"], tripwire=0)
    v6 = door(name="v6", family="ipv6", sequence=[3000, 4000], protect=["22/tcp"], tripwire=0)
    for family, specs in fresh_plan((v4, v6), 0).items():
        at_22 = [s for s in specs if s.dport == 22]
        assert [s.target for s in at_22] == ["ACCEPT", "NFQUEUE", "NFQUEUE", "NFQUEUE", "MARK", "ACCEPT", "DROP"], (
            family
        )


def test_nft_restore_script_replaces_chain_and_jumps_in_one_transaction():
    from nfknock.firewall.nft import restore_script

    specs = fresh_scaffolding((door(tripwire=0),), 3)
    jumps = [f"-A INPUT -j {CHAIN}", f"-A INPUT -i eth1 -j {CHAIN}"]
    script = restore_script(specs, jumps, chain_exists=True, interface="eth0").splitlines()
    assert script[:4] == ["*filter", f":{CHAIN} - [0:0]", f"-D INPUT -j {CHAIN}", f"-D INPUT -i eth1 -j {CHAIN}"]
    assert script[4:-2] == [str(s) for s in specs]
    assert script[-2:] == [f"-I INPUT 1 -i eth0 -j {CHAIN}", "COMMIT"]
    assert restore_script(None, jumps[:1], True).splitlines() == [
        "*filter",
        f"-D INPUT -j {CHAIN}",
        f"-F {CHAIN}",
        f"-X {CHAIN}",
        "COMMIT",
    ]


def test_established_traffic_on_knock_ports_returns_before_any_knock_rule(monkeypatch):
    """The host's own connections may use a knock port as their local port (40000-60000 are in
    Linux's ephemeral range): their replies are not ours to queue or drop."""
    import base64

    from nfknock.doors.rules import SpaDoor
    from nfknock.doors.spa import generate_keys

    encryption, mac = generate_keys()
    monkeypatch.setenv("T_KEY_BASE64", encryption)
    monkeypatch.setenv("T_HMAC_KEY_BASE64", mac)
    monkeypatch.setenv("T_SECRET", base64.b64encode(b"s" * 32).decode())
    spa = SpaDoor.model_validate(dict(kind="spa", name="s", keys_env="T", protect=["2222/tcp"]))
    rotating = door(name="r", sequence=None, rotate={"secret_env": "T_SECRET", "proto": "udp"}, protect=["23/tcp"])
    for specs in (fresh_scaffolding((door(tripwire=8), rotating, spa), 0), fresh_scaffolding((door(tripwire=0),), 0)):
        returns = [i for i, s in enumerate(specs) if s == RuleSpec("RETURN", ctstate="RELATED,ESTABLISHED")]
        assert len(returns) == 1
        (cut,) = returns
        # Protected ports keep accepting their established traffic first ...
        assert all(s.dport in (22, 23, 2222) or s.mark or s.in_interface == "lo" for s in specs[:cut])
        # ... and every knock, range, SPA and tripwire rule comes after the cut.
        assert specs[cut + 1 :] and all(
            s.target in ("NFQUEUE", "SET", "MARK", "DROP") and s.dport not in (22, 23, 2222) for s in specs[cut + 1 :]
        )


def test_no_knock_rules_means_no_established_return():
    assert fresh_scaffolding((), 0) == []


class FakeIptablesNft:
    """A stand-in for subprocess.run: answers `-S` as a host with our chain in both families, and
    fails the restore of the families named in `fail` with (returncode, stderr)."""

    INSTALLED = f"-P INPUT ACCEPT\n-N {CHAIN}\n-A INPUT -j {CHAIN}\n-A {CHAIN} -p tcp -m tcp --dport 40000 -j DROP\n"

    def __init__(self, fail=None):
        self.fail = fail or {}
        self.calls = []

    def __call__(self, argv, input=None, **kwargs):
        import subprocess

        self.calls.append((argv, input))
        tool = argv[0]
        if tool.endswith("-restore"):
            returncode, stderr = self.fail.get(tool, (0, ""))
            return subprocess.CompletedProcess(argv, returncode, "", stderr)
        chain = argv[2] if len(argv) > 2 else None
        lines = [
            line
            for line in self.INSTALLED.splitlines()
            if chain is None or line.startswith(f"-A {chain} ") or line.startswith(f"-P {chain} ")
        ]
        return subprocess.CompletedProcess(argv, 0, "\n".join(lines) + "\n", "")

    def restores(self):
        return [argv[0] for argv, _ in self.calls if argv[0].endswith("-restore")]


LEGACY_WARNING = "# Warning: iptables-legacy tables present, use iptables-legacy to see them\n"


def test_nft_errors_say_the_signal_that_killed_the_tool():
    import pytest

    from nfknock.errors import FirewallError
    from nfknock.firewall.nft import NftFirewall

    fake = FakeIptablesNft({"iptables-nft-restore": (-15, LEGACY_WARNING)})
    with pytest.raises(FirewallError) as info:
        NftFirewall(runner=fake).apply({4: fresh_scaffolding((door(),), 0)})
    assert str(info.value).startswith("iptables-nft-restore was killed by signal 15 (SIGTERM)")


def test_nft_errors_say_the_exit_status_and_what_the_tool_said():
    import pytest

    from nfknock.errors import FirewallError
    from nfknock.firewall.nft import NftFirewall

    fake = FakeIptablesNft({"iptables-nft-restore": (4, "iptables-nft-restore: line 3 failed\n")})
    with pytest.raises(FirewallError) as info:
        NftFirewall(runner=fake).apply({4: fresh_scaffolding((door(),), 0)})
    assert str(info.value) == "iptables-nft-restore exited with status 4: iptables-nft-restore: line 3 failed"
    fake = FakeIptablesNft({"iptables-nft-restore": (1, "")})
    with pytest.raises(FirewallError, match="^iptables-nft-restore exited with status 1$"):
        NftFirewall(runner=fake).apply({4: fresh_scaffolding((door(),), 0)})


def test_nft_tool_that_cannot_start_or_hangs_is_named():
    import subprocess

    import pytest

    from nfknock.errors import FirewallError
    from nfknock.firewall.nft import NftFirewall

    def missing(argv, **kwargs):
        raise FileNotFoundError(2, "No such file or directory")

    def hangs(argv, **kwargs):
        raise subprocess.TimeoutExpired(argv, kwargs["timeout"])

    with pytest.raises(FirewallError, match="^iptables-nft: cannot run: No such file or directory$"):
        NftFirewall(runner=missing).installed()
    with pytest.raises(FirewallError, match="^iptables-nft did not finish within 30 s$"):
        NftFirewall(runner=hangs).installed()


def test_remove_tries_both_families_and_reports_every_failure():
    import pytest

    from nfknock.errors import FirewallError
    from nfknock.firewall.nft import NftFirewall

    fake = FakeIptablesNft({"iptables-nft-restore": (-9, "")})
    with pytest.raises(FirewallError) as info:
        NftFirewall(runner=fake).remove()
    assert fake.restores() == ["iptables-nft-restore", "ip6tables-nft-restore"]  # IPv6 still went
    assert str(info.value) == "nft rules not removed: IPv4: iptables-nft-restore was killed by signal 9 (SIGKILL)"
    ipv6_script = [stdin for argv, stdin in fake.calls if argv[0] == "ip6tables-nft-restore"][0]
    assert ipv6_script.splitlines() == ["*filter", f"-D INPUT -j {CHAIN}", f"-F {CHAIN}", f"-X {CHAIN}", "COMMIT"]

    fake = FakeIptablesNft({"iptables-nft-restore": (1, "a\n"), "ip6tables-nft-restore": (2, "b\n")})
    with pytest.raises(FirewallError) as info:
        NftFirewall(runner=fake).remove()
    assert str(info.value) == (
        "nft rules not removed: IPv4: iptables-nft-restore exited with status 1: a; "
        "IPv6: ip6tables-nft-restore exited with status 2: b"
    )
    assert str(info.value).count("\n") == 0  # one line, for the log and the CLI

    fake = FakeIptablesNft()
    assert NftFirewall(runner=fake).remove() is True
    assert fake.restores() == ["iptables-nft-restore", "ip6tables-nft-restore"]


def test_the_pass_mark_bit_is_the_one_chosen():
    from nfknock.firewall.plan import parse_pass_mark

    chosen = fresh_plan((door(tripwire=8),), 0, pass_mark=0x100)
    for family in (4, 6):
        assert str(chosen[family][1]) == f"-A {CHAIN} -m mark --mark 0x100/0x100 -j RETURN"
    assert fresh_plan((door(tripwire=8),), 0)[4][1].mark == PASS_MARK == 0x20000000
    assert parse_pass_mark("0x80000000") == 1 << 31 and parse_pass_mark("256") == 0x100
    for bad in ("0x3", "0", "0x100000000", "x"):
        try:
            parse_pass_mark(bad)
        except ValueError as exc:
            assert "single bit" in str(exc)
        else:
            raise AssertionError(bad)


def test_auto_means_nft_only_when_the_hosts_iptables_is_nf_tables(monkeypatch):
    import pytest

    from nfknock import firewall
    from nfknock.firewall import resolve_flavour

    assert resolve_flavour("auto", lambda: "nf_tables") == "nft"
    assert resolve_flavour("auto", lambda: "legacy") == "legacy"
    assert resolve_flavour("auto", lambda: None) == "legacy"  # no iptables command
    assert resolve_flavour("legacy", lambda: "nf_tables") == "legacy"
    assert resolve_flavour("nft", lambda: None) == "nft"
    monkeypatch.setattr(firewall, "iptables_flavour", lambda: "nf_tables")
    assert resolve_flavour("auto") == "nft" and firewall.make_firewall("auto").name == "nft"
    with pytest.raises(ValueError, match="unknown firewall 'pf'"):
        resolve_flavour("pf")


def test_one_worker_is_the_plan_of_a_single_process():

    doors = (door(tripwire=8), door(name="e", sequence=[1, 2, 3], protect=["53/udp"], tripwire=0))
    assert fresh_plan(doors, 7, workers=1) == fresh_plan(doors, 7)
    assert not any(spec.u32 for specs in fresh_plan(doors, 7).values() for spec in specs)


def test_two_workers_get_each_queue_rule_once_with_disjoint_ranges_and_their_queues():
    from dataclasses import replace

    from nfknock.firewall.shards import u32_match

    doors = (door(tripwire=8), door(name="e", sequence=[1, "2/udp", 3], protect=["53/udp"], tripwire=0))
    single, double = fresh_plan(doors, 60), fresh_plan(doors, 60, workers=2)
    for family in (4, 6):
        expanded = []
        for spec in single[family]:
            if spec.target != "NFQUEUE":
                expanded.append(spec)  # everything else as it was, in the same place
                continue
            grant = spec.queue_num == 61
            assert spec.queue_num in (60, 61)
            expanded += [
                replace(spec, u32=u32_match(family, 0, 127), queue_num=61 if grant else 60),
                replace(spec, u32=u32_match(family, 128, 255), queue_num=63 if grant else 62),
            ]
        assert double[family] == expanded
        queued = [s for s in double[family] if s.target == "NFQUEUE"]
        assert len(queued) == 2 * sum(1 for s in single[family] if s.target == "NFQUEUE") > 0
        assert {s.queue_num for s in queued} == {60, 61, 62, 63}
        # Set names are the daemon's, whatever the number of workers.
        names = {s.match_set for s in double[family]} | {s.add_set for s in double[family]}
        assert names == {s.match_set for s in single[family]} | {s.add_set for s in single[family]}


def test_a_worker_rule_tests_the_source_before_its_limit():
    """The limit spends a token on every packet that reaches it: after the u32 match, only
    packets of that worker's sources do, so each worker has a bucket of its own."""

    limited = [s for s in fresh_plan((door(tripwire=0),), 60, workers=2)[6] if s.limit and not s.match_set]
    assert [str(s) for s in limited] == [
        f"-A {CHAIN} -p tcp -m tcp --dport 22 --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate NEW "
        f'-m u32 --u32 "0x14&0xff={span}" -m limit --limit 100/sec --limit-burst 200 -j NFQUEUE --queue-num {queue}'
        for span, queue in (("0x0:0x7f", 60), ("0x80:0xff", 62))
    ]
    granted = [str(s) for s in fresh_plan((door(tripwire=0),), 60, workers=2)[4] if s.match_set and s.dport == 22]
    assert granted[1] == (
        f"-A {CHAIN} -p tcp -m tcp --dport 22 --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate NEW "
        '-m set --match-set nfknock-q60-v4 src -m u32 --u32 "0xc&0xff=0x80:0xff" -j NFQUEUE --queue-num 63'
    )


def test_sixteen_workers_use_thirty_two_queues_and_a_bad_number_is_refused():
    import pytest

    queued = [s for s in fresh_plan((door(tripwire=0),), 100, workers=16)[4] if s.target == "NFQUEUE"]
    assert sorted({s.queue_num for s in queued}) == list(range(100, 132))
    for workers in (0, 17):
        with pytest.raises(ValueError, match="workers must be 1 to 16"):
            fresh_plan((door(),), 0, workers=workers)


def test_nft_restore_script_carries_the_u32_rules_as_iptables_prints_them():
    from nfknock.firewall.nft import restore_script

    specs = fresh_plan((door(tripwire=0),), 60, workers=2)[4]
    script = restore_script(specs, [], chain_exists=False).splitlines()
    assert (
        f'-A {CHAIN} -p tcp -m tcp --dport 40000 -m set --match-set nfknock-q60-v4 src -m u32 --u32 "0xc&0xff=0x0:0x7f" -j NFQUEUE --queue-num 60'
        in script
    )


class FakeMatch:
    def __init__(self, name, params):
        self.name, self.params = name, params

    def get_all_parameters(self):
        return self.params


class FakeRule:
    """A python-iptables rule as `_spec_of` reads it: what iptc returned for a real u32 rule."""

    def __init__(self, protocol, matches, target, target_params):
        self.protocol, self.matches = protocol, [FakeMatch(*m) for m in matches]
        self.in_interface = None
        self.target = FakeMatch(target, target_params)


def test_legacy_reads_a_u32_rule_back_as_the_plan_wrote_it():
    from nfknock.firewall.legacy import _spec_of
    from nfknock.firewall.shards import u32_match

    rule = FakeRule(
        "tcp",
        [
            ("tcp", {"dport": ["22"], "tcp-flags": ["FIN,SYN,RST,ACK", "SYN"]}),
            ("conntrack", {"ctstate": ["NEW"]}),
            ("u32", {"u32": ["0x14&0xff=0x80:0xff"]}),  # shlex has taken the quotes off
            ("limit", {"limit": ["100/sec"], "limit-burst": ["200"]}),
        ],
        "NFQUEUE",
        {"queue-num": ["62"]},
    )
    assert _spec_of(rule) == RuleSpec(
        "NFQUEUE",
        "tcp",
        22,
        ctstate="NEW",
        queue_num=62,
        tcp_flags=("FIN,SYN,RST,ACK", "SYN"),
        limit=("100/sec", 200),
        u32=u32_match(6, 128, 255),
    )


def test_a_u32_rule_is_written_as_iptables_prints_it():
    """Quoted, and before the limit: iptables -S shows matches in the order they were given."""
    from nfknock.firewall.shards import u32_match

    spec = RuleSpec("NFQUEUE", "udp", 53, ctstate="NEW", queue_num=0, limit=("100/sec", 200), u32=u32_match(4, 0, 127))
    assert str(spec) == (
        f"-A {CHAIN} -p udp -m udp --dport 53 -m conntrack --ctstate NEW "
        '-m u32 --u32 "0xc&0xff=0x0:0x7f" -m limit --limit 100/sec --limit-burst 200 -j NFQUEUE --queue-num 0'
    )


def test_legacy_interface_match_compares_whole_names_in_both_families():
    """python-iptables writes IPv6 interface masks as 0x01 bytes: the kernel then compares only
    the lowest bit of each character, and `-i lo` matched veth interfaces too. Our rules carry
    the mask iptables itself writes."""
    import pytest

    iptc = pytest.importorskip("iptc")
    from nfknock.firewall.legacy import set_in_interface

    for rule, entry in ((iptc.Rule(), "ip"), (iptc.Rule6(), "ipv6")):
        set_in_interface(rule, "lo")
        mask = bytes(getattr(rule.entry, entry).iniface_mask)
        assert mask == b"\xff" * 3, entry  # "lo" and its NUL (ctypes stops at the first zero byte)
        assert rule.in_interface == "lo"


def test_a_chain_of_the_other_flavour_is_named_with_its_queues_and_the_command_that_removes_it():
    from nfknock.firewall.host import other_flavour_chain, spans

    chain = {
        4: [
            "-A NFKNOCK -p tcp -m tcp --dport 22 -j NFQUEUE --queue-num 8",
            "-A NFKNOCK -p tcp -j NFQUEUE --queue-num 7",
        ],
        6: [],
    }
    nobody = other_flavour_chain("legacy", chain, ours={20, 21}, listened={20, 21})
    assert nobody is not None
    assert nobody.startswith("the legacy tables still hold an NFKNOCK chain (IPv4) that sends packets to queues 7-8")
    assert "no process listens on 7-8" in nobody and "never reach this daemon (queues 20-21)" in nobody
    assert nobody.endswith(
        "remove it with 'nfknock down --firewall legacy' (it leaves the other flavour's rules alone)"
    )
    shared = other_flavour_chain("legacy", chain, ours={7, 8}, listened={7, 8})
    assert "which this daemon binds too" in shared and "no process listens" not in shared
    another = other_flavour_chain("nft", chain, ours={20, 21}, listened={7, 8, 20, 21})
    assert "another process listens on 7-8" in another and "nfknock down --firewall nft" in another
    assert other_flavour_chain("legacy", {4: [], 6: []}, ours={0, 1}, listened=set()) is None
    assert spans([9, 7, 8, 20, 10, 22]) == "7-10, 20, 22"


def test_every_queued_knock_notes_its_source_as_recent_and_nothing_else_does():
    """The recent set lets a client's SYN right behind its last knock or SPA packet past a SYN
    flood at the protected port: so exactly what is queued as a knock (not a first step the
    kernel records, not a tripwire hit) notes its source, with the same match, right before."""
    plan = fresh_scaffolding((door(sequence=[40000, 41000, "50000/udp"], tripwire=4),), 0)
    for i, spec in enumerate(plan):
        noting = spec.add_set is not None and spec.add_set[0] == "nfknock-q0-recent-v4"
        if spec.target == "NFQUEUE" and spec.dport in (41000, 50000):
            assert plan[i - 1] == RuleSpec(
                **{**vars(spec), "target": "SET", "queue_num": None, "add_set": ("nfknock-q0-recent-v4", 3)}
            )
        if noting:
            assert plan[i + 1].target == "NFQUEUE" and plan[i + 1].dport == spec.dport
            assert not isinstance(spec.dport, tuple)  # never a tripwire range
    first = [s for s in plan if s.dport == 40000 and s.add_set and "recent" in s.add_set[0]]
    assert [s.match_set for s in first] == ["nfknock-q0-v4"]  # only a granted source's knock there


# -- the codecs: one for the first-step mark bits, one for set names -------------------------------

PASS_MARKS = st.integers(0, 31).map(lambda shift: 1 << shift)


@given(PASS_MARKS, st.integers(0, MARK_BITS - 1))
def test_a_mark_bit_round_trips_through_its_value(pass_mark, bit):
    marks = MarkBits(pass_mark)
    value = marks.value(bit)
    assert marks.bit(value) == bit
    assert value & (value - 1) == 0 and value & pass_mark == 0  # one bit, never the pass mark
    assert 0 < value < 1 << 32 and marks.field & value  # within the packet mark, in the field


@given(PASS_MARKS, st.integers(0, (1 << 32) - 1))
def test_a_mark_value_round_trips_or_is_not_a_first_step_mark(pass_mark, value):
    marks = MarkBits(pass_mark)
    bit = marks.bit(value)
    assert (bit is None) == (value not in marks.values)
    if bit is not None:
        assert marks.value(bit) == value


def test_a_bit_index_outside_the_field_is_refused():
    with pytest.raises(ValueError, match="0..3"):
        MarkBits().value(MARK_BITS)


KEYED = st.tuples(st.sampled_from(["tcp", "udp"]), st.integers(0, 65535))
SET_NAMES = st.one_of(
    st.builds(SetName, st.just("granted"), st.integers(0, 65535), st.sampled_from([4, 6])),
    st.builds(SetName, st.just("recent"), st.integers(0, 65535), st.sampled_from([4, 6])),
    st.builds(SetName, st.just("first-step"), st.integers(0, 65535), st.sampled_from([4, 6]), KEYED),
    st.builds(
        SetName, st.just("sessions"), st.integers(0, 65535), st.sampled_from([4, 6]), KEYED.map(lambda k: ("tcp", k[1]))
    ),
)


@given(SET_NAMES)
def test_a_set_name_round_trips_through_its_fields(name):
    text = str(name)
    assert SetName.parse(text) == name
    assert text.startswith(f"{SET_PREFIX}q{name.queue_num}-") and len(text) <= 31  # ipset's limit


@given(st.from_regex(r"nfknock-q[0-9]{1,6}-((tcp|udp|s)[0-9]{1,6}-|recent-)?v[0-9]", fullmatch=True) | st.text())
def test_a_name_that_parses_has_exactly_that_spelling(text):
    """Text round trip: whatever parses prints back as itself, so no two names mean one set."""
    parsed = SetName.parse(text)
    if parsed is not None:
        assert str(parsed) == text


def test_the_plans_set_names_are_the_codecs():
    names = {
        name
        for specs in fresh_plan((door(protect=["22/tcp"], tripwire=0),), 7).values()
        for spec in specs
        for name in (spec.match_set, spec.add_set and spec.add_set[0], spec.del_set)
        if name
    }
    assert {(n.kind, n.family, n.key) for n in map(SetName.parse, names) if n is not None and n.queue_num == 7} == {
        ("granted", 4, None),
        ("granted", 6, None),
        ("recent", 4, None),
        ("recent", 6, None),
        ("sessions", 4, ("tcp", 22)),
        ("sessions", 6, ("tcp", 22)),
        ("first-step", 4, ("tcp", 40000)),
        ("first-step", 6, ("tcp", 40000)),
    }
    assert len(names) == 8
    assert SetName.parse("nfknock-q7-tcp040000-v4") is None  # not a spelling nfknock writes
    assert SetName.parse("nfknock-q7-tcp70000-v4") is None  # no such port
    assert SetName.parse("f2b-sshd") is None  # another program's set
