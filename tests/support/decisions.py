"""The first-step decision as a start with no rules in place makes it, for tests that build an
engine or a plan from doors alone (nfknock.doors.first_steps.decide takes the history explicitly)."""

from __future__ import annotations

from nfknock.doors.engine import Engine
from nfknock.doors.first_steps import FirstSteps, MarkHistory, decide
from nfknock.firewall.plan import Plan, RuleSpec, plan, scaffolding


def fresh(doors) -> FirstSteps:
    """decide(doors) over an empty mark history: no earlier meaning of a mark bit to keep."""
    return decide(tuple(doors), MarkHistory())


def fresh_engine(doors, *args, **kwargs) -> Engine:
    """An engine for these doors with the first steps a fresh start decides."""
    return Engine(doors, *args, first_steps=fresh(doors), **kwargs)


def fresh_plan(doors, *args, **kwargs) -> Plan:
    """plan(doors, ...) with the first steps a fresh start decides."""
    return plan(doors, *args, first_steps=fresh(doors), **kwargs)


def fresh_scaffolding(doors, *args, **kwargs) -> list[RuleSpec]:
    """scaffolding(doors, ...) with the first steps a fresh start decides over these doors."""
    return scaffolding(doors, *args, first_steps=fresh(doors), **kwargs)
