"""The files deploy/ gives the admin's log tools are well-formed for the real tools; what they
match is checked on a real daemon's lines in tests/netns/test_log_tools.py."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{tool} is missing (scripts/setup.sh installs it)")
        pytest.skip(f"{tool} is missing")


def test_the_fail2ban_jail_is_shipped_disabled_and_fail2ban_accepts_it_enabled(tmp_path):
    need("fail2ban-client")
    jail = (DEPLOY / "fail2ban" / "jail.d" / "nfknock.conf").read_text()
    assert "\nenabled  = false\n" in jail
    config = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", config)
    for path in config.joinpath("jail.d").iterdir():
        path.unlink()  # the host's own jails (Debian enables sshd) are not under test
    shutil.copy(DEPLOY / "fail2ban" / "filter.d" / "nfknock.conf", config / "filter.d")
    shutil.copy(DEPLOY / "fail2ban" / "jail.d" / "nfknock.conf", config / "jail.d")
    log = tmp_path / "nfknock.log"
    log.write_text("[2026-12-03 16:13] 10.0.0.2: openSSH: OPEN SESAME\n")
    (config / "jail.d" / "nfknock.local").write_text(f"[nfknock]\nenabled = true\nbackend = auto\nlogpath = {log}\n")
    result = subprocess.run(["fail2ban-client", "-c", str(config), "-t"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "configuration test is successful" in result.stdout + result.stderr, (
        result.stdout + result.stderr
    )
    dump = subprocess.run(["fail2ban-client", "-c", str(config), "-d"], capture_output=True, text=True, timeout=60)
    assert "['add', 'nfknock', 'auto']" in dump.stdout
    assert "['set', 'nfknock', 'addaction', 'iptables-allports']" in dump.stdout  # bans every port


def test_the_logrotate_file_is_accepted_by_logrotate(tmp_path):
    need("logrotate")
    result = subprocess.run(
        ["logrotate", "--debug", "--state", str(tmp_path / "state"), str(DEPLOY / "logrotate" / "nfknock")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "error" not in result.stderr.lower(), result.stderr
    assert "considering log /var/log/nfknock/nfknock.log" in result.stderr


def test_the_logwatch_script_is_valid_perl():
    need("perl")
    script = DEPLOY / "logwatch" / "scripts" / "services" / "nfknock"
    assert os.access(script, os.X_OK)
    result = subprocess.run(["perl", "-c", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def rendered(tmp_path: Path) -> list[str]:
    """The file lines of events a short scenario cannot all make (IPv6 sources, SPA keys,
    resets, close sequences), written by the daemon's own logging set-up."""
    import logging

    from nfknock.daemon.logs import log_events, setup_logging
    from nfknock.doors.events import (
        DoorClosed,
        DoorOpened,
        GrantExpired,
        KnockAdvanced,
        LockedOut,
        LockReleased,
        Sequence,
        SequenceReset,
        SequenceReused,
        SequenceTimeout,
        SpaRefused,
    )

    six = "2001:db8::7"
    events = [
        KnockAdvanced(six, "door-1.a", Sequence.CLOSE, 2),
        SequenceReset(six, "door-1.a", Sequence.OPEN, 1, "60000/udp"),
        SequenceTimeout(six, "door-1.a", Sequence.CLOSE, 2),
        DoorOpened(six, "team", 5.0, "alice@example.org", 120.0),
        GrantExpired(six, "team", "alice@example.org"),
        DoorClosed(six, "door-1.a", False),
        LockReleased(six, "door-1.a"),
        SpaRefused(six, "team", "replay", "packet seen before"),
        LockedOut(six, "door-1.a", 5, 1.0),
        SequenceReused("10.0.0.3", "rot"),
    ]
    path = tmp_path / "events.log"
    log = setup_logging(str(path))
    log_events(log, events)
    for handler in log.handlers:
        handler.close()
    logging.getLogger("nfknock").handlers.clear()
    return path.read_text().splitlines()


def test_logcheck_and_fail2ban_on_every_kind_of_line(tmp_path):
    """logcheck's way (grep -E -v -f each ignore file) and fail2ban-regex on the rendered lines:
    the three alarms stay, every routine line goes; fail2ban takes the two failures."""
    need("fail2ban-regex")
    lines = rendered(tmp_path)
    log = tmp_path / "events.log"
    ignore = DEPLOY / "logcheck" / "ignore.d.server" / "nfknock"
    shown = subprocess.run(["grep", "-E", "-v", "-f", str(ignore), str(log)], capture_output=True, text=True)
    assert [line[19:] for line in shown.stdout.splitlines()] == [
        "2001:db8::7: team: SPA packet refused: replay (packet seen before)",
        "2001:db8::7: door-1.a: locked out after 5 failed attempts; knocks ignored",
        "10.0.0.3: rot: sequence already used in this window; not opened",
    ]
    config = tmp_path / "fail2ban"
    (config / "filter.d").mkdir(parents=True)
    shutil.copy(DEPLOY / "fail2ban" / "filter.d" / "nfknock.conf", config / "filter.d")
    result = subprocess.run(
        ["fail2ban-regex", "--config", str(config), "--out", "ip", str(log), "nfknock"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2001:db8::7", "2001:db8::7"]
    assert len(lines) == 10
