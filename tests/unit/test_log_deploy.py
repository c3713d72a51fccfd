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
