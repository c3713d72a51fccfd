"""Under journald the lines go through its native protocol with the event's fields as journal
fields (source, door, event, port); whatever the socket cannot take goes to the stream, never
waiting. The last test runs Debian's systemd-journald and journalctl."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap

import pytest

from nfknock.daemon import logs
from nfknock.daemon.logs import log_events, setup_logging
from nfknock.doors.events import ConnectionAccepted, LockedOut, SpaRefused


def parse(datagram: bytes) -> dict[str, str]:
    """The native protocol, read back: NAME=value lines, or NAME, newline, 64-bit length, bytes."""
    fields, rest = {}, datagram
    while rest:
        head, newline, rest = rest.partition(b"\n")
        if b"=" in head:
            name, _, value = head.partition(b"=")
            fields[name.decode()] = value.decode()
        else:
            (length,) = struct.unpack("<Q", rest[:8])
            fields[head.decode()] = rest[8 : 8 + length].decode()
            assert rest[8 + length : 9 + length] == b"\n"
            rest = rest[9 + length :]
    return fields


@pytest.fixture
def under_journald(monkeypatch, tmp_path, capfd):
    """stderr is the journal's stream (JOURNAL_STREAM names it: the captured stderr) and a
    journald socket listens."""
    stat = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "journal.socket"))
    receiver.settimeout(5)
    monkeypatch.setattr(logs, "JOURNAL_SOCKET", str(tmp_path / "journal.socket"))
    yield receiver
    receiver.close()
    for handler in logging.getLogger("nfknock").handlers:
        handler.close()
    logging.getLogger("nfknock").handlers.clear()


def test_each_event_is_an_entry_with_its_fields(under_journald, capfd):
    log = setup_logging()
    log_events(log, [LockedOut("10.0.0.7", "openSSH", 5, 99.0), ConnectionAccepted("10.0.0.2", "openSSH", "22/tcp")])
    locked, accepted = (parse(under_journald.recv(65536)) for _ in range(2))
    assert locked["MESSAGE"] == "10.0.0.7: openSSH: locked out after 5 failed attempts; knocks ignored"
    assert (locked["PRIORITY"], locked["SYSLOG_IDENTIFIER"]) == ("6", "nfknock")
    assert (locked["NFKNOCK_EVENT"], locked["NFKNOCK_SRC"], locked["NFKNOCK_DOOR"]) == (
        "LockedOut",
        "10.0.0.7",
        "openSSH",
    )
    assert locked["NFKNOCK_FAILURES"] == "5"
    assert (accepted["NFKNOCK_EVENT"], accepted["NFKNOCK_PORT"]) == ("ConnectionAccepted", "22/tcp")
    assert capfd.readouterr().err == ""  # not twice


def test_a_traceback_is_one_entry_at_its_priority(under_journald):
    log = setup_logging()
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.critical("nfknock stopped on an unexpected error", exc_info=True)
    fields = parse(under_journald.recv(65536))
    assert fields["PRIORITY"] == "2" and "NFKNOCK_EVENT" not in fields
    assert fields["MESSAGE"].startswith("nfknock stopped on an unexpected error\nTraceback")
    assert fields["MESSAGE"].endswith("RuntimeError: boom")


def test_what_the_socket_cannot_take_goes_to_the_stream_without_waiting(under_journald, capfd):
    """journald not reading (its queue full), then gone: no line lost, none blocks."""
    log = setup_logging()
    sent = 3000  # more than a datagram queue holds (net.unix.max_dgram_qlen: 10, or 512 under systemd)
    refused = SpaRefused("10.0.0.9", "spa", "bad hmac", "HMAC does not match")
    for _ in range(sent):
        log_events(log, [refused])
    received = 0
    under_journald.setblocking(False)
    try:
        while under_journald.recv(65536):
            received += 1
    except BlockingIOError:
        pass
    streamed = capfd.readouterr().err.splitlines()
    assert received and streamed and received + len(streamed) == sent
    assert set(streamed) == {"<6>10.0.0.9: spa: SPA packet refused: bad hmac (HMAC does not match)"}
    under_journald.close()  # journald gone
    log.warning("still here")
    assert capfd.readouterr().err == "<4>still here\n"


def test_without_a_journald_socket_the_stream_carries_the_priority(monkeypatch, tmp_path, capfd):
    stat = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
    monkeypatch.setattr(logs, "JOURNAL_SOCKET", str(tmp_path / "none"))
    setup_logging().error("reload refused")
    assert capfd.readouterr().err == "<3>reload refused\n"
    logging.getLogger("nfknock").handlers.clear()


JOURNALD = "/lib/systemd/systemd-journald"


def test_journald_keeps_the_fields_and_journalctl_finds_them(tmp_path):
    """Debian's systemd-journald, in a mount and PID namespace of its own (tmpfs over /run/systemd
    and /run/log: the host's journal and sockets are never touched), takes the entries; journalctl
    filters on the fields."""
    missing = [tool for tool in ("unshare", "journalctl", JOURNALD) if not shutil.which(tool)]
    if missing or os.geteuid() != 0:
        reason = f"needs root and {', '.join(missing) or 'nothing more'}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    writer = tmp_path / "write.py"
    writer.write_text(
        textwrap.dedent("""\
        import logging, sys
        from nfknock.daemon import journal
        from nfknock.daemon.logs import log_events
        from nfknock.doors.events import DoorOpened, LockedOut
        log = logging.getLogger("test-journal")
        log.setLevel(logging.INFO)
        log.addHandler(journal.JournalHandler(logging.StreamHandler(sys.stderr)))
        opened = DoorOpened("10.0.0.2", "openSSH", 5.0, "alice", 30.0)
        log_events(log, [opened, LockedOut("10.0.0.7", "openSSH", 5, 1.0)])
        log.warning("reload refused, keeping the current rules: test")
        """)
    )
    script = textwrap.dedent(f"""\
        set -e
        mount -t tmpfs tmpfs /run/systemd
        mount -t tmpfs tmpfs /run/log
        if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi
        mkdir -p /run/systemd/journal
        {JOURNALD} &
        for i in $(seq 100); do [ -S /run/systemd/journal/socket ] && break; sleep 0.1; done
        {sys.executable} {writer}
        for i in $(seq 100); do
            [ "$(journalctl -q -t nfknock -o json | wc -l)" -ge 3 ] && break; sleep 0.1
        done
        echo ALL; journalctl -q -t nfknock -o json
        echo DOOR; journalctl -q -t nfknock -o json NFKNOCK_SRC=10.0.0.7
        echo WARN; journalctl -q -t nfknock -o json -p warning
        """)
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    sections: dict[str, list[dict]] = {}
    for line in result.stdout.splitlines():
        if line in ("ALL", "DOOR", "WARN"):
            current = sections.setdefault(line, [])
        else:
            current.append(json.loads(line))
    opened, locked, refused = sections["ALL"]
    assert opened["MESSAGE"] == "10.0.0.2: openSSH: OPEN SESAME (key alice, 30s)"
    assert (opened["NFKNOCK_EVENT"], opened["NFKNOCK_SRC"], opened["NFKNOCK_DOOR"]) == (
        "DoorOpened",
        "10.0.0.2",
        "openSSH",
    )
    assert (opened["NFKNOCK_KEY"], opened["PRIORITY"], opened["_TRANSPORT"]) == ("alice", "6", "journal")
    assert [entry["MESSAGE"] for entry in sections["DOOR"]] == [locked["MESSAGE"]]
    assert [entry["MESSAGE"] for entry in sections["WARN"]] == ["reload refused, keeping the current rules: test"]
