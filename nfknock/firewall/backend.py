"""What every backend is to the daemon (`Firewall`), and what the two iptables backends share:
one transaction per address family (`PerFamily`)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Protocol

from ..errors import FirewallError
from .granted import create_first_step_sets
from .plan import Plan, RuleSpec
from .rotation_sets import create_rotation_sets
from .sessions import create_session_sets


class Firewall(Protocol):
    """What the daemon needs from a backend. `apply` replaces whatever scaffolding is there
    (a killed run's leftovers included) in one step per family; `remove` takes all of it away."""

    name: str

    def apply(self, plan: Plan) -> None: ...

    def remove(self) -> bool: ...

    def installed(self) -> dict[int, list[str]]: ...


class PerFamily:
    """What both backends share: one transaction per address family. A backend supplies
    `_transaction(family, specs or None)`, `_rules(family)` and `_jumps(family)`."""

    name = "?"

    def __init__(self, interface: str | None = None):
        self.interface = interface  # only packets arriving here jump to our chain (None: all)

    def apply(self, plan: Plan) -> None:

        create_first_step_sets(plan, self.set_runner())  # the rules refer to them
        create_session_sets(plan, self.set_runner())
        create_rotation_sets(plan, self.set_runner())
        for family, specs in plan.items():
            self._transaction(family, specs or None)

    def set_runner(self) -> Callable:
        return subprocess.run

    def remove(self) -> bool:
        """Remove the chains and every jump to them; True if there was anything to remove.

        Each family is one transaction (all of it goes, or none); a failure in one family does
        not stop the other, and one FirewallError names every family that failed."""
        present = False
        failures = []
        for family in (4, 6):
            try:
                present = bool(self._rules(family)) or self._jumps(family) > 0 or present
                self._transaction(family, None)
            except FirewallError as exc:
                failures.append(f"IPv{family}: {exc}")
        if failures:
            raise FirewallError(f"{self.name} rules not removed: {'; '.join(failures)}")
        return present

    def installed(self) -> dict[int, list[str]]:
        """Our rules as the kernel has them, in `iptables -S` style, per family."""
        return {family: self._rules(family) for family in (4, 6)}

    def _transaction(self, family: int, specs: list[RuleSpec] | None) -> None:
        raise NotImplementedError

    def _rules(self, family: int) -> list[str]:
        raise NotImplementedError

    def _jumps(self, family: int) -> int:
        raise NotImplementedError
