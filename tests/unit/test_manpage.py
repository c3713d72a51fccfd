"""nfknock(8) is written from the CLI's own parser: every verb and option is in it."""

import argparse
import subprocess

import pytest

from nfknock import __version__
from nfknock.cli import build_parser
from nfknock.tools.manpage import escape, main, render


def verbs_and_options(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for verb, sub in action.choices.items():
                options = [s for a in sub._actions for s in a.option_strings if s not in ("-h", "--help")]
                yield verb, options


def test_every_verb_and_option_of_the_cli_is_in_the_page():
    page = render(build_parser())
    found = list(verbs_and_options(build_parser()))
    assert {verb for verb, _ in found} >= {"run", "check", "knock", "down", "status", "keygen", "spa", "otp"}
    for verb, options in found:
        assert f".SS nfknock {escape(verb)}\n" in page
        for option in options:
            assert f"\\fB{escape(option)}\\fR" in page, (verb, option)


def test_a_new_option_shows_up_without_touching_the_generator():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["down"]
    sub.add_argument("--dry-run-xyz", help="pretend (default: %(default)s)", default="no")
    page = render(parser)
    assert "\\fB\\-\\-dry\\-run\\-xyz\\fR" in page
    assert "pretend (default: no)" in page


def test_header_and_escaping():
    page = render(build_parser(), "2026-11-26")
    assert page.startswith(f'.TH NFKNOCK 8 "2026-11-26" "nfknock {__version__}" "System Administration"\n')
    assert escape(".start\nback\\slash -x") == "\\&.start\nback\\eslash \\-x"


@pytest.mark.needs_tools("groff")
def test_groff_reads_the_page_without_warnings(tmp_path, capsys):
    assert main(["--date", "2026-11-26"]) == 0
    page = tmp_path / "nfknock.8"
    page.write_text(capsys.readouterr().out)
    result = subprocess.run(["groff", "-man", "-ww", "-z", str(page)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == ""
