"""The admin's log tools on what a real daemon writes: logrotate rotates --log-file (single process
and workers) with nothing lost and the daemon undisturbed; fail2ban-regex, logwatch and logcheck
(Debian's, with the files in deploy/) read the lines of a run that opens, closes, refuses and
locks out, in the three forms an admin has: the --log-file, syslog (--syslog through rsyslog) and
the journal (journalctl's default output)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import REPO, SEED, connect, knock, spa_door

from nfknock.doors.spa import Keys, encode
from support.sandbox import entered

DEPLOY = REPO / "deploy"
KNOCK_DOOR = (
    SEED.replace("seq_timeout: 15s", "seq_timeout: 1s")
    .replace("open_for: 30s", "open_for: 3s")
    .replace("    tcp_flags: syn,!ack", "    tcp_flags: syn,!ack\n    lockout: {failures: 3, lock_for: 2s}")
)


def send_spa(client, payload: bytes) -> None:
    with entered(client.namespace):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.sendto(payload, (client.server_address, 62201))
    sock.close()


def fwknop(server, client) -> None:
    encryption, mac = server.keys
    argv = ["fwknop", "-A", "tcp/22", "-a", client.address, "-D", client.server_address, "--use-hmac"]
    argv += ["--key-base64-rijndael", encryption, "--key-base64-hmac", mac, "--rc-file", "/dev/null"]
    result = server.sandbox.run(client.namespace, argv)
    assert result.returncode == 0, result.stdout + result.stderr


def run_scenario(server, alice, bob, mallory, tmp_path: Path) -> str:
    """A day at a bastion in a few seconds: opens, closes, an SPA packet, wrong keys, garbage,
    a replay, a lockout, a sequence timeout, a reload, a refused reload, a stop. The log file."""
    spa_door(server, tmp_path)  # doors.yaml: spaSSH on 62201
    server.write_rules(KNOCK_DOOR, "knock.yaml")
    server.start()
    knock(server.sandbox, alice, "40000", "50000", "60000")
    assert connect(alice).connected
    knock(server.sandbox, alice, "60000", "50000", "40000")
    server.wait_log(f"{alice.address}: openSSH: closed")
    fwknop(server, bob)
    assert connect(bob).connected
    send_spa(bob, b"not an SPA packet at all, just bytes")  # the kernel drops it (docs/spa-flood.md): no line
    wrong = Keys(b"k" * 32, b"h" * 64)
    for _ in range(2):  # two packets shaped like fwknop's, made with keys the door does not hold
        send_spa(bob, encode(wrong, bob.address, [("tcp", 22)], time.time()))
    server.wait_log(f"{bob.address}: spaSSH: SPA packet refused", after=1)
    for port in (40001, 40002, 40003):
        connect(mallory, port=port, timeout=0.2)
    server.wait_log(f"{mallory.address}: openSSH: locked out after 3 failed attempts")
    server.wait_log(f"{mallory.address}: openSSH: lockout over", timeout=10)
    knock(server.sandbox, alice, "40000", "50000")  # and no third knock
    server.wait_log(f"{alice.address}: openSSH: sequence timeout (stage 2)")
    knock(server.sandbox, alice, "40000", "50000", "60000")  # and no close: open_for runs out
    server.wait_log(f"{alice.address}: openSSH: command timeout")
    reloaded = server.log_text().count("reload")
    server.process.send_signal(signal.SIGHUP)
    server.wait_log("reload", after=reloaded)
    (server.rules / "broken.yaml").write_text("doors:\n  - name: broken\n    sequence: [1, 2\n")
    server.process.send_signal(signal.SIGHUP)
    server.wait_log("reload refused")
    assert server.stop() == 0
    return server.log_text()


def tools(*names: str) -> None:
    """The admin's tools (scripts/setup.sh installs them); missing: skipped, or failed under CI."""
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        reason = f"missing commands: {', '.join(missing)}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"log tool tests cannot run under CI=true: {reason}")
        pytest.skip(reason)


# -- the forms an admin's tools see -----------------------------------------------------------

FILE_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d)\] (.*)$")


def forms(text: str) -> dict[str, list[str]]:
    """The run's lines as each place holds them. The message is the one the daemon wrote (the
    file, syslog and journal formatters share it: tests/unit/test_logs.py); the stamp and the
    host and program in front are what rsyslog (traditional and RFC 3339 file formats, program
    `nfknock` as --syslog sends it, `nfknock[PID]` as journald forwards the unit's lines) and
    `journalctl` (its default short output) put there."""
    out: dict[str, list[str]] = {"file": [], "syslog": [], "rfc3339": [], "journal": []}
    for line in text.splitlines():
        match = FILE_LINE.match(line)
        assert match, f"a line of the log file without its stamp: {line!r}"
        when, message = datetime.strptime(match[1], "%Y-%m-%d %H:%M"), match[2]
        out["file"].append(line)
        out["syslog"].append(f"{when:%b} {when.day:2d} {when:%H:%M:%S} bastion nfknock: {message}")
        out["rfc3339"].append(f"{when:%Y-%m-%dT%H:%M:%S}.000000+00:00 bastion nfknock[4242]: {message}")
        out["journal"].append(f"{when:%b %d %H:%M:%S} bastion nfknock[4242]: {message}")
    return out


def alarms(lines: list[str]) -> list[str]:
    return [line for line in lines if re.search(ALARM, line)]


FAILURE = r": SPA packet refused: |: locked out after \d+ failed attempts"
ALARM = FAILURE + r"| reload refused, | nfknock stopped "


# -- the tools ----------------------------------------------------------------------------------


def fail2ban_matches(log: Path, tmp_path: Path) -> list[str]:
    """fail2ban-regex with the shipped filter (its own config directory: a filter file names
    no directory of its own)."""
    config = tmp_path / "fail2ban"
    (config / "filter.d").mkdir(parents=True, exist_ok=True)
    shutil.copy(DEPLOY / "fail2ban" / "filter.d" / "nfknock.conf", config / "filter.d")
    result = subprocess.run(
        ["fail2ban-regex", "--config", str(config), "--out", "msg", str(log), "nfknock"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()


def logcheck_report(lines: list[str]) -> list[str]:
    """Debian's logcheck (as its own user, at the server level, in test mode) over `lines` with
    its stock rules plus the shipped ignore file: the lines its report would mail. (Its own
    directory: pytest's are root's alone.)"""
    workdir = Path(tempfile.mkdtemp(prefix="nfknock-logcheck-"))
    try:
        return _logcheck(lines, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _logcheck(lines: list[str], workdir: Path) -> list[str]:
    workdir.chmod(0o755)
    rules = workdir / "rules"
    shutil.copytree("/etc/logcheck", rules)
    shutil.copy(DEPLOY / "logcheck" / "ignore.d.server" / "nfknock", rules / "ignore.d.server")
    (workdir / "state").mkdir()
    (workdir / "logcheck.conf").write_text('REPORTLEVEL="server"\nSYSLOGSUMMARY=0\n')
    (workdir / "syslog").write_text("\n".join(lines) + "\n")
    subprocess.run(["chown", "-R", "logcheck", str(workdir)], check=True)
    command = (
        f"/usr/sbin/logcheck -o -t -c {workdir}/logcheck.conf -r {workdir}/rules -S {workdir}/state -l {workdir}/syslog"
    )
    result = subprocess.run(
        ["su", "-s", "/bin/sh", "-c", command, "logcheck"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return [line for line in result.stdout.splitlines() if "nfknock" in line or FILE_LINE.match(line)]


def logwatch_report(logdir: Path, tmp_path: Path, override: str = "", journal: Path | None = None) -> str:
    """Debian's logwatch, nfknock service only, with deploy/logwatch as /etc/logwatch (a bind
    mount in a mount namespace of its own: the host's /etc is never touched), over `logdir`;
    `journal`: a directory with the journalctl it runs."""
    etc = tmp_path / "etc-logwatch"
    shutil.copytree(DEPLOY / "logwatch", etc)
    (etc / "conf" / "override.conf").write_text(override)
    cache = tmp_path / "logwatch-cache"
    cache.mkdir()
    (etc / "conf" / "logwatch.conf").write_text(f"TmpDir = {cache}\n")
    script = (
        f"mount --bind {etc} /etc/logwatch && "
        f"exec logwatch --service nfknock --range all --detail high --output stdout --hostname bastion "
        f"--logdir {logdir}"
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": f"{journal}:{os.environ['PATH']}"} if journal else None,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nfknock Begin" in result.stdout, result.stdout + result.stderr
    return result.stdout


def sections(report: str) -> dict[str, list[str]]:
    """logwatch's nfknock section as {title: [lines]}."""
    body = report.split("nfknock Begin", 1)[1].split("nfknock End", 1)[0]
    out: dict[str, list[str]] = {}
    title = ""
    for line in body.splitlines():
        if line.strip() and not line.startswith("    "):
            title = line.strip().rstrip(":")
            out[title] = []
        elif line.strip():
            out[title].append(line.strip())
    return out


# -- the tests ----------------------------------------------------------------------------------


def test_admin_log_tools_read_what_the_daemon_writes(server, alice, bob, mallory, tmp_path):
    tools("fail2ban-regex", "logwatch", "logcheck", "unshare", "su")
    text = run_scenario(server, alice, bob, mallory, tmp_path)
    lines = forms(text)
    failures = [line for line in lines["file"] if re.search(FAILURE, line)]
    assert len(failures) == 3  # two refused SPA packets, one lockout
    assert len(alarms(lines["file"])) == 5  # and a refused reload, a stop

    # fail2ban: the failures, nothing else, in every form
    for form, form_lines in lines.items():
        log = tmp_path / f"{form}.log"
        log.write_text("\n".join(form_lines) + "\n")
        expected = [line for line in form_lines if re.search(FAILURE, line)]
        assert fail2ban_matches(log, tmp_path) == expected, form

    # logcheck: the routine lines hidden, the alarms shown, in every form
    for form, form_lines in lines.items():
        shown = logcheck_report(form_lines)
        assert sorted(shown) == sorted(alarms(form_lines)), form  # logcheck sorts its report

    # logwatch: opens, closes, refusals, lockouts per door and source; nothing unmatched
    logdir = tmp_path / "var-log"
    (logdir / "nfknock").mkdir(parents=True)
    (logdir / "syslog").write_text("\n".join(lines["syslog"]) + "\nDec  3 16:00:00 bastion sshd[1]: other\n")
    (logdir / "nfknock" / "nfknock.log").write_text(text)
    journal = tmp_path / "bin" / "journalctl"  # the journal as journalctl prints it
    journal.parent.mkdir()
    journal.write_text(
        "#!/bin/sh\n"
        'case " $* " in *" --identifier=nfknock "*) ;; *) echo "unexpected: $*" >&2; exit 1;; esac\n'
        f"cat {tmp_path / 'journal.log'}\n"
    )
    journal.chmod(0o755)
    (tmp_path / "journal.log").write_text("\n".join(lines["journal"]) + "\n")
    journal_only = (
        "services/nfknock: LogFile =\nservices/nfknock: LogFile = none\n"
        'services/nfknock: *JournalCtl = "--output=short --identifier=nfknock"\n'
    )
    file_only = "services/nfknock: LogFile =\nservices/nfknock: LogFile = nfknock\n"
    syslog_only = "services/nfknock: LogFile =\nservices/nfknock: LogFile = syslog\n"
    for form, override in (("file", file_only), ("syslog", syslog_only), ("journal", journal_only)):
        report = sections(logwatch_report(logdir, tmp_path / form, override, journal.parent))
        assert report["Doors opened"] == [
            f"openSSH: {alice.address}: 2 time(s)",
            f"spaSSH: {bob.address} (key default): 1 time(s)",
        ], form
        assert report["Doors closed by their close sequence"] == [f"openSSH: {alice.address}: 1 time(s)"], form
        assert report["Refused SPA packets"] == [
            f"spaSSH: bad hmac: {bob.address}: 2 time(s)",
        ], form
        assert report["Lockouts"] == [f"openSSH: {mallory.address}: 1 time(s)"], form
        assert report["Failed knock attempts"] == [f"openSSH: sequence timeout: {alice.address}: 1 time(s)"], form
        assert report["Grants expired (open_for over)"] == [f"openSSH: {alice.address}: 1 time(s)"], form
        assert len(report["Reloads refused (the rules in force were kept)"]) == 1, form
        assert "**Unmatched Entries**" not in report, form
    default = sections(logwatch_report(logdir, tmp_path / "default"))  # the syslog and the file
    assert default["Lockouts"] == [f"openSSH: {mallory.address}: 2 time(s)"]


def logrotate(server, tmp_path: Path) -> Path:
    """Debian's logrotate with the shipped file, pointed at the server's log; the rotated file."""
    conf = tmp_path / "logrotate.conf"
    shipped = (DEPLOY / "logrotate" / "nfknock").read_text()
    assert "/var/log/nfknock/nfknock.log {" in shipped
    conf.write_text(shipped.replace("/var/log/nfknock/nfknock.log", str(server.log)))
    result = subprocess.run(
        ["logrotate", "--force", "--state", str(tmp_path / "logrotate.state"), str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rotated = server.log.with_name(server.log.name + ".1")  # delaycompress: plain text this time
    assert rotated.exists() and server.log.exists() and server.log.stat().st_size == 0
    return rotated


@pytest.mark.parametrize("workers", ["1", "2"])
def test_logrotate_rotates_the_log_file_nothing_is_lost_and_the_daemon_runs_on(server, alice, tmp_path, workers):
    """Lines before the rotation in the rotated file, every line after it in the new one, none
    twice; no signal, no reload. With workers, the line of a knock is written by a worker
    process: it follows the rotation by itself."""
    tools("logrotate")
    server.start("--workers", workers)
    knock(server.sandbox, alice, "40000", "50000", "60000")
    assert connect(alice).connected
    server.wait_log(f"{alice.address}: openSSH: accepted new connection")
    before = server.log_text()
    rotated = logrotate(server, tmp_path)
    knock(server.sandbox, alice, "60000", "50000", "40000")
    server.wait_log(f"{alice.address}: openSSH: closed")
    knock(server.sandbox, alice, "40000", "50000", "60000")
    assert connect(alice).connected
    server.wait_log(f"{alice.address}: openSSH: accepted new connection")
    after = server.log_text()
    assert server.process.poll() is None  # undisturbed: running, and no reload
    assert "reload" not in before + after
    assert rotated.read_text() == before
    messages = [line[19:] for line in after.splitlines()]
    assert messages == [
        f"{alice.address}: openSSH: close Stage 1",
        f"{alice.address}: openSSH: close Stage 2",
        f"{alice.address}: openSSH: closed",
        f"{alice.address}: openSSH: Stage 1",
        f"{alice.address}: openSSH: Stage 2",
        f"{alice.address}: openSSH: OPEN SESAME",
        f"{alice.address}: openSSH: accepted new connection to 22/tcp",
    ]
    assert server.stop() == 0
    assert "nfknock stopped by a signal" in server.log_text()  # the supervisor's line, new file too
    assert not rotated.read_text().count("stopped")
