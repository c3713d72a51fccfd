"""Suite-wide rule: under CI=true a skipped real-kernel test is a failure, not a skip."""

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/tests/netns/" in str(item.path):
            item.add_marker(pytest.mark.netns)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and item.get_closest_marker("netns"):
        report.outcome = "failed"
        report.longrepr = f"real-kernel test skipped under CI=true: {report.longrepr}"
