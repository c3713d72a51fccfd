"""One knock sequence and the attempts sources make at it. Pure: (source, port, now) in, an
action and events out.

Theory of operation
-------------------
For every (sequence, source) there is at most one *attempt*: how many steps that source has
matched, until a deadline `seq_timeout` after its first knock. An attempt past its deadline is
gone (a SequenceTimeout is reported) and the source is IDLE again. When the kernel records the
sequence's first step (first_steps.py), a source with no attempt whose knock on the second step
comes marked "first step seen" is in phase KERNEL: stage 1 without an attempt, and the attempt
begins at the second step (its deadline counts from there). A knock on a port of the door is
classified against the attempt as

  EXPECTED  the next step, not the last (for an idle source: the first step)
  LAST      the next step, and the last one: the sequence is complete
  REPEAT    the step just matched again (a retransmit, or a client that knocks twice)
  FIRST     the first step, while an attempt is further along
  OTHER     any other port of the door (either of its sequences)

and `TRANSITIONS`, which names every (phase, match) pair, says what happens:

  ADVANCE   one more step matched (an idle source starts an attempt at stage 1)
  COMPLETE  the attempt ends in success: the caller opens or closes the door
  ABSORB    a repeat: nothing changes, and no other sequence of the door sees the packet (a
            client may send every step several times, to get through loss)
  RESTART   the attempt is dropped and a new one starts at stage 1
  RESET     the attempt is dropped (a failure, for the lockout)
  IGNORE    nothing changes

Five pairs cannot occur (an idle source has no step to repeat, and its first step is EXPECTED
or LAST; KERNEL is entered only on the second step, which is EXPECTED or LAST); they are in the
table, as IGNORE, so that a lookup can never miss.

A completed attempt is gone at once, so a copy of the last step that arrives after completion
is a knock like any other (it may start a sequence that begins with that port, such as a close
sequence that reverses the open one; that attempt then times out). Telling such a copy from a
deliberate new knock would take a time window, and any window also swallows a real knock sent
right after: knockd's semantics win.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .events import Event, KnockAdvanced, Sequence, SequenceReset, SequenceTimeout
from .state import Table

Key = tuple[str, int]  # (proto, port)


class _FastHash:
    """Members are singletons: hash by identity, not by name (Enum's default is a Python-level
    hash of the name, which showed up in the per-packet profile)."""

    __hash__ = object.__hash__


class Phase(_FastHash, Enum):
    IDLE = "idle"  # no attempt for this source and sequence
    STARTED = "started"  # at least one step matched
    KERNEL = "kernel"  # no attempt, but the kernel saw the first step (first_steps.py)


class Match(_FastHash, Enum):
    EXPECTED = "expected"
    LAST = "last"
    REPEAT = "repeat"
    FIRST = "first"
    OTHER = "other"


class Action(_FastHash, Enum):
    ADVANCE = "advance"
    COMPLETE = "complete"
    ABSORB = "absorb"
    RESTART = "restart"
    RESET = "reset"
    IGNORE = "ignore"


TRANSITIONS: dict[tuple[Phase, Match], Action] = {
    (Phase.IDLE, Match.EXPECTED): Action.ADVANCE,
    (Phase.IDLE, Match.LAST): Action.COMPLETE,  # a one-step sequence
    (Phase.IDLE, Match.REPEAT): Action.IGNORE,  # cannot occur
    (Phase.IDLE, Match.FIRST): Action.IGNORE,  # cannot occur
    (Phase.IDLE, Match.OTHER): Action.IGNORE,
    (Phase.STARTED, Match.EXPECTED): Action.ADVANCE,
    (Phase.STARTED, Match.LAST): Action.COMPLETE,
    (Phase.STARTED, Match.REPEAT): Action.ABSORB,
    (Phase.STARTED, Match.FIRST): Action.RESTART,
    (Phase.STARTED, Match.OTHER): Action.RESET,
    (Phase.KERNEL, Match.EXPECTED): Action.ADVANCE,
    (Phase.KERNEL, Match.LAST): Action.COMPLETE,  # a two-step sequence
    (Phase.KERNEL, Match.REPEAT): Action.IGNORE,  # cannot occur
    (Phase.KERNEL, Match.FIRST): Action.IGNORE,  # cannot occur
    (Phase.KERNEL, Match.OTHER): Action.IGNORE,  # cannot occur
}

# Enum member access costs ~50 ns on Python 3.11 (it showed in the per-packet profile); the
# packet path below uses these module-level aliases instead.
_IDLE, _STARTED, _KERNEL = Phase.IDLE, Phase.STARTED, Phase.KERNEL
_EXPECTED, _LAST, _REPEAT, _FIRST, _OTHER = Match.EXPECTED, Match.LAST, Match.REPEAT, Match.FIRST, Match.OTHER
_ADVANCE, _COMPLETE, _ABSORB, _RESTART, _RESET, _IGNORE = (
    Action.ADVANCE,
    Action.COMPLETE,
    Action.ABSORB,
    Action.RESTART,
    Action.RESET,
    Action.IGNORE,
)


def classify(steps: tuple[Key, ...], stage: int, key: Key) -> Match:
    """Where `key` stands for an attempt that has matched `stage` steps of `steps`."""
    if key == steps[stage]:
        return _LAST if stage == len(steps) - 1 else _EXPECTED
    if stage and key == steps[stage - 1]:
        return _REPEAT
    if key == steps[0]:
        return _FIRST
    return _OTHER


@dataclass(slots=True)
class Attempt:
    stage: int


class KnockSequence:
    """One of a door's sequences, precompiled, with its attempts."""

    __slots__ = ("door", "kind", "steps", "timeout", "attempts", "window", "second")

    def __init__(
        self,
        door: str,
        kind: Sequence,
        steps: tuple[Key, ...],
        timeout: float,
        attempts: Table,
        window: int | None = None,
    ):
        self.door = door
        self.kind = kind
        self.steps = steps
        self.timeout = timeout
        self.attempts = attempts
        self.window = window  # the time window of a rotating door's sequence
        self.second: Key | None = None  # the second step, when the kernel records the first

    def step(self, src: str, key: Key, now: float, events: list[Event], first_seen: bool = False) -> Action:
        """Apply one knock of `src` on `key`; the caller acts on COMPLETE and RESET.
        `first_seen`: the kernel says this source knocked the first step (first_steps.py)."""
        entry = self.attempts.entries.get(src)
        attempt = None
        if entry is not None:
            if entry[0] <= now:
                self.attempts.pop(src)
                events.append(SequenceTimeout(src, self.door, self.kind, entry[1].stage))
            else:
                attempt = entry[1]
        if attempt is not None:
            phase, stage = _STARTED, attempt.stage
        elif first_seen and key == self.second:
            phase, stage = _KERNEL, 1
        else:
            phase, stage = _IDLE, 0
        # A port of the door's other sequence is "any other port of that door".
        match = classify(self.steps, stage, key) if key in self.steps else _OTHER
        action = TRANSITIONS[(phase, match)]
        if action is _IGNORE or action is _ABSORB:
            return action
        if phase is _KERNEL:  # the log tells the whole story, as if the daemon had seen step 1
            events.append(KnockAdvanced(src, self.door, self.kind, 1))
        if action is _RESET or action is _RESTART:
            self.attempts.pop(src)
            events.append(SequenceReset(src, self.door, self.kind, stage, f"{key[1]}/{key[0]}"))
            if action is _RESET:
                return action
            attempt, stage = None, 0  # and on as from IDLE (a STARTED sequence has two steps at least)
        if action is _COMPLETE:
            self.attempts.pop(src)
            return action
        stage += 1
        if attempt is None:
            self.attempts.put(src, now + self.timeout, Attempt(stage))
        else:
            attempt.stage = stage
        events.append(KnockAdvanced(src, self.door, self.kind, stage))
        return action

    def forget(self, src: str) -> Attempt | None:
        entry = self.attempts.pop(src)
        return None if entry is None else entry[1]

    def expire(self, now: float) -> list[Event]:
        return [SequenceTimeout(src, self.door, self.kind, attempt.stage) for src, attempt in self.attempts.expire(now)]
