"""`nfknock import-knockd`: a knockd.conf turned into nfknock doors, and a list of what could not be.

knockd runs commands; nfknock grants ports. A door maps when its command (or start_command)
is the usual `iptables ... -s %IP% ... --dport N ... -j ACCEPT`; a door whose command deletes
that same rule (`-D`) becomes the close sequence of the door that adds it. Everything else is
reported, line by line, instead of guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import yaml

from ..doors.rules import MAX_SEQUENCE, Port

_ACCEPT = re.compile(
    r"\biptables\S*\s+(?P<op>-A|-I|-D)\s+INPUT\b.*?(?:-p\s+(?P<proto>tcp|udp)\b)?.*?"
    r"--dport\s+(?P<port>\d+)\b.*-j\s+ACCEPT\b"
)
_PROTO = re.compile(r"-p\s+(tcp|udp)\b")


@dataclass
class Section:
    name: str
    line: int
    values: dict[str, tuple[int, str]] = field(default_factory=dict)  # key -> (line number, value)


@dataclass
class Imported:
    doors: list[dict]
    unmapped: list[str]  # "line N: ... (why)": what the doors do not carry over
    notes: list[str]  # how something was carried over

    def yaml(self) -> str:
        return yaml.safe_dump({"doors": self.doors}, sort_keys=False, default_flow_style=None)


def parse_sections(text: str) -> tuple[list[Section], list[str]]:
    """Sections with their settings; keys are lower-cased, as knockd reads them."""
    sections: list[Section] = []
    problems = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        header = re.fullmatch(r"\[(.+)\]", line)
        if header:
            sections.append(Section(header.group(1).strip(), number))
        elif not sections:
            problems.append(f"line {number}: {raw.strip()} (outside any [section])")
        else:
            key, sep, value = line.partition("=")
            sections[-1].values[key.strip().lower()] = (number, value.strip() if sep else "")
    return sections, problems


def _grant_of(command: str) -> tuple[str, str, int] | None:
    """(op, proto, port) of an iptables ACCEPT rule for %IP%, or None."""
    if "%IP%" not in command:
        return None
    match = _ACCEPT.search(command)
    if not match:
        return None
    proto = _PROTO.search(command)
    return match.group("op"), proto.group(1) if proto else "tcp", int(match.group("port"))


def _steps(value: str) -> list[str]:
    """knockd's `7000:udp,8000` as nfknock writes it (`7000/udp`, `8000/tcp`), read by the rules'
    own port parser (it takes knockd's spelling); ValueError names the step it cannot read."""
    steps = []
    for item in value.split(","):
        try:
            steps.append(str(Port.model_validate(item.strip())))
        except ValueError as exc:  # pydantic's ValidationError is one
            reason = exc.errors()[0]["msg"].removeprefix("Value error, ") if hasattr(exc, "errors") else exc
            raise ValueError(f"{item.strip()!r}: {reason}") from None
    return steps


def import_knockd(text: str) -> Imported:
    sections, unmapped = parse_sections(text)
    raw = {number: line.strip() for number, line in enumerate(text.splitlines(), start=1)}
    notes: list[str] = []
    doors: dict[str, dict] = {}
    closers: list[tuple[Section, tuple[str, int], list[str]]] = []
    for section in sections:
        if section.name.lower() == "options":
            for number, _ in section.values.values():
                unmapped.append(
                    f"line {number}: {raw[number]} ([options]: nfknock logs with --log-file/--syslog "
                    "and guards every interface)"
                )
            continue
        values = section.values
        if "sequence" not in values:
            unmapped.append(
                f"line {section.line}: [{section.name}] has no sequence (skipped; it may use "
                "one_time_sequences, which nfknock does not support)"
            )
            continue
        command_key = "start_command" if "start_command" in values else "command"
        number, command = values.get(command_key, (section.line, ""))
        grant = _grant_of(command)
        if grant is None:
            unmapped.append(
                f"line {number}: [{section.name}] {raw[number]} (not an 'iptables ... "
                "-s %IP% --dport N -j ACCEPT' rule: door skipped)"
            )
            continue
        op, proto, port = grant
        try:
            steps = _steps(values["sequence"][1])
        except ValueError as exc:
            line = values["sequence"][0]
            unmapped.append(f"line {line}: [{section.name}] {raw[line]} ({exc}: door skipped)")
            continue
        if op == "-D":
            closers.append((section, (proto, port), steps))
            continue
        door = {"name": section.name, "sequence": steps[:MAX_SEQUENCE], "protect": [f"{port}/{proto}"]}
        if "seq_timeout" in values:
            door["seq_timeout"] = f"{values['seq_timeout'][1]}s"
        if "cmd_timeout" in values:
            door["open_for"] = f"{values['cmd_timeout'][1]}s"
        if "tcpflags" in values:
            door["tcp_flags"] = values["tcpflags"][1].replace(" ", "")
        for key, (line, _) in values.items():
            if key not in ("sequence", "seq_timeout", "cmd_timeout", "tcpflags", command_key, "stop_command"):
                unmapped.append(f"line {line}: [{section.name}] {raw[line]} (no nfknock equivalent)")
        if "cmd_timeout" not in values:
            notes.append(
                f"line {number}: [{section.name}] knockd keeps this rule until another door removes "
                "it; nfknock accepts new connections for open_for (default 30s) and never cuts "
                "established ones"
            )
        doors[section.name] = door
    for section, (proto, port), steps in closers:
        opener = next(
            (d for d in doors.values() if d["protect"] == [f"{port}/{proto}"] and "close_sequence" not in d),
            None,
        )
        if opener is None:
            unmapped.append(
                f"line {section.line}: [{section.name}] removes access to {port}/{proto}, "
                "which no imported door opens (skipped)"
            )
        else:
            opener["close_sequence"] = steps
            notes.append(f"line {section.line}: [{section.name}] became the close_sequence of {opener['name']}")
    return Imported(list(doors.values()), unmapped, notes)
