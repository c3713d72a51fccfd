"""The granted-source sets: what the daemon asks of `ipset`, with a fake runner."""

import logging
import subprocess

import pytest

from nfknock.errors import FirewallError
from nfknock.firewall.granted import GrantedSets, destroy_all


class FakeIpset:
    def __init__(self, returncode=0, stderr="", listed=""):
        self.calls, self.returncode, self.stderr, self.listed = [], returncode, stderr, listed

    def __call__(self, argv, input=None, **kwargs):
        self.calls.append((argv, input))
        stdout = self.listed if argv[1:] == ["list", "-n"] else ""
        return subprocess.CompletedProcess(argv, self.returncode, stdout, self.stderr)


def test_create_makes_both_families_empty_with_timeouts():
    fake = FakeIpset()
    GrantedSets(7, logging.getLogger("t"), fake).create()
    ((argv, script),) = fake.calls
    assert argv == ["ipset", "restore"]
    assert script.splitlines() == [
        "create nfknock-q7-v4 hash:ip family inet timeout 86400 maxelem 65536 -exist",
        "flush nfknock-q7-v4",
        "create nfknock-q7-v6 hash:ip family inet6 timeout 86400 maxelem 65536 -exist",
        "flush nfknock-q7-v6",
    ]


def test_a_missing_ipset_is_one_line():
    def missing(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "ipset")

    with pytest.raises(FirewallError, match="cannot create the granted-source sets: .*ipset.*installed"):
        GrantedSets(7, logging.getLogger("t"), missing).create()


def test_updates_are_batched_by_the_thread_with_their_timeouts():
    fake = FakeIpset()
    sets = GrantedSets(0, logging.getLogger("t"), fake)
    sets.add("10.0.0.2", 29.2)
    sets.add("fd00::2", 0.1)
    sets.remove("10.0.0.3")
    sets.start()
    sets.stop()
    script = "".join(call[1] for call in fake.calls)
    assert script.splitlines() == [
        "add nfknock-q0-v4 10.0.0.2 timeout 31 -exist",
        "add nfknock-q0-v6 fd00::2 timeout 2 -exist",
        "del nfknock-q0-v4 10.0.0.3 -exist",
    ]


def test_a_failed_update_is_logged_and_the_thread_goes_on(caplog):
    fake = FakeIpset(returncode=1, stderr="ipset v7.17: The set with the given name does not exist\n")
    sets = GrantedSets(0, logging.getLogger("t-granted"), fake)
    sets.start()
    sets.add("10.0.0.2", 30)
    sets.stop()
    assert "exited with status 1: ipset v7.17: The set with the given name does not exist" in caplog.text


def test_destroy_takes_only_our_sets():
    fake = FakeIpset(listed="other\nnfknock-q0-v4\nnfknock-q0-v6\n")
    assert destroy_all(fake) == ["nfknock-q0-v4", "nfknock-q0-v6"]
    assert fake.calls[-1][1].splitlines() == ["destroy nfknock-q0-v4", "destroy nfknock-q0-v6"]
