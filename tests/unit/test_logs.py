"""Log lines keep knockd's wording where knockd has one."""

import logging

from nfknock.daemon.logs import RENDERERS, log_events, render, setup_logging
from nfknock.doors.events import (
    ConnectionAccepted,
    ConnectionRefused,
    DoorClosed,
    DoorOpened,
    GrantExpired,
    KnockAdvanced,
    Sequence,
    SequenceReset,
    SequenceTimeout,
)


def test_knockd_compatible_lines():
    assert render(KnockAdvanced("10.0.0.2", "openSSH", Sequence.OPEN, 1)) == "10.0.0.2: openSSH: Stage 1"
    assert render(DoorOpened("10.0.0.2", "openSSH", 5.0)) == "10.0.0.2: openSSH: OPEN SESAME"
    assert (
        render(SequenceTimeout("10.0.0.2", "openSSH", Sequence.OPEN, 2))
        == "10.0.0.2: openSSH: sequence timeout (stage 2)"
    )
    assert render(GrantExpired("10.0.0.2", "openSSH")).startswith("10.0.0.2: openSSH: command timeout")


def test_close_sequence_lines_are_told_apart():
    assert render(KnockAdvanced("1.2.3.4", "d", Sequence.CLOSE, 2)) == "1.2.3.4: d: close Stage 2"
    assert render(DoorClosed("1.2.3.4", "d", True)) == "1.2.3.4: d: closed"
    assert render(DoorClosed("1.2.3.4", "d", False)) == "1.2.3.4: d: closed (was not open)"
    assert (
        render(SequenceReset("1.2.3.4", "d", Sequence.OPEN, 1, "60000/tcp"))
        == "1.2.3.4: d: sequence reset at stage 1 by a knock on 60000/tcp"
    )


def test_every_event_type_has_a_line():
    from nfknock.doors import events

    assert set(RENDERERS) == set(events.Event.__args__)


def test_file_lines_carry_a_knockd_timestamp(tmp_path):
    path = tmp_path / "log"
    logger = setup_logging(str(path))
    log_events(logger, [DoorOpened("10.0.0.2", "openSSH", 1.0), ConnectionRefused("10.0.0.3", "22/tcp")])
    for handler in logger.handlers:
        handler.flush()
    (line,) = path.read_text().splitlines()  # refused connections only with --verbose
    assert line[0] == "[" and line[17:] == "] 10.0.0.2: openSSH: OPEN SESAME"
    logger.handlers.clear()


def test_verbose_logs_refused_connections(tmp_path):
    path = tmp_path / "log"
    logger = setup_logging(str(path), verbose=True)
    log_events(logger, [ConnectionRefused("10.0.0.3", "22/tcp"), ConnectionAccepted("10.0.0.2", "d", "22/tcp")])
    assert len(path.read_text().splitlines()) == 2
    logger.handlers.clear()
    logging.getLogger("nfknock").setLevel(logging.INFO)


def test_rate_limit_holds_back_a_flood_per_event_type_and_says_so():
    from nfknock.daemon.logs import RateLimit

    limit = RateLimit(per_second=10, burst=5)
    stage = KnockAdvanced("10.0.0.2", "d", Sequence.OPEN, 1)
    allowed = sum(limit.allow(type(stage), now=0.0) for _ in range(100))
    assert allowed == 5
    assert limit.allow(DoorOpened, now=0.0)  # another type has its own bucket
    assert limit.allow(KnockAdvanced, now=0.1)  # refilled: 10/s
    assert not limit.allow(KnockAdvanced, now=0.1)
    assert limit.held_back() == ["96 'KnockAdvanced' log lines held back (more than 10/s)"]
    assert limit.held_back() == []


def test_json_lines_carry_the_event_and_its_fields(tmp_path):
    import json

    path = tmp_path / "log"
    logger = setup_logging(str(path), log_format="json")
    log_events(logger, [KnockAdvanced("10.0.0.2", "openSSH", Sequence.OPEN, 2)])
    logger.info("ready")
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert first["event"] == "KnockAdvanced" and first["stage"] == 2 and first["sequence"] == "open"
    assert first["src"] == "10.0.0.2" and first["message"] == "10.0.0.2: openSSH: Stage 2"
    assert second["message"] == "ready" and "event" not in second
    logger.handlers.clear()


def test_spa_lines_name_the_key_after_knockds_words():
    from nfknock.doors.events import GrantsRevoked, SpaRefused

    opened = DoorOpened("10.0.0.2", "team", 5.0, "alice", 5.0)
    assert render(opened) == "10.0.0.2: team: OPEN SESAME (key alice, 5s)"
    assert render(GrantExpired("10.0.0.2", "team", "alice")).endswith("new connections refused) (key alice)")
    refused = SpaRefused("10.0.0.9", "team", "key expired", "key carol expired on 2020-01-01 00:00 UTC", "carol")
    assert render(refused) == (
        "10.0.0.9: team: SPA packet refused: key expired (key carol expired on 2020-01-01 00:00 UTC)"
    )
    assert render(GrantsRevoked("team", "alice", ("10.0.0.2",))) == (
        "team: key alice removed or changed: grants ended for 10.0.0.2"
    )


def test_json_lines_carry_the_key(capsys):
    import json

    logger = setup_logging(log_format="json")
    log_events(logger, [DoorOpened("10.0.0.2", "team", 5.0, "alice", 5.0)])
    line = json.loads(capsys.readouterr().err)
    assert (line["event"], line["key"], line["seconds"]) == ("DoorOpened", "alice", 5.0)


def test_under_journald_each_line_carries_its_priority_and_no_timestamp(monkeypatch, capfd):
    """journald reads a "<N>" prefix on each line of the service's stderr: `journalctl -p warning`
    then shows a refused reload and hides the door lines; the journal stamps the time itself."""
    import os
    import sys

    from nfknock.daemon import logs
    from nfknock.daemon.logs import setup_logging

    stat = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
    monkeypatch.setattr(
        logs, "JOURNAL_SOCKET", "/nonexistent/journal.socket"
    )  # the stream (test_journal.py: the socket)
    log = setup_logging()
    log.info("door ssh: sequence 40000/tcp")
    log.error("reload refused, keeping the current rules: broken")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.critical("nfknock stopped on an unexpected error", exc_info=True)
    lines = capfd.readouterr().err.splitlines()
    assert lines[0] == "<6>door ssh: sequence 40000/tcp"
    assert lines[1] == "<3>reload refused, keeping the current rules: broken"
    assert lines[2] == "<2>nfknock stopped on an unexpected error"
    assert all(line.startswith("<2>") for line in lines[3:]) and "RuntimeError: boom" in lines[-1]


def test_without_journald_lines_keep_their_timestamp(monkeypatch, capfd):
    from nfknock.daemon.logs import setup_logging

    monkeypatch.setenv("JOURNAL_STREAM", "0:0")  # another stream's: stderr is not the journal
    setup_logging().warning("hello")
    (line,) = capfd.readouterr().err.splitlines()
    assert line.startswith("[") and line.endswith("] hello")


def test_the_file_syslog_and_journal_carry_the_same_message(monkeypatch, tmp_path, capfd):
    """The admin's log tools (deploy/, tests/netns/test_log_tools.py) read the message after
    each form's own stamp: `[YYYY-MM-DD HH:MM] ` in the file, `nfknock: ` to syslog (rsyslog puts
    its stamp and host in front), `<6>` to the journal (journald strips it)."""
    import os
    import socket
    import sys

    from nfknock.daemon import logs

    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "log"))
    monkeypatch.setattr(logs, "SYSLOG_ADDRESS", str(tmp_path / "log"))
    event = DoorOpened("10.0.0.2", "openSSH", 1.0)
    file_log = setup_logging(str(tmp_path / "nfknock.log"), syslog=True)
    log_events(file_log, [event])
    stat = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
    monkeypatch.setattr(logs, "JOURNAL_SOCKET", str(tmp_path / "none"))  # the stream; the socket: test_journal.py
    log_events(setup_logging(), [event])
    file_line = (tmp_path / "nfknock.log").read_text().splitlines()[0]
    assert file_line[19:] == "10.0.0.2: openSSH: OPEN SESAME"
    assert receiver.recv(4096) == b"<30>nfknock: 10.0.0.2: openSSH: OPEN SESAME\x00"  # daemon.info
    assert capfd.readouterr().err == "<6>10.0.0.2: openSSH: OPEN SESAME\n"
    receiver.close()
    logging.getLogger("nfknock").handlers.clear()
