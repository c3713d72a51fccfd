"""Per-person SPA key files, written: what `nfknock keygen --name` and `import-fwknop` leave in
an SPA door's keys_dir, and the fwknop command line that goes with a key.

A key file is the two lines `fwknop --key-gen` prints plus the key's settings, one upper-case
`NAME: value` line each (rules.read_key_file reads them back). It is checked by that same
reader before it is written, and created 0600 without ever replacing a file: a key is never
overwritten by accident, and never readable by others, not even for a moment.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from ..doors.rules import KEY_FILE_SETTINGS, KEY_SUFFIX, SpaKey, read_key_file
from ..errors import UsageError


def key_file_text(
    name: str, encryption: str, mac: str, comments: tuple[str, ...] = (), **settings: str | list[str] | None
) -> str:
    """The text of NAME.keys; UsageError when a setting is not valid (nothing is written then)."""
    lines = [f"# nfknock SPA key {name!r}; the file's name (without .keys) names the key in logs and status"]
    lines += [f"# {comment}" for comment in comments]
    lines += [f"KEY_BASE64: {encryption}", f"HMAC_KEY_BASE64: {mac}"]
    for field in KEY_FILE_SETTINGS:
        value = settings.pop(field, None)
        if value is None:
            continue
        lines.append(f"{field.upper()}: {', '.join(value) if isinstance(value, list) else value}")
    if settings:
        raise TypeError(f"unknown key settings: {', '.join(settings)}")
    text = "\n".join(lines) + "\n"
    try:
        _, parsed = read_key_file(text, f"key {name}")
        SpaKey.model_validate({"name": name, "file": f"{name}{KEY_SUFFIX}", **parsed})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err["loc"])
        raise UsageError(f"key {name!r}: {where}: {err['msg'].removeprefix('Value error, ')}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return text


def write_key_file(directory: Path, name: str, text: str) -> Path:
    """Create DIRECTORY/NAME.keys, mode 0600 from the start; never replace one (UsageError)."""
    path = directory / f"{name}{KEY_SUFFIX}"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{path} exists already (remove it first to replace the key)") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot write: {exc.strerror}") from None
    with os.fdopen(fd, "w") as stream:
        stream.write(text)
    return path


def client_command(
    server: str,
    encryption: str,
    mac: str,
    ports: list[str] | None = None,
    username: str | None = None,
    digest: str = "sha256",
) -> str:
    """The stock client's command line for this key (fwknop wants proto/port: tcp/22)."""
    access = ",".join(_fwknop_port(port) for port in ports or ["22/tcp"])
    argv = ["fwknop", "-A", access, "-a", "CLIENT_IP", "-D", server]
    if username is not None:
        argv += ["-U", username]
    argv += ["--use-hmac", "--key-base64-rijndael", encryption, "--key-base64-hmac", mac]
    if digest != "sha256":
        argv += ["--hmac-digest-type", digest]
    return " ".join(argv)


def _fwknop_port(text: str) -> str:
    port, _, proto = text.partition("/")
    return f"{(proto or 'tcp').strip().lower()}/{port.strip()}"
