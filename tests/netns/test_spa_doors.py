"""SPA doors on a real kernel with the stock fwknop client: the first SYN after the packet gets
through, a replayed packet is refused (also after a restart), and so are wrong keys, ports the
door does not protect, stale packets and packets asking for someone else's address."""

import base64
import signal
import socket

import pytest
from conftest import connect, spa_door

from nfknock.doors.spa import Keys, encode, generate_keys
from support.sandbox import entered, nfknock_argv

pytestmark = pytest.mark.parametrize("server", ["legacy", "nft"], indirect=True)


@pytest.fixture
def spa_server(server, tmp_path):
    spa_door(server, tmp_path)
    server.state = tmp_path / "state"
    return server


def fwknop(server, client, *extra, key=None, hmac_key=None, access="tcp/22", allow=None, save=None):
    argv = [
        "fwknop",
        "-A",
        access,
        "-a",
        allow or client.address,
        "-D",
        client.server_address,
        "--key-base64-rijndael",
        key or server.keys[0],
        "--key-base64-hmac",
        hmac_key or server.keys[1],
        "--use-hmac",
        "--rc-file",
        "/dev/null",
        *extra,
    ]
    if save:
        argv += ["--save-packet", str(save)]
    result = server.sandbox.run(client.namespace, argv)
    assert result.returncode == 0, result.stdout + result.stderr


def send_raw(client, payload):
    with entered(client.namespace):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.sendto(payload, (client.server_address, 62201))
    sock.close()


def test_stock_fwknop_client_opens_on_the_first_syn(spa_server, alice, bob):
    spa_server.start("--state-dir", str(spa_server.state))
    assert not connect(alice, timeout=1).connected
    fwknop(spa_server, alice)
    attempt = connect(alice, timeout=3)
    assert attempt.connected and attempt.seconds < 0.5
    assert "10.199.1.2: spaSSH: OPEN SESAME" in spa_server.log_text()
    assert not connect(bob, timeout=1).connected


def test_replay_is_refused_also_after_a_restart(spa_server, alice, tmp_path):
    spa_server.start("--state-dir", str(spa_server.state))
    packet_file = tmp_path / "packet"
    fwknop(spa_server, alice, save=packet_file)
    spa_server.wait_log("OPEN SESAME")
    wire = packet_file.read_text().strip().encode()
    send_raw(alice, wire)
    assert "SPA packet refused: replay" in spa_server.wait_log("SPA packet refused")
    spa_server.stop(signal.SIGTERM)
    spa_server.start("--state-dir", str(spa_server.state))
    send_raw(alice, wire)
    spa_server.wait_log("SPA packet refused", after=1)
    assert spa_server.log_text().count("refused: replay") == 2
    assert not connect(alice, timeout=1).connected


@pytest.mark.parametrize("workers", [1, 2])
def test_a_packet_that_opened_is_refused_after_a_crash(spa_server, alice, tmp_path, workers):
    """The replay record is durable before the grant's effect is visible: once the client has
    connected, a SIGKILL (no chance to write anything more) and a restart still refuse the same
    bytes. With workers the record is a claim file; alone, the replay cache."""
    spa_server.start("--state-dir", str(spa_server.state), "--workers", str(workers))
    packet_file = tmp_path / "packet"
    fwknop(spa_server, alice, save=packet_file)
    assert connect(alice, timeout=3).connected  # the effect is visible...
    spa_server.stop(signal.SIGKILL)  # ...and then the daemon dies at once
    spa_server.start("--state-dir", str(spa_server.state), "--workers", str(workers))
    send_raw(alice, packet_file.read_text().strip().encode())
    assert "SPA packet refused: replay" in spa_server.wait_log("SPA packet refused")
    assert not connect(alice, timeout=1).connected


def test_wrong_keys_ports_and_addresses_are_refused(spa_server, alice, bob):
    spa_server.start("--state-dir", str(spa_server.state))
    other_key, other_hmac = generate_keys()
    fwknop(spa_server, alice, hmac_key=other_hmac)
    fwknop(spa_server, alice, key=other_key)
    fwknop(spa_server, alice, access="tcp/80")
    fwknop(spa_server, bob, allow="10.199.1.2")  # bob asks access for alice's address
    keys = Keys(base64.b64decode(spa_server.keys[0]), base64.b64decode(spa_server.keys[1]))
    import time

    send_raw(alice, encode(keys, alice.address, [("tcp", 22)], time.time() - 600))
    spa_server.wait_log("SPA packet refused", after=4)
    log = spa_server.log_text()
    for reason in ("bad hmac", "bad key", "port not allowed", "source mismatch", "too old"):
        assert f"SPA packet refused: {reason}" in log, reason
    assert spa_server.keys[0] not in log and spa_server.keys[1] not in log
    assert not connect(alice, timeout=1).connected and not connect(bob, timeout=1).connected


def test_our_spa_client(spa_server, alice):
    spa_server.start("--state-dir", str(spa_server.state))
    result = spa_server.sandbox.run(
        alice.namespace, nfknock_argv("spa", alice.server_address, "--door", "spaSSH", "--rules", str(spa_server.rules))
    )
    assert result.returncode == 0, result.stderr
    assert connect(alice).connected


@pytest.mark.needs_tools("promtool")
def test_the_first_replay_a_real_daemon_reports_fires_the_critical_alert(spa_server, alice, tmp_path):
    """Scrapes of a running daemon (on an IPv6 listen address), before anything, after an
    opening and after its replay, one a minute for promtool: NfknockSpaReplay fires on the
    first replay because its series was there at 0 from the start."""
    import urllib.request
    from pathlib import Path

    from support.scrapes import expected_alert, promtool_test, samples

    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    spa_server.start("--state-dir", str(spa_server.state), "--metrics-listen", "[::1]:9477")

    def scrape() -> str:
        with entered(spa_server.sandbox.server):
            return direct.open("http://[::1]:9477/metrics", timeout=5).read().decode()

    fresh = scrape()
    replays = {series: value for series, value in samples(fresh).items() if 'reason="replay"' in series}
    assert list(replays.values()) == [0]
    packet_file = tmp_path / "packet"
    fwknop(spa_server, alice, save=packet_file)
    spa_server.wait_log("OPEN SESAME")
    opened = scrape()
    send_raw(alice, packet_file.read_text().strip().encode())
    spa_server.wait_log("SPA packet refused")
    replayed = scrape()
    assert 'nfknock_spa_refused_total{door="spaSSH",key="default",reason="replay"} 1.0' in replayed
    alerts = Path(__file__).resolve().parents[2] / "deploy" / "monitoring" / "nfknock-alerts.yml"
    fired = expected_alert(alerts, "NfknockSpaReplay", {"instance": "bastion:9474", "door": "spaSSH"})
    checks = [
        {"eval_time": "4m", "alertname": "NfknockSpaReplay", "exp_alerts": []},
        {"eval_time": "6m", "alertname": "NfknockSpaReplay", "exp_alerts": [fired]},
    ]
    result = promtool_test(alerts, [fresh] * 3 + [opened] * 2 + [replayed] * 3, checks, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
