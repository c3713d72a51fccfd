"""Unit tests never touch the host: a test that reaches a role's run (the queue, the firewall) fails."""

import pytest


@pytest.fixture(autouse=True)
def no_real_daemon(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("a unit test tried to start the real daemon on the host")

    for role in ("single.Single", "supervisor.Supervisor", "worker.Worker"):
        monkeypatch.setattr(f"nfknock.daemon.{role}.run", refuse)
