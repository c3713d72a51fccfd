"""The last good rules as a file (lastgood.py says why and when): a copy of the rules files and of
the key and secret files they name, written atomically (0600, in the root-only state directory)
and loaded back as any rules are; and, when there is no copy, the plan that only closes the
protected ports a broken rules file still shows."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from ..doors import yamlsafe
from ..doors.first_steps import MarkHistory, decide
from ..doors.rules import KEY_SUFFIX, Destination, Door, RotatingDoor, Ruleset, SpaDoor
from ..errors import RulesError
from ..firewall.plan import FORWARD_CHAIN, GatedPlan, GatewayPlan, Plan, RuleSpec, scaffolding, with_gateway
from ..loading import MAX_RULES_BYTES, MAX_SECRET_BYTES, load_rules, rule_files
from ..trust import why_unsafe

FILE_NAME = "last-good.json"
WRITTEN_DIR = "last-good"  # the copy as a rules directory, only while it is being loaded
FORMAT = 1
EXIT_DEGRADED = 3  # `nfknock status` while the daemon runs on the last good rules


class LastGoodError(Exception):
    """The copy cannot be used (missing, unreadable, or its rules no longer load); one line."""


# -- the copy ------------------------------------------------------------------------------------


def capture(rules_path: Path) -> dict[str, Any]:
    """The rules files as data, with every key or secret file they name read in and its path
    replaced by a name inside the copy. Reads only; raises OSError/ValueError/YAMLError."""
    rules: dict[str, Any] = {}
    keys: dict[str, str] = {}
    seen: set[int] = set()  # YAML aliases share objects: each is rewritten once

    def keep(path: str, is_dir: bool = False) -> str:
        name = f"k{len(keys)}"
        source = Path(path)
        if is_dir:
            name += ".d"
            keys[name] = ""  # the directory itself
            for file in sorted(source.iterdir()):
                if file.name.endswith(KEY_SUFFIX):
                    keys[f"{name}/{file.name}"] = _read_text(file, MAX_SECRET_BYTES)
        else:
            keys[name] = _read_text(source, MAX_SECRET_BYTES)
        return name

    for index, file in enumerate(rule_files(rules_path)):
        data = yamlsafe.load(_read_text(file, MAX_RULES_BYTES))
        if not isinstance(data, dict) or not isinstance(data.get("doors"), list):
            raise ValueError(f"{file}: no 'doors:' list")
        for door in data["doors"]:
            if not isinstance(door, dict) or id(door) in seen:
                continue  # an alias of a door already seen: rewritten once
            seen.add(id(door))
            if isinstance(door.get("keys_file"), str):
                door["keys_file"] = keep(door["keys_file"])
            if isinstance(door.get("keys_dir"), str):
                door["keys_dir"] = keep(door["keys_dir"], is_dir=True)
            for entry in door.get("keys") or []:
                if isinstance(entry, dict) and isinstance(entry.get("file"), str) and id(entry) not in seen:
                    seen.add(id(entry))
                    entry["file"] = keep(entry["file"])
            rotate = door.get("rotate")
            if isinstance(rotate, dict) and isinstance(rotate.get("secret_file"), str) and id(rotate) not in seen:
                seen.add(id(rotate))
                rotate["secret_file"] = keep(rotate["secret_file"])
        # The index keeps the files' order (and so the doors'), the name says where they came from.
        rules[f"{index:03d}-{file.name}"] = data
    return {"format": FORMAT, "source": str(rules_path), "rules": rules, "keys": keys}


def write_out(copy: dict[str, Any], directory: Path) -> Path:
    """The copy as a rules directory (`directory`/rules) with its key files (`directory`/keys),
    every file 0600 and every directory 0700; returns the rules directory."""
    if copy.get("format") != FORMAT:
        raise ValueError(f"unknown format {copy.get('format')!r}")
    shutil.rmtree(directory, ignore_errors=True)
    rules_dir, keys_dir = directory / "rules", directory / "keys"
    for made in (directory, rules_dir, keys_dir):
        made.mkdir(mode=0o700)
    names = {name: str(keys_dir / name) for name in copy["keys"] if "/" not in name}
    for name, text in copy["keys"].items():
        if name.endswith(".d"):
            (keys_dir / name).mkdir(mode=0o700)
        else:
            _write_private(keys_dir / name, text)
    for name, data in copy["rules"].items():
        if "/" in name or not name.endswith((".yaml", ".yml")):
            raise ValueError(f"bad file name {name!r}")
        for door in data["doors"]:
            if not isinstance(door, dict):
                continue
            for field in ("keys_file", "keys_dir"):
                if field in door:
                    door[field] = names[door[field]]
            for entry in door.get("keys") or []:
                if isinstance(entry, dict) and "file" in entry:
                    entry["file"] = names[entry["file"]]
            rotate = door.get("rotate")
            if isinstance(rotate, dict) and "secret_file" in rotate:
                rotate["secret_file"] = names[rotate["secret_file"]]
        _write_private(rules_dir / name, yaml.safe_dump(data, sort_keys=False))
    return rules_dir


def load_copy(copy: dict[str, Any], scratch: Path) -> Ruleset:
    """The doors of a copy, loaded as any rules are (strict: trust checked, secrets attached),
    by way of a rules directory written at `scratch` and removed again whatever happens."""
    try:
        return load_rules(write_out(json.loads(json.dumps(copy)), scratch), strict=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def same_doors(ours: tuple[Door, ...], theirs: tuple[Door, ...]) -> bool:
    """Whether two rulesets have the same doors and keys, wherever their key files are."""
    return len(ours) == len(theirs) and all(_shape(a) == _shape(b) for a, b in zip(ours, theirs, strict=True))


def _shape(door: Door) -> tuple:
    fields = door.model_dump(exclude={"keys_file", "keys_dir", "keys", "rotate"})
    extra: tuple = ()
    if isinstance(door, SpaDoor):
        extra = (
            tuple(key.model_dump(exclude={"file"}) for key in door.keys),
            tuple(dataclasses.replace(key, origin="") for key in door.keyring),
        )
    elif isinstance(door, RotatingDoor):
        extra = (door.rotate.model_dump(exclude={"secret_file"}), door.rotate.secret)
    return (type(door), fields, extra)


class Store:
    """`last-good.json` in the state directory."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / FILE_NAME
        self.scratch = self.state_dir / WRITTEN_DIR

    def save(self, rules_path: Path, ruleset: Ruleset, wall: float) -> bool:
        """Keep the rules at `rules_path` as the last good ones, if they still are `ruleset` (the
        rules just installed); False when they changed on disk meanwhile. OSError and the
        loaders' errors are the caller's."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        copy = capture(rules_path)
        if not same_doors(load_copy(copy, self.scratch).doors, ruleset.doors):
            return False
        copy["saved"] = wall
        copy["doors"] = [door.name for door in ruleset.doors]
        _write_private(self.path.with_suffix(".tmp"), json.dumps(copy), replace=self.path)
        return True

    def load(self) -> tuple[Ruleset, dict[str, Any]]:
        """The last good rules and what the copy says about itself (saved, source, doors)."""
        if not self.path.exists():
            raise LastGoodError(f"none in {self.state_dir}")
        unsafe = why_unsafe(self.path, secret=True)
        if unsafe:
            raise LastGoodError(f"{self.path}: not trusted: {unsafe}")
        try:
            copy = json.loads(_read_text(self.path, 64 * MAX_RULES_BYTES))
            if not isinstance(copy, dict):
                raise ValueError("not an object")
            ruleset = load_copy(copy, self.scratch)
        except RulesError as exc:
            raise LastGoodError(f"{self.path}: its rules do not load either: {exc.lines[0]}") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LastGoodError(f"{self.path}: cannot read: {reason_of(exc)}") from None
        about = {"saved": copy.get("saved"), "source": copy.get("source"), "doors": copy.get("doors")}
        return Ruleset(ruleset.doors, dict.fromkeys(ruleset.origin, self.path), ruleset.warnings), about

    def forget(self) -> None:
        for path in (self.path, self.path.with_suffix(".tmp")):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.scratch, ignore_errors=True)


# -- closed without doors --------------------------------------------------------------------------

_PORT = re.compile(r"^\s*(\d{1,5})\s*(?:/\s*(tcp|udp)\s*)?$", re.IGNORECASE)


def readable_ports(rules_path: Path) -> tuple[tuple[str, int], ...]:
    """Every (proto, port) the files at `rules_path` protect, as far as they can be read: each
    door's `protect` list when the YAML parses, else the `protect:` lines found in the text
    (flow `[22/tcp, 443]` or block `- 22/tcp` lists). Never raises; () when nothing is read."""
    found: dict[tuple[str, int], None] = {}
    try:
        files = rule_files(rules_path)
    except RulesError:
        return ()
    for file in files:
        try:
            text = _read_text(file, MAX_RULES_BYTES)
        except (OSError, ValueError):
            continue
        try:
            data = yamlsafe.load(text)
            doors = data.get("doors") if isinstance(data, dict) else None
        except Exception:  # noqa: BLE001 - broken YAML: read the lines instead
            doors = None
        if isinstance(doors, list):
            for door in doors:
                protect = door.get("protect") if isinstance(door, dict) else None
                for item in protect if isinstance(protect, list) else [protect]:
                    _add_port(found, item)
        for item in _protect_in_text(text):
            _add_port(found, item)
    return tuple(found)


_DESTINATION = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|\b[0-9]+(?:\.[0-9]+){3}):[0-9]+(?:/[A-Za-z]+)?")


def readable_destinations(rules_path: Path) -> tuple[Destination, ...]:
    """Every destination behind this host (a gateway door's `forward` entries and `publish`
    targets, docs/gateway.md) that the files at `rules_path` name, as far as they can be read,
    as `readable_ports` reads the protected ports: from the parsed YAML, and from the `forward:`
    and `to:` text when it does not parse. A `to:` that names no protocol is closed for tcp and
    udp alike (its port's protocol may be unreadable): closing more is the safe side. Never
    raises; () when nothing is read."""
    found: dict[Destination, None] = {}
    try:
        files = rule_files(rules_path)
    except RulesError:
        return ()
    for file in files:
        try:
            text = _read_text(file, MAX_RULES_BYTES)
        except (OSError, ValueError):
            continue
        lines = [line.split("#", 1)[0] for line in text.splitlines()]
        items: list[str] = []
        for number, line in enumerate(lines):
            if re.search(r"\bforward\s*:", line):
                items += _DESTINATION.findall(line)
                for following in lines[number + 1 :]:  # a block list under it
                    if not re.match(r"^\s*-\s*\S", following):
                        break
                    items += _DESTINATION.findall(following)
            for to in re.findall(r"\bto\s*:\s*[\"']?([^\s,}\"']+)", line):
                items += _DESTINATION.findall(to)
        for item in items:
            protos = ("tcp", "udp") if "/" not in item else ("",)
            for proto in protos:
                try:
                    found[Destination.model_validate(f"{item}/{proto}" if proto else item)] = None
                except ValueError:
                    continue
    return tuple(found)


def closed_gateway(destinations: Iterable[Destination]) -> GatewayPlan:
    """Gateway scaffolding that only closes `destinations` (pure): their established traffic
    accepted, everything else to them dropped, no queue, no DNAT (a published port then leads
    nowhere), as closed_plan does for the host's own ports."""
    forward: dict[int, list[RuleSpec]] = {4: [], 6: []}
    for dest in dict.fromkeys(destinations):
        address = f"{dest.host}/{32 if dest.family == 4 else 128}"
        drop = RuleSpec("DROP", dest.proto, dest.port, chain=FORWARD_CHAIN, destination=address)
        forward[dest.family] += [replace(drop, target="ACCEPT", ctstate="RELATED,ESTABLISHED"), drop]
    return GatewayPlan(forward, {4: [], 6: []})


def closed_gated_plan(
    ports: tuple[tuple[str, int], ...], destinations: tuple[Destination, ...], queue_num: int, pass_mark: int
) -> Plan | GatedPlan:
    """closed_plan, carrying closed_gateway when there are destinations to close (none: a plain
    plan, which leaves gateway chains already in the kernel, closed without a daemon, alone)."""
    chains = closed_plan(ports, queue_num, pass_mark)
    return with_gateway(chains, closed_gateway(destinations)) if destinations else chains


def _protect_in_text(text: str) -> list[str]:
    items: list[str] = []
    lines = text.splitlines()
    for number, line in enumerate(lines):
        code = line.split("#", 1)[0]
        match = re.search(r"protect\s*:\s*(.*)$", code)
        if not match:
            continue
        rest = match.group(1).strip()
        if rest:
            flow = re.match(r"\[([^\]]*)\]?", rest)
            items += (flow.group(1) if flow else rest).split(",")
            continue
        for following in lines[number + 1 :]:  # a block list under it
            item = re.match(r"^\s*-\s*([^#\s,\]]+)", following)
            if not item:
                break
            items.append(item.group(1))
    return items


def _add_port(found: dict, item: Any) -> None:
    if isinstance(item, bool):
        return
    match = _PORT.match(str(item)) if isinstance(item, (int, str)) else None
    if match and 1 <= int(match.group(1)) <= 65535:
        found[((match.group(2) or "tcp").lower(), int(match.group(1)))] = None


def closed_plan(ports: tuple[tuple[str, int], ...], queue_num: int, pass_mark: int) -> Plan:
    """Scaffolding that only closes `ports` (established traffic and the host's sessions
    accepted, everything new dropped) in both families: no door, no queue, no set of grants."""
    nothing = decide((), MarkHistory())
    return {
        family: scaffolding((), queue_num, pass_mark, family, first_steps=nothing, closed=ports) for family in (4, 6)
    }


# -- files -----------------------------------------------------------------------------------------


def _read_text(path: Path, limit: int) -> str:
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(0, f"{path}: not a regular file")
    with open(path, "rb") as stream:
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path}: larger than {limit // 1024} KiB")
    return data.decode("utf-8")


def _write_private(path: Path, text: str, replace: Path | None = None) -> None:
    """0600 from the start (never readable by others, not even for a moment), fsynced; with
    `replace`, renamed over that file afterwards (a crash leaves the old one or the new one)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            fd = -1
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
    finally:
        if fd >= 0:
            os.close(fd)
    if replace is not None:
        os.replace(path, replace)


def when_saved(saved: float | None) -> str:
    if saved is None:
        return "at an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(saved))


def reason_of(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())[:200]
