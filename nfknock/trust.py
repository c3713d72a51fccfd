"""Whether a rules or key file can be trusted: the one check `run` (strict), `check` (a warning)
and `doctor` (a finding) share, after sshd's StrictModes.

Whoever can write a rules file, or the directory holding it, decides who gets in; whoever can
read a key file can open SPA doors. So a file is trusted only if, with symlinks resolved (the
target is what gets read; a link's own mode means nothing):

* the file, and every directory above it, is owned by root or by the user nfknock runs as;
* none of them is writable by group or others, except that a directory above the holding
  directory may be world-writable with the sticky bit (/tmp): there nobody can replace
  another's entries;
* a key or secret file is moreover not readable by group or others.

A file that cannot be stat()ed is not judged here: reading it reports the error.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

WRITABLE = stat.S_IWGRP | stat.S_IWOTH
READABLE = stat.S_IRGRP | stat.S_IROTH


def why_unsafe(path: str | Path, secret: bool = False) -> str | None:
    """The reason not to trust `path` (a file or a rules directory), in one line; None if it is safe."""
    try:
        real = Path(os.path.realpath(path))
        chain = [real, *real.parents]
        modes = [os.stat(p) for p in chain]
    except (OSError, ValueError):
        return None
    shown = f"{path} (-> {real})" if str(real) != os.path.abspath(path) else str(path)
    owners = {0, os.geteuid()}
    for level, (where, mode) in enumerate(zip(chain, modes, strict=True)):
        what = ("directory " if stat.S_ISDIR(mode.st_mode) else "") + (shown if level == 0 else str(where))
        if mode.st_uid not in owners:
            return f"{what} is owned by uid {mode.st_uid}, not root: its owner decides who gets in"
        if mode.st_mode & WRITABLE and not (level >= 2 and stat.S_ISDIR(mode.st_mode) and mode.st_mode & stat.S_ISVTX):
            return f"{what} is writable by group or others: anyone who can edit it decides who gets in (chmod go-w)"
    if secret and modes[0].st_mode & READABLE:
        return f"{shown} holds keys and is readable by group or others (chmod 600)"
    return None
