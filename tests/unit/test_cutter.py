"""A revoke's conntrack cut (daemon/cutter.py): only where a handshake can be pending (a
connection of that source accepted within WINDOW), by the connections' exact tuples (no walk
of the kernel's whole table), and by a walk only while that is unknown (right after a start,
before the survey of what an earlier process let begin)."""

import logging

import pytest

from nfknock.daemon.cutter import WINDOW, HandshakeCutter
from nfknock.errors import FirewallError

LOG = logging.getLogger("test-cutter")


class FakeHandshakes:
    """Records walks (`cut`) and exact lookups (`cut_exact`); `pending` is the survey's answer."""

    def __init__(self, pending=(), fail_survey=False):
        self.cuts: list[str] = []
        self.exact: list[tuple[str, list]] = []
        self.surveyed = list(pending)
        self.fail_survey = fail_survey

    def cut(self, src, ports):
        self.cuts.append(src)
        return 1

    def cut_exact(self, src, tuples):
        self.exact.append((src, sorted(tuples)))
        return len(tuples)

    def pending(self):
        if self.fail_survey:
            raise FirewallError("cannot read conntrack's pending handshakes: no")
        return self.surveyed

    def close(self):
        pass


def surveyed(fake, now=0.0):
    cutter = HandshakeCutter(fake, LOG, now=now)
    cutter.survey()
    return cutter


def test_a_revoke_looks_up_the_connections_it_accepted_instead_of_walking_the_table():
    fake = FakeHandshakes()
    cutter = surveyed(fake)  # nothing pending from an earlier process
    cutter.accepted("10.0.0.3", 3.0, "10.0.0.1", 40004, "22/tcp")
    cutter.accepted("10.0.0.3", 3.5, "10.0.0.1", 40005, "8080/tcp")  # not a port this revoke closes
    assert cutter.cut("10.0.0.3", {22, 2222}, now=4.0) == 1
    assert fake.exact == [("10.0.0.3", [("10.0.0.1", 40004, 22)])] and fake.cuts == []
    assert cutter.cut("10.0.0.4", {22}, now=4.0) == 0  # accepted nothing: nothing to do
    assert cutter.skipped == 1 and fake.cuts == []


def test_a_connection_it_cannot_name_exactly_makes_the_revoke_walk_the_table():
    fake = FakeHandshakes()
    cutter = surveyed(fake)
    cutter.accepted("10.0.0.2", 1.0, "10.0.0.1", 40001, "22/tcp")
    cutter.accepted("10.0.0.2", 2.0)  # (no tuple)
    cutter.cut("10.0.0.2", {22}, now=3.0)
    assert fake.cuts == ["10.0.0.2"] and fake.exact == []


def test_long_after_its_last_connection_a_source_needs_no_cut():
    fake = FakeHandshakes()
    cutter = surveyed(fake)
    cutter.accepted("10.0.0.2", 10.0, "10.0.0.1", 40001, "22/tcp")
    cutter.accepted("10.0.0.5", 10.0)
    assert cutter.cut("10.0.0.2", {22}, now=10.0 + WINDOW + 1) == 0
    assert cutter.cut("10.0.0.5", {22}, now=10.0 + WINDOW + 1) == 0
    assert fake.cuts == [] and fake.exact == [] and cutter.skipped == 2


def test_the_survey_at_start_names_what_an_earlier_process_let_begin():
    fake = FakeHandshakes(pending=[("10.0.0.7", "10.0.0.1", 50000, 22)])
    cutter = HandshakeCutter(fake, LOG, now=0.0)
    cutter.cut("10.0.0.7", {22}, now=0.5)  # before the survey: the whole table
    assert fake.cuts == ["10.0.0.7"]
    cutter.survey()
    cutter.cut("10.0.0.7", {22}, now=1.0)
    cutter.cut("10.0.0.8", {22}, now=1.0)
    assert fake.cuts == ["10.0.0.7"] and fake.exact == [("10.0.0.7", [("10.0.0.1", 50000, 22)])]


def test_without_a_survey_every_revoke_walks_the_table_until_the_window_is_over(caplog):
    fake = FakeHandshakes(fail_survey=True)
    cutter = HandshakeCutter(fake, LOG, now=100.0)
    with caplog.at_level(logging.WARNING):
        cutter.survey()
    assert "revokes read the whole conntrack table" in caplog.text
    cutter.cut("10.0.0.9", {22}, now=100.0 + WINDOW - 1)
    assert fake.cuts == ["10.0.0.9"]
    assert cutter.cut("10.0.0.9", {22}, now=100.0 + WINDOW + 1) == 0


def test_the_start_reads_a_bounded_number_of_pending_handshakes():
    """After a SYN flood conntrack may hold hundreds of thousands of unfinished entries: the
    survey stops after its limit (the cutter then walks the table at a revoke) instead of
    parsing them all while no knock is answered."""
    from types import SimpleNamespace

    from nfknock.firewall.handshakes import Handshakes

    read = []

    def flood():
        for n in range(100_000):
            read.append(n)
            orig = SimpleNamespace(
                saddr=f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", daddr="10.0.0.1", sport=1024, dport=22
            )
            yield SimpleNamespace(status=0, tuple_orig=orig)

    handshakes = Handshakes()
    handshakes._open = lambda: object()  # type: ignore[method-assign]
    handshakes._unassured = lambda table, wanted, lazy=False: flood()  # type: ignore[method-assign]
    with pytest.raises(FirewallError, match="more than 50 pending handshakes"):
        handshakes.pending(limit=50)
    assert len(read) == 51  # the rest of the dump is never parsed
