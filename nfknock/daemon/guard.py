"""The scaffolding watcher: puts back what other programs remove, while the daemon runs.

Why: a reload of nftables.service (`flush ruleset`), an `iptables -F INPUT`, a netfilter-persistent
reload all take nfknock's chain or its jump away, and from then on a protected port follows the
rest of the firewall: open, on most hosts. The daemon cannot stop that from happening, but it can
make the window short: it re-installs the plan it applied last as soon as the kernel shows the
change (nf_tables: a netlink notification wakes the loop; legacy tables: the xtables lock file's
inotify event, or a look at the tables' headers every POLL_EVERY seconds), re-creates the sets the
rules need if they were destroyed meanwhile, and refills the granted set from the grants the
engine holds, so a granted client keeps its access and a knock works right after.

Each repair is logged once, at warning level, with what changed and who changed it (nf_tables
names the process), and counted (`restored`: in `nfknock status` and the metrics). A repair
that fails is retried every RETRY_EVERY seconds and logged at error level: the port may be open.
The kernel side (the socket, the fingerprint, the restore) is nfknock/firewall/watch.py.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from ..firewall.backend import PerFamily
from ..firewall.granted import GrantedSets
from ..firewall.plan import CHAIN, FORWARD_CHAIN, NAT_CHAIN, Plan
from ..firewall.watch import (
    GATEWAY,
    HOOKS,
    Damage,
    LegacyProbe,
    LegacyView,
    NftEvents,
    Restorer,
    legacy_repair,
    nft_repair,
)

POLL_EVERY = 0.02  # seconds between looks at the legacy tables' headers (writers that skip the lock file)
FULL_EVERY = 10  # every this many looks, the whole tables (a rule replaced by one of the same size)
RETRY_EVERY = 1.0  # seconds between attempts while the scaffolding cannot be put back


class Guard:
    """Watches one backend's scaffolding for the daemon's loop: `fds()` go into its select,
    `sleep(now)` bounds its wait, `step(readable, now)` runs after each wake-up, and
    `applied(plan)` is called after every install of the daemon's own (start, reload)."""

    def __init__(
        self,
        firewall: PerFamily,
        log: logging.Logger,
        granted: GrantedSets,
        refill: Callable[[], None],
        sets_recreated: Callable[[], None] = lambda: None,
        protected: Callable[[], set[tuple[str, int]]] = set,
        timer: Callable[[], float] = time.perf_counter,
        events: Any = None,
        probe: Any = None,
    ):
        self.firewall = firewall
        self.log = log
        self.granted = granted
        self.refill = refill  # puts the engine's grants back into the granted set
        self.sets_recreated = sets_recreated
        self.protected = protected  # (proto, port) of every protected port, for a refill's first step
        self._closed_at: float | None = None
        self.timer = timer
        self.plan: Plan | None = None
        self.restored = 0  # repairs done
        self.failed = 0  # repairs that did not succeed (retried)
        self.last: str | None = None  # what the last repair was about
        self.events: NftEvents | None = events  # given: a test's fake
        self.probe: LegacyProbe | None = probe
        self.restorers: dict[int, Restorer] = {}
        self._baseline: dict[int, LegacyView | None] = {}  # legacy: the tables as we left them
        self._gateway_baseline: dict[tuple[int, str], LegacyView | None] = {}  # (family, gateway chain)
        self._next_poll = 0.0
        self._polls = 0
        self._retry: dict[int, Damage] = {}
        self._retry_at: float | None = None
        if events is None and probe is None:
            if firewall.name == "nft":
                self.events = NftEvents()
            else:
                self.probe = LegacyProbe()

    @property
    def how(self) -> str:
        if self.events is not None:
            return "nf_tables notifications"
        return f"legacy tables: on the xtables lock, their headers every {POLL_EVERY * 1000:g} ms"

    def status(self) -> dict[str, Any]:
        """For `nfknock status` and the metrics."""
        return {"watch": self.how, "restored": self.restored, "failed": self.failed, "last": self.last}

    def fds(self) -> list[int]:
        if self.events is not None:
            return [self.events.fileno()]
        fd = self.probe.fileno() if self.probe is not None else None
        return [] if fd is None else [fd]

    def sleep(self, now: float) -> float:
        """Seconds until the guard wants the loop back without a wake-up (inf: no timer)."""
        waits = [0.0 if self.events is not None and self.events.pending else math.inf]
        if self.probe is not None:
            waits.append(self._next_poll - now)
        if self._retry_at is not None:
            waits.append(self._retry_at - now)
        return max(0.0, min(waits))

    def applied(self, plan: Plan) -> None:
        """The daemon installed `plan` itself: from now on this is what to keep."""
        self.plan = plan
        self._retry, self._retry_at = {}, None
        if self.events is not None:
            self.events.discard()  # our own install's notifications (its pid is not ours to know)
            self._warm_up(plan)
        else:
            self._baseline = self._look()
            self._gateway_baseline = self._gateway_look()
            self._warm_up(plan)

    def _warm_up(self, plan: Plan) -> None:
        """Have each family's Restorer load its extensions now, by writing the plan just applied
        once more (one atomic replacement by the same rules), so that the first repair is as fast
        as the next ones. A failure here only costs speed: a repair starts a new Restorer."""
        intact = {family: Damage(family, "", chain=True, jump=False) for family, specs in plan.items() if specs}
        if self.events is not None:
            failures = nft_repair(self.restorers, self.events, plan, intact, self.firewall.interface)
        else:
            assert self.probe is not None
            expected = {family: view.chain if view is not None else None for family, view in self._baseline.items()}
            failures = legacy_repair(self.restorers, self.probe, plan, intact, self.firewall.interface, expected)
            self._baseline = self._look()
        if failures:
            self.log.warning("the scaffolding watcher's restore helper is not ready: %s", "; ".join(failures))

    def step(self, readable: list | None, now: float) -> None:
        """After a wake-up of the loop (`readable`: what its select returned; None: look anyway,
        for a loop that does not say, which costs one recv or read that finds nothing)."""
        if self.plan is None:
            return
        started = self.timer()
        damage: dict[int, list[Damage]] = {}
        by = ""
        if self.events is not None:
            if readable is None or self.events.fileno() in readable or self.events.pending:
                changes = self.events.changes()
                if changes is not None:
                    by = changes.by
                    for hurt in changes.damage:
                        damage.setdefault(hurt.family, []).append(hurt)
        elif self.probe is not None:
            ran = self.probe.drain()  # an iptables command ran: look at all of it
            if ran or now >= self._next_poll:
                self._next_poll = now + POLL_EVERY
                self._polls += 1
                full = ran or self._polls % FULL_EVERY == 0
                for family, hurt in self._legacy_damage(full).items():
                    damage.setdefault(family, []).append(hurt)
                for hurt in self._legacy_gateway_damage(full):
                    damage.setdefault(hurt.family, []).append(hurt)
        if self._retry_at is not None and now >= self._retry_at:
            for family, hurt in self._retry.items():
                damage.setdefault(family, []).append(hurt)
        if not damage:
            return  # the usual turn (the loop calls this every turn): nothing to repair
        wanted = {family for family, specs in self.plan.items() if specs}
        gated = self._gateway_chains()
        damage = {
            family: [hurt for hurt in hurts if not hurt.gateway or (family, hurt.gateway) in gated]
            for family, hurts in damage.items()
        }
        wanted |= {family for family, _ in gated}
        merged = {family: _merge(hurts) for family, hurts in damage.items() if family in wanted and hurts}
        if merged:
            self._repair(merged, by, started, now)

    def close(self) -> None:
        for restorer in self.restorers.values():
            restorer.close()
        if self.events is not None:
            self.events.close()
        if self.probe is not None:
            self.probe.close()

    # -- legacy ----------------------------------------------------------------------------

    def _look(self) -> dict[int, LegacyView | None]:
        assert self.probe is not None
        return {family: self.probe.view(family) for family in (4, 6)}

    def _legacy_damage(self, full: bool = True) -> dict[int, Damage]:
        """Families whose table changed in a way that touches us (a change elsewhere in the
        table only moves the baseline). Unless `full`, a table whose header did not change is
        taken as unchanged (the header is one system call; the whole table ~100 us of Python)."""
        assert self.probe is not None
        found = {}
        for family in (4, 6):
            before = self._baseline.get(family)
            if not full and before is not None and self.probe.info(family) == before.info:
                continue
            now = self.probe.view(family)
            if before is None or (now is not None and now.table == before.table):
                continue
            chain = now is None or now.chain != before.chain
            jump = now is None or now.jumps == 0
            if not (chain or jump):  # a change elsewhere (a second jump to us included: it opens nothing)
                self._baseline[family] = now
                continue
            if now is None:
                what = "the filter table is gone"
            elif now.chain is None:
                what = f"chain {CHAIN} deleted"
            elif chain:
                what = f"rules of {CHAIN} changed"
            else:
                what = ""
            if jump and now is not None:
                what = "; ".join(filter(None, [what, f"the jump from INPUT to {CHAIN} deleted"]))
            found[family] = Damage(family, what, chain=chain, jump=jump)
        return found

    # -- gateway chains ----------------------------------------------------------------------

    def _gateway_chains(self) -> set[tuple[int, str]]:
        """(family, chain) of each gateway chain the plan installs (docs/gateway.md)."""
        gateway = getattr(self.plan, "gateway", None)
        if gateway is None:
            return set()
        return {
            (family, chain)
            for chain, specs in ((FORWARD_CHAIN, gateway.forward), (NAT_CHAIN, gateway.nat))
            for family, rules in specs.items()
            if rules
        }

    def _gateway_look(self) -> dict[tuple[int, str], LegacyView | None]:
        """Legacy: each gateway chain of the plan and the jumps to it, as the kernel has them."""
        assert self.probe is not None
        tables = {chain: (table, builtin) for (table, chain), builtin in GATEWAY.items()}
        looks = {}
        for family, chain in self._gateway_chains():
            table, builtin = tables[chain]
            looks[(family, chain)] = self.probe.view(family, table, chain, HOOKS[builtin])
        return looks

    def _legacy_gateway_damage(self, full: bool) -> list[Damage]:
        """Legacy: the gateway chains that are gone, changed or no longer jumped to, as for the
        main chain (`_legacy_damage`), each table's header first unless `full`."""
        assert self.probe is not None
        tables = {chain: (table, builtin) for (table, chain), builtin in GATEWAY.items()}
        found = []
        for (family, chain), before in self._gateway_baseline.items():
            table, builtin = tables[chain]
            if not full and before is not None and self.probe.info(family, table) == before.info:
                continue
            now = self.probe.view(family, table, chain, HOOKS[builtin])
            if before is None:  # not readable when we left it (no such table here): nothing to compare
                self._gateway_baseline[(family, chain)] = now
                continue
            if now is not None and now.table == before.table:
                continue
            whats = []
            if now is None or now.chain is None:
                whats.append(f"chain {chain} deleted")
            elif now.chain != before.chain:
                whats.append(f"rules of {chain} changed")
            if now is not None and now.chain is not None and now.jumps == 0:
                whats.append(f"the jump from {builtin} to {chain} deleted")
            if not whats:
                self._gateway_baseline[(family, chain)] = now  # a change elsewhere in the table
                continue
            found.append(Damage(family, ", ".join(whats), False, False, gateway=chain))
        return found

    # -- repair ----------------------------------------------------------------------------

    def _repair(self, damage: dict[int, Damage], by: str, started: float, now: float) -> None:
        assert self.plan is not None
        self._closed_at = None
        main = {family: hurt for family, hurt in damage.items() if hurt.chain or hurt.jump}
        failures = self._put_back(main) if main else []
        if not failures:
            # The main chain gone: what removed it (a flush, a restore) took the gateway chains
            # too, all of them go back. Only gateway chains hurt: those alone (fewer forks).
            hurt_chains = {(family, c) for family, hurt in damage.items() for c in hurt.gateway.split(",") if c}
            only = None if main else hurt_chains
            failures = self._gateway_back(only)
        recreated = False
        if failures:  # a set the rules name may be gone too: make everything again, then the rules
            try:
                recreated = self._rebuild()
                failures = []
            except Exception as exc:  # noqa: BLE001 - logged below; retried: the port may be open
                failures.append(str(exc))
        took = (self.timer() - started) * 1000
        closed = (
            "" if self._closed_at is None else f"ports closed again in {(self._closed_at - started) * 1000:.1f} ms, "
        )
        said = "; ".join(f"IPv{family}: {hurt.what}" for family, hurt in sorted(damage.items()))
        who = f" (by {by})" if by else ""
        if failures:
            self.failed += 1
            self._retry, self._retry_at = damage, now + RETRY_EVERY
            self.log.error(
                "nfknock's rules were changed%s and could not be put back: %s; %s; retrying every %g s: the "
                "protected ports may be open meanwhile",
                who,
                said,
                "; ".join(failures),
                RETRY_EVERY,
            )
            return
        self._retry, self._retry_at = {}, None
        self.restored += 1
        self.last = said
        self.log.warning(
            "nfknock's rules were changed%s: %s; %sput back in %.1f ms%s (%d time(s) so far)",
            who,
            said,
            closed,
            took,
            "; the sets were re-created and the granted set refilled" if recreated else "",
            self.restored,
        )

    def _put_back(self, damage: dict[int, Damage]) -> list[str]:
        assert self.plan is not None
        if self.events is not None:

            def closed() -> None:
                self._closed_at = self.timer()

            return nft_repair(
                self.restorers, self.events, self.plan, damage, self.firewall.interface, self.protected(), closed
            )
        assert self.probe is not None
        expected = {family: view.chain if view is not None else None for family, view in self._baseline.items()}
        failures = legacy_repair(self.restorers, self.probe, self.plan, damage, self.firewall.interface, expected)
        if not failures:
            self._baseline = self._look()
        return failures

    def _gateway_back(self, only: set[tuple[int, str]] | None = None) -> list[str]:
        """The gateway doors' chains (FORWARD and nat, docs/gateway.md) put back: all of them
        (after the main chain's repair), or `only` those (family, chain). Failures: the slow
        path (_rebuild) follows."""
        gateway = getattr(self.plan, "gateway", None)
        apply = getattr(self.firewall, "apply_gateway", None)
        if gateway is None or gateway.empty or apply is None:
            return []
        try:
            if only is None:
                apply(self.plan)
            else:
                assert self.plan is not None
                for family, chain in sorted(only):
                    self.firewall.apply_gateway_chain(self.plan, family, chain)
        except Exception as exc:  # noqa: BLE001 - the rebuild follows, and logs it if that fails too
            return [f"gateway chains: {exc}"]
        if self.events is not None:
            self.events.discard()  # our own changes
        else:
            self._baseline = self._look()
            self._gateway_baseline = self._gateway_look()
        return []

    def _rebuild(self) -> bool:
        """The slow path: every set the plan names (created again if gone, kept if there), the
        granted set refilled, then the whole plan as at start. True if a set had to be made."""
        assert self.plan is not None
        missing = self.granted.ensure()
        self.firewall.apply(self.plan)  # creates the first-step and sessions sets first
        if self.events is not None:
            self.events.discard()
        else:
            self._baseline = self._look()
            self._gateway_baseline = self._gateway_look()
        self.refill()
        self.sets_recreated()
        return missing


def _merge(hurts: list[Damage]) -> Damage:
    """One family's damage in one line: a deleted table says it all."""
    whats = list(dict.fromkeys(hurt.what for hurt in hurts))
    whats = [what for what in whats if what.startswith("table ")] or whats
    gateway = ",".join(dict.fromkeys(hurt.gateway for hurt in hurts if hurt.gateway))
    return Damage(hurts[0].family, ", ".join(whats), any(h.chain for h in hurts), any(h.jump for h in hurts), gateway)


def start_guard(
    firewall: Any,
    log: logging.Logger,
    granted: GrantedSets,
    grants: Callable[[], list[tuple[str, float]]],
    sets_recreated: Callable[[], None],
    protected: Callable[[], set[tuple[str, int]]],
) -> Guard | None:
    """The watcher of the process that installs the rules, for a real backend (a test's fake
    firewall gets none). `grants`: (source, seconds left) of every grant this process holds, to
    refill the granted set with. Not being able to watch does not stop the daemon (its rules are
    in), but it is said loudly."""
    if not isinstance(firewall, PerFamily):
        return None

    def refill() -> None:
        for src, left in grants():
            granted.add(src, left)
        granted.flush()

    try:
        return Guard(firewall, log, granted, refill, sets_recreated, protected)
    except OSError as exc:
        log.error(
            "cannot watch nfknock's rules (%s): if another program removes them, the protected ports follow "
            "the rest of the firewall until nfknock restarts",
            exc,
        )
        return None
