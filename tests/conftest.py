"""Suite-wide rules: under CI=true a skipped real-kernel test is a failure, not a skip; a test
marked `needs_tools("cmd", ...)` is skipped when a command is missing, and fails under CI=true
(scripts/setup.sh installs every command the suite calls).

tests/support (namespaces, flood senders, fakes, fault injection) is imported as the package
`support`: this directory goes on sys.path here, whatever pytest's import mode."""

import os
import shutil
import sys
from pathlib import Path

import pytest

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

IN_CI = os.environ.get("CI", "").lower() == "true"

# No test key in any output of the suite (README: keys never appear in any log).
pytest_plugins = ["support.secretcheck"]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "needs_tools(*commands): commands the test runs; missing ones skip it, or fail it under CI=true"
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/tests/netns/" in str(item.path):
            item.add_marker(pytest.mark.netns)


def pytest_runtest_setup(item):
    for marker in item.iter_markers("needs_tools"):
        missing = [tool for tool in marker.args if shutil.which(tool) is None]
        if missing:
            reason = f"missing commands: {', '.join(missing)} (scripts/setup.sh installs them)"
            if IN_CI:
                pytest.fail(f"cannot run under CI=true: {reason}")
            pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and (item.get_closest_marker("netns") or item.get_closest_marker("needs_tools")):
        report.outcome = "failed"
        report.longrepr = f"test skipped under CI=true: {report.longrepr}"
