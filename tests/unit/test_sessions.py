"""The sessions sets: which of the host's sockets count as sessions, and what `sync` writes."""

import subprocess

import pytest

from nfknock.doors.rules import parse_door
from nfknock.errors import FirewallError
from nfknock.firewall.sessions import SESSION_TIMEOUT, SessionSets, open_sessions, prune_session_sets, session_sets
from support.decisions import fresh_plan

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def row(local: str, remote: str, state: str) -> str:
    return f"   0: {local} {remote} {state} 00000000:00000000 00:00000000 00000000     0        0 1 1 0 20 4 30 10 -1\n"


# 10.0.0.1:22 <- 10.0.0.2:51234 (addresses in host order, as /proc/net/tcp writes them)
V4_TABLE = HEADER + "".join(
    [
        row("0100000A:0016", "0200000A:C822", "01"),  # established: a session
        row("0100000A:0016", "0300000A:C823", "03"),  # SYN_RECV: a handshake, not a session
        row("0100000A:0016", "0400000A:C824", "06"),  # TIME_WAIT: gone
        row("00000000:0016", "00000000:0000", "0A"),  # the listener
        row("0100000A:0050", "0200000A:C825", "01"),  # another port
        row("0100000A:0016", "0500000A:C826", "08"),  # CLOSE_WAIT: still open
    ]
)
# [fd00::1]:22 <- [fd00::2]:40000, and a dual-stack socket holding IPv4 10.0.0.9:51240
V6_TABLE = HEADER + "".join(
    [
        row("000000FD000000000000000001000000:0016", "000000FD000000000000000002000000:9C40", "01"),
        row("0000000000000000FFFF00000100000A:0016", "0000000000000000FFFF00000900000A:C828", "01"),
    ]
)


def test_only_connections_past_their_handshake_on_the_wanted_ports_are_sessions():
    assert sorted(open_sessions(V4_TABLE, [22])) == [
        (4, 22, ("10.0.0.2", 51234, "10.0.0.1")),
        (4, 22, ("10.0.0.5", 51238, "10.0.0.1")),
    ]


def test_ipv6_sessions_and_ipv4_clients_of_a_dual_stack_socket():
    assert sorted(open_sessions(V6_TABLE, [22])) == [
        (4, 22, ("10.0.0.9", 51240, "10.0.0.1")),
        (6, 22, ("fd00::2", 40000, "fd00::1")),
    ]


def test_garbage_lines_are_skipped():
    assert list(open_sessions(HEADER + "junk\n   0: zz:16 00:00 01\n", [22])) == []


class FakeIpset:
    def __init__(self, returncode=0):
        self.inputs: list[str] = []
        self.returncode = returncode

    def __call__(self, argv, input=None, **kwargs):
        self.inputs.append(input)
        return subprocess.CompletedProcess(argv, self.returncode, "", "ipset v7.17: Set cannot be created\n")


def doors_plan():
    door = parse_door(dict(name="d", sequence=[40000, 50000], protect=["22/tcp", "53/udp"], family="ipv4"))
    return fresh_plan((door,), 0)


def test_every_protected_tcp_port_has_a_sessions_set_per_family():
    assert session_sets(doors_plan()) == {"nfknock-q0-s22-v4": (4, 22), "nfknock-q0-s22-v6": (6, 22)}


def test_sync_adds_new_sessions_deletes_closed_ones_and_refreshes_timeouts():
    found = {(4, 22): {("10.0.0.2", 51234, "10.0.0.1")}}
    fake = FakeIpset()
    sets = SessionSets(fake, reader=lambda ports: {key: set(value) for key, value in found.items()})
    sets.sync(doors_plan(), now=0.0)
    first = fake.inputs[-1].splitlines()
    assert "create nfknock-q0-s22-v4 hash:ip,port,ip family inet timeout 120 maxelem 65536 -exist" in first
    assert f"add nfknock-q0-s22-v4 10.0.0.2,tcp:51234,10.0.0.1 timeout {SESSION_TIMEOUT} -exist" in first

    found[(4, 22)] = {("10.0.0.3", 4000, "10.0.0.1")}
    sets.sync(doors_plan(), now=5.0)
    assert fake.inputs[-1].splitlines() == [
        f"add nfknock-q0-s22-v4 10.0.0.3,tcp:4000,10.0.0.1 timeout {SESSION_TIMEOUT} -exist",
        "del nfknock-q0-s22-v4 10.0.0.2,tcp:51234,10.0.0.1 -exist",
    ]
    calls = len(fake.inputs)
    sets.sync(doors_plan(), now=10.0)  # nothing changed: nothing to write
    assert len(fake.inputs) == calls
    sets.sync(doors_plan(), now=40.0)  # but timeouts are renewed before they run out
    assert f"add nfknock-q0-s22-v4 10.0.0.3,tcp:4000,10.0.0.1 timeout {SESSION_TIMEOUT} -exist" in fake.inputs[-1]


def test_a_refused_update_is_an_error_naming_the_sets():
    sets = SessionSets(FakeIpset(returncode=1), reader=lambda ports: {})
    with pytest.raises(FirewallError, match="cannot update the sessions sets: ipset restore exited with status 1"):
        sets.sync(doors_plan(), now=0.0)


def test_only_this_daemons_sessions_sets_of_ports_no_door_protects_any_more_are_pruned():
    listed = "nfknock-q0-s22-v4\nnfknock-q0-s2222-v4\nnfknock-q1-s2222-v4\nnfknock-q0-v4\nnfknock-q0-tcp40000-v4\n"
    calls = []

    def runner(argv, input=None, **kwargs):
        calls.append(input)
        return subprocess.CompletedProcess(argv, 0, listed if argv[1:] == ["list", "-n"] else "", "")

    assert prune_session_sets(0, doors_plan(), runner) == ["nfknock-q0-s2222-v4"]
    assert calls[-1] == "destroy nfknock-q0-s2222-v4\n"
