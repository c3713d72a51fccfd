"""Which firewall managers this host runs, and the files where their nfknock base rule belongs.

Read for `nfknock doctor` (its `check_base_rules` judges what is found here): a manager is in use
when its service is enabled or its configuration files exist, as an administrator would tell.
Only files are read, under `etc` (a test passes a directory of its own); nothing is run.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass, field
from pathlib import Path

MAX_BYTES = 1 << 20  # a firewall configuration larger than this is not read (said so)


@dataclass(frozen=True)
class Manager:
    """A firewall manager in use, and the text of each file that must hold the base rule."""

    name: str  # as the admin knows it: nftables.service, netfilter-persistent, firewalld, ufw
    export: str  # the `nfknock export` argument
    why: str  # what says it is in use
    reload: str  # the command that reloads it
    # file -> its text (None: missing or unreadable), where one of them must hold the base rule
    # (`any_of`) or each of them must (not `any_of`)
    files: dict[str, str | None] = field(default_factory=dict)
    any_of: bool = False


def _read(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_BYTES:
            return None
        return path.read_text(errors="replace")
    except OSError:
        return None


def _enabled(etc: Path, unit: str) -> bool:
    return any((etc / "systemd" / "system").glob(f"*.wants/{unit}"))


_INCLUDE = re.compile(r'^\s*include\s+"([^"]+)"', re.MULTILINE)


def nft_files(conf: Path, depth: int = 3) -> dict[str, str | None]:
    """nftables.conf and every file it includes (globs, nested includes; relative paths from
    the including file's directory, as nft resolves them first)."""
    files: dict[str, str | None] = {}
    todo = [(conf, 0)]
    while todo:
        path, level = todo.pop(0)
        if str(path) in files:
            continue
        text = files[str(path)] = _read(path)
        if text is None or level >= depth:
            continue
        for name in _INCLUDE.findall(text):
            pattern = name if name.startswith("/") else str(path.parent / name)
            todo += [(Path(p), level + 1) for p in sorted(glob.glob(pattern))]
    return files


def find_managers(etc: Path = Path("/etc")) -> list[Manager]:
    found = []
    conf = etc / "nftables.conf"
    enabled = _enabled(etc, "nftables.service")
    if enabled or conf.exists():
        why = "nftables.service is enabled" if enabled else f"{conf} exists (nftables.service is not enabled)"
        found.append(
            Manager("nftables.service", "nftables", why, "systemctl reload nftables", nft_files(conf), any_of=True)
        )
    rules = [etc / "iptables" / "rules.v4", etc / "iptables" / "rules.v6"]
    present = [path for path in rules if path.exists()]
    if present:
        found.append(
            Manager(
                "netfilter-persistent",
                "iptables",
                f"{' and '.join(map(str, present))} exist",
                "netfilter-persistent reload",
                {str(path): _read(path) for path in present},
            )
        )
    firewalld = etc / "firewalld"
    if _enabled(etc, "firewalld.service") or (firewalld / "firewalld.conf").exists():
        direct = firewalld / "direct.xml"
        found.append(
            Manager(
                "firewalld",
                "firewalld",
                f"{firewalld / 'firewalld.conf'} exists",
                "firewall-cmd --reload",
                {str(direct): _read(direct)},
            )
        )
    ufw_conf = _read(etc / "ufw" / "ufw.conf") or ""
    if re.search(r"^\s*ENABLED\s*=\s*yes\b", ufw_conf, re.MULTILINE):
        before = [etc / "ufw" / "before.rules", etc / "ufw" / "before6.rules"]
        found.append(
            Manager(
                "ufw",
                "ufw",
                f"ufw is enabled ({etc / 'ufw' / 'ufw.conf'})",
                "ufw reload",
                {str(path): _read(path) for path in before},
            )
        )
    return found
