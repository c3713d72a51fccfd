"""A revoke's conntrack cut (daemon/cutter.py): never in the loop's way, and only where a
handshake can be pending (a connection of that source accepted within WINDOW, or right after a
start, when nobody knows)."""

import logging
import threading

from nfknock.daemon.cutter import WINDOW, HandshakeCutter
from nfknock.errors import FirewallError

LOG = logging.getLogger("test-cutter")


class FakeHandshakes:
    """Records cuts; `gate` holds each one (a slow conntrack walk)."""

    def __init__(self, fail=False):
        self.cuts: list[tuple[str, frozenset]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail = fail
        self.closed = False

    def cut(self, src, ports):
        self.gate.wait(10)
        self.cuts.append((src, frozenset(ports)))
        if self.fail:
            raise FirewallError("cannot cut")
        return 1

    def close(self):
        self.closed = True


def test_a_revoke_never_waits_for_the_conntrack_walk():
    fake = FakeHandshakes()
    fake.gate.clear()  # the kernel walks its table for a long time
    cutter = HandshakeCutter(fake, LOG, now=0.0)
    assert cutter.cut("10.0.0.2", {22}, now=1.0) == 0  # returned at once
    assert fake.cuts == []
    fake.gate.set()
    assert cutter.wait()
    assert fake.cuts == [("10.0.0.2", frozenset({22}))]
    cutter.close()
    assert fake.closed


def test_only_a_source_with_a_connection_accepted_lately_is_cut_once_the_start_is_past():
    fake = FakeHandshakes()
    cutter = HandshakeCutter(fake, LOG, now=0.0)
    start = WINDOW + 1  # the history of an earlier process is over
    cutter.accepted("10.0.0.2", start)
    cutter.cut("10.0.0.2", {22}, now=start + 10)  # its SYN may still be half-way
    cutter.cut("10.0.0.3", {22}, now=start + 10)  # nothing of it was accepted: nothing to cut
    cutter.cut("10.0.0.2", {22}, now=start + WINDOW + 5)  # its last accepted SYN is long gone
    assert cutter.wait()
    assert [src for src, _ in fake.cuts] == ["10.0.0.2"]
    assert cutter.skipped == 2
    cutter.close()


def test_right_after_a_start_every_revoke_cuts():
    """An earlier process may have accepted SYNs whose handshakes are still pending."""
    fake = FakeHandshakes()
    cutter = HandshakeCutter(fake, LOG, now=100.0)
    cutter.cut("10.0.0.9", {22}, now=100.0 + WINDOW - 1)
    assert cutter.wait() and [src for src, _ in fake.cuts] == ["10.0.0.9"]
    cutter.close()


def test_a_failed_cut_is_a_warning_and_the_next_one_still_runs(caplog):
    fake = FakeHandshakes(fail=True)
    cutter = HandshakeCutter(fake, LOG, now=0.0)
    with caplog.at_level(logging.WARNING):
        cutter.cut("10.0.0.2", {22}, now=1.0)
        cutter.cut("10.0.0.3", {22}, now=1.0)
        assert cutter.wait()
    assert len(fake.cuts) == 2
    assert "a handshake it started during its grant may still complete" in caplog.text
    cutter.close()
