"""What a Redis deployment risks for a fleet (fleet/deployment.py): the judgement the member's
start log and `nfknock doctor --cluster` share, and the facts read from a Redis (fakeredis)."""

import fakeredis
import pytest
import redis

from nfknock.fleet.deployment import ERROR, OK, WARN, RedisFacts, read_facts, risks

SAFE = RedisFacts(True, False, "3600 1", "yes", "everysec", "noeviction")


def by_what(facts):
    return {risk.what: risk for risk in risks(facts)}


def test_a_protected_persistent_non_evicting_redis_is_fine():
    found = by_what(SAFE)
    assert {risk.level for risk in found.values()} == {OK}
    assert "about the last second" in found["persistence"].text


@pytest.mark.parametrize(
    ("save", "appendonly", "appendfsync", "level", "says"),
    [
        ("", "no", "everysec", WARN, "a Redis restart loses every claim"),
        ("3600 1 300 100", "no", "everysec", WARN, "loses the claims since the last snapshot"),
        ("", "yes", "always", OK, "loses no claim"),
        (None, None, None, WARN, "did not say how it persists"),
    ],
)
def test_persistence_says_what_a_crash_loses(save, appendonly, appendfsync, level, says):
    risk = by_what(RedisFacts(True, False, save, appendonly, appendfsync, "noeviction"))["persistence"]
    assert risk.level == level and says in risk.text


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl", "allkeys-random"])
def test_an_evicting_policy_is_an_error_naming_it(policy):
    risk = by_what(RedisFacts(True, False, "", "yes", "always", policy))["evicting"]
    assert risk.level == ERROR and f"maxmemory-policy is {policy}" in risk.text and "noeviction" in risk.text


def test_a_redis_open_without_a_password_is_an_error_and_no_password_file_a_warning():
    assert by_what(RedisFacts(True, True, "", "yes", "always", "noeviction"))["password"].level == ERROR
    assert by_what(RedisFacts(False, True, "", "yes", "always", "noeviction"))["password"].level == ERROR
    unknown = by_what(RedisFacts(False, None, "", "yes", "always", "noeviction"))["password"]
    assert unknown.level == WARN and "--cluster-password-file" in unknown.text


class _Refusing:
    """A client an ACL keeps from CONFIG, or one without the password."""

    def config_get(self, name):
        raise redis.ResponseError("NOPERM this user has no permissions to run the 'config|get' command")

    def ping(self):
        raise redis.AuthenticationError("Authentication required.")

    def close(self):
        pass


def test_facts_are_read_from_redis_and_an_acl_refusal_leaves_them_unknown():
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    facts = read_facts(client, fakeredis.FakeRedis(server=server), True)
    assert facts.open_without_password is True  # the anonymous client got in
    refused = read_facts(_Refusing(), _Refusing(), True)
    assert refused == RedisFacts(True, False, None, None, None, None)
    assert {risk.what for risk in risks(refused) if risk.level == WARN} == {"persistence", "evicting"}
