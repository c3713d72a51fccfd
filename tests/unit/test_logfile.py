"""--log-file follows logrotate: after a rename or a removal the next line is in a new file at the
path, every earlier line in the old one; a file that cannot be opened never raises."""

import logging
import os

import pytest

from nfknock.daemon.logs import setup_logging


@pytest.fixture
def log(tmp_path):
    logger = setup_logging(str(tmp_path / "nfknock.log"))
    yield logger
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()


def test_after_a_rename_the_next_line_lands_in_a_new_file(log, tmp_path):
    path = tmp_path / "nfknock.log"
    log.info("before")
    path.rename(tmp_path / "nfknock.log.1")  # what logrotate does (then `create` makes a new file)
    path.touch()
    log.info("after")
    assert (tmp_path / "nfknock.log.1").read_text().splitlines()[0].endswith("] before")
    (line,) = path.read_text().splitlines()
    assert line.endswith("] after")


def test_a_removed_file_is_made_again(log, tmp_path):
    path = tmp_path / "nfknock.log"
    log.info("one")
    path.unlink()
    log.info("two")
    assert [line[19:] for line in path.read_text().splitlines()] == ["two"]


def test_copytruncate_keeps_appending_at_the_start(log, tmp_path):
    path = tmp_path / "nfknock.log"
    log.info("one")
    os.truncate(path, 0)  # logrotate's copytruncate
    log.info("two")
    assert path.read_text().splitlines()[0].endswith("] two")  # O_APPEND: no hole of NULs


def test_a_file_that_cannot_be_opened_drops_lines_says_so_and_recovers(log, tmp_path, capfd):
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "nfknock.log"
    logger = setup_logging(str(path))
    logger.info("first")
    path.rename(tmp_path / "rotated")
    directory.rmdir()  # the next open fails
    logger.info("lost 1")  # never raises into the daemon
    logger.warning("lost 2")
    err = capfd.readouterr().err
    assert err.count("cannot open the log file") == 1 and str(path) in err and "Traceback" not in err
    directory.mkdir()
    logger.info("back")
    lines = [line[19:] for line in path.read_text().splitlines()]
    assert lines == [f"2 log line(s) lost while {path} could not be opened", "back"]
    assert (tmp_path / "rotated").read_text().endswith("] first\n")


def test_json_lines_follow_a_rotation_too(tmp_path):
    import json

    path = tmp_path / "nfknock.json"
    logger = setup_logging(str(path), log_format="json")
    logger.info("one")
    path.rename(tmp_path / "nfknock.json.1")
    logger.info("two")
    assert json.loads(path.read_text())["message"] == "two"
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    logging.getLogger("nfknock").setLevel(logging.INFO)
