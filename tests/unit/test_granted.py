"""The granted-source sets: what the daemon asks of `ipset`, with a fake runner."""

import logging
import subprocess

import pytest

from nfknock.errors import FirewallError
from nfknock.firewall.granted import (
    FIRST_STEP_BUCKETS,
    FIRST_STEP_ELEMENTS,
    GrantedSets,
    create_first_step_sets,
    destroy_all,
    prune_first_step_sets,
)
from nfknock.firewall.plan import RuleSpec


class FakeIpset:
    def __init__(self, returncode=0, stderr="", listed="", headers=""):
        self.calls, self.returncode, self.stderr, self.listed = [], returncode, stderr, listed
        self.headers = headers  # what `ipset list -t` prints

    def __call__(self, argv, input=None, **kwargs):
        self.calls.append((argv, input))
        stdout = self.listed if argv[1:] == ["list", "-n"] else self.headers if argv[1:] == ["list", "-t"] else ""
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


class FakeLink:
    def __init__(self, fail=None):
        self.calls, self.fail, self.closed = [], fail, False

    def add(self, name, address, timeout):
        if self.fail:
            raise OSError(self.fail)
        self.calls.append(("add", name, address, timeout))

    def delete(self, name, address):
        self.calls.append(("del", name, address))

    def close(self):
        self.closed = True


def test_updates_wait_for_the_flush_and_the_last_word_on_an_address_wins():
    link = FakeLink()
    sets = GrantedSets(0, logging.getLogger("t"), FakeIpset(), lambda: link)
    sets.create()
    sets.add("10.0.0.2", 29.2)
    sets.add("fd00::2", 0.1)
    sets.remove("10.0.0.3")
    sets.add("10.0.0.3", 5)
    assert link.calls == []  # nothing before the loop's turn ends
    sets.flush()
    assert link.calls == [
        ("add", "nfknock-q0-v4", "10.0.0.2", 31),
        ("add", "nfknock-q0-v6", "fd00::2", 2),
        ("add", "nfknock-q0-v4", "10.0.0.3", 6),
    ]
    sets.flush()
    assert len(link.calls) == 3
    sets.close()
    assert link.closed


def test_a_failed_update_is_logged_and_the_daemon_goes_on(caplog):
    sets = GrantedSets(0, logging.getLogger("t-granted"), FakeIpset(), lambda: FakeLink(fail="set is full"))
    sets.create()
    sets.add("10.0.0.2", 30)
    sets.flush()
    assert sets.failed == 1
    assert "could not update the set nfknock-q0-v4 for 10.0.0.2 (set is full" in caplog.text


def test_a_backlog_is_bounded():
    sets = GrantedSets(0, logging.getLogger("t"), FakeIpset(), FakeLink)
    for n in range(5000):
        sets.add(f"10.0.{n >> 8}.{n & 255}", 30)
    assert sets.dropped == 5000 - 4096


def test_destroy_takes_only_our_sets():
    fake = FakeIpset(listed="other\nnfknock-q0-v4\nnfknock-q0-v6\n")
    assert destroy_all(fake) == ["nfknock-q0-v4", "nfknock-q0-v6"]
    assert fake.calls[-1][1].splitlines() == ["destroy nfknock-q0-v4", "destroy nfknock-q0-v6"]


def test_add_now_is_sent_at_once_and_nothing_said_earlier_overtakes_it():
    """Route first: a grant's add goes out at once; a removal still waiting for the end of the
    turn was said earlier and is dropped, never sent after the add; a removal said after the add
    goes out at the end of the turn; the same add said again in that turn costs no message."""
    link = FakeLink()
    sets = GrantedSets(0, logging.getLogger("t"), FakeIpset(), lambda: link)
    sets.create()
    sets.remove("10.0.0.2")  # a close sequence, then the open sequence again, in one turn
    sets.add_now("10.0.0.2", 29.2)
    assert link.calls == [("add", "nfknock-q0-v4", "10.0.0.2", 31)]
    sets.add("10.0.0.2", 29.2)  # the grant's sync at the end of a claim: already sent
    sets.flush()
    assert link.calls == [("add", "nfknock-q0-v4", "10.0.0.2", 31)]
    sets.add_now("10.0.0.3", 10)
    sets.remove("10.0.0.3")  # a lost claim: out again, after the add
    assert link.calls[-1] == ("add", "nfknock-q0-v4", "10.0.0.3", 11)
    sets.flush()
    assert link.calls[-1] == ("del", "nfknock-q0-v4", "10.0.0.3")
    sets.add_now("10.0.0.3", 10)  # a new turn: sent again
    assert link.calls[-1] == ("add", "nfknock-q0-v4", "10.0.0.3", 11) and len(link.calls) == 4


def test_add_now_without_a_link_waits_for_it(caplog):
    link = FakeLink()
    sets = GrantedSets(0, logging.getLogger("t"), FakeIpset(), lambda: link)
    sets.add_now("10.0.0.2", 5)
    assert link.calls == []
    sets.create()
    sets.flush()
    assert link.calls == [("add", "nfknock-q0-v4", "10.0.0.2", 6)]
    failing = GrantedSets(0, logging.getLogger("t-granted"), FakeIpset(), lambda: FakeLink(fail="set is full"))
    failing.create()
    failing.add_now("10.0.0.2", 5)
    assert failing.failed == 1 and "could not update the set nfknock-q0-v4 for 10.0.0.2" in caplog.text


def test_a_removal_is_sent_whatever_add_now_sent_before():
    link = FakeLink()
    sets = GrantedSets(0, logging.getLogger("t"), FakeIpset(), lambda: link)
    sets.create()
    sets.remove("10.0.0.2")  # a close sequence, no add this turn
    sets.flush()
    assert link.calls == [("del", "nfknock-q0-v4", "10.0.0.2")]


FIRST_STEPS = {
    4: [RuleSpec("SET", "tcp", 40000, add_set=("nfknock-q3-tcp40000-v4", 15)), RuleSpec("DROP", "tcp", 40000)],
    6: [RuleSpec("SET", "tcp", 40000, add_set=("nfknock-q3-tcp40000-v6", 15)), RuleSpec("DROP", "tcp", 40000)],
}
SIZE = "hashsize 262144 maxelem 1310720 timeout 3 bucketsize 12 forceadd"


def _header(name, family, size):
    return f"Name: {name}\nType: hash:ip\nRevision: 6\nHeader: family {family} {size} initval 0x1234abcd\n"


def test_first_step_sets_are_made_for_a_million_sources():
    fake = FakeIpset()
    create_first_step_sets(FIRST_STEPS, fake)
    assert fake.calls[0][0] == ["ipset", "list", "-t"]
    argv, script = fake.calls[1]
    assert argv == ["ipset", "restore"]
    assert script.splitlines() == [
        f"create nfknock-q3-tcp40000-v4 hash:ip family inet {SIZE} -exist",
        f"create nfknock-q3-tcp40000-v6 hash:ip family inet6 {SIZE} -exist",
    ]


def test_a_million_sources_leave_every_region_of_the_set_below_its_share():
    """The kernel walks a region of 1024 buckets at every add once the region holds its share of
    maxelem (granted.py): a million sources, spread evenly by the hash, stay 18 standard
    deviations below it, so an add never walks; and they leave a bucket (12 at most) room."""
    regions = FIRST_STEP_BUCKETS // 1024
    share = FIRST_STEP_ELEMENTS / regions
    mean = 1_000_000 / regions
    assert share > mean + 18 * mean**0.5
    assert 1_000_000 / FIRST_STEP_BUCKETS < 4  # on average per bucket, against 12 room


def test_a_first_step_set_of_this_size_is_kept_with_its_elements():
    headers = _header("nfknock-q3-tcp40000-v4", "inet", SIZE.replace(" forceadd", ""))
    fake = FakeIpset(headers=headers)
    create_first_step_sets(FIRST_STEPS, fake)
    assert fake.calls[1][1].splitlines()[0] == f"create nfknock-q3-tcp40000-v4 hash:ip family inet {SIZE} -exist"


def test_a_first_step_set_an_earlier_version_made_is_swapped_for_one_of_this_size():
    """ipset refuses `create -exist` over a set with another maxelem or timeout: the daemon
    would not start over the sets an earlier version left (or kept another size silently)."""
    old = "hashsize 65536 maxelem 262144 timeout 86400 bucketsize 12"
    spare = _header("nfknock-q3-tcp40000-v6-new", "inet6", old)
    headers = _header("nfknock-q3-tcp40000-v6", "inet6", old) + "\n" + spare
    fake = FakeIpset(headers=headers)
    create_first_step_sets(FIRST_STEPS, fake)
    assert fake.calls[1][1].splitlines() == [
        f"create nfknock-q3-tcp40000-v4 hash:ip family inet {SIZE} -exist",
        "destroy nfknock-q3-tcp40000-v6-new",  # left by an interrupted swap
        f"create nfknock-q3-tcp40000-v6-new hash:ip family inet6 {SIZE}",
        "swap nfknock-q3-tcp40000-v6 nfknock-q3-tcp40000-v6-new",
        "destroy nfknock-q3-tcp40000-v6-new",
    ]


def test_no_first_step_set_no_ipset_call():
    fake = FakeIpset()
    create_first_step_sets({4: [RuleSpec("DROP", "tcp", 40000)], 6: []}, fake)
    assert fake.calls == []


def test_only_this_daemons_first_step_sets_that_the_plan_no_longer_uses_are_pruned():
    listed = "\n".join(
        [
            "nfknock-q3-tcp40000-v4",  # the plan's
            "nfknock-q3-tcp41000-v4",  # a first step a reload removed
            "nfknock-q3-udp41000-v6-new",  # the spare of an interrupted swap
            "nfknock-q4-tcp41000-v4",  # another daemon's
            "nfknock-q3-v4",  # the granted set
            "nfknock-q3-recent-v4",
            "nfknock-q3-s22-v4",  # a sessions set
            "f2b-sshd",  # another program's
        ]
    )
    fake = FakeIpset(listed=listed)
    assert prune_first_step_sets(3, FIRST_STEPS, fake) == ["nfknock-q3-tcp41000-v4", "nfknock-q3-udp41000-v6-new"]
    assert fake.calls[-1][1].splitlines() == ["destroy nfknock-q3-tcp41000-v4", "destroy nfknock-q3-udp41000-v6-new"]
