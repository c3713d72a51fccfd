"""The suite's secret check: no test key, whole or in part, in anything a test saw come out of
nfknock (captured stdout/stderr and logs, `capsys`/`capfd` reads, commands run through the
sandbox, daemon log files). README promises that keys never appear in any log; this makes every
test of the suite a witness.

How it stays cheap and not flaky:
- Secrets are registered when they are made, not guessed: every key `generate_keys` returns in
  the test process (patched once per session), every key line (KEY_BASE64, HMAC_KEY_BASE64, KEY,
  HMAC_KEY, GPG_DECRYPT_PW) of the suite's data files (access.conf samples, the stock client's
  vectors) and of the files a test leaves in its tmp_path, the content of its secret files
  (`*.key`, `*.password`: a fleet key, a rotating door's secret), and whatever a test registers
  by hand (`register`).
- A leak is any 16-character piece of a secret (a message clipped to 80 characters still leaks
  72 of an 88-character key). Only runs of base64 characters are looked at (a C-speed regex),
  and each is checked against a set of every 16-character window of every secret: linear in
  the output. A random 16-character window shows up in honest output with odds of 64^-16.
- Texts are collected during the test and checked once, when its teardown is reported, after
  the tmp_path's key files are registered; a leak makes that report an error naming where the
  piece was found, never the piece.

A test whose command prints a key on purpose (`nfknock keygen` prints the pair on stdout: that
is its job) says so with `@pytest.mark.prints_keys`: its stdout is not checked, its stderr and
logs still are.
"""

from __future__ import annotations

import base64
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pytest

WINDOW = 16  # characters of a secret that count as a leak
_RUN = re.compile(rf"[A-Za-z0-9+/=_-]{{{WINDOW},}}")
# Lines that carry a secret in the files the suite writes or ships: key files, access.conf.
_KEY_LINE = re.compile(
    r"^\s*(?:KEY_BASE64|HMAC_KEY_BASE64|KEY|HMAC_KEY|GPG_DECRYPT_PW|PASSWORD)\s*[:=\s]\s*(\S+)\s*$", re.M
)
_PLACEHOLDERS = {"__CHANGEME__"}
MAX_FILE = 256 * 1024  # files bigger than this in a tmp_path are no key files: not read
MAX_LOG = 64 * 1024 * 1024  # of a log file, read (a bench's log is a few MB)
_SECRET_FILES = {".key", ".password", ".pw", ".secret"}


@dataclass
class Registry:
    """Every secret of the session, as 16-character windows; the texts of the running test."""

    windows: dict[str, int] = field(default_factory=dict)  # window -> secret number
    count: int = 0
    texts: list[tuple[str, str]] = field(default_factory=list)  # (where, text) of the current test
    stdout_allowed: bool = False

    def register(self, *secrets: str | bytes) -> None:
        for secret in secrets:
            if isinstance(secret, bytes):
                secret = base64.b64encode(secret).decode()
            secret = secret.strip()
            if len(secret) < WINDOW or secret in _PLACEHOLDERS:
                continue
            self.count += 1
            # The padding and the last characters before it are no secret of their own.
            body = secret.rstrip("=")
            for i in range(len(body) - WINDOW + 1):
                self.windows.setdefault(body[i : i + WINDOW], self.count)

    def register_text(self, text: str) -> None:
        """The secrets of a key file's or access.conf's lines."""
        self.register(*(match.group(1) for match in _KEY_LINE.finditer(text)))

    def register_files(self, directory: Path) -> None:
        """Key lines of every small regular file under `directory` (never a FIFO or device), and
        the base64 of secret files (`*.key`, `*.password`, `*.pw`: a fleet key, a rotating door's
        secret, a Redis password)."""
        for path in _regular_files(directory, MAX_FILE):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            self.register_text(text)
            if path.suffix in _SECRET_FILES:
                self.register(*(line.split()[-1] for line in text.splitlines() if line.strip()))

    def see_logs(self, directory: Path) -> None:
        """Every `*.log` under `directory`: the daemons' log files a test's fixtures wrote."""
        for path in _regular_files(directory, MAX_LOG, pattern="*.log"):
            try:
                with open(path, "rb") as stream:
                    self.see(f"log file {path.name}", stream.read(MAX_LOG))
            except OSError:
                continue

    def see(self, where: str, text: str | bytes | None) -> None:
        """An output of the running test, checked at its teardown."""
        if not text:
            return
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        self.texts.append((where, text))

    def leaks(self, text: str) -> list[tuple[int, int]]:
        """(secret number, offset) of each secret a text shows a piece of, once per secret."""
        return find_leaks(text, self.windows)

    def check(self) -> list[str]:
        """One line per (output, secret) that leaked; the texts are forgotten."""
        found = []
        for where, text in self.texts:
            if self.stdout_allowed and "stdout" in where:
                continue
            for number, offset in self.leaks(text):
                line = text.count("\n", 0, offset) + 1
                found.append(f"test secret #{number} appears in {where}, line {line} (the piece is not shown)")
        self.texts.clear()
        return found


def _regular_files(directory: Path, limit: int, pattern: str = "*") -> list[Path]:
    try:
        paths = list(directory.rglob(pattern))
    except OSError:
        return []
    found = []
    for path in paths:
        try:
            info = path.lstat()
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode) and (pattern != "*" or info.st_size <= limit):
            found.append(path)
    return found


def find_leaks(text: str, windows: dict[str, int]) -> list[tuple[int, int]]:
    """(secret number, offset) for each secret a window of which occurs in `text`."""
    seen: dict[int, int] = {}
    for run in _RUN.finditer(text):
        chunk, start = run.group(), run.start()
        for i in range(len(chunk) - WINDOW + 1):
            number = windows.get(chunk[i : i + WINDOW])
            if number is not None and number not in seen:
                seen[number] = start + i
    return sorted(seen.items())


REGISTRY = Registry()


def register(*secrets: str | bytes) -> None:
    """Make these secrets known to the check (a test that makes keys by other means)."""
    REGISTRY.register(*secrets)


def see(where: str, text: str | bytes | None) -> None:
    """Hand the check an output the test got (a command's, a log file)."""
    REGISTRY.see(where, text)


# -- the plugin ------------------------------------------------------------------------------

_DATA = ("unit/fwknop_conf", "unit/broken_rules")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "prints_keys: the command under test prints keys on stdout by design (keygen); stderr is checked"
    )
    import nfknock.doors.spa as spa

    original = spa.generate_keys
    if not getattr(original, "_registers", False):

        def generate_keys(*args, **kwargs):
            keys = original(*args, **kwargs)
            REGISTRY.register(*keys)
            return keys

        generate_keys._registers = True  # type: ignore[attr-defined]
        spa.generate_keys = generate_keys
    tests = Path(__file__).resolve().parents[1]
    for folder in _DATA:
        REGISTRY.register_files(tests / folder)
    _register_vectors(tests / "unit" / "spa_vectors" / "vectors.jsonl")
    _wrap_readouterr()


def _register_vectors(path: Path) -> None:
    """The keys of the stock client's packets the SPA tests decode (one JSON object a line)."""
    import json

    try:
        lines = path.read_text().splitlines()
    except OSError:
        return
    for line in lines:
        if line.strip():
            vector = json.loads(line)
            REGISTRY.register(vector.get("key", ""), vector.get("hmac_key", ""))


def _wrap_readouterr() -> None:
    """What a test reads with capsys/capfd never reaches pytest's report: see it here."""
    cls = pytest.CaptureFixture
    if getattr(cls.readouterr, "_sees", False):
        return
    original = cls.readouterr

    def readouterr(self):
        result = original(self)
        REGISTRY.see("captured stdout", result.out)
        REGISTRY.see("captured stderr", result.err)
        return result

    readouterr._sees = True  # type: ignore[attr-defined]
    cls.readouterr = readouterr  # type: ignore[method-assign]


def pytest_runtest_setup(item):
    REGISTRY.texts.clear()
    REGISTRY.stdout_allowed = item.get_closest_marker("prints_keys") is not None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "teardown":
        return
    for name, text in report.sections:  # what pytest captured and nobody read, every phase
        REGISTRY.see(name.lower(), text)
    tmp = (getattr(item, "funcargs", None) or {}).get("tmp_path")
    if isinstance(tmp, Path):
        REGISTRY.register_files(tmp)
        REGISTRY.see_logs(tmp)
    found = REGISTRY.check()
    if found and report.outcome != "failed":
        report.outcome = "failed"
        report.longrepr = "secret check: a test key leaked into an output\n" + "\n".join(found)
