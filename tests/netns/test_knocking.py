"""Knocks on a real kernel: stock and own clients, closing, resets, timeouts, other clients."""

import signal
import time

import pytest
from conftest import connect, echoes, hold, knock, our_knock

pytestmark = pytest.mark.parametrize("server", ["legacy", "nft"], indirect=True)

SHORT = """\
doors:
  - name: openSSH
    sequence: [40000, 50000, 60000]
    close_sequence: [60000, 50000, 40000]
    protect: [22/tcp]
    seq_timeout: {seq_timeout}
    open_for: {open_for}
"""


def test_protected_port_gives_no_answer_before_a_knock(server, alice):
    server.start()
    attempt = connect(alice, timeout=1.5)
    assert not attempt.connected
    assert attempt.seconds >= 1.4  # silently dropped: no RST, no ICMP, just nothing


def test_stock_knock_client_opens_and_the_first_syn_gets_through(server, alice):
    server.start()
    knock(server.sandbox, alice, "40000", "50000", "60000")
    attempt = connect(alice, timeout=3)
    assert attempt.connected and attempt.greeting == b"hello\n"
    assert attempt.seconds < 0.5, f"connect took {attempt.seconds:.3f}s: the first SYN was dropped"
    log = server.log_text()
    for line in (
        "10.199.1.2: openSSH: Stage 1",
        "10.199.1.2: openSSH: Stage 2",
        "10.199.1.2: openSSH: OPEN SESAME",
        "10.199.1.2: openSSH: accepted new connection to 22/tcp",
    ):
        assert line in log


def test_a_client_that_did_not_knock_stays_out_while_another_is_in(server, alice, bob):
    server.start()
    knock(server.sandbox, alice, "40000", "50000", "60000")
    assert connect(alice).connected
    assert not connect(bob, timeout=1).connected
    assert connect(alice).connected


def test_own_client_with_tcp_and_udp_steps(server, alice, bob):
    server.write_rules("""\
doors:
  - name: mixed
    sequence: [7000/udp, 8000/tcp, 9000/udp]
    protect: [22/tcp]
""")
    server.start()
    result = our_knock(server.sandbox, alice, "--door", "mixed", "--rules", str(server.rules))
    assert result.returncode == 0, result.stderr
    attempt = connect(alice)
    assert attempt.connected and attempt.seconds < 0.5
    # The same ports all over TCP are not the door's steps.
    assert our_knock(server.sandbox, bob, "7000", "8000", "9000").returncode == 0
    assert not connect(bob, timeout=1).connected


def test_own_client_with_explicit_ports(server, alice):
    server.start()
    result = our_knock(server.sandbox, alice, "40000/tcp", "50000", "60000", "--delay", "20")
    assert result.returncode == 0, result.stderr
    assert connect(alice).connected


def test_reverse_sequence_closes(server, alice):
    server.start()
    knock(server.sandbox, alice, "40000", "50000", "60000")
    assert connect(alice).connected
    knock(server.sandbox, alice, "60000", "50000", "40000")
    # The knock client does not wait for the daemon, and a granted source's SYN goes to the grant
    # queue, served before the knocks: wait until the close was taken, as a user sees it.
    server.wait_log("10.199.1.2: openSSH: closed")
    assert not connect(alice, timeout=1).connected


def test_own_client_closes_with_the_close_sequence(server, alice):
    server.start()
    assert our_knock(server.sandbox, alice, "--door", "openSSH", "--rules", str(server.rules)).returncode == 0
    assert connect(alice).connected
    assert (
        our_knock(server.sandbox, alice, "--door", "openSSH", "--rules", str(server.rules), "--close").returncode == 0
    )
    assert not connect(alice, timeout=1).connected


def test_wrong_port_resets_the_attempt(server, alice):
    server.start()
    knock(server.sandbox, alice, "40000", "50000", "41000", "60000")  # 41000: no door's port
    assert connect(alice, timeout=3).connected  # an unrelated port changes nothing
    knock(server.sandbox, alice, "60000", "50000", "40000")  # close again
    server.wait_log(f"{alice.address}: openSSH: closed")  # taken before the next attempt starts
    knock(server.sandbox, alice, "40000", "60000", "50000", "60000")  # 60000 out of order
    assert not connect(alice, timeout=1).connected
    knock(server.sandbox, alice, "40000", "50000", "60000")  # and a clean knock after it works
    assert connect(alice).connected, server.log_text()


def test_a_wrong_knock_after_a_first_step_the_kernel_recorded_voids_it(server, alice):
    """The daemon never sees a stranger's first step (first_steps.py); a knock on another port of
    the door after it still spoils the attempt, as it would have reset it."""
    server.write_rules("doors:\n  - name: oneWay\n    sequence: [40000, 50000, 60000]\n    protect: [22/tcp]\n")
    server.start()
    knock(server.sandbox, alice, "40000", "60000", "50000", "60000")
    assert not connect(alice, timeout=1).connected
    knock(server.sandbox, alice, "40000", "50000", "60000")
    assert connect(alice).connected


def test_duplicated_knocks_are_tolerated(server, alice):
    server.start()
    knock(server.sandbox, alice, "40000", "40000", "50000", "50000", "60000", "60000")
    assert connect(alice).connected
    assert "sequence reset" not in server.log_text()


def test_sequence_times_out_from_the_first_knock(server, alice):
    server.write_rules(SHORT.format(seq_timeout="1s", open_for="30s"))
    server.start()
    knock(server.sandbox, alice, "40000", "50000")
    time.sleep(1.3)
    knock(server.sandbox, alice, "60000")
    assert not connect(alice, timeout=1).connected
    assert "10.199.1.2: openSSH: sequence timeout (stage 2)" in server.log_text()


def test_grant_expires_after_open_for(server, alice):
    server.write_rules(SHORT.format(seq_timeout="10s", open_for="1s"))
    server.start()
    knock(server.sandbox, alice, "40000", "50000", "60000")
    assert connect(alice).connected
    server.wait_log("openSSH: command timeout", timeout=5)
    assert not connect(alice, timeout=1).connected


def test_established_connection_survives_close_and_expiry(server, alice):
    server.write_rules(SHORT.format(seq_timeout="10s", open_for="2s"))
    server.start()
    knock(server.sandbox, alice, "40000", "50000", "60000")
    closed_by_knock = hold(alice)
    knock(server.sandbox, alice, "40000", "50000", "60000")
    outlives_expiry = hold(alice)
    knock(server.sandbox, alice, "60000", "50000", "40000")
    assert "openSSH: closed" in server.wait_log("openSSH: closed")
    assert echoes(closed_by_knock)
    assert not connect(alice, timeout=1).connected
    knock(server.sandbox, alice, "40000", "50000", "60000")
    server.wait_log("openSSH: command timeout", timeout=5)
    assert echoes(outlives_expiry) and echoes(closed_by_knock)
    assert not connect(alice, timeout=1).connected


def test_knock_ports_give_no_answer(server, alice):
    server.start()
    for port in (50000, 40000, 60000):  # not the door's order: this opens nothing
        assert not connect(alice, port=port, timeout=0.5).connected
    assert not connect(alice, timeout=1).connected


def test_a_two_step_door_closes_with_a_close_sequence_that_starts_on_its_second_port(server, alice):
    """The kernel's record of a first step is spent on the second step it marks: knocking the
    second port again (here the close sequence's first step) is not a fresh second step."""
    server.write_rules(
        "doors:\n  - name: twoStep\n    sequence: [40000, 50000]\n    close_sequence: [50000, 40000]\n"
        "    protect: [22/tcp]\n"
    )
    server.start()
    knock(server.sandbox, alice, "40000", "50000")
    assert connect(alice).connected
    knock(server.sandbox, alice, "50000", "40000")
    server.wait_log("10.199.1.2: twoStep: closed")  # the client does not wait for the daemon
    assert not connect(alice, timeout=1).connected


def test_first_step_sets_of_another_size_are_replaced_in_place_at_start(server, alice):
    """The sets outlive the daemon (a stop leaves the scaffolding), so a new version starts over
    the sets an older one made, of another size; ipset refuses to create a set over one with
    another maxelem or timeout. The daemon swaps in sets of its own size under the same names
    (their first steps are forgotten) and the door works."""
    sandbox = server.sandbox
    old = ["timeout", "86400", "hashsize", "65536", "maxelem", "262144", "forceadd"]
    names = {family: f"nfknock-q{server.queue_num}-tcp40000-v{family}" for family in (4, 6)}
    for family, address in ((4, "11.0.0.1"), (6, "2001:db8::1")):
        kind = "inet" if family == 4 else "inet6"
        sandbox.run(sandbox.server, ["ipset", "create", names[family], "hash:ip", "family", kind, *old], check=True)
        sandbox.run(sandbox.server, ["ipset", "add", names[family], address], check=True)
    server.start()
    for name in names.values():
        listed = sandbox.run(sandbox.server, ["ipset", "list", "-t", name], check=True).stdout
        assert "hashsize 262144 maxelem 1310720 timeout 3 bucketsize 12" in listed
        assert "Number of entries: 0" in listed
    listed = set(sandbox.run(sandbox.server, ["ipset", "list", "-n"], check=True).stdout.split())
    q = server.queue_num
    # sessions, recent, and the sources mid-attempt (the third step is the kernel's: later_steps.py)
    others = {f"nfknock-q{q}-{kind}-v{family}" for kind in ("s22", "recent", "midway") for family in (4, 6)}
    assert listed == {f"nfknock-q{q}-v4", f"nfknock-q{q}-v6", *names.values(), *others}
    knock(sandbox, alice, "40000", "50000", "60000")
    assert connect(alice).connected


TWINS = """\
doors:
  - name: openSSH
    sequence: [40000, 50000, 60000]
    protect: [22/tcp]
  - name: twin
    sequence: [41000, 50000, 61000]
    protect: [2222/tcp]
"""


def first_step_entries(server, port: int) -> int:
    name = f"nfknock-q{server.queue_num}-tcp{port}-v4"
    listed = server.sandbox.run(server.sandbox.server, ["ipset", "list", "-t", name])
    assert listed.returncode == 0, listed.stderr
    return int(listed.stdout.split("Number of entries:")[1].split()[0])


def test_twins_sharing_a_second_step_open_only_the_door_whose_first_step_was_knocked(server, alice, bob):
    """Two doors with the same second step after different first steps: the kernel records both
    first steps (one set each) and marks the second step with the bit of each set that held the
    source, so knocking the twin's first step does not count as openSSH's (first_steps.py)."""
    server.write_rules(TWINS)
    server.start()
    knock(server.sandbox, alice, "41000")
    assert (first_step_entries(server, 41000), first_step_entries(server, 40000)) == (1, 0)
    knock(server.sandbox, alice, "50000", "60000")  # the twin's first step, then openSSH's later ones
    assert not connect(alice, timeout=1).connected
    knock(server.sandbox, alice, "41000", "50000", "61000")
    server.wait_log("10.199.1.2: twin: OPEN SESAME")
    assert not connect(alice, timeout=1).connected  # port 22 is openSSH's: still closed to alice
    assert first_step_entries(server, 41000) == 0  # spent on the marked second step
    # bob knocks both first steps: the second step is marked for both, the third decides which
    knock(server.sandbox, bob, "40000", "41000", "50000", "60000")
    assert connect(bob).connected
    log = server.log_text()
    assert f"{bob.address}: openSSH: OPEN SESAME" in log and f"{bob.address}: twin: OPEN SESAME" not in log
    assert f"{alice.address}: openSSH: OPEN SESAME" not in log


def marks(server) -> dict[int, str]:
    """First port -> the mark its second steps get, as the kernel has the rules."""
    found = {}
    for line in server.iptables():
        if "-j MARK --set-xmark" in line and "--match-set" in line and "src,src,dst" not in line:  # not sessions
            first = int(line.split("--match-set ")[1].split()[0].split("-tcp")[1].split("-")[0])
            found[first] = line.split("--set-xmark ")[1].split("/")[0]
    return found


def test_a_twin_added_by_a_reload_or_a_restart_leaves_the_other_twins_their_mark_bits(server, alice):
    """A second step marked under the old rules may still wait in the queue when the new engine
    judges it: a bit keeps its meaning, however the doors change (first_steps.py, `held`)."""
    server.write_rules(TWINS)
    server.start()
    assert marks(server) == {40000: "0x10000000", 41000: "0x8000000"}
    added = TWINS + "  - name: third\n    sequence: [39000, 50000, 62000]\n    protect: [3333/tcp]\n"
    server.write_rules(added)
    server.process.send_signal(signal.SIGHUP)
    server.wait_log("reloaded")
    assert marks(server) == {39000: "0x4000000", 40000: "0x10000000", 41000: "0x8000000"}
    knock(server.sandbox, alice, "39000", "50000", "62000")
    server.wait_log("10.199.1.2: third: OPEN SESAME")
    assert not connect(alice, timeout=1).connected  # 22 is openSSH's
    # stopped, the rules stay; started again on the same rules, a fresh daemon would number the
    # twins in port order: it keeps to the bits the rules in place use instead
    assert server.stop() == 0
    server.start()
    assert marks(server) == {39000: "0x4000000", 40000: "0x10000000", 41000: "0x8000000"}
    knock(server.sandbox, alice, "40000", "50000", "60000")
    assert connect(alice).connected


WITH_THIRD = TWINS + "  - name: third\n    sequence: [39000, 50000, 62000]\n    protect: [3333/tcp]\n"


@pytest.mark.parametrize("how", ["workers", "other flavour"])
def test_a_restart_reads_the_mark_bits_of_every_chain_in_place(server, alice, bob, how):
    """Restarted on a rule set with a new twin: the rules in place (the stopped daemon's, in
    this flavour or, after a switch of --firewall, in the other one, which the kernel still
    applies) keep their meaning for every process that judges packets, workers included. Found
    by an attack run: the workers, or a daemon of the other flavour, numbered the bits afresh
    and a knock on the twin's first step counted for openSSH."""
    server.write_rules(TWINS)
    server.start()
    assert server.stop() == 0  # the rules stay
    server.write_rules(WITH_THIRD)
    if how == "workers":
        server.start("--workers", "2")
    else:
        other = "nft" if server.flavour == "legacy" else "legacy"
        server.start("--firewall", other)
        assert f"the {server.flavour} tables still hold an NFKNOCK chain" in server.log_text()
    knock(server.sandbox, alice, "41000", "50000", "60000")  # the twin's first step, openSSH's rest
    assert not connect(alice, timeout=1).connected
    knock(server.sandbox, bob, "39000", "50000", "61000")  # the third's first step, the twin's rest
    assert f"{bob.address}: twin: OPEN SESAME" not in server.log_text()
    knock(server.sandbox, alice, "40000", "50000", "60000")
    assert connect(alice).connected
    assert "10.199.1.2: openSSH: OPEN SESAME" in server.log_text()
