"""An SPA door shared by a team, on a real kernel with the stock fwknop client: a key per person
(a keys_dir of files made by `nfknock keygen --name`), the log and `status` name whose key opened
the door, each key's expiry, networks and username are enforced with their reason in the log,
fwknop -f is honoured up to max_open_for, a removed key stops working after a reload while the
others keep theirs, `revoke --key` ends one person's grants, and a door made by import-fwknop
opens for the stock client."""

from __future__ import annotations

import json
import shlex
import signal
from pathlib import Path

import pytest
from conftest import connect

from nfknock.doors.spa import generate_keys

pytestmark = pytest.mark.parametrize("server", ["legacy", "nft"], indirect=True)

EXPIRED = "2020-01-01"


class Team:
    """The server with a `team` door whose keys_dir holds one key file per person."""

    def __init__(self, server, tmp_path: Path):
        self.server = server
        self.keys_dir = tmp_path / "keys"
        self.keys_dir.mkdir(mode=0o700)
        self.commands: dict[str, list[str]] = {}
        server.write_rules(f"""\
doors:
  - name: team
    kind: spa
    keys_dir: {self.keys_dir}
    protect: [22/tcp]
    open_for: 30s
    max_open_for: 2m
""")

    def keygen(self, name: str, *settings: str) -> None:
        """`nfknock keygen --name`, as an admin runs it; keep the client command it prints."""
        result = self.server.nfknock("keygen", "--name", name, "--dir", str(self.keys_dir), *settings)
        assert result.returncode == 0, result.stderr
        (line,) = result.stdout.splitlines()
        self.commands[name] = shlex.split(line)

    def fwknop(self, name: str, client, *extra: str, user: str | None = None) -> None:
        """The stock client, with the command line keygen printed for `name` (-a and -D filled in)."""
        argv = [client.address if word == "CLIENT_IP" else word for word in self.commands[name]]
        argv = [client.server_address if word == "SERVER" else word for word in argv]
        if user is not None:
            if "-U" in argv:
                argv[argv.index("-U") + 1] = user
            else:
                argv += ["-U", user]
        argv += ["--rc-file", "/dev/null", *extra]
        result = self.server.sandbox.run(client.namespace, argv)
        assert result.returncode == 0, result.stdout + result.stderr

    def status(self) -> dict:
        result = self.server.nfknock("status", "--json", "--control-socket", str(self.server.workdir / "nfknock.sock"))
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def grants(self) -> dict[str, dict]:
        return {row["source"]: row for row in self.status()["grants"]}


@pytest.fixture
def team(server, tmp_path):
    return Team(server, tmp_path)


def test_two_people_open_the_same_door_and_the_log_names_each(team, alice, bob, mallory):
    team.keygen("alice")
    team.keygen("bob")
    team.server.start()
    assert not connect(alice, timeout=1).connected
    team.fwknop("alice", alice)
    team.fwknop("bob", bob)
    team.server.wait_log("OPEN SESAME", after=1)
    log = team.server.log_text()
    assert "10.199.1.2: team: OPEN SESAME (key alice, 30s)" in log
    assert "10.199.2.2: team: OPEN SESAME (key bob, 30s)" in log
    assert connect(alice).connected and connect(bob).connected
    assert not connect(mallory, timeout=1).connected
    grants = team.grants()
    assert (grants[alice.address]["key"], grants[bob.address]["key"]) == ("alice", "bob")
    # One person leaves in a hurry: their grants end, the other's stay.
    result = team.server.nfknock(
        "revoke", "--key", "alice", "--control-socket", str(team.server.workdir / "nfknock.sock")
    )
    assert result.returncode == 0 and "revoked key alice on team (10.199.1.2)" in result.stdout, result.stderr
    assert not connect(alice, timeout=1).connected
    assert connect(bob).connected


def test_a_key_is_refused_for_its_expiry_its_networks_and_its_username(team, alice, bob, mallory):
    team.keygen("carol", "--expires", EXPIRED)
    team.keygen("dave", "--sources", "10.199.1.0/24")  # alice's link only
    team.keygen("erin", "--username", "erin")
    team.server.start()
    team.fwknop("carol", alice)
    team.fwknop("dave", bob)
    team.fwknop("erin", mallory, user="mallory")
    team.server.wait_log("SPA packet refused", after=2)
    log = team.server.log_text()
    assert "10.199.1.2: team: SPA packet refused: key expired (key carol expired on 2020-01-01 00:00 UTC)" in log
    assert (
        "10.199.2.2: team: SPA packet refused: source not allowed "
        "(10.199.2.2 is not in key dave's sources (10.199.1.0/24))" in log
    )
    assert (
        "10.199.3.2: team: SPA packet refused: username mismatch "
        "(key erin requires username 'erin', the packet has 'mallory')" in log
    )
    assert not any(connect(client, timeout=1).connected for client in (alice, bob, mallory))
    assert team.grants() == {}
    team.fwknop("erin", mallory)  # the -U that keygen printed
    team.fwknop("dave", alice)  # from the network the key belongs to
    team.server.wait_log("OPEN SESAME", after=1)
    assert connect(mallory).connected and connect(alice).connected


def test_client_timeouts_are_honoured_up_to_max_open_for(team, alice, bob, mallory):
    team.keygen("alice")
    team.keygen("bob")
    team.server.start()
    team.fwknop("alice", alice, "-f", "5")
    team.fwknop("bob", bob, "-f", "100000")
    team.fwknop("alice", mallory)  # no -f: open_for
    team.server.wait_log("OPEN SESAME", after=2)
    grants = team.grants()
    assert grants[alice.address]["granted_for"] == 5 and grants[alice.address]["seconds_left"] <= 5
    assert grants[bob.address]["granted_for"] == 120 and grants[bob.address]["seconds_left"] <= 120
    assert grants[mallory.address]["granted_for"] == 30 and grants[mallory.address]["seconds_left"] <= 30
    log = team.server.log_text()
    assert "10.199.1.2: team: OPEN SESAME (key alice, 5s)" in log
    assert "10.199.2.2: team: OPEN SESAME (key bob, 120s)" in log
    assert connect(alice).connected and connect(bob).connected


def test_a_removed_key_stops_working_after_a_reload_and_the_others_keep_theirs(team, alice, bob):
    team.keygen("alice")
    team.keygen("bob")
    team.server.start()
    team.fwknop("alice", alice)
    team.fwknop("bob", bob)
    team.server.wait_log("OPEN SESAME", after=1)
    (team.keys_dir / "alice.keys").unlink()
    team.server.process.send_signal(signal.SIGHUP)
    team.server.wait_log("reloaded")
    log = team.server.log_text()
    assert "team: key alice removed or changed: grants ended for 10.199.1.2" in log
    assert "state reset" not in log  # the door itself did not change
    assert not connect(alice, timeout=1).connected
    assert connect(bob).connected  # bob's grant survived the reload
    team.fwknop("alice", alice)
    team.fwknop("bob", bob)
    team.server.wait_log("OPEN SESAME", after=2)
    assert "10.199.1.2: team: SPA packet refused: bad hmac" in team.server.wait_log("SPA packet refused")
    assert not connect(alice, timeout=1).connected
    assert team.server.log_text().count("OPEN SESAME (key bob") == 2


def test_a_door_imported_from_access_conf_opens_for_the_stock_client(server, tmp_path, alice, bob):
    people = {name: generate_keys() for name in ("alice", "bob")}
    access = tmp_path / "access.conf"
    access.write_text(f"""\
SOURCE              ANY
REQUIRE_USERNAME    alice
KEY_BASE64          {people["alice"][0]}
HMAC_KEY_BASE64     {people["alice"][1]}
OPEN_PORTS          tcp/22
FW_ACCESS_TIMEOUT   45

SOURCE              10.199.1.0/24
REQUIRE_USERNAME    bob
KEY_BASE64          {people["bob"][0]}
HMAC_KEY_BASE64     {people["bob"][1]}
OPEN_PORTS          tcp/22
ENABLE_CMD_EXEC     Y
""")
    result = server.nfknock(
        "import-fwknop",
        str(access),
        "--keys-dir",
        str(tmp_path / "keys"),
        "-o",
        str(server.rules / "doors.yaml"),  # replaces the seed door
        "--door",
        "bastion",
    )
    assert result.returncode == 0, result.stderr
    assert "line 13: ENABLE_CMD_EXEC (commands" in result.stderr
    check = server.nfknock("check", "--rules", str(server.rules))
    assert check.returncode == 0, check.stderr
    server.start()
    for name, client in (("alice", alice), ("bob", bob)):
        encryption, mac = people[name]
        argv = ["fwknop", "-A", "tcp/22", "-a", client.address, "-D", client.server_address, "-U", name]
        argv += ["--use-hmac", "--key-base64-rijndael", encryption, "--key-base64-hmac", mac, "--rc-file", "/dev/null"]
        assert server.sandbox.run(client.namespace, argv).returncode == 0
    server.wait_log("OPEN SESAME")
    server.wait_log("SPA packet refused")
    log = server.log_text()
    assert "10.199.1.2: bastion: OPEN SESAME (key alice, 45s)" in log
    assert "10.199.2.2: bastion: SPA packet refused: source not allowed" in log  # bob's stanza: 10.199.1.0/24
    assert connect(alice).connected and not connect(bob, timeout=1).connected


def test_a_key_file_with_a_key_on_a_wrong_line_is_refused_without_quoting_it(team, alice):
    """`HMAC_KEY_BASE64=<key>` (an `=` for a `:`) and a bare key: the reload is refused naming the
    file and line, the door keeps working, and no piece of the key reaches the log or `check`
    (0.x quoted the line: 72 of a 64-byte key's 88 characters)."""
    from support.secretcheck import Registry

    team.keygen("alice")
    team.server.start()
    encryption, mac = generate_keys()
    bob = team.keys_dir / "bob.keys"
    bob.write_text(f"KEY_BASE64: {encryption}\nHMAC_KEY_BASE64={mac}\n{mac}\n")
    bob.chmod(0o600)
    team.server.process.send_signal(signal.SIGHUP)
    line = team.server.wait_log("reload refused")
    assert "bob.keys: line 2: not a 'NAME: value' line (the line is not shown" in line
    check = team.server.nfknock("check", "--rules", str(team.server.rules))
    assert check.returncode == 2 and "bob.keys: line 2" in check.stderr
    registry = Registry()
    registry.register(encryption, mac)
    assert registry.leaks(team.server.log_text() + check.stdout + check.stderr) == []
    team.fwknop("alice", alice)  # the old rules, alice's key with them, stay in force
    assert connect(alice).connected


def test_forged_spa_packets_do_not_lock_their_source_out(team, alice, tmp_path):
    """Garbage, wrong sizes, bad HMACs and replays of a used packet, ten of each, from Alice's
    address (as anyone can send, UDP sources being free to forge): the door's lockout (5
    failures) never locks her out; her next packet opens at once."""
    import socket

    from support.sandbox import entered

    team.keygen("alice")
    team.server.start()
    saved = tmp_path / "packet"
    team.fwknop("alice", alice, "--save-packet", str(saved))
    team.server.wait_log("OPEN SESAME")
    used = saved.read_text().strip().encode()
    with entered(alice.namespace):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        for payload in (b"junk", b"x" * 1500, used[:-10] + b"A" * 10, used):
            for _ in range(10):
                sock.sendto(payload, (alice.server_address, 62201))
    team.server.wait_log("SPA packet refused")
    team.fwknop("alice", alice)
    team.server.wait_log("OPEN SESAME", after=1)
    assert "locked out" not in team.server.log_text()
    assert connect(alice).connected
