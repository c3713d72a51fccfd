"""The file an importer reads (knockd.conf, fwknopd's access.conf), read the way the daemon reads
its rules: a regular file, bounded, UTF-8, or one line saying why not.

An importer is run by hand on a file someone gave you: a 300 MB file must not take a gigabyte,
a link to /dev/zero must not read forever, a FIFO must not hang the command, and nothing of the
file's bytes goes into the message (an access.conf holds keys).
"""

from __future__ import annotations

import os
import stat

from ..errors import UsageError

MAX_IMPORT_BYTES = 1024 * 1024  # a thousand fwknopd stanzas take about 300 KiB


def read_config(path: str, limit: int = MAX_IMPORT_BYTES) -> str:
    """The text of `path`; UsageError naming the file and what is wrong with it."""
    try:
        # O_NONBLOCK: opening a FIFO does not wait for a writer; fstat then refuses it (a stat
        # before the open could be raced by a rename).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UsageError(f"{path}: cannot read: not a regular file ({_kind(mode)})")
        os.set_blocking(fd, True)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(65536, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if size > limit:
        raise UsageError(f"{path}: cannot read: larger than {limit // 1024} KiB (is it the right file?)")
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: cannot read: not UTF-8 text (byte {exc.start + 1})") from None


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a plain file"
