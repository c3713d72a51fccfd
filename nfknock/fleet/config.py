"""`nfknock run --cluster ...` turned into a FleetConfig: the URL checked, the fleet key and the
Redis password read from root-only files (never from the command line, where `ps` shows them,
and never logged)."""

from __future__ import annotations

import re

from ..errors import UsageError
from ..trust import why_unsafe
from .link import FleetConfig, check_url
from .records import parse_keys

NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_SECRET_FILE = 4096


def fleet_config(
    url: str,
    key_file: str | None,
    password_file: str | None = None,
    name: str = "nfknock",
    member: str = "",
    offline: str = "accept",
) -> FleetConfig:
    check_url(url)
    if not key_file:
        raise UsageError("--cluster needs --cluster-key-file (the fleet key, shared by the members)")
    if not NAME.fullmatch(name):
        raise UsageError(f"--cluster-name: letters, digits, '_', '.', '-' (at most 64), got {name!r}")
    if member and not NAME.fullmatch(member):
        raise UsageError(f"--cluster-member: letters, digits, '_', '.', '-' (at most 64), got {member!r}")
    key, *older = parse_keys(_read_secret(key_file, "--cluster-key-file"), key_file)
    password = _read_secret(password_file, "--cluster-password-file").strip() if password_file else None
    return FleetConfig(url, key, password or None, name, member, offline, tuple(older))


def read_password(path: str | None) -> str | None:
    """--cluster-password-file's password (None without one); UsageError if the file is unsafe."""
    return (_read_secret(path, "--cluster-password-file").strip() or None) if path else None


def _read_secret(path: str, option: str) -> str:
    reason = why_unsafe(path, secret=True)
    if reason:
        raise UsageError(f"{option}: not trusted: {reason}")
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read(MAX_SECRET_FILE + 1)
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{option}: {path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    if len(text) > MAX_SECRET_FILE:
        raise UsageError(f"{option}: {path}: longer than {MAX_SECRET_FILE} bytes")
    if not text.strip():
        raise UsageError(f"{option}: {path}: empty")
    return text
