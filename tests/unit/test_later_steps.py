"""Which later steps and tripwire ports the kernel keeps strangers away from (later_steps.py),
and the rules that do it (plan.py). No root needed."""

from dataclasses import replace

import pytest

from nfknock.doors.later_steps import LaterSteps, decide, rotating_doors_in_kernel
from nfknock.doors.rules import parse_door
from nfknock.firewall.plan import RECENT_LIMIT, TRIPWIRE_LIMIT, MarkBits, RuleSpec, SetName, iptables_flags, midway_set
from support.decisions import fresh, fresh_plan, fresh_scaffolding


def door(**fields):
    base = dict(name="d", sequence=[40000, 50000, 60000], protect=["22/tcp"], tripwire=0)
    base.update(fields)
    return parse_door({key: value for key, value in base.items() if value is not None})


def gated(doors, family=4) -> LaterSteps:
    return decide(tuple(doors), fresh(doors), family)


def rules_for(doors, port, queue_num=0, family=4):
    return [
        spec
        for spec in fresh_scaffolding(tuple(d for d in doors if family in d.families), queue_num, family=family)
        if spec.dport == port and spec.target in ("NFQUEUE", "DROP")
    ]


def test_a_stranger_at_a_later_step_of_a_kernel_door_is_dropped_by_the_kernel():
    assert rules_for([door()], 60000) == [
        RuleSpec("NFQUEUE", "tcp", 60000, queue_num=0, match_set="nfknock-q0-v4"),
        RuleSpec("NFQUEUE", "tcp", 60000, queue_num=0, match_set="nfknock-q0-midway-v4"),
        RuleSpec("NFQUEUE", "tcp", 60000, queue_num=0, match_set="nfknock-q0-recent-v4", limit=RECENT_LIMIT),
        RuleSpec("DROP", "tcp", 60000),
    ]


def test_the_kernel_itself_enters_a_source_into_the_midway_set_on_its_marked_second_step():
    at_second = [spec for spec in fresh_scaffolding((door(seq_timeout="7.5s"),), 0) if spec.dport == 50000]
    entering = [spec for spec in at_second if spec.add_set == ("nfknock-q0-midway-v4", 8)]
    assert len(entering) == 1 and entering[0].mark == 0x10000000  # only the marked packet
    # before the packet is queued: no race with a third knock right behind it
    queued = next(i for i, spec in enumerate(at_second) if spec.target == "NFQUEUE" and spec.mark)
    assert at_second.index(entering[0]) < queued


def test_a_two_step_door_has_no_later_step_and_feeds_no_midway_set():
    plan = fresh_scaffolding((door(sequence=[40000, 50000]),), 0)
    assert not any(spec.add_set and "midway" in spec.add_set[0] for spec in plan)


def test_close_steps_after_the_second_are_gated_too():
    # 60000, 50000, 40000 closes: 60000 is a later step and the close sequence's first
    assert gated([door(close_sequence=[60000, 50000, 40000])]).ports == (("tcp", 60000),)
    assert gated([door(sequence=[40000, 50000, 60000, 61000])]).ports == (("tcp", 60000), ("tcp", 61000))


# f's tripwire range covers 1000, so e (first step 1000) is a door whose first step the daemon decides
DAEMON_E = [
    dict(name="e", sequence=[1000, 2000, 60000]),
    dict(name="f", sequence=[1010, 5000], tripwire=16, protect=["24/tcp"]),
]


@pytest.mark.parametrize(
    "others",
    [
        [dict(name="e", sequence=[60000, 3000])],  # another door's first step
        DAEMON_E,  # a later step of a door the daemon serves
        [dict(name="e", sequence=[59990, 3000], tripwire=16)],  # another door's tripwire range
        [dict(name="e", sequence=[1000, 2000], protect=["60000/tcp"])],  # another door's protected port
        [dict(name="e", sequence=None, rotate={"secret_env": "S", "ports": "59000-61000"})],  # a rotating range
    ],
)
def test_a_port_another_door_needs_queued_for_everyone_stays_queued(others, monkeypatch):
    monkeypatch.setenv("S", "secret")
    doors = [door(), *(door(**{"protect": ["23/tcp"], **other}) for other in others)]
    assert "d" in {name for group in fresh(doors).groups for name in group.doors}  # d's first step: the kernel's
    assert ("tcp", 60000) not in gated(doors).ports
    assert not any(
        spec.match_set == "nfknock-q0-midway-v4" and spec.dport == 60000 for spec in fresh_scaffolding(tuple(doors), 0)
    )


def test_a_later_step_shared_by_two_kernel_doors_is_gated():
    doors = [door(), door(name="e", sequence=[1000, 2000, 60000], protect=["23/tcp"])]
    assert gated(doors).ports == (("tcp", 60000),)


def test_a_door_whose_first_step_the_daemon_decides_is_not_gated():
    # its first port is another door's second step: both doors' first steps are the daemon's
    doors = [door(), door(name="e", sequence=[1000, 40000], protect=["23/tcp"])]
    assert fresh(doors).groups == ()
    assert gated(doors) == LaterSteps()
    assert RuleSpec("NFQUEUE", "tcp", 60000, queue_num=0) in rules_for(doors, 60000)


def test_tripwires_of_kernel_doors_queue_sources_mid_attempt_and_a_bucket_of_strangers_and_never_drop():
    specs = rules_for([door(tripwire=4)], (59996, 60004))
    hit = RuleSpec("NFQUEUE", "tcp", (59996, 60004), ctstate="NEW", queue_num=0, tcp_flags=("FIN,SYN,RST,ACK", "SYN"))
    assert specs == [
        RuleSpec(**{**hit.__dict__, "match_set": "nfknock-q0-v4"}),
        RuleSpec(**{**hit.__dict__, "match_set": "nfknock-q0-midway-v4"}),
        RuleSpec(**{**hit.__dict__, "match_set": "nfknock-q0-recent-v4", "limit": RECENT_LIMIT}),
        RuleSpec(**{**hit.__dict__, "limit": TRIPWIRE_LIMIT}),
    ]


def test_a_tripwire_range_shared_with_a_daemon_door_stays_queued_for_everyone():
    # e's first step is the daemon's (its 1-step door), and its range is d's range around 60000
    doors = [door(tripwire=4), door(name="e", sequence=[60000], tripwire=4, protect=["23/tcp"])]
    assert ("tcp", 59996, 60004) not in gated(doors).tripwires


def test_each_family_gates_only_its_own_kernel_doors():
    v6 = door(family="ipv6")
    assert gated([v6], 4) == LaterSteps()
    assert gated([v6], 6).ports == (("tcp", 60000),)
    assert rules_for([v6], 60000, family=6)[1].match_set == "nfknock-q0-midway-v6"


def test_workers_share_the_midway_set_and_each_gets_its_queue():
    plan = fresh_plan((door(),), 0, workers=2)[4]
    at_third = [
        spec
        for spec in plan
        if spec.dport == 60000 and spec.match_set == "nfknock-q0-midway-v4" and spec.target == "NFQUEUE"
    ]
    assert len(at_third) == 2 and len({spec.queue_num for spec in at_third}) == 2
    assert all(spec.u32 for spec in at_third)


def test_the_midway_set_name_round_trips():
    assert midway_set(7, 6) == "nfknock-q7-midway-v6"
    assert SetName.parse("nfknock-q7-midway-v6") == SetName("midway", 7, 6)
    assert SetName.parse("nfknock-q7-midway-v5") is None


def rotating(name="rot", ports="20000-20999", **fields):
    return door(name=name, sequence=None, rotate={"secret_env": "S", "ports": ports}, **fields)


def test_a_rotating_range_queues_its_current_steps_and_sources_mid_attempt_and_drops_the_rest(monkeypatch):
    """Doors sharing a range: their current steps stay queued for everyone (rotating_first_steps)."""
    monkeypatch.setenv("S", "c2VjcmV0")
    doors = [rotating(seq_timeout="9.5s"), rotating(name="rot2", seq_timeout="9.5s")]
    specs = rules_for(doors, (20000, 20999))
    whole = RuleSpec("NFQUEUE", "tcp", (20000, 20999), queue_num=0)
    assert specs == [
        RuleSpec(**{**whole.__dict__, "match_set": "nfknock-q0-v4"}),
        RuleSpec(**{**whole.__dict__, "match_set": "nfknock-q0-rtcp20000-v4", "match_dirs": "dst"}),
        RuleSpec(**{**whole.__dict__, "match_set": "nfknock-q0-midway-v4"}),
        RuleSpec(**{**whole.__dict__, "match_set": "nfknock-q0-recent-v4", "limit": RECENT_LIMIT}),
        RuleSpec("DROP", "tcp", (20000, 20999)),
    ]
    entering = [s for s in fresh_scaffolding(tuple(doors), 0) if s.add_set and "midway" in s.add_set[0]]
    assert [(s.match_set, s.match_dirs, s.add_set) for s in entering] == [
        ("nfknock-q0-rtcp20000-v4", "dst", ("nfknock-q0-midway-v4", 10))
    ]
    assert gated(doors).rotating_first == () and rotating_doors_in_kernel(tuple(doors)) == frozenset()


def test_a_rotating_door_alone_in_its_range_has_its_current_first_steps_recorded_by_the_kernel(monkeypatch):
    """Goal 4 of issue 24: a stranger's knock on a current first step only lands in a set; a
    second or later step is queued, marked, only from a source in it (and spends it)."""
    monkeypatch.setenv("S", "c2VjcmV0")
    doors = (rotating(seq_timeout="9.5s"),)
    span = (20000, 20999)
    noting_recent = ("nfknock-q0-recent-v4", 3)  # before each queue rule (plan._noting_recent)
    specs = [s for s in fresh_scaffolding(doors, 0) if s.dport == span and s.add_set != noting_recent]
    marks = MarkBits()
    mark, started = marks.rotating, "nfknock-q0-tcp20000-v4"
    seconds, firsts = "nfknock-q0-rtcp20000-v4", "nfknock-q0-rftcp20000-v4"
    flags = iptables_flags(doors[0].tcp_flags)  # the door's (a knock client's SYN)
    queue = RuleSpec("NFQUEUE", "tcp", span, queue_num=0)
    assert specs == [
        RuleSpec("MARK", "tcp", span, set_mark=(0, marks.field | mark)),
        replace(queue, match_set="nfknock-q0-v4"),
        RuleSpec("MARK", "tcp", span, match_set=started, set_mark=(mark, mark)),
        RuleSpec("SET", "tcp", span, tcp_flags=flags, del_set=started),
        RuleSpec("SET", "tcp", span, tcp_flags=flags, match_set=firsts, match_dirs="dst", add_set=(started, 10)),
        RuleSpec(
            "SET", "tcp", span, mark=mark, match_set=seconds, match_dirs="dst", add_set=("nfknock-q0-midway-v4", 10)
        ),
        replace(queue, mark=mark, match_set=seconds, match_dirs="dst"),
        RuleSpec("MARK", "tcp", span, set_mark=(0, mark)),
        replace(queue, match_set="nfknock-q0-midway-v4"),
        RuleSpec("DROP", "tcp", span, match_set=firsts, match_dirs="dst"),
        replace(queue, match_set="nfknock-q0-recent-v4", limit=RECENT_LIMIT),
        RuleSpec("DROP", "tcp", span),
    ]
    assert gated(doors).rotating_first == ((("tcp", 20000, 20999), (10, doors[0].tcp_flags)),)
    assert rotating_doors_in_kernel(doors) == {"rot"}
    assert SetName.parse(firsts) == SetName("rotation-first", 0, 4, ("tcp", 20000))
    assert str(SetName.parse("nfknock-q65535-rfudp65535-v6")) == "nfknock-q65535-rfudp65535-v6"


def test_a_rotating_door_in_a_family_where_its_range_is_shared_is_still_in_the_kernel_in_the_other(monkeypatch):
    """The engine takes a marked second step if the kernel may mark it in any family."""
    monkeypatch.setenv("S", "c2VjcmV0")
    doors = (rotating(), rotating(name="rot6", family="ipv6"))
    assert gated([d for d in doors if 4 in d.families]).rotating_first != ()
    assert gated([d for d in doors if 6 in d.families], family=6).rotating_first == ()
    assert rotating_doors_in_kernel(doors) == {"rot"}


def test_the_rotating_mark_is_none_of_the_first_step_bits_nor_the_pass_mark():
    for pass_mark in (0x20000000, 0x80000000, 1, 0x8, 0x10, 0x20, 0x40):
        marks = MarkBits(pass_mark)
        assert 0 < marks.rotating < 1 << 32 and marks.rotating & (marks.rotating - 1) == 0
        assert marks.rotating not in (*marks.values, pass_mark) and marks.bit(marks.rotating) is None
    assert MarkBits().rotating == 0x01000000


@pytest.mark.parametrize(
    "other",
    [
        dict(name="e", sequence=[20500, 3000]),  # a knock door's step inside the range
        dict(name="e", sequence=[1000, 2000], protect=["20500/tcp"]),  # a protected port inside
        dict(name="e", sequence=[19990, 3000], tripwire=16),  # a tripwire range reaching into it
        dict(name="e", sequence=None, rotate={"secret_env": "S", "ports": "20500-21999"}),  # an overlapping range
    ],
)
def test_a_rotating_range_another_door_uses_stays_queued_for_everyone(other, monkeypatch):
    monkeypatch.setenv("S", "c2VjcmV0")
    doors = [rotating(), door(**{"protect": ["23/tcp"], **other})]
    assert ("tcp", 20000, 20999) not in {span for span, _ in gated(doors).rotating}
    assert RuleSpec("NFQUEUE", "tcp", (20000, 20999), queue_num=0) in fresh_scaffolding(tuple(doors), 0)


def test_rotating_doors_of_one_range_share_its_set(monkeypatch):
    monkeypatch.setenv("S", "c2VjcmV0")
    doors = [rotating(), rotating(name="rot2", seq_timeout="30s")]
    assert gated(doors).rotating == ((("tcp", 20000, 20999), 30),)
    assert SetName.parse("nfknock-q0-rtcp20000-v6") == SetName("rotation", 0, 6, ("tcp", 20000))


def test_doors_of_two_steps_name_no_midway_set_nothing_creates():
    plan = fresh_scaffolding((door(sequence=[40000, 50000], tripwire=4),), 0)
    assert not any(
        "midway" in (spec.match_set or "") or (spec.add_set and "midway" in spec.add_set[0]) for spec in plan
    )
    assert any(spec.limit == TRIPWIRE_LIMIT for spec in plan)  # its tripwires are still gated
