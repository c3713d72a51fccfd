"""IPv6 on a real kernel: ip6tables scaffolding, knocks over IPv6 (also behind extension
headers), grants per IPv6 address, IPv6 sources, doors restricted to one family."""

import socket

import pytest
from conftest import connect, our_knock

from support.sandbox import entered, nfknock_argv

pytestmark = pytest.mark.parametrize("server", ["legacy", "nft"], indirect=True)

V6_ONLY = """\
doors:
  - name: v6door
    sequence: [41000, 42000/udp, 43000]
    protect: [22/tcp]
    family: ipv6
    sources: ["fd00:199:1::/64"]
"""


def knock6(server, client, *ports):
    result = server.sandbox.run(client.namespace, ["knock", "-6", client.server_address6, *ports])
    assert result.returncode == 0, result.stderr


def test_stock_knock_over_ipv6_opens_for_that_address_only(server, alice, bob):
    server.start()
    assert not connect(alice, family=6, timeout=1).connected
    knock6(server, alice, "40000", "50000", "60000")
    attempt = connect(alice, family=6, timeout=3)
    assert attempt.connected and attempt.seconds < 0.5
    assert "fd00:199:1::2: openSSH: OPEN SESAME" in server.log_text()
    assert not connect(alice, family=4, timeout=1).connected  # IPv4 of the same host: not granted
    assert not connect(bob, family=6, timeout=1).connected
    knock6(server, alice, "60000", "50000", "40000")
    assert not connect(alice, family=6, timeout=1).connected


def test_own_client_over_ipv6(server, alice):
    server.start()
    knock = nfknock_argv("knock", alice.server_address6, "--door", "openSSH", "--rules", str(server.rules))
    result = server.sandbox.run(alice.namespace, knock)
    assert result.returncode == 0, result.stderr
    attempt = connect(alice, family=6)
    assert attempt.connected and attempt.seconds < 0.5
    wrong = our_knock(server.sandbox, alice, "-6", "40000")  # -6 with an IPv4 literal
    assert wrong.returncode == 2 and "cannot resolve '10.199.1.1' (IPv6)" in wrong.stderr


def test_door_for_one_family_and_ipv6_sources(server, alice, bob):
    server.write_rules(V6_ONLY)
    server.start()
    # No knock is taken over IPv4, but the port stays closed there: the service listens on both.
    assert not any("--dport 41000" in rule or "NFQUEUE" in rule for rule in server.iptables(4))
    assert any("--dport 22 -j DROP" in rule for rule in server.iptables(4))
    assert any("--dport 41000" in rule for rule in server.iptables(6))
    assert not connect(alice, family=4, timeout=1).connected
    knock6(server, bob, "41000", "42000:udp", "43000")
    assert not connect(bob, family=6, timeout=1).connected  # bob is outside the sources
    knock6(server, alice, "41000", "42000:udp", "43000")
    assert connect(alice, family=6).connected


def test_udp_knock_behind_a_hop_by_hop_header_counts(server, alice):
    server.write_rules(V6_ONLY)
    server.start()
    knock6(server, alice, "41000")
    with entered(alice.namespace):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_HOPOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0]))
    sock.sendto(b"x", (alice.server_address6, 42000))
    sock.close()
    knock6(server, alice, "43000")
    assert connect(alice, family=6).connected


V4_ONLY = V6_ONLY.replace("v6door", "v4door").replace("ipv6", "ipv4").replace('"fd00:199:1::/64"', '"10.199.1.0/24"')


def test_a_door_for_ipv4_keeps_its_port_closed_over_ipv6(server, alice, bob):
    """`family` says where knocks are taken, never where the port is closed: a service on `::`
    answers IPv6 too, and a stranger must not reach it there."""
    server.write_rules(V4_ONLY)
    server.start()
    assert not any("NFQUEUE" in rule for rule in server.iptables(6))
    assert not connect(bob, family=6, timeout=1).connected
    assert not connect(alice, family=6, timeout=1).connected
    knock6(server, alice, "41000", "42000:udp", "43000")  # not taken over IPv6
    assert not connect(alice, family=6, timeout=1).connected
    result = server.sandbox.run(alice.namespace, ["knock", alice.server_address, "41000", "42000:udp", "43000"])
    assert result.returncode == 0, result.stderr
    assert connect(alice, family=4).connected
    assert not connect(alice, family=6, timeout=1).connected  # a grant is for the address that knocked
