"""nfknock(8), written from the argparse parser the command itself uses, so the manual cannot
drift from the CLI: every verb, option, choice and default comes from `cli.build_parser()`.

`python -m nfknock.manpage > nfknock.8` (the Debian package build does this). The prose that
argparse does not hold (files, signals, fail-closed) is kept short here and points at README.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__

SECTION = "8"
FILES = (
    ("/etc/nfknock/rules/*.yaml", "the doors, root's alone (mode 0600 in a 0700 directory)"),
    ("/etc/default/nfknock", "NFKNOCK_ENABLE, NFKNOCK_INTERFACE and NFKNOCK_OPTS for the systemd unit"),
    ("/var/lib/nfknock", "the replay cache (SPA packets and rotating sequences already used), kept across restarts"),
    ("/run/nfknock/nfknock.sock", "the control socket of status, revoke and grant (mode 0600, in a 0700 directory)"),
)
FAIL_CLOSED = (
    "Stopping, a crash or a kill leave nfknock's firewall rules in place: with no process bound to the "
    "queue the kernel drops what the rules queue, so protected ports stay closed until the daemon runs "
    "again. Only nfknock down (or removing the package) takes the rules away."
)


def escape(text: str) -> str:
    """Text as roff reads it literally: backslashes, minus signs, and no line starting a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line for line in text.splitlines())


def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str]]:
    """(verb, parser, one-line help) in the order the verbs were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            return [(verb, sub, helps.get(verb, "")) for verb, sub in action.choices.items()]
    return []


def _option_label(action: argparse.Action) -> str:
    metavar = action.metavar or (action.dest.upper() if action.nargs != 0 else None)
    if action.choices is not None and action.nargs != 0:
        metavar = "{" + ",".join(str(c) for c in action.choices) + "}"
    names = ", ".join(f"\\fB{escape(name)}\\fR" for name in action.option_strings)
    if not action.option_strings:
        return f"\\fI{escape(str(action.metavar or action.dest))}\\fR"
    return names + (f" \\fI{escape(str(metavar))}\\fR" if metavar and action.nargs != 0 else "")


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:
        text = parser._get_formatter()._expand_help(action)
    return text


def _options(parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        out += [".TP", _option_label(action), escape(_help(parser, action))]
    return out


def _usage(parser: argparse.ArgumentParser) -> str:
    usage = " ".join(parser.format_usage().split())
    return usage.removeprefix("usage: ")


def render(parser: argparse.ArgumentParser, date: str = "") -> str:
    """The whole page as roff (man macros)."""
    name = parser.prog
    lines = [
        f'.TH {name.upper()} {SECTION} "{date}" "{name} {__version__}" "System Administration"',
        ".SH NAME",
        f"{name} \\- inline port\\-knocking daemon and client (NFQUEUE)",
        ".SH SYNOPSIS",
        f"\\fB{name}\\fR [\\fB\\-\\-version\\fR] \\fIVERB\\fR [\\fIoptions\\fR]",
        ".SH DESCRIPTION",
        escape(parser.description or ""),
        ".PP",
        escape(FAIL_CLOSED),
        ".SH OPTIONS",
        *_options(parser),
        ".SH COMMANDS",
    ]
    for verb, sub, summary in _subparsers(parser):
        lines += [".SS " + escape(f"{name} {verb}"), escape(summary), ".PP", escape(_usage(sub))]
        options = _options(sub)
        if options:
            lines += [".RS", *options, ".RE"]
    lines += [".SH FILES"]
    for path, what in FILES:
        lines += [".TP", f"\\fI{escape(path)}\\fR", escape(what)]
    lines += [
        ".SH EXIT STATUS",
        "0 on success; 1 when a check or a command failed; 2 for a usage error or invalid rules.",
        ".SH SEE ALSO",
        "\\fBsystemctl\\fR(1), \\fBiptables\\fR(8), \\fBknockd\\fR(1), \\fBfwknop\\fR(8); "
        "the README and the guides (docs/*.md) in /usr/share/doc/nfknock.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from ..cli import build_parser

    args = argparse.ArgumentParser(prog="python -m nfknock.manpage", description="write nfknock(8) as roff")
    args.add_argument("--date", default="", help="the date in the page's footer (e.g. the release date)")
    options = args.parse_args(argv)
    sys.stdout.write(render(build_parser(), options.date))
    return 0


if __name__ == "__main__":
    sys.exit(main())
