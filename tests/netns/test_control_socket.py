"""The control socket and the metrics of a running daemon: status, revoke, break-glass grant."""

import json
import stat
import urllib.request

import pytest
from conftest import connect, knock

from support.sandbox import entered

DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy outside the namespaces


@pytest.fixture
def controlled(server):
    server.start("--metrics-port", "9474")
    server.socket = server.workdir / "nfknock.sock"
    return server


def ctl(server, *args):
    return server.nfknock(*args, "--control-socket", str(server.socket))


def test_status_shows_grants_and_the_socket_is_root_only(controlled, alice):
    assert stat.S_IMODE(controlled.socket.stat().st_mode) == 0o600
    knock(controlled.sandbox, alice, "40000", "50000", "60000")
    answer = json.loads(ctl(controlled, "status", "--json").stdout)
    assert [(g["door"], g["source"]) for g in answer["grants"]] == [("openSSH", "10.199.1.2")]
    assert 0 < answer["grants"][0]["seconds_left"] <= 30
    assert answer["packets"]["drop"] >= 2  # the second and third knock (the first is the kernel's)
    text = ctl(controlled, "status").stdout
    assert "10.199.1.2" in text and "openSSH" in text


def test_revoke_and_break_glass_grant(controlled, alice, bob):
    knock(controlled.sandbox, alice, "40000", "50000", "60000")
    held = connect(alice)
    assert held.connected
    result = ctl(controlled, "revoke", "10.199.1.2")
    assert result.returncode == 0 and "revoked 10.199.1.2 on openSSH" in result.stdout
    assert not connect(alice, timeout=1).connected
    result = ctl(controlled, "grant", "10.199.2.2", "--door", "openSSH", "--for", "1m")
    assert result.returncode == 0, result.stderr
    assert connect(bob).connected
    assert "break-glass grant for 60s" in controlled.log_text()
    bad = ctl(controlled, "grant", "10.199.2.2", "--door", "nope", "--for", "1m")
    assert bad.returncode == 2 and "no door named 'nope'" in bad.stderr


def test_metrics_on_localhost(controlled, alice):
    knock(controlled.sandbox, alice, "40000", "50000", "60000")
    assert connect(alice).connected
    with entered(controlled.sandbox.server):
        body = DIRECT.open("http://127.0.0.1:9474/metrics", timeout=5).read().decode()
    assert 'nfknock_doors_opened_total{door="openSSH"} 1.0' in body
    assert 'nfknock_active_grants{door="openSSH"} 1.0' in body
    assert 'nfknock_connections_total{door="openSSH",result="accepted"} 1.0' in body
    assert 'nfknock_packets_total{verdict="accept"} 1.0' in body
    assert "nfknock_queue_dropped_total" in body
    assert 'nfknock_lockouts_total{door="openSSH"} 0.0' in body  # at 0 before the first one
    assert "nfknock_last_reload_successful 1.0" in body and "nfknock_internal_errors_total 0.0" in body
    assert 'nfknock_build_info{python="' in body and "process_resident_memory_bytes " in body
    with entered(controlled.sandbox.server), pytest.raises(OSError):  # bound to localhost only
        DIRECT.open(f"http://{alice.server_address}:9474/metrics", timeout=2)
