"""Which first steps the kernel records (first_steps.py), and how the engine takes the second
step it is then handed (sequence.py phase KERNEL). Time is written into the tests."""

import pytest

from nfknock.doors.engine import Engine, Verdict
from nfknock.doors.events import DoorOpened, KnockAdvanced, SequenceReset
from nfknock.doors.first_steps import GRACE, MARK_BITS, MAX_GROUPS, MarkHistory, decide
from nfknock.doors.packet import Packet
from nfknock.doors.rules import parse_door
from nfknock.firewall.host import marks_installed
from nfknock.firewall.plan import first_step_marks, plan, scaffolding
from support.decisions import fresh, fresh_engine, fresh_scaffolding

ALICE = "10.0.0.2"


def door(**fields):
    base = dict(name="d", sequence=[40000, 50000, 60000], protect=["22/tcp"], tripwire=0)
    base.update(fields)
    return parse_door({key: value for key, value in base.items() if value is not None})


def names(doors):
    return sorted(name for group in fresh(doors).groups for name in group.doors)


def test_a_plain_door_and_its_reverse_close_sequence_qualify():
    (group,) = fresh((door(close_sequence=[60000, 50000, 40000], seq_timeout="7.5s"),)).groups
    assert group.first == ("tcp", 40000) and group.seconds == (("tcp", 50000),)
    assert group.timeout == 8 and group.families == (4, 6)
    assert str(group.tcp_flags) == "syn,!ack"


def test_doors_sharing_a_first_step_share_a_group():
    (group,) = fresh((door(), door(name="e", sequence=[40000, 51000], protect=["23/tcp"]))).groups
    assert group.doors == {"d", "e"} and set(group.seconds) == {("tcp", 50000), ("tcp", 51000)}


@pytest.mark.parametrize(
    "other",
    [
        dict(name="e", sequence=[1000, 40000, 2000]),  # the first port is another door's later step
        dict(name="e", sequence=[1000, 40000, 50000]),  # the second port is another door's third step
        dict(name="e", sequence=[50000, 3000]),  # the second port is another door's first step
        dict(name="e", sequence=[40000]),  # a one-step door on the first port
        dict(name="e", sequence=[40000, 51000], tcp_flags="syn"),  # the group disagrees on flags
        dict(name="e", sequence=[40010, 3000], tripwire=16),  # the first port is a tripwire
    ],
)
def test_a_port_the_kernel_cannot_tell_apart_keeps_the_door_in_the_daemon(other):
    assert "d" not in names([door(), door(protect=["23/tcp"], **other)])


def test_rotating_spa_and_one_step_doors_stay_in_the_daemon(monkeypatch):
    assert names([door(sequence=[40000])]) == []
    assert names([door(sequence=None, rotate={"secret_env": "S", "proto": "udp"})]) == []


def test_groups_are_capped_in_port_order():
    doors = [door(name=f"d{n}", sequence=[10000 + n, 20000 + n], protect=[f"{100 + n}/tcp"]) for n in range(40)]
    groups = fresh(doors).groups
    assert len(groups) == MAX_GROUPS and groups[0].first == ("tcp", 10000)


def knock(port, seen=False, src=ALICE):
    return Packet(src=src, dst="10.0.0.1", proto="tcp", sport=3333, dport=port, flags=0x02, first_seen=seen)


def test_a_marked_second_step_opens_with_the_rest_of_the_sequence():
    engine, now = fresh_engine((door(),)), 100.0
    events = engine.handle(knock(50000, seen=True), now).events
    assert events == (KnockAdvanced(ALICE, "d", "open", 1), KnockAdvanced(ALICE, "d", "open", 2))
    assert isinstance(engine.handle(knock(60000), now + 1).events[0], DoorOpened)
    assert engine.handle(knock(22), now + 2).verdict is Verdict.ACCEPT


def test_an_unmarked_second_step_from_a_stranger_does_nothing():
    engine = fresh_engine((door(),))
    assert engine.handle(knock(50000), 100.0).events == ()
    engine.handle(knock(60000), 101.0)
    assert engine.handle(knock(22), 102.0).verdict is Verdict.DROP


def test_the_mark_means_nothing_on_a_door_the_kernel_does_not_serve():
    engine = fresh_engine((door(), door(name="e", sequence=[1000, 40000, 2000], protect=["23/tcp"])))
    assert engine.handle(knock(50000, seen=True), 100.0).events == ()


def test_the_kernel_forgets_a_first_step_on_any_other_port_of_the_door_before_marking():
    """What would have reset the attempt in the daemon takes the source out of the set, in
    packet order: another knock port of the door (with the door's flags) and its tripwires (not
    its steps), before any knock or tripwire rule can take the packet."""
    specs = [str(s) for s in fresh_scaffolding((door(close_sequence=[60000, 50000, 40000], tripwire=4),), 0)]
    forget = [s for s in specs if "--del-set nfknock-q0-tcp40000-v4" in s and "--mark" not in s]
    assert forget == [
        "-A NFKNOCK -p tcp -m tcp --dport 60000 --tcp-flags SYN,ACK SYN -j SET --del-set nfknock-q0-tcp40000-v4 src",
        *[
            f"-A NFKNOCK -p tcp -m tcp --dport {span} --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate NEW "
            "-j SET --del-set nfknock-q0-tcp40000-v4 src"
            for span in ("39996:39999", "40001:40004", "49996:49999", "50001:50004", "59996:59999", "60001:60004")
        ],
    ]
    first_queue_rule = min(i for i, s in enumerate(specs) if "NFQUEUE" in s and "--dport 22 " not in s)
    assert max(specs.index(rule) for rule in forget) < first_queue_rule


def test_another_doors_overlapping_tripwire_cannot_hide_a_tripwire_port():
    other = door(name="other", sequence=[40030, 45000], protect=["23/tcp"], tripwire=16)
    specs = [str(s) for s in fresh_scaffolding((other, door(tripwire=16)), 0)]
    forgets_40015 = [
        i for i, s in enumerate(specs) if "--del-set nfknock-q0-tcp40000-v4" in s and "--dport 40001:40016" in s
    ]
    queues_40015 = [i for i, s in enumerate(specs) if "--dport 40014:40046" in s and "NFQUEUE" in s]
    assert forgets_40015 and queues_40015 and forgets_40015[0] < queues_40015[0]


def noting_recent(spec):
    """A rule that notes a queued knock's source as recent (firewall/__init__.py, _noting_recent)."""
    return spec.add_set is not None and "-recent-" in spec.add_set[0]


def test_a_second_step_is_marked_only_for_the_set_and_queued_only_when_marked_or_granted():
    specs = [str(s) for s in fresh_scaffolding((door(),), 0) if s.dport == 50000 and not noting_recent(s)]
    assert specs == [
        "-A NFKNOCK -p tcp -m tcp --dport 50000 -j MARK --set-xmark 0x0/0x1e000000",
        "-A NFKNOCK -p tcp -m tcp --dport 50000 -m set --match-set nfknock-q0-tcp40000-v4 src "
        "-j MARK --set-xmark 0x10000000/0x10000000",
        "-A NFKNOCK -p tcp -m tcp --dport 50000 -m mark --mark 0x10000000/0x10000000 "
        "-j SET --del-set nfknock-q0-tcp40000-v4 src",
        # the source is mid-attempt from here on: its third step will be queued (later_steps.py)
        "-A NFKNOCK -p tcp -m tcp --dport 50000 -m mark --mark 0x10000000/0x10000000 "
        "-j SET --add-set nfknock-q0-midway-v4 src --exist --timeout 15",
        "-A NFKNOCK -p tcp -m tcp --dport 50000 -m mark --mark 0x10000000/0x10000000 -j NFQUEUE --queue-num 0",
        "-A NFKNOCK -p tcp -m tcp --dport 50000 -m set --match-set nfknock-q0-v4 src -j NFQUEUE --queue-num 0",
        "-A NFKNOCK -p tcp -m tcp --dport 50000 -j DROP",
    ]


def test_the_first_step_marks_are_the_bits_below_the_pass_mark_or_above_it_when_there_is_no_room():
    assert first_step_marks(0x20000000) == (0x10000000, 0x08000000, 0x04000000, 0x02000000)
    assert first_step_marks(1) == (2, 4, 8, 16) and first_step_marks(0x8) == (0x10, 0x20, 0x40, 0x80)
    assert len(first_step_marks()) == MARK_BITS


def twin(n, first, second=50000, **fields):
    return door(name=f"t{n}", sequence=[first, second, 61000 + n], protect=[f"{2200 + n}/tcp"], **fields)


def test_twins_sharing_a_second_step_each_get_their_own_mark_bit():
    groups = fresh((door(), twin(1, 41000))).groups
    assert [(g.first, g.doors, g.bit) for g in groups] == [
        (("tcp", 40000), {"d"}, 0),
        (("tcp", 41000), {"t1"}, 1),
    ]
    specs = [
        str(s) for s in fresh_scaffolding((door(), twin(1, 41000)), 0) if s.dport == 50000 and not noting_recent(s)
    ]
    assert specs == [
        "-A NFKNOCK -p tcp -m tcp --dport 50000 -j MARK --set-xmark 0x0/0x1e000000",
        "-A NFKNOCK -p tcp -m tcp --dport 50000 -m set --match-set nfknock-q0-tcp40000-v4 src "
        "-j MARK --set-xmark 0x10000000/0x10000000",
        "-A NFKNOCK -p tcp -m tcp --dport 50000 -m set --match-set nfknock-q0-tcp41000-v4 src "
        "-j MARK --set-xmark 0x8000000/0x8000000",
        "-A NFKNOCK -p tcp -m tcp --dport 50000 -m mark --mark 0x10000000/0x10000000 "
        "-j SET --del-set nfknock-q0-tcp40000-v4 src",
        "-A NFKNOCK -p tcp -m tcp --dport 50000 -m mark --mark 0x8000000/0x8000000 "
        "-j SET --del-set nfknock-q0-tcp41000-v4 src",
        "-A NFKNOCK -p tcp -m tcp --dport 50000 -m mark --mark 0x10000000/0x10000000 "
        "-j SET --add-set nfknock-q0-midway-v4 src --exist --timeout 15",
        "-A NFKNOCK -p tcp -m tcp --dport 50000 -m mark --mark 0x8000000/0x8000000 "
        "-j SET --add-set nfknock-q0-midway-v4 src --exist --timeout 15",
        "-A NFKNOCK -p tcp -m tcp --dport 50000 -m mark --mark 0x10000000/0x10000000 -j NFQUEUE --queue-num 0",
        "-A NFKNOCK -p tcp -m tcp --dport 50000 -m mark --mark 0x8000000/0x8000000 -j NFQUEUE --queue-num 0",
        "-A NFKNOCK -p tcp -m tcp --dport 50000 -m set --match-set nfknock-q0-v4 src -j NFQUEUE --queue-num 0",
        "-A NFKNOCK -p tcp -m tcp --dport 50000 -j DROP",
    ]


def test_bits_are_reused_where_groups_share_no_second_port():
    groups = fresh((door(), twin(1, 41000), twin(2, 42000, second=52000), twin(3, 43000, second=52000))).groups
    assert [g.bit for g in groups] == [0, 1, 0, 1]


@pytest.mark.parametrize(
    "shared",
    [
        # a fifth group on one second port has no bit left: it stays in the daemon, and so must
        # every group sharing that port (the daemon's second step would meet the port's DROP)
        [twin(n, 41000 + n) for n in range(MARK_BITS)],
        # the twin's first port is another door's later step: the twin is the daemon's, so is 50000
        [twin(1, 41000), door(name="e", sequence=[1000, 41000, 2000], protect=["23/tcp"])],
    ],
)
def test_a_second_port_shared_with_a_door_the_daemon_serves_keeps_all_its_groups_in_the_daemon(shared):
    assert not {"d", "t1"} & set(names([door(), *shared]))


def test_the_engine_takes_a_second_step_only_for_the_group_whose_bit_is_set():
    engine, now = fresh_engine((door(), twin(1, 41000))), 100.0
    # alice knocked 41000 (the twin's first step, bit 1) and now 50000: the twin advances, not d
    events = engine.handle(knock(50000, seen=0b10), now).events
    assert events == (KnockAdvanced(ALICE, "t1", "open", 1), KnockAdvanced(ALICE, "t1", "open", 2))
    assert engine.handle(knock(60000), now + 1).events == ()  # d's third step: d has no attempt
    assert isinstance(engine.handle(knock(61001), now + 2).events[0], DoorOpened)
    assert engine.handle(knock(22), now + 3).verdict is Verdict.DROP  # d's port stays closed
    assert engine.handle(knock(2201), now + 3).verdict is Verdict.ACCEPT
    # both first steps seen: both advance
    both = engine.handle(knock(50000, seen=0b11, src="10.0.0.3"), now).events
    assert {e.door for e in both} == {"d", "t1"}


def test_a_first_step_the_kernel_saw_ends_a_close_attempt_as_a_knock_would():
    engine, now = fresh_engine((door(close_sequence=[60000, 50000, 40000]),)), 100.0
    engine.handle(knock(60000), now)  # close, stage 1
    events = engine.handle(knock(50000, seen=True), now + 1).events
    assert events[0] == SequenceReset(ALICE, "d", "close", 1, "40000/tcp")
    assert events[1:] == (KnockAdvanced(ALICE, "d", "open", 1), KnockAdvanced(ALICE, "d", "open", 2))


def test_a_two_step_door_completes_on_the_marked_second_step():
    engine = fresh_engine((door(sequence=[40000, 50000]),))
    events = engine.handle(knock(50000, seen=True), 100.0).events
    assert [type(e) for e in events] == [KnockAdvanced, DoorOpened]


def bits(first_steps):
    return {g.first[1]: g.bit for g in first_steps.groups}


def switched(first_steps, now):
    """The daemon's history once rules and engines run `first_steps` at engine time `now`."""
    return first_steps.history.retire(now)


def test_a_mark_bit_never_changes_its_meaning_on_a_port_across_reloads():
    """A second step marked under the old rules may be judged by the new engine (it waited in
    the queue during the swap) or the other way round (workers): so a group keeps its bit, and
    a new group takes a bit no other door's first step has held on its second ports while a
    packet marked under it can still be judged (here: reloads within GRACE of each other)."""
    a, b, c = twin(0, 40000), twin(1, 41000), twin(2, 39000)
    before = decide((a, b), MarkHistory())
    assert bits(before) == {40000: 0, 41000: 1}
    after = decide((a, b, c), switched(before, 0.0))  # 39000 comes first in port order: fresh, it would take bit 0
    assert bits(after) == {39000: 2, 40000: 0, 41000: 1}
    back = decide((a, b), switched(after, 1.0))
    assert bits(back) == {40000: 0, 41000: 1}
    # a group whose port has no bit left that never meant another door stays in the daemon, and
    # so does every group sharing that port with it
    alone = decide((twin(3, 38000),), switched(back, 2.0))
    assert [g.bit for g in alone.groups] == [3]  # bits 0-2 meant other doors' first steps on 50000
    # every bit of 50000 has meant another door lately: a fifth door there cannot have one, even
    # with only two doors left on the port; both stay in the daemon until the meanings retire
    late = decide((a, twin(4, 37000)), switched(alone, 3.0))
    assert late.groups == ()
    assert "no first-step mark bit is free on its second step 50000/tcp" in late.in_daemon["t4"]
    assert late.in_daemon["t0"].startswith("its second step 50000/tcp is also door t4's")


def test_a_meaning_retires_once_no_packet_marked_under_it_can_be_judged():
    """A bit is free again GRACE seconds after the rules that marked with it were replaced (the
    queue holds a packet for milliseconds), not before, and not while rules still mark with it."""
    a, b = twin(0, 40000), twin(1, 41000)
    history = switched(decide((a, b), MarkHistory()), 100.0)
    gone = decide((a,), history)  # b's rules go: its meaning is past, since a time not known yet
    assert not decide((a, twin(2, 39000)), gone.history.retire(100.0 + 10 * GRACE)).groups[0].bit == 1
    history = switched(gone, 200.0)  # installed at 200: b's meaning left then
    assert bits(decide((a, twin(2, 39000)), history.retire(200.0 + GRACE - 0.1))) == {39000: 2, 40000: 0}
    assert bits(decide((a, twin(2, 39000)), history.retire(200.0 + GRACE))) == {39000: 1, 40000: 0}
    # a meaning current rules mark with never retires, however long they stay
    assert bits(decide((a, twin(2, 39000)), history.retire(1e9))) == {39000: 1, 40000: 0}


def test_reloads_that_swap_twins_never_use_up_the_bits_of_a_port():
    """Before the history retired meanings, every twin a reload added took a bit of its second
    port for good: after MARK_BITS - 1 of them the next door on that port (unrelated to every
    twin before it) went to the daemon, and with it the door that had been there all along,
    until a restart. Reloads a few seconds apart now go on for ever."""
    a = twin(0, 40000)
    first_steps = decide((a,), MarkHistory())
    history, now = switched(first_steps, 0.0), 0.0
    for n in range(1, 4 * MARK_BITS):
        now += GRACE
        first_steps = decide((a, twin(n, 39000 - n)), history.retire(now))  # the reload: the last twin goes
        assert first_steps.in_daemon == {}, n
        assert bits(first_steps)[40000] == 0 and bits(first_steps)[39000 - n] != 0
        history = switched(first_steps, now + 0.5)  # rules and workers switched half a second later
        assert len(history.held()[(("tcp", 50000), bits(first_steps)[39000 - n])]) == 1
    assert len(history.past) <= 2  # the history does not grow with the reloads


def test_a_door_whose_first_step_changes_keeps_its_bit():
    """Editing a door's first step again and again must not use up the bits of its second port:
    a packet in flight at worst counts the door's old first step for its new one."""
    history = MarkHistory()
    for first in range(1000, 1010):
        first_steps = decide((door(sequence=[first, 2000]),), history)
        assert [g.bit for g in first_steps.groups] == [0]
        history = switched(first_steps, 0.0)
    # another door on that port, though, gets a bit of its own
    other = decide((door(name="x", sequence=[999, 2000], protect=["23/tcp"]),), history)
    assert [g.bit for g in other.groups] == [1]


def test_the_meanings_in_place_are_read_back_from_the_installed_rules():
    doors = (door(), twin(1, 41000))
    installed = {4: [str(s) for s in scaffolding(doors, 7, first_steps=fresh(doors))], 6: []}
    assert marks_installed(installed, 7).held() == {
        (("tcp", 50000), 0): {(("tcp", 40000), None)},
        (("tcp", 50000), 1): {(("tcp", 41000), None)},
    }
    assert marks_installed(installed, 8) == MarkHistory()  # another daemon's rules
    assert marks_installed(installed, 7, pass_mark=0x100) == MarkHistory()  # other bits: not first-step marks


def test_a_restart_with_rules_in_place_keeps_their_meanings_until_they_retire():
    """The doors are not known from rules in place: only the same first port keeps its bit, and
    a new first port takes none of theirs until the rules that marked with them are replaced and
    GRACE has passed."""
    doors = (door(), twin(1, 41000))
    in_place = marks_installed({4: [str(s) for s in scaffolding(doors, 7, first_steps=fresh(doors))], 6: []}, 7)
    restart = decide((door(name="renamed"), twin(1, 42000)), in_place)
    assert bits(restart) == {40000: 0, 42000: 2}
    assert bits(fresh((door(name="renamed"), twin(1, 42000)))) == {40000: 0, 42000: 1}  # without the history
    history = switched(restart, 50.0)  # our rules replaced theirs at 50
    assert bits(decide((door(name="renamed"), twin(1, 42000), twin(3, 43000)), history.retire(50.0))) == {
        40000: 0,
        42000: 2,
        43000: 3,
    }
    assert bits(decide((door(name="renamed"), twin(1, 42000), twin(3, 43000)), history.retire(50.0 + GRACE))) == {
        40000: 0,
        42000: 2,
        43000: 1,
    }


def test_the_plan_and_the_engine_take_nothing_but_the_decision():
    """No caller can leave the mark history out: plan, scaffolding, Engine and Engine.reload
    require the FirstSteps value (a TypeError when it is missing, or a bare tuple of groups)."""
    doors = (door(), twin(1, 41000))
    decided = fresh(doors)
    with pytest.raises(TypeError):
        plan(doors, 0)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        scaffolding(doors, 0)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Engine(doors)  # type: ignore[call-arg]
    for wrong in (decided.groups, None):
        with pytest.raises(TypeError, match="FirstSteps"):
            plan(doors, 0, first_steps=wrong)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="FirstSteps"):
            Engine(doors, first_steps=wrong)  # type: ignore[arg-type]
    engine = Engine(doors, first_steps=decided)
    with pytest.raises(TypeError):
        engine.reload(doors)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="FirstSteps"):
        engine.reload((door(),), decided.groups)  # type: ignore[arg-type]
    assert set(engine.doors) == {"d", "t1"}  # a refused reload changed nothing


def test_one_decision_feeds_the_plan_and_the_engine_alike():
    """The bits the engine reads are the bits the plan's rules set: both come from one value."""
    doors = (door(), twin(1, 41000), twin(2, 39000))
    history = switched(decide(doors[:2], MarkHistory()), 0.0)
    decided = decide(doors, history)  # 39000 takes bit 2: bits 0 and 1 are held
    marking = {
        spec.match_set: spec.set_mark[0]
        for spec in plan(doors, 0, first_steps=decided)[4]
        if spec.target == "MARK" and spec.match_set
    }
    assert marking["nfknock-q0-tcp39000-v4"] == first_step_marks()[2]
    engine = Engine(doors, first_steps=decided)
    events = engine.handle(knock(50000, seen=0b100), 100.0).events
    assert {e.door for e in events} == {"t2"}


def test_a_bit_counts_for_a_door_only_on_its_own_second_port():
    """Bits are distinct per second port only: d (40000, 50000) and e (41000, 51000) both mark
    bit 0. A packet on 51000 marked for e must not touch d, here d's close attempt on 51000."""
    d = door(close_sequence=[60000, 51000, 40000])
    e = door(name="e", sequence=[41000, 51000, 61000], protect=["23/tcp"])
    assert bits(fresh((d, e))) == {40000: 0, 41000: 0}
    engine, now = fresh_engine((d, e)), 100.0
    engine.handle(knock(60000), now)  # d's close sequence, stage 1
    events = engine.handle(knock(51000, seen=0b1), now + 1).events
    assert SequenceReset(ALICE, "d", "close", 1, "40000/tcp") not in events
    assert KnockAdvanced(ALICE, "d", "close", 2) in events and KnockAdvanced(ALICE, "e", "open", 2) in events


def test_the_meanings_of_chains_in_both_flavours_are_kept_together():
    """An earlier run with the other --firewall may have left a chain that marks too: a bit
    either chain sets means what each meant, and no door takes a bit the two disagree on."""

    def chain(*doors):
        return {4: [str(s) for s in scaffolding(doors, 7, first_steps=fresh(doors))], 6: []}

    legacy, nft = marks_installed(chain(door(), twin(1, 41000)), 7), marks_installed(chain(twin(2, 42000)), 7)
    both = legacy | nft
    assert both.held()[(("tcp", 50000), 0)] == {(("tcp", 40000), None), (("tcp", 42000), None)}
    assert bits(decide((door(), twin(1, 41000), twin(2, 42000)), both)) == {40000: 2, 41000: 1, 42000: 3}
