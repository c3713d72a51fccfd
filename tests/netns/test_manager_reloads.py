"""`nfknock export` on a real kernel: the host firewall manager reloads its ruleset the way it does
on a real host (nftables.service: `nft -f /etc/nftables.conf`, which starts with `flush ruleset`;
netfilter-persistent: iptables-restore of rules.v4 and rules.v6), again and again, while a host
that never knocked starts a connection to 22 every 2 ms over IPv4 and IPv6: with the exported
base rule in the manager's configuration, not one connects; a granted client still gets in.
Both backends: with iptables-nft, nfknock's chain is in the tables the manager flushes; with
legacy tables, an nft flush leaves it alone and the grant must survive the reloads."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, knock

from support.sandbox import connect

pytestmark = pytest.mark.parametrize("server", ["legacy", "nft"], indirect=True)

WATCH = REPO / "deploy" / "systemd" / "watch.py"
RELOADS = 25

# Debian 12's /etc/nftables.conf as the nftables package ships it, plus the include the README's
# recipe adds.
DEBIAN_NFTABLES_CONF = """\
#!/usr/sbin/nft -f

flush ruleset

table inet filter {
	chain input {
		type filter hook input priority filter;
	}
	chain forward {
		type filter hook forward priority filter;
	}
	chain output {
		type filter hook output priority filter;
	}
}
"""

# A typical netfilter-persistent rules.v4/rules.v6: the admin lets SSH in explicitly.
RULES_V = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
COMMIT
"""


class Probers:
    """watch.py from a namespace that never knocked, one per address family, every 2 ms."""

    def __init__(self, sandbox, client, workdir: Path):
        self.stop = workdir / "watch.stop"
        self.processes = [
            sandbox.spawn(
                client.namespace,
                [sys.executable, str(WATCH), client.server(family), "22", str(self.stop), "2"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for family in (4, 6)
        ]
        time.sleep(0.3)  # both are probing before the first reload

    def results(self) -> list[tuple[int, int, str]]:
        """(probes, connected, the prober's line) per family."""
        self.stop.touch()
        out = []
        for process in self.processes:
            stdout, stderr = process.communicate(timeout=10)
            words = stdout.split()
            assert words, stderr
            out.append((int(words[0]), int(stdout.split(", ")[1].split()[0]), stdout.strip()))
        return out


def reload_under_probes(server, mallory, tmp_path, reload) -> None:
    probers = Probers(server.sandbox, mallory, tmp_path)
    try:
        for _ in range(RELOADS):
            reload()
            time.sleep(0.02)
    finally:
        results = probers.results()
    for probes, connected, line in results:
        assert connected == 0, line
        assert probes >= RELOADS, line  # they probed all along


def granted_after(server, alice) -> None:
    """A granted client gets in after the reloads: where the manager left nfknock's chain alone
    (an nft flush and legacy tables), with the grant it had; where it flushed the chain, once the
    chain is back (the daemon restarted here) and after a knock."""
    if not server.iptables():
        server.stop()
        server.start()
        knock(server.sandbox, alice, "40000", "50000", "60000")
    attempt = connect(alice, timeout=3)
    assert attempt.connected and attempt.greeting == b"hello\n"


def test_nftables_service_reloads_never_open_the_protected_port(server, alice, mallory, tmp_path):
    sandbox = server.sandbox
    include = tmp_path / "nfknock.nft"
    include.write_text(server.nfknock("export", "nftables", "--rules", str(server.rules)).stdout)
    conf = tmp_path / "nftables.conf"
    conf.write_text(DEBIAN_NFTABLES_CONF + f'include "{include}"\n')
    try:
        sandbox.run(sandbox.server, ["nft", "-f", str(conf)], check=True)  # at boot, before nfknock
        server.start()
        assert not connect(mallory, timeout=1).connected
        knock(sandbox, alice, "40000", "50000", "60000")
        granted = connect(alice, timeout=3)  # through nfknock's chain and the base rule after it
        assert granted.connected and granted.greeting == b"hello\n"

        reload_under_probes(
            server, mallory, tmp_path, lambda: sandbox.run(sandbox.server, ["nft", "-f", str(conf)], check=True)
        )
        if server.flavour == "legacy":  # an nft flush leaves legacy tables: the grant holds through it all
            assert server.iptables()
        granted_after(server, alice)
    finally:
        sandbox.run(sandbox.server, ["nft", "delete", "table", "inet", "nfknock_base"])
        sandbox.run(sandbox.server, ["nft", "delete", "table", "inet", "filter"])


def test_netfilter_persistent_reloads_never_open_the_protected_port(server, alice, mallory, tmp_path):
    sandbox = server.sandbox
    base = server.nfknock("export", "iptables", "--rules", str(server.rules)).stdout
    rules = tmp_path / "rules.v"
    rules.write_text(RULES_V + base)  # the same text serves rules.v4 and rules.v6
    restore = [f"iptables-{server.flavour}-restore", f"ip6tables-{server.flavour}-restore"]

    def reload() -> None:
        for tool in restore:
            sandbox.run(sandbox.server, [tool, str(rules)], check=True)

    reload()  # at boot, before nfknock
    server.start()
    assert not connect(mallory, timeout=1).connected
    knock(sandbox, alice, "40000", "50000", "60000")
    granted = connect(alice, timeout=3)  # nfknock's chain comes first in INPUT; the security table after it
    assert granted.connected and granted.greeting == b"hello\n"

    reload_under_probes(server, mallory, tmp_path, reload)
    assert not server.iptables()  # the restore took nfknock's chain away: only the base rule held
    granted_after(server, alice)
