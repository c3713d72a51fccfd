"""The transition table of one knock sequence."""

import itertools

from hypothesis import given
from hypothesis import strategies as st

from nfknock.doors.events import KnockAdvanced, Sequence, SequenceReset, SequenceTimeout
from nfknock.doors.sequence import TRANSITIONS, Action, KnockSequence, Match, Phase, classify
from nfknock.doors.state import Pool

STEPS = (("tcp", 1), ("tcp", 2), ("tcp", 3))


def test_the_table_names_every_pair():
    assert set(TRANSITIONS) == set(itertools.product(Phase, Match))


@given(
    st.lists(st.sampled_from([("tcp", p) for p in range(1, 5)]), min_size=1, max_size=6, unique=True),
    st.sampled_from([("tcp", p) for p in range(1, 6)]),
)
def test_an_idle_source_never_repeats_or_restarts(steps, key):
    """The two pairs the table marks as impossible are: an idle attempt has matched nothing."""
    assert classify(tuple(steps), 0, key) not in (Match.REPEAT, Match.FIRST)


def test_classify_names_each_relation():
    assert classify(STEPS, 0, ("tcp", 1)) is Match.EXPECTED
    assert classify(STEPS, 1, ("tcp", 2)) is Match.EXPECTED
    assert classify(STEPS, 1, ("tcp", 1)) is Match.REPEAT
    assert classify(STEPS, 2, ("tcp", 1)) is Match.FIRST
    assert classify(STEPS, 2, ("tcp", 3)) is Match.LAST
    assert classify(STEPS, 0, ("tcp", 3)) is Match.OTHER
    assert classify((("udp", 9),), 0, ("udp", 9)) is Match.LAST


def sequence(steps=STEPS, timeout=10.0):
    return KnockSequence("door", Sequence.OPEN, steps, timeout, Pool(100).table())


def test_steps_advance_then_complete_and_forget_the_attempt():
    seq, events = sequence(), []
    assert [seq.step("a", key, 1.0, events) for key in STEPS] == [Action.ADVANCE, Action.ADVANCE, Action.COMPLETE]
    assert events == [KnockAdvanced("a", "door", Sequence.OPEN, 1), KnockAdvanced("a", "door", Sequence.OPEN, 2)]
    assert "a" not in seq.attempts


def test_a_wrong_port_resets_and_the_first_step_restarts():
    seq, events = sequence(), []
    seq.step("a", ("tcp", 1), 1.0, events)
    assert seq.step("a", ("tcp", 3), 1.1, events) is Action.RESET
    assert events[-1] == SequenceReset("a", "door", Sequence.OPEN, 1, "3/tcp")
    seq.step("a", ("tcp", 1), 1.2, events)
    seq.step("a", ("tcp", 2), 1.3, events)
    assert seq.step("a", ("tcp", 1), 1.4, events) is Action.RESTART
    assert events[-2:] == [
        SequenceReset("a", "door", Sequence.OPEN, 2, "1/tcp"),
        KnockAdvanced("a", "door", Sequence.OPEN, 1),
    ]


def test_repeats_while_started_are_absorbed():
    """A client may send every step several times; copies are one knock, seen by no other sequence."""
    seq, events = sequence(), []
    seq.step("a", ("tcp", 1), 1.0, events)
    assert seq.step("a", ("tcp", 1), 1.1, events) is Action.ABSORB
    seq.step("a", ("tcp", 2), 1.2, events)
    assert seq.step("a", ("tcp", 2), 1.3, events) is Action.ABSORB
    assert seq.step("a", ("tcp", 3), 1.4, events) is Action.COMPLETE


def test_after_completion_the_last_step_is_just_a_port_again():
    seq, events = sequence(steps=(("tcp", 1), ("tcp", 2))), []
    seq.step("a", ("tcp", 1), 1.0, events)
    seq.step("a", ("tcp", 2), 1.0, events)
    assert seq.step("a", ("tcp", 2), 1.0, events) is Action.IGNORE  # IDLE, OTHER: another sequence may take it


def test_an_attempt_past_its_deadline_is_idle_again():
    seq, events = sequence(timeout=5.0), []
    seq.step("a", ("tcp", 1), 1.0, events)
    assert seq.step("a", ("tcp", 2), 6.0, events) is Action.IGNORE  # timed out: 2 is not a first step
    assert events[-1] == SequenceTimeout("a", "door", Sequence.OPEN, 1)
