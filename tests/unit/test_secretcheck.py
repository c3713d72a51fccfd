"""The suite's secret check (tests/support/secretcheck.py) catches a leak: a test key, whole or a
clipped piece of it, in captured output, a capsys read, a log record or a daemon's log file."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from nfknock.doors.spa import generate_keys
from support.secretcheck import Registry

TESTS = Path(__file__).resolve().parents[1]


def test_a_clipped_piece_of_a_key_is_a_leak_and_honest_text_is_not():
    registry = Registry()
    _, mac = generate_keys()
    registry.register(mac)
    clipped = f"line 3: unknown setting 'HMAC_KEY_BASE64={mac}'"[:80] + "..."  # what 0.x logged
    assert [number for number, _ in registry.leaks(clipped)] == [1]
    assert registry.leaks(f"{mac[:15]} {mac[15:30]}") == []  # fewer than 16 characters in a row
    assert registry.leaks("reload refused: alice.keys: line 3: not a 'NAME: value' line") == []


def test_the_plugin_fails_a_test_that_shows_a_key_and_passes_the_others(tmp_path):
    (tmp_path / "test_inner.py").write_text(
        textwrap.dedent("""
        import logging, sys
        from nfknock.doors.spa import generate_keys

        def test_prints_a_clipped_key():
            _, mac = generate_keys()
            print(f"unknown setting {mac[:60]}...")

        def test_logs_a_piece():
            _, mac = generate_keys()
            logging.getLogger("nfknock").warning("reload refused: %s", mac[10:40])

        def test_reads_what_it_leaked(capsys):
            _, mac = generate_keys()
            print(mac, file=sys.stderr)
            assert capsys.readouterr().err  # read, so pytest never reports it: still seen

        def test_a_daemon_log_in_tmp_path(tmp_path):
            key = "nDWa19jtLUsYDboog47T4Kmh/azXbWYT1UtzKS9Gg9L9LLh9N+dGA6B0X2KwhAAq4PGmYTO0dONYNHWydoJoxg=="
            (tmp_path / "bob.keys").write_text(f"HMAC_KEY_BASE64: {key}\\n")
            (tmp_path / "nfknock.log").write_text(f"reload refused: {key[:50]}\\n")

        def test_honest(capsys):
            generate_keys()
            print("keys loaded: alice, bob")
        """)
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "support.secretcheck", "-p", "no:cacheprovider", "-q", "-rA"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = result.stdout
    assert "4 errors" in out and "5 passed" in out, out
    for name in ("prints_a_clipped_key", "logs_a_piece", "reads_what_it_leaked", "a_daemon_log_in_tmp_path"):
        assert f"ERROR test_inner.py::test_{name}" in out
    assert "ERROR test_inner.py::test_honest" not in out
    assert "appears in log file nfknock.log, line 1" in out and "appears in captured log call" in out
