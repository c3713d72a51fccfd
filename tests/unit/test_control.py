"""The control protocol: requests are checked before the loop sees them; a slow or oversized
client is cut off by a whole-request deadline, not per read."""

import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from nfknock.daemon import control
from nfknock.daemon.control import canonical_address, parse_request, read_request


@pytest.mark.parametrize(
    "raw,message",
    [
        (b"[]", "expected a JSON object, got list"),
        (b"{", "not JSON"),
        (b"\xff", "not JSON"),
        (b'{"cmd": "reboot"}', "unknown command 'reboot'"),
        (b'{"cmd": "revoke", "address": []}', "address must be an IP address"),
        (b'{"cmd": "revoke", "address": "10.0.0.300"}', "address must be an IP address"),
        (b'{"cmd": "revoke", "address": "10.0.0.1", "door": 5}', "door must be a name"),
        (b'{"cmd": "grant", "address": "10.0.0.1", "seconds": 5}', "grant needs a door"),
        (b'{"cmd": "grant", "address": "10.0.0.1", "door": "d", "seconds": 1e999}', "seconds must be a number"),
        (b'{"cmd": "grant", "address": "10.0.0.1", "door": "d", "seconds": true}', "seconds must be a number"),
        (b'{"cmd": "grant", "address": "10.0.0.1", "door": "d", "seconds": -1}', "seconds must be a number"),
        (b'{"cmd": "revoke", "key": "al ice"}', "key must be a key name"),
        (b'{"cmd": "revoke", "key": 5}', "key must be a key name"),
        (b'{"cmd": "revoke", "key": "alice", "address": "10.0.0.1"}', "an address or a key, not both"),
        (b'{"cmd": "grant", "key": "alice", "door": "d", "seconds": 5}', "address must be an IP address"),
        (b'{"cmd": "grant", "address": "fe80::1%eth0", "door": "d", "seconds": 5}', "must not carry a scope"),
        (b'{"cmd": "grant", "address": "::", "door": "d", "seconds": 5}', ":: is not the address of a host"),
        (b'{"cmd": "grant", "address": "0.0.0.0", "door": "d", "seconds": 5}', "not the address of a host"),
        (b'{"cmd": "revoke", "address": "255.255.255.255"}', "255.255.255.255 is not the address of a host"),
        (b'{"cmd": "revoke", "address": "224.0.0.1"}', "not the address of a host"),
    ],
)
def test_malformed_requests_are_refused_with_the_reason(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_request(raw)


def test_a_request_nested_too_deeply_is_refused_and_the_socket_goes_on(tmp_path):
    server = control.ControlServer(tmp_path / "c.sock", lambda: None)
    try:
        deep = b'{"cmd": "status", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}"
        for _ in range(2):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5)
                sock.connect(str(tmp_path / "c.sock"))
                sock.sendall(deep + b"\n")
                assert b"nested too deeply" in sock.recv(4096)
    finally:
        server.close()


def test_requests_are_checked_and_addresses_canonical():
    assert parse_request(b'{"cmd": "status"}') == {"cmd": "status"}
    assert parse_request(b'{"cmd": "grant", "address": "FD00:251:2:0:0:0:0:2", "door": "d", "seconds": 60}') == {
        "cmd": "grant",
        "address": "fd00:251:2::2",
        "door": "d",
        "seconds": 60.0,
    }
    assert canonical_address(" 10.0.0.1 ") == "10.0.0.1"
    assert parse_request(b'{"cmd": "revoke", "key": "alice"}') == {"cmd": "revoke", "key": "alice", "door": None}


def test_a_slow_client_gets_a_deadline_for_the_whole_request():
    server, client = socket.socketpair()
    stop = threading.Event()

    def dribble():
        while not stop.is_set():
            try:
                client.send(b" ")
            except OSError:
                return
            time.sleep(0.1)

    sender = threading.Thread(target=dribble)
    sender.start()
    try:  # a byte every 0.1 s never lets a per-read timeout fire: only a whole-request deadline can
        with pytest.raises(ValueError, match="not complete within"):
            read_request(server, time.monotonic() + 0.5)
    finally:
        stop.set()
        sender.join()
        server.close()
        client.close()


def test_an_oversized_request_is_refused():
    server, client = socket.socketpair()
    client.sendall(b"x" * (control.MAX_REQUEST + 10))
    with pytest.raises(ValueError, match="longer than"):
        read_request(server, time.monotonic() + 1)
    server.close()
    client.close()


def test_requests_wait_for_the_loop_and_get_its_answer(tmp_path):
    woken = threading.Event()
    server = control.ControlServer(tmp_path / "ctl.sock", woken.set)
    try:
        answers = []
        caller = threading.Thread(target=lambda: answers.append(control.call(tmp_path / "ctl.sock", {"cmd": "status"})))
        caller.start()
        assert woken.wait(5)
        server.answer_pending(lambda request: {"seen": request["cmd"]})
        caller.join(5)
        assert answers == [{"seen": "status"}]
    finally:
        server.close()
    assert not (tmp_path / "ctl.sock").exists()


def test_the_default_socket_lives_in_a_directory_of_its_own_that_the_daemon_makes_root_only(tmp_path):
    """Under systemd that directory is the unit's RuntimeDirectory (the rest of /run is read-only
    to the daemon there); run by hand, the daemon makes it, 0700."""
    assert Path(control.DEFAULT_SOCKET).parent == Path("/run/nfknock")
    path = tmp_path / "run" / "nfknock.sock"
    server = control.ControlServer(path, lambda: None)
    try:
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        server.close()


def test_the_default_reaches_a_daemon_of_an_earlier_version_on_its_old_socket(tmp_path, monkeypatch):
    monkeypatch.setattr(control, "DEFAULT_SOCKET", str(tmp_path / "run" / "nfknock.sock"))
    monkeypatch.setattr(control, "OLD_DEFAULT_SOCKET", str(tmp_path / "nfknock.sock"))
    woken = threading.Event()
    old = control.ControlServer(tmp_path / "nfknock.sock", woken.set)
    try:
        answers: list = []
        default = control.DEFAULT_SOCKET
        caller = threading.Thread(target=lambda: answers.append(control.call(default, {"cmd": "status"})))
        caller.start()
        assert woken.wait(5)
        old.answer_pending(lambda request: {"seen": request["cmd"]})
        caller.join(5)
        assert answers == [{"seen": "status"}]
    finally:
        old.close()
