"""Rules from disk, at the edge: read the files (bounded, trusted or refused), validate them with
rules.py (pure), then attach the doors' secrets from key files and the environment.

Kept apart from rules.py so that validation stays pure: the engine and everything it imports
never touch a file, and a rules file can be checked on a machine that has none of the keys.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path

from .errors import RulesError
from .rules import (
    MAX_LINES_PER_FILE,
    Door,
    RotatingDoor,
    Ruleset,
    SpaDoor,
    _clip,
    _conflicts,
    _parse_text,
    _read_keys,
)
from .spa import Keys
from .trust import why_unsafe


def _secret_from(file: Path | None, env: str | None, what: str) -> bytes:
    """A base64 secret from a root-only file or an environment variable, never the rules file."""
    if file is not None:
        try:
            text = _read_secret(file)
        except OSError as exc:
            raise ValueError(f"{what}_file {file}: cannot read: {exc.strerror}") from None
        where = f"{what}_file {file}"
    else:
        text = os.environ.get(env or "", "").strip()
        where = f"environment variable {env}"
        if not text:
            raise ValueError(f"{where} is not set")
    try:
        secret = base64.b64decode(text.split()[-1], validate=True)
    except (binascii.Error, IndexError, ValueError):
        raise ValueError(f"{where}: not valid base64") from None
    if len(secret) < 16:
        raise ValueError(f"{where}: secret too short (16 bytes at least; 'nfknock keygen' makes good ones)")
    return secret


MAX_SECRET_BYTES = 64 * 1024


def _read_secret(file: Path) -> str:
    if not stat.S_ISREG(os.stat(file).st_mode):
        raise OSError(0, "not a regular file")
    with open(file, "rb") as stream:
        data = stream.read(MAX_SECRET_BYTES + 1)
    if len(data) > MAX_SECRET_BYTES:
        raise OSError(0, f"larger than {MAX_SECRET_BYTES // 1024} KiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise OSError(0, "not UTF-8 text") from None


def _spa_keys(door: SpaDoor) -> Keys:
    if door.keys_file is not None:
        try:
            text = _read_secret(door.keys_file)
        except OSError as exc:
            raise ValueError(f"keys_file {door.keys_file}: cannot read: {exc.strerror}") from None
        keys = _read_keys(text, f"keys_file {door.keys_file}")
    else:
        names = [f"{door.keys_env}_{name}" for name in ("KEY_BASE64", "HMAC_KEY_BASE64")]
        missing = [name for name in names if not os.environ.get(name)]
        if missing:
            raise ValueError(f"environment variable {missing[0]} is not set")
        keys = _read_keys(
            f"KEY_BASE64: {os.environ[names[0]]}\nHMAC_KEY_BASE64: {os.environ[names[1]]}",
            f"environment variables {names[0]}, {names[1]}",
        )
    return Keys(keys.encryption, keys.hmac, door.hmac_digest)


def load_secrets(door: Door, strict: bool = False) -> list[str]:
    """Attach a validated door's secret: a rotating door's `rotate.secret`, an SPA door's `keys`.

    The one step of loading that reads key files and the environment (validation reads
    nothing). A key file that `trust.why_unsafe` refuses is not read when `strict`; otherwise
    the reason is returned as a warning. Raises ValueError naming the field on any problem.
    """
    if isinstance(door, SpaDoor):
        field, file = "keys_file", door.keys_file
    elif isinstance(door, RotatingDoor):
        field, file = "rotate: secret_file", door.rotate.secret_file
    else:
        return []
    warnings = []
    reason = why_unsafe(file, secret=True) if file is not None else None
    if reason:
        if strict:
            raise ValueError(f"{field}: not trusted: {reason}")
        warnings.append(f"{field}: not trusted: {reason}")
    if isinstance(door, SpaDoor):
        door._keys = _spa_keys(door)
    else:
        try:
            door.rotate._secret = _secret_from(door.rotate.secret_file, door.rotate.secret_env, "secret")
        except ValueError as exc:
            raise ValueError(f"rotate: {exc}") from None
    return warnings


def rule_files(path: Path) -> list[Path]:
    if path.is_dir():
        # Not is_file(): a dangling symlink or a directory named *.yaml must be reported, not skipped.
        try:
            files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
        except OSError as exc:
            raise RulesError([f"{path}: cannot read: {exc.strerror}"]) from None
        if not files:
            raise RulesError([f"{path}: no rule files (*.yaml) in this directory"])
        return files
    if not path.exists():
        raise RulesError([f"{path}: no such file or directory"])
    return [path]


def load_rules(path: str | Path, strict: bool = False) -> Ruleset:
    """Load a rules file or a directory of `*.yaml` files; raise RulesError listing every problem.

    Validation reads nothing; the secrets (key files, environment) are attached afterwards, by
    `load_secrets`. With `strict` (the daemon), a rules or key file that `trust.why_unsafe`
    refuses (others could write it, or read keys) is an error and is not read; without it (`check`,
    the clients) the reason comes back in `Ruleset.warnings`.

    Nothing but RulesError escapes: whatever goes wrong becomes a line naming the file (a reload
    keeps the old rules on RulesError)."""
    try:
        return _load_rules(Path(path), strict)
    except RulesError:
        raise
    except Exception as exc:
        raise RulesError([f"{path}: cannot load: {type(exc).__name__}: {_clip(exc)}"]) from exc


def _load_rules(path: Path, strict: bool) -> Ruleset:
    warnings: list[str] = []
    reported: set[str] = set()

    def untrusted(target: Path, errors: list[str]) -> bool:
        """Whether `target` must not be read; its reason is reported once however many files share it."""
        reason = why_unsafe(target)
        if reason and reason not in reported:
            reported.add(reason)
            (errors if strict else warnings).append(f"{target}: not trusted: {reason}")
        return bool(reason) and strict

    top_errors: list[str] = []
    if path.is_dir() and untrusted(path, top_errors):
        raise RulesError(top_errors)
    loaded = []
    doors: list[Door] = []
    files: list[Path] = []
    origin: dict[str, Path] = {}
    for file in rule_files(path):
        file_errors: list[str] = []
        file_doors = [] if untrusted(file, file_errors) else _load_file(file, file_errors)
        loaded.append((file_errors, len(doors), len(file_doors)))
        doors += file_doors
        files += [file] * len(file_doors)
        for door in file_doors:
            origin.setdefault(door.name, file)
    problems = _conflicts(doors, files, origin)
    for i, door in enumerate(doors):
        try:
            found = load_secrets(door, strict)
        except ValueError as exc:
            problems.setdefault(i, []).append(f"{files[i]}: door {door.name!r}: {exc}")
        else:
            warnings += [f"{files[i]}: door {door.name!r}: {line}" for line in found]
    errors: list[str] = top_errors
    for file_errors, first, count in loaded:
        errors += file_errors
        for i in range(first, first + count):
            errors += problems.get(i, [])
    if errors:
        raise RulesError(errors)
    return Ruleset(tuple(doors), origin, tuple(warnings))


MAX_RULES_BYTES = 1024 * 1024  # per file: 10,000 doors in flow style fit; more go in several files


def _read(file: Path) -> str:
    """The file's text; OSError, UnicodeDecodeError or ValueError (too big) when it cannot be had."""
    if not stat.S_ISREG(mode := os.stat(file).st_mode) and not stat.S_ISDIR(mode):
        raise OSError(0, "not a regular file")  # a FIFO would block the reload
    with open(file, "rb") as stream:
        data = stream.read(MAX_RULES_BYTES + 1)
    if len(data) > MAX_RULES_BYTES:
        raise ValueError(
            f"larger than {MAX_RULES_BYTES // 1024} KiB; put the doors in several files of a rules directory"
        )
    return data.decode("utf-8")


def _load_file(file: Path, errors: list[str]) -> list[Door]:
    """The doors of one file, or none and the file's problems added to `errors`."""
    found: list[str] = []
    doors = _parse_file(file, found)
    if len(found) > MAX_LINES_PER_FILE:
        found[MAX_LINES_PER_FILE:] = [f"{file}: {len(found) - MAX_LINES_PER_FILE} more problems not listed"]
    errors.extend(found)
    return doors


def _parse_file(file: Path, errors: list[str]) -> list[Door]:
    try:
        text = _read(file)
    except (OSError, UnicodeDecodeError) as exc:
        errors.append(f"{file}: cannot read: {_clip(getattr(exc, 'strerror', None) or exc)}")
        return []
    except ValueError as exc:
        errors.append(f"{file}: cannot read: {exc}")
        return []
    return _parse_text(text, file, errors)
