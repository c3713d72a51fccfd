"""What every backend is to the daemon (`Firewall`), and what the two iptables backends share:
one transaction per address family (`PerFamily`)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Protocol

from ..errors import FirewallError
from .granted import create_first_step_sets
from .plan import FORWARD_CHAIN, NAT_CHAIN, Plan, RuleSpec
from .rotation_sets import create_rotation_sets
from .sessions import create_session_sets

# The gateway chains (plan.gateway_plan): chain -> (table, the built-in chain that jumps to it).
GATEWAY_CHAINS = {FORWARD_CHAIN: ("filter", "FORWARD"), NAT_CHAIN: ("nat", "PREROUTING")}


def gateway_script(
    chain: str, specs: list[RuleSpec] | None, jumps: list[str], chain_exists: bool, interface: str | None = None
) -> str:
    """The restore input that replaces a gateway chain and its jump (None: removes them), as
    restore_script does for the main chain."""
    table, builtin = GATEWAY_CHAINS[chain]
    lines = [f"*{table}"]
    if specs is not None:
        lines.append(f":{chain} - [0:0]")
    lines += ["-D" + jump[2:] for jump in jumps]
    if specs is not None:
        lines += [str(spec) for spec in specs]
        lines.append(f"-I {builtin} 1{f' -i {interface}' if interface else ''} -j {chain}")
    elif chain_exists:
        lines += [f"-F {chain}", f"-X {chain}"]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


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
        self.apply_gateway(plan)

    def apply_gateway(self, plan: Plan) -> None:
        """The gateway doors' chains of `plan` (plan.GatedPlan, docs/gateway.md), each replaced
        with its jump in one transaction; a plain Plan (a dict) leaves them as they are."""
        gateway = getattr(plan, "gateway", None)
        if gateway is not None:
            for family in (4, 6):
                self._gateway(family, FORWARD_CHAIN, gateway.forward.get(family) or None)
                self._gateway(family, NAT_CHAIN, gateway.nat.get(family) or None)

    def apply_gateway_chain(self, plan: Plan, family: int, chain: str) -> None:
        """One gateway chain of `plan` and its jump, in one family (the scaffolding watcher's
        repair of what another program took away: the others are left as they are)."""
        gateway = getattr(plan, "gateway", None)
        if gateway is not None:
            specs = (gateway.forward if chain == FORWARD_CHAIN else gateway.nat).get(family)
            self._gateway(family, chain, specs or None)

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
                for chain in (FORWARD_CHAIN, NAT_CHAIN):
                    present = self._gateway(family, chain, None) or present
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

    def _gateway(self, family: int, chain: str, specs: list[RuleSpec] | None) -> bool:
        """Replace a gateway chain (plan.FORWARD_CHAIN or NAT_CHAIN) and its jump with `specs`
        in one transaction (None: remove them); True if there was one before."""
        raise NotImplementedError

    def _gateway_by_restore(
        self,
        tools: tuple[str, str],
        family: int,
        chain: str,
        specs: list[RuleSpec] | None,
        run: Callable[[list[str], str | None], str],
    ) -> bool:
        """`_gateway` through the iptables tools of one flavour (`tools`: the listing command
        and its -restore): one `-restore --noflush` is one transaction of that table."""
        table, builtin = GATEWAY_CHAINS[chain]
        listing = run([tools[0], "-w", "-t", table, "-S"], None).splitlines()
        exists = f"-N {chain}" in listing
        jumps = [line for line in listing if line.startswith(f"-A {builtin} ") and line.split()[-2:] == ["-j", chain]]
        if specs is None and not exists and not jumps:
            return False
        run([tools[1], "--noflush", "--wait"], gateway_script(chain, specs, jumps, exists, self.interface))
        return exists

    def _jumps(self, family: int) -> int:
        raise NotImplementedError
