"""Unit tests never touch the host: a test that reaches a role's run (the queue, the firewall) fails,
and `nfknock run` gets a fake firewall."""

import pytest


@pytest.fixture(autouse=True)
def no_real_daemon(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("a unit test tried to start the real daemon on the host")

    for role in ("single.Single", "supervisor.Supervisor", "worker.Worker"):
        monkeypatch.setattr(f"nfknock.daemon.{role}.run", refuse)


@pytest.fixture(autouse=True)
def no_real_firewall(request, monkeypatch):
    """`nfknock run` on rules that do not load installs rules that close their ports (lastgood.py):
    in a unit test that firewall is a recording fake, never the host's (test_firewall.py checks the
    registry itself, and installs nothing)."""
    from support.fakes import FakeFirewall

    if request.module.__name__.endswith("test_firewall"):
        return

    monkeypatch.setattr("nfknock.firewall.make_firewall", lambda *args, **kwargs: FakeFirewall())
