"""Gateway doors on a real kernel: client — bastion (nfknock) — internal host. A knock or a stock
`fwknop -N` opens the internal service through the bastion for the knocker only, routed and
published (DNAT); a host that never knocked gets nothing before, during and after; a daemon
killed mid-session leaves the established session up and lets nothing new through."""

from __future__ import annotations

import signal
import socket
import time

import pytest
from conftest import knock, spa_door

from support.sandbox import EchoService, add_internal, entered

pytestmark = pytest.mark.parametrize("server", ["legacy", "nft"], indirect=True)

SEQUENCE = ("7001", "7002", "7003")


@pytest.fixture
def internal(sandbox):
    host = add_internal(sandbox)
    service = EchoService(host.namespace)
    try:
        yield host
    finally:
        service.close()


def fwknop(server, client, *extra: str, access: str = "tcp/22") -> None:
    """The stock fwknop client (as test_spa_doors.py drives it), with the door's keys."""
    argv = ["fwknop", "-A", access, "-a", client.address, "-D", client.server_address]
    argv += ["--key-base64-rijndael", server.keys[0], "--key-base64-hmac", server.keys[1]]
    argv += ["--use-hmac", "--rc-file", "/dev/null", *extra]
    result = server.sandbox.run(client.namespace, argv)
    assert result.returncode == 0, result.stdout + result.stderr


def reach(client, address: str, port: int = 22, family: int = 4, timeout: float = 1.5) -> socket.socket | None:
    """A connection from `client` to address:port that got the internal service's greeting, or None."""
    with entered(client.namespace):
        sock = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET)
    sock.settimeout(timeout)
    try:
        sock.connect((address, port))
        if sock.recv(16) == b"hello\n":
            return sock
    except OSError:
        pass
    sock.close()
    return None


def reaches(client, address: str, port: int = 22, family: int = 4) -> bool:
    sock = reach(client, address, port, family)
    if sock is None:
        return False
    sock.close()
    return True


def gateway_rules(internal, family: str = "any") -> str:
    return f"""\
doors:
  - name: gwSSH
    sequence: [{", ".join(SEQUENCE)}]
    family: {family}
    forward: [{internal.address}:22/tcp, "[{internal.address6}]:22/tcp"]
    publish: [{{port: 2222/tcp, to: {internal.address}:22}}, {{port: 2223/tcp, to: "[{internal.address6}]:22"}}]
"""


def test_a_knock_opens_the_internal_service_for_the_knocker_only(server, internal, alice, mallory):
    assert reaches(mallory, internal.address)  # the bastion forwards: what stops mallory below is nfknock
    server.write_rules(gateway_rules(internal))
    server.start()
    assert not reaches(alice, internal.address) and not reaches(alice, alice.server_address, 2222)
    assert not reaches(mallory, internal.address) and not reaches(mallory, mallory.server_address, 2222)
    knock(server.sandbox, alice, *SEQUENCE)
    assert reaches(alice, internal.address), server.log_text()  # routed
    assert reaches(alice, alice.server_address, 2222), server.log_text()  # published (DNAT)
    assert not reaches(mallory, internal.address) and not reaches(mallory, mallory.server_address, 2222)
    line = server.wait_log("gwSSH: accepted new connection to")
    assert f"{internal.address}:22/tcp" in line
    revoked = server.nfknock("revoke", alice.address, "--control-socket", str(server.workdir / "nfknock.sock"))
    assert revoked.returncode == 0, revoked.stderr
    assert not reaches(mallory, internal.address) and not reaches(mallory, mallory.server_address, 2222)
    assert not reaches(alice, internal.address)


def test_an_ipv6_knock_opens_the_routed_ipv6_destination(server, internal, alice, mallory):
    assert reaches(mallory, internal.address6, family=6)  # the bastion forwards IPv6 too
    server.write_rules(gateway_rules(internal))
    server.start()
    assert not reaches(alice, internal.address6, family=6)
    result = server.sandbox.run(alice.namespace, ["knock", "-6", alice.server_address6, *SEQUENCE])
    assert result.returncode == 0, result.stderr
    assert reaches(alice, internal.address6, family=6), server.log_text()
    assert reaches(alice, alice.server_address6, 2223, family=6), server.log_text()  # published (ip6tables DNAT)
    assert not reaches(mallory, internal.address6, family=6)
    assert not reaches(mallory, mallory.server_address6, 2223, family=6)
    assert not reaches(alice, internal.address)  # a grant is per address: IPv4 stays closed


def test_a_killed_daemon_keeps_established_sessions_and_forwards_nothing_new(server, internal, alice, mallory):
    server.write_rules(gateway_rules(internal))
    server.start()
    knock(server.sandbox, alice, *SEQUENCE)
    routed = reach(alice, internal.address)
    published = reach(alice, alice.server_address, 2222)
    assert routed is not None and published is not None, server.log_text()
    try:
        server.stop(signal.SIGKILL)
        for sock in (routed, published):
            sock.sendall(b"ping\n")
            assert sock.recv(64) == b"ping\n"
        assert not reaches(alice, internal.address) and not reaches(alice, alice.server_address, 2222)
        assert not reaches(mallory, internal.address) and not reaches(mallory, mallory.server_address, 2222)
    finally:
        routed.close()
        published.close()


def test_stock_fwknop_nat_access_opens_the_published_port(server, internal, alice, mallory, tmp_path):
    spa_door(
        server,
        tmp_path,
        f"forward: [{internal.address}:22/tcp]",
        f"publish: [{{port: 2222/tcp, to: {internal.address}:22}}]",
    )
    text = (server.rules / "doors.yaml").read_text().replace("    protect: [22/tcp]\n", "")
    server.write_rules(text)
    server.start()
    assert not reaches(alice, alice.server_address, 2222)
    fwknop(server, alice, "-N", f"{internal.address}:22", access="tcp/2222")
    server.wait_log("spaSSH: OPEN")
    assert reaches(alice, alice.server_address, 2222), server.log_text()
    assert reaches(alice, internal.address), server.log_text()
    assert not reaches(mallory, mallory.server_address, 2222) and not reaches(mallory, internal.address)


def test_fwknop_nat_access_to_another_destination_is_refused_with_a_reason(server, internal, alice, tmp_path):
    spa_door(server, tmp_path, f"forward: [{internal.address}:22/tcp]")
    server.start()
    fwknop(server, alice, "-N", f"{internal.address}:2200", access="tcp/22")
    line = server.wait_log("destination not allowed")
    assert f"{internal.address}:2200/tcp" in line
    assert not reaches(alice, internal.address)


def test_a_flush_that_takes_the_rules_away_takes_the_gateway_chains_back_too(server, internal, alice, mallory):
    server.write_rules(gateway_rules(internal))
    server.start()
    installed = server.iptables()
    assert any(line.startswith("-A NFKNOCK-FWD") for line in installed)
    knock(server.sandbox, alice, *SEQUENCE)
    assert reaches(alice, internal.address), server.log_text()
    # nftables.service's `flush ruleset` (every nf_tables table), or an admin's `iptables -F`
    # (every chain of the legacy filter table): the main chain goes, and so do the FORWARD rules.
    argv = ["nft", "flush", "ruleset"] if server.flavour == "nft" else ["iptables-legacy", "-F"]
    server.sandbox.run(server.sandbox.server, argv, check=True)
    server.wait_log("nfknock's rules were changed")
    assert server.iptables() == installed
    assert not reaches(mallory, internal.address) and not reaches(mallory, mallory.server_address, 2222)
    assert reaches(alice, internal.address) and reaches(alice, alice.server_address, 2222)


def test_the_exported_nftables_base_rule_keeps_the_destinations_closed_without_nfknock(
    server, internal, alice, mallory, tmp_path
):
    rules = server.write_rules(gateway_rules(internal))
    base = tmp_path / "nfknock.nft"
    exported = server.nfknock("export", "nftables", "--rules", str(rules))
    assert exported.returncode == 0, exported.stderr
    base.write_text(exported.stdout)
    server.sandbox.run(server.sandbox.server, ["nft", "-f", str(base)], check=True)
    server.start()
    knock(server.sandbox, alice, *SEQUENCE)
    held = reach(alice, internal.address)  # nfknock's verdict marks it: the base rule lets it by
    assert held is not None and reaches(alice, alice.server_address, 2222), server.log_text()
    assert not reaches(mallory, internal.address)
    try:
        server.stop(signal.SIGKILL)
        down = server.nfknock("down")
        assert down.returncode == 0, down.stderr
        assert not any("NFKNOCK" in line for line in server.iptables())  # only the base rule is left
        held.sendall(b"ping\n")
        assert held.recv(64) == b"ping\n"  # established: let by
        assert not reaches(mallory, internal.address) and not reaches(alice, internal.address)
    finally:
        held.close()


def test_with_workers_a_knock_opens_the_destination_for_the_knocker_only(server, internal, alice, bob, mallory):
    server.write_rules(gateway_rules(internal))
    server.start("--workers", "2")
    # The FORWARD queue rules are sharded as INPUT's are (by the source's last byte, which is 2
    # for every client here: one worker judges them, the other's copies must not get in the way).
    for client in (alice, bob):
        knock(server.sandbox, client, *SEQUENCE)
        assert reaches(client, internal.address) and reaches(client, client.server_address, 2222), server.log_text()
    assert not reaches(mallory, internal.address) and not reaches(mallory, mallory.server_address, 2222)


WARNING = "nfknock's rules were changed"
GATEWAY_DAMAGE = {
    "flush FORWARD": ["-F", "FORWARD"],
    "flush NFKNOCK-FWD": ["-F", "NFKNOCK-FWD"],
    "flush nat": ["-t", "nat", "-F"],
    "delete the PREROUTING jump": ["-t", "nat", "-D", "PREROUTING", "-j", "NFKNOCK-NAT"],
}


@pytest.mark.parametrize("operation", list(GATEWAY_DAMAGE))
def test_a_gateway_chain_taken_away_alone_comes_back(server, internal, alice, mallory, operation):
    """Only a gateway chain or its jump goes (ufw or docker rewriting FORWARD, `iptables -t nat
    -F`), the main chain stays: the watcher notices it, puts it back and says so, and then a
    stranger gets nothing new through while the knocker still does."""
    server.write_rules(gateway_rules(internal))
    server.start()
    assert not reaches(mallory, internal.address)
    knock(server.sandbox, alice, *SEQUENCE)
    held = reach(alice, alice.server_address, 2222)
    assert held is not None, server.log_text()
    try:
        tool = f"iptables-{server.flavour}"
        server.sandbox.run(server.sandbox.server, [tool, *GATEWAY_DAMAGE[operation]], check=True)
        line = server.wait_log(WARNING, timeout=10)
        print(f"{server.flavour} {operation}: {line.split(WARNING, 1)[1]}")  # how long the repair took
        assert "NFKNOCK-FWD" in line or "NFKNOCK-NAT" in line, line
        listing = server.sandbox.run(server.sandbox.server, [tool, "-S", "FORWARD"], check=True).stdout
        assert "-A FORWARD -j NFKNOCK-FWD" in listing.splitlines()
        nat = server.sandbox.run(server.sandbox.server, [tool, "-t", "nat", "-S"], check=True).stdout
        assert "-A PREROUTING -j NFKNOCK-NAT" in nat.splitlines() and "DNAT" in nat
        assert not reaches(mallory, internal.address) and not reaches(mallory, mallory.server_address, 2222)
        assert reaches(alice, internal.address), server.log_text()
        assert reaches(alice, alice.server_address, 2222), server.log_text()
        held.sendall(b"ping\n")
        assert held.recv(64) == b"ping\n"  # the established session lives on
    finally:
        held.close()
    assert len([line for line in server.log_text().splitlines() if WARNING in line]) == 1


def test_broken_rules_and_no_last_good_keep_the_destinations_closed(server, internal, alice, mallory):
    """At boot, rules that do not load and no last good copy: the destinations the broken file
    still names are closed too (routed and published), not only the host's protected ports."""
    assert reaches(mallory, internal.address) and reaches(mallory, internal.address6, family=6)
    broken = gateway_rules(internal).replace("7003]", "7003")  # an edit never reloaded
    server.write_rules(broken + "    protect: [22/tcp]\n")
    server.start(expect_ready=False)
    assert server.process.wait(30) == 2
    said = server.process.stderr.read()
    assert f"{internal.address}:22/tcp" in said and "closed" in said, said
    knock(server.sandbox, alice, *SEQUENCE)
    for client in (alice, mallory):
        assert not reaches(client, internal.address), server.iptables()
        assert not reaches(client, internal.address6, family=6)
        assert not reaches(client, client.server_address, 2222)


def knock_from(client, source: str, *ports: str) -> None:
    """A TCP knock (SYNs, as knockd's client sends) from `source`, an extra address of `client`."""
    for port in ports:
        with entered(client.namespace):
            sock = socket.socket()
        sock.setblocking(False)
        sock.bind((source, 0))
        sock.connect_ex((client.server_address, int(port)))
        time.sleep(0.05)
        sock.close()


def reach_from(client, source: str, address: str, port: int = 22) -> bool:
    with entered(client.namespace):
        sock = socket.socket()
    sock.settimeout(1.5)
    try:
        sock.bind((source, 0))
        sock.connect((address, port))
        return sock.recv(16) == b"hello\n"
    except OSError:
        return False
    finally:
        sock.close()


def test_with_workers_a_client_whose_last_byte_differs_gets_through_too(server, internal, alice, mallory):
    """--workers 2 shards the FORWARD queue rules by the source's last byte: a client at .200
    (the other worker's shard than .2) is judged by its own worker, routed and published."""
    far = alice.address.rsplit(".", 1)[0] + ".200"
    shown = server.sandbox.run(alice.namespace, ["ip", "-o", "-4", "addr", "show"], check=True).stdout
    device = next(line.split()[1] for line in shown.splitlines() if f" {alice.address}/" in line)
    server.sandbox.run(alice.namespace, ["ip", "addr", "add", f"{far}/24", "dev", device], check=True)
    server.write_rules(gateway_rules(internal))
    server.start("--workers", "2")
    assert not reach_from(alice, far, internal.address)
    knock_from(alice, far, *SEQUENCE)
    assert reach_from(alice, far, internal.address), server.log_text()
    assert reach_from(alice, far, alice.server_address, 2222), server.log_text()
    assert not reaches(alice, internal.address)  # alice's own address never knocked
    assert not reaches(mallory, internal.address) and not reaches(mallory, mallory.server_address, 2222)


def test_a_door_that_only_publishes_lets_no_stranger_reach_the_internal_address(server, internal, alice, mallory):
    """No `forward`: a stranger sending to the internal address itself (routed, not through the
    published port) is dropped too, before and after someone else's knock."""
    server.write_rules(
        f"doors:\n  - name: gwPub\n    sequence: [{', '.join(SEQUENCE)}]\n"
        f"    publish: [{{port: 2222/tcp, to: {internal.address}:22}}]\n"
    )
    server.start()
    assert not reaches(mallory, internal.address) and not reaches(mallory, mallory.server_address, 2222)
    knock(server.sandbox, alice, *SEQUENCE)
    assert reaches(alice, alice.server_address, 2222), server.log_text()
    assert not reaches(mallory, internal.address) and not reaches(mallory, mallory.server_address, 2222)


IPV6_DSTOPTS = 59
PADDING_OPTIONS = bytes([0, 0, 1, 4, 0, 0, 0, 0])  # a destination options header: PadN only


def reach_with_options(client, address: str, port: int = 22) -> bool:
    """An IPv6 connection whose every packet carries a destination options header."""
    with entered(client.namespace):
        sock = socket.socket(socket.AF_INET6)
    sock.settimeout(1.5)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_DSTOPTS, PADDING_OPTIONS)
        sock.connect((address, port))
        return sock.recv(16) == b"hello\n"
    except OSError:
        return False
    finally:
        sock.close()


def test_ipv6_extension_headers_to_a_destination_change_nothing(server, internal, alice, mallory):
    """A destination options header ahead of TCP (which a `-p tcp` rule might have missed): a
    stranger still gets nothing through, and the knocker's connection is judged as any other."""
    assert reach_with_options(mallory, internal.address6)  # the header itself passes the bastion
    server.write_rules(gateway_rules(internal))
    server.start()
    assert not reach_with_options(mallory, internal.address6)
    assert not reach_with_options(mallory, mallory.server_address6, 2223)
    server.sandbox.run(alice.namespace, ["knock", "-6", alice.server_address6, *SEQUENCE], check=True)
    assert reach_with_options(alice, internal.address6), server.log_text()
    assert not reach_with_options(mallory, internal.address6)
