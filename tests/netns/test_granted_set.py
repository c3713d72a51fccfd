"""The kernel's set of granted sources, on a real kernel: a knock puts the client in it, close
and revoke take it out; a flood of strangers at the protected port is shed by the kernel before
the queue; a granted client's connections go to a queue of their own. Both backends."""

import json
import time

import pytest
from conftest import connect, knock

from support.sandbox import SynFlood, queue_counters

pytestmark = pytest.mark.parametrize("server", ["legacy", "nft"], indirect=True)
SEQUENCE, CLOSE = ("40000", "50000", "60000"), ("60000", "50000", "40000")


def members(server, family: int = 4) -> set[str]:
    out = server.sandbox.run(server.sandbox.server, ["ipset", "list", f"nfknock-q7-v{family}"], check=True).stdout
    return {line.split()[0] for line in out.split("Members:", 1)[1].splitlines() if line.strip()}


def wait_members(server, wanted: set[str], family: int = 4) -> set[str]:
    end = time.monotonic() + 10
    while (found := members(server, family)) != wanted and time.monotonic() < end:
        time.sleep(0.05)
    return found


def test_a_grant_puts_the_source_in_the_set_and_close_and_revoke_take_it_out(server, alice, bob):
    server.start()
    assert members(server) == set()
    knock(server.sandbox, alice, *SEQUENCE)
    assert wait_members(server, {alice.address}) == {alice.address}
    assert connect(alice).connected
    knock(server.sandbox, alice, *CLOSE)
    assert wait_members(server, set()) == set()
    knock(server.sandbox, bob, *SEQUENCE)
    assert wait_members(server, {bob.address}) == {bob.address}
    socket_path = str(server.workdir / "nfknock.sock")
    assert server.nfknock("revoke", bob.address, "--control-socket", socket_path).returncode == 0
    assert wait_members(server, set()) == set()
    assert not connect(bob, timeout=1).connected


def test_being_in_the_set_opens_nothing_by_itself(server, bob):
    """The set only routes to the daemon's queue: an element the daemon did not put there (or
    one it has revoked) gets the daemon's verdict, which is drop."""
    server.start("-v")
    server.sandbox.run(server.sandbox.server, ["ipset", "add", "nfknock-q7-v4", bob.address], check=True)
    assert not connect(bob, timeout=1).connected
    assert f"{bob.address}: refused new connection to 22/tcp" in server.wait_log("refused new connection")


def test_a_syn_flood_from_strangers_is_shed_before_the_queue(server, alice, mallory):
    server.start("-v")
    knock(server.sandbox, alice, *SEQUENCE)
    assert wait_members(server, {alice.address}) == {alice.address}
    main_before = queue_counters(server.sandbox.server, 7).id_sequence
    grant_before = queue_counters(server.sandbox.server, 8).id_sequence
    flood = SynFlood(mallory.namespace, mallory.server_address, 22)
    started = time.monotonic()
    try:
        sent = flood.send(0x0B000000, 200_000)  # 11.0.0.0 upwards: strangers
    finally:
        flood.close()
    elapsed = time.monotonic() - started
    assert connect(alice).connected
    main = queue_counters(server.sandbox.server, 7).id_sequence - main_before
    grant = queue_counters(server.sandbox.server, 8).id_sequence - grant_before
    # The kernel's limit: a burst of 200, then 100 a second (a little slack for timer rounding).
    assert sent > 150_000
    assert main <= 200 + 100 * (elapsed + 1), (main, elapsed)
    assert grant == 1  # alice's one connection, and nothing of the flood
    status = json.loads(
        server.nfknock("status", "--json", "--control-socket", str(server.workdir / "nfknock.sock")).stdout
    )
    assert [g["source"] for g in status["grants"]] == [alice.address]
