"""The daemon side of the scaffolding watcher (daemon/guard.py), with fakes for the kernel: one
warning per repair with what changed and who, counted; the slow path re-creates the sets and
refills the granted set; a repair that fails is said at error level and retried."""

import logging

import pytest

from nfknock.daemon import guard as guard_module
from nfknock.daemon.guard import RETRY_EVERY, Guard
from nfknock.firewall.backend import PerFamily
from nfknock.firewall.plan import FORWARD_CHAIN, NAT_CHAIN, GatewayPlan, RuleSpec, with_gateway
from nfknock.firewall.watch import Changes, Damage

PLAN = {4: [RuleSpec("DROP", proto="tcp", dport=22)], 6: [RuleSpec("DROP", proto="tcp", dport=22)]}


class FakeFirewall(PerFamily):
    name = "nft"

    def __init__(self):
        super().__init__(None)
        self.applied = []

    def apply(self, plan):
        self.applied.append(plan)


class FakeEvents:
    def __init__(self):
        self.changes_to_report = []
        self.discarded = 0
        self.pending = False

    def fileno(self):
        return 99

    def changes(self):
        return self.changes_to_report.pop(0) if self.changes_to_report else None

    def discard(self):
        self.discarded += 1

    def close(self):
        pass


class FakeGranted:
    def __init__(self, missing=False):
        self.missing = missing

    def ensure(self):
        return self.missing


@pytest.fixture
def repairs(monkeypatch):
    """What nft_repair was asked to do; it answers with `repairs.failures` (a list per call)."""

    class Calls(list):
        failures: list = []

    calls = Calls()

    def fake(restorers, events, plan, damage, interface, protected=(), closed=lambda: None, timeout=1.0):
        calls.append((damage, set(protected)))
        closed()
        return calls.failures.pop(0) if calls.failures else []

    monkeypatch.setattr(guard_module, "nft_repair", fake)
    return calls


def make_guard(caplog, granted=None, refilled=None):
    caplog.set_level(logging.INFO, logger="test-guard")
    events = FakeEvents()
    firewall = FakeFirewall()
    guard = Guard(
        firewall,
        logging.getLogger("test-guard"),
        granted or FakeGranted(),
        refill=lambda: refilled.append(True) if refilled is not None else None,
        protected=lambda: {("tcp", 22)},
        events=events,
    )
    guard.applied(PLAN)
    return guard, events, firewall


def test_a_change_by_another_program_is_put_back_logged_once_and_counted(caplog, repairs):
    guard, events, _ = make_guard(caplog)
    repairs.clear()  # the warm-up after applied()
    flushed = (Damage(4, "table filter deleted", True, True), Damage(6, "table filter deleted", True, True))
    events.changes_to_report.append(Changes(flushed, "pid 4242 (nft)"))
    guard.step([99], now=10.0)
    assert [sorted(damage) for damage, _ in repairs] == [[4, 6]]
    assert repairs[0][1] == {("tcp", 22)}  # the protected ports, for the closing step
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    line = warnings[0].getMessage()
    assert "by pid 4242 (nft)" in line and "IPv4: table filter deleted; IPv6: table filter deleted" in line
    assert guard.status() == {
        "watch": "nf_tables notifications",
        "restored": 1,
        "failed": 0,
        "last": "IPv4: table filter deleted; IPv6: table filter deleted",
    }
    guard.step([], now=11.0)  # nothing new: nothing done
    assert len(repairs) == 1 and guard.restored == 1


def test_the_daemons_own_install_is_not_a_change(caplog, repairs):
    guard, events, _ = make_guard(caplog)
    before = events.discarded
    guard.applied(PLAN)
    assert events.discarded == before + 1
    assert guard.restored == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_when_the_quick_repair_fails_the_sets_come_back_and_the_granted_set_is_refilled(caplog, repairs):
    refilled = []
    guard, events, firewall = make_guard(caplog, FakeGranted(missing=True), refilled)
    repairs.failures = [["IPv4: iptables-nft-restore exited with status 1: Set nfknock-q7-v4 doesn't exist"]]
    events.changes_to_report.append(Changes((Damage(4, "table filter deleted", True, True),), "pid 1 (nft)"))
    guard.step([99], now=1.0)
    assert firewall.applied == [PLAN]  # the whole plan, its sets first (PerFamily.apply)
    assert refilled == [True]
    assert guard.restored == 1 and guard.failed == 0
    assert "the sets were re-created and the granted set refilled" in caplog.text


def test_a_repair_that_cannot_be_done_is_an_error_and_is_retried(caplog, repairs):
    guard, events, firewall = make_guard(caplog)

    def broken(plan):
        raise OSError("no iptables-nft-restore")

    firewall.apply = broken
    repairs.failures = [["IPv4: cannot run"], ["IPv4: cannot run"]]
    events.changes_to_report.append(Changes((Damage(4, "chain NFKNOCK deleted", True, True),), "pid 1 (nft)"))
    guard.step([99], now=1.0)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "may be open" in errors[0].getMessage()
    assert guard.failed == 1 and guard.restored == 0
    assert guard.sleep(1.0) == pytest.approx(RETRY_EVERY)
    repairs.failures = [[]]
    guard.step([], now=1.0 + RETRY_EVERY)  # the retry, with no new event
    assert guard.restored == 1
    assert guard.sleep(5.0) == float("inf")


def test_a_gateway_chain_hurt_alone_puts_back_that_chain_only(caplog, repairs):
    gated = with_gateway(
        PLAN, GatewayPlan({4: [RuleSpec("DROP", "tcp", 22, chain=FORWARD_CHAIN)], 6: []}, {4: [], 6: []})
    )
    guard, events, firewall = make_guard(caplog)
    chains = []
    firewall.apply_gateway_chain = lambda plan, family, chain: chains.append((family, chain))
    guard.applied(gated)
    repairs.clear()
    hurt = Damage(4, "the jump from FORWARD to NFKNOCK-FWD deleted", False, False, gateway=FORWARD_CHAIN)
    ignored = Damage(6, "table nat deleted", False, False, gateway=NAT_CHAIN)  # no nat chain in the plan
    events.changes_to_report.append(Changes((hurt, ignored), "pid 7 (ufw)"))
    guard.step([99], now=1.0)
    assert repairs == []  # the INPUT chain is intact: not re-written
    assert chains == [(4, FORWARD_CHAIN)]
    assert guard.restored == 1 and guard.last == "IPv4: the jump from FORWARD to NFKNOCK-FWD deleted"
    assert "by pid 7 (ufw)" in caplog.text
