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

from pydantic import ValidationError

from .doors.rules import (
    KEY_SUFFIX,
    MAX_LINES_PER_FILE,
    Door,
    DoorKey,
    RotatingDoor,
    Ruleset,
    SpaDoor,
    SpaKey,
    _clip,
    _conflicts,
    _parse_text,
    _read_keys,
    hide_values,
    read_key_file,
)
from .doors.spa import Keys
from .errors import RulesError
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
    """The single key of keys_file or keys_env (KEY_BASE64 and HMAC_KEY_BASE64, other lines ignored)."""
    if door.keys_file is not None:
        try:
            text = _read_secret(door.keys_file)
        except OSError as exc:
            raise ValueError(f"keys_file {door.keys_file}: cannot read: {exc.strerror}") from None
        return _read_keys(text, f"keys_file {door.keys_file}")
    return _env_keys(door.keys_env or "")


def _env_keys(prefix: str) -> Keys:
    names = [f"{prefix}_{name}" for name in ("KEY_BASE64", "HMAC_KEY_BASE64")]
    missing = [name for name in names if not os.environ.get(name)]
    if missing:
        raise ValueError(f"environment variable {missing[0]} is not set")
    return _read_keys(
        f"KEY_BASE64: {os.environ[names[0]]}\nHMAC_KEY_BASE64: {os.environ[names[1]]}",
        f"environment variables {names[0]}, {names[1]}",
    )


def _person_key(door: SpaDoor, spec: SpaKey, file: Path | None, where: str) -> DoorKey:
    """One person's key: its file (keys and settings) or environment, over the entry's settings."""
    if file is None:
        return door.resolve(spec, _env_keys(spec.env or ""), where)
    try:
        text = _read_secret(file)
    except OSError as exc:
        raise ValueError(f"{where}: cannot read: {exc.strerror}") from None
    lines: dict[str, int] = {}
    keys, settings = read_key_file(text, where, lines)
    given = spec.model_dump(exclude_unset=True, exclude={"name", "file", "env"})
    both = sorted(set(given) & set(settings))
    if both:
        raise ValueError(f"{where}: {', '.join(both)} set both in the rules and in the key file")
    try:
        spec = SpaKey.model_validate({**spec.model_dump(exclude_unset=True), **settings})
    except ValidationError as exc:
        raise ValueError(f"{where}: {_clip(_settings_problems(exc, lines))}") from None
    return door.resolve(spec, keys, where)


def _settings_problems(exc: ValidationError, lines: dict[str, int]) -> str:
    """A key file's bad settings by line and name, without their values (the file holds keys:
    a key pasted on the SOURCES line must not reach the log). Pydantic's own messages never
    quote the input (str(exc) does: never used); the validators' value errors do, and are
    stripped of what they quote."""
    problems = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else ""
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] in ("value_error", "assertion_error"):
            message = hide_values(message)
        where = f"line {lines[field]}: {field.upper()}" if field in lines else ".".join(map(str, err["loc"]))
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


def _keyring(door: SpaDoor, strict: bool, warnings: list[str]) -> tuple[DoorKey, ...]:
    """Every key of an SPA door, loaded: the single key, the `keys` list, then `keys_dir`.

    Names and HMAC keys must be unique: a packet is matched to its person by the HMAC key it
    carries. An empty keys_dir is no error (removing the last person must not keep the old
    rules, and so the old key, in force); `check` warns about it.
    """

    def trusted(path: Path, field: str, secret: bool = True) -> None:
        reason = why_unsafe(path, secret=secret)
        if reason:
            if strict:
                raise ValueError(f"{field}: not trusted: {reason}")
            warnings.append(f"{field}: not trusted: {reason}")

    ring: list[DoorKey] = []
    if door.keys_file is not None or door.keys_env is not None:
        if door.keys_file is not None:
            trusted(door.keys_file, "keys_file")
        origin = f"keys_file {door.keys_file}" if door.keys_file else f"keys_env {door.keys_env}"
        ring.append(door.single_key(_spa_keys(door), origin))
    for spec in door.keys:
        where = f"keys: {spec.name}: " + (f"file {spec.file}" if spec.file else f"env {spec.env}")
        if spec.file is not None:
            trusted(spec.file, f"keys: {spec.name}")
        ring.append(_person_key(door, spec, spec.file, where))
    if door.keys_dir is not None:
        trusted(door.keys_dir, "keys_dir", secret=False)
        try:
            files = sorted(p for p in door.keys_dir.iterdir() if p.name.endswith(KEY_SUFFIX))
        except OSError as exc:
            raise ValueError(f"keys_dir {door.keys_dir}: cannot read: {exc.strerror}") from None
        if not files:
            warnings.append(f"keys_dir {door.keys_dir} holds no *{KEY_SUFFIX} file: nobody can open this door")
        for file in files:
            name = file.name[: -len(KEY_SUFFIX)]
            where = f"keys_dir: {file}"
            try:
                spec = SpaKey.model_validate({"name": name, "file": file})
            except ValidationError:
                raise ValueError(f"{where}: {name!r} is not a key name (letters, digits, '_.@-', up to 64)") from None
            trusted(file, where)
            ring.append(_person_key(door, spec, file, where))
    names: dict[str, DoorKey] = {}
    macs: dict[bytes, DoorKey] = {}
    for key in ring:
        if key.name in names:
            raise ValueError(f"key {key.name!r} twice ({names[key.name].origin} and {key.origin})")
        if key.keys.hmac in macs:
            raise ValueError(
                f"keys {macs[key.keys.hmac].name!r} and {key.name!r} have the same HMAC key: a packet could "
                "not tell them apart (give each person a key of their own: nfknock keygen --name)"
            )
        names[key.name] = macs[key.keys.hmac] = key
    return tuple(ring)


def load_secrets(door: Door, strict: bool = False) -> list[str]:
    """Attach a validated door's secrets: a rotating door's `rotate.secret`, an SPA door's keys.

    The one step of loading that reads key files and the environment (validation reads
    nothing). A key file that `trust.why_unsafe` refuses is not read when `strict`; otherwise
    the reason is returned as a warning. Raises ValueError naming the field on any problem.
    """
    if isinstance(door, SpaDoor):
        warnings: list[str] = []
        door._keyring = _keyring(door, strict, warnings)
        return warnings
    if not isinstance(door, RotatingDoor):
        return []
    warnings = []
    file = door.rotate.secret_file
    reason = why_unsafe(file, secret=True) if file is not None else None
    if reason:
        if strict:
            raise ValueError(f"rotate: secret_file: not trusted: {reason}")
        warnings.append(f"rotate: secret_file: not trusted: {reason}")
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
        except ValueError as exc:  # str() of a ValidationError quotes the input: never that
            why = _settings_problems(exc, {}) if isinstance(exc, ValidationError) else exc
            problems.setdefault(i, []).append(f"{files[i]}: door {door.name!r}: {why}")
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
