"""A corpus of broken rule files: each is refused by `check` and by `run` with exit code 2 and
one line naming the file and the field. The expected text is the file's first line."""

import os
from pathlib import Path

import pytest

from nfknock.cli import main

CORPUS = sorted((Path(__file__).parent / "broken_rules").glob("*.yaml"))


def expectation(path: Path) -> str:
    first = path.read_bytes().split(b"\n", 1)[0].decode()
    assert first.startswith("# expect: "), f"{path.name} has no '# expect:' line"
    return first.removeprefix("# expect: ")


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
@pytest.mark.parametrize("verb", ["check", "run"])
def test_broken_file_is_refused_with_one_named_line(path, verb, capsys, tmp_path):
    extra = ["--state-dir", str(tmp_path)] if verb == "run" else []  # no last good rules there
    assert main([verb, "--rules", str(path), *extra]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    if verb == "run":  # and one line saying which ports it closed (daemon/lastgood.py)
        assert lines[-1].startswith("nfknock: no last good rules ("), lines
        lines = lines[:-1]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"nfknock: {path}: ")
    assert expectation(path) in lines[0]


def test_corpus_is_not_empty():
    assert len(CORPUS) >= 30


def test_dangling_symlink_is_reported_not_skipped(tmp_path, capsys):
    (tmp_path / "ok.yaml").write_text("doors:\n  - {name: a, sequence: [1, 2], protect: [22]}\n")
    os.symlink(tmp_path / "gone.yaml", tmp_path / "link.yaml")
    assert main(["check", "--rules", str(tmp_path)]) == 2
    assert f"{tmp_path / 'link.yaml'}: cannot read: No such file or directory" in capsys.readouterr().err


def test_directory_named_like_a_rules_file_is_named(tmp_path, capsys):
    (tmp_path / "ok.yaml").write_text("doors:\n  - {name: a, sequence: [1, 2], protect: [22]}\n")
    (tmp_path / "sub.yaml").mkdir()
    assert main(["check", "--rules", str(tmp_path)]) == 2
    assert f"{tmp_path / 'sub.yaml'}: cannot read: Is a directory" in capsys.readouterr().err
