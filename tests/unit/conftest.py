"""Unit tests never touch the host: a test that reaches Daemon.run (the queue, the firewall) fails."""

import pytest


@pytest.fixture(autouse=True)
def no_real_daemon(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("a unit test tried to start the real daemon on the host")

    monkeypatch.setattr("nfknock.daemon.core.Daemon.run", refuse)
