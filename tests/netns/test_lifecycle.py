"""Start, stop, crash, restart, reload and down on a real kernel: never open, never duplicated.
Every test runs with both firewall backends."""

import signal
import time

import pytest
from conftest import connect, echoes, hold, knock

pytestmark = pytest.mark.parametrize("server", ["legacy", "nft"], indirect=True)


def scaffolding(family: int = 4) -> list[str]:
    granted, first = f"nfknock-q7-v{family}", f"nfknock-q7-tcp40000-v{family}"
    sessions, recent = f"nfknock-q7-s22-v{family}", f"nfknock-q7-recent-v{family}"
    midway = f"nfknock-q7-midway-v{family}"
    return (
        [
            "-N NFKNOCK",
            "-A INPUT -j NFKNOCK",
            "-A NFKNOCK -i lo -j RETURN",
            "-A NFKNOCK -m mark --mark 0x20000000/0x20000000 -j RETURN",
            "-A NFKNOCK -p tcp -m tcp --dport 22 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            "-A NFKNOCK -p tcp -m tcp --dport 22 --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate NEW "
            f"-m set --match-set {granted} src -j NFQUEUE --queue-num 8",
            "-A NFKNOCK -p tcp -m tcp --dport 22 --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate NEW "
            f"-m set --match-set {recent} src -m limit --limit 100/sec --limit-burst 200 -j NFQUEUE --queue-num 7",
            "-A NFKNOCK -p tcp -m tcp --dport 22 --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate NEW "
            "-m limit --limit 100/sec --limit-burst 200 -j NFQUEUE --queue-num 7",
            "-A NFKNOCK -p tcp -m tcp --dport 22 --tcp-flags SYN,ACK ACK -m conntrack --ctstate NEW "
            f"-m set --match-set {sessions} src,src,dst -j MARK --set-xmark 0x20000000/0x20000000",
            "-A NFKNOCK -p tcp -m tcp --dport 22 --tcp-flags SYN,ACK ACK -m conntrack --ctstate NEW "
            f"-m set --match-set {sessions} src,src,dst -j ACCEPT",
            "-A NFKNOCK -p tcp -m tcp --dport 22 -j DROP",
            "-A NFKNOCK -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
            # the first step goes to the kernel's set, the second is queued only marked or granted
            f"-A NFKNOCK -p tcp -m tcp --dport 60000 --tcp-flags SYN,ACK SYN -j SET --del-set {first} src",
        ]
        + [
            f"-A NFKNOCK -p tcp -m tcp --dport {span} --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate NEW "
            f"-j SET --del-set {first} src"
            for step in (40000, 50000, 60000)
            for span in (f"{step - 16}:{step - 1}", f"{step + 1}:{step + 16}")
        ]
        + [
            f"-A NFKNOCK -p tcp -m tcp --dport 40000 -m set --match-set {granted} src -j SET --add-set {recent} src "
            "--exist --timeout 3",
            f"-A NFKNOCK -p tcp -m tcp --dport 40000 -m set --match-set {granted} src -j NFQUEUE --queue-num 7",
            f"-A NFKNOCK -p tcp -m tcp --dport 40000 --tcp-flags SYN,ACK SYN -j SET --add-set {first} src --exist "
            "--timeout 15",
            "-A NFKNOCK -p tcp -m tcp --dport 40000 -j DROP",
            "-A NFKNOCK -p tcp -m tcp --dport 50000 -j MARK --set-xmark 0x0/0x1e000000",
            f"-A NFKNOCK -p tcp -m tcp --dport 50000 -m set --match-set {first} src -j MARK --set-xmark "
            "0x10000000/0x10000000",
            f"-A NFKNOCK -p tcp -m tcp --dport 50000 -m mark --mark 0x10000000/0x10000000 -j SET --del-set {first} src",
            # a marked second step notes its source as mid-attempt: only such sources (and granted or
            # recent ones) are queued at the later steps and tripwires (docs/floods.md)
            "-A NFKNOCK -p tcp -m tcp --dport 50000 -m mark --mark 0x10000000/0x10000000 -j SET --add-set "
            f"{midway} src --exist --timeout 15",
            "-A NFKNOCK -p tcp -m tcp --dport 50000 -m mark --mark 0x10000000/0x10000000 -j SET --add-set "
            f"{recent} src --exist --timeout 3",
            "-A NFKNOCK -p tcp -m tcp --dport 50000 -m mark --mark 0x10000000/0x10000000 -j NFQUEUE --queue-num 7",
            f"-A NFKNOCK -p tcp -m tcp --dport 50000 -m set --match-set {granted} src -j SET --add-set {recent} src "
            "--exist --timeout 3",
            f"-A NFKNOCK -p tcp -m tcp --dport 50000 -m set --match-set {granted} src -j NFQUEUE --queue-num 7",
            "-A NFKNOCK -p tcp -m tcp --dport 50000 -j DROP",
        ]
        + [
            rule
            for gate, limit in ((granted, ""), (midway, ""), (recent, "-m limit --limit 100/sec --limit-burst 200 "))
            for rule in (
                f"-A NFKNOCK -p tcp -m tcp --dport 60000 -m set --match-set {gate} src {limit}-j SET --add-set "
                f"{recent} src --exist --timeout 3",
                f"-A NFKNOCK -p tcp -m tcp --dport 60000 -m set --match-set {gate} src {limit}-j NFQUEUE --queue-num 7",
            )
        ]
        + ["-A NFKNOCK -p tcp -m tcp --dport 60000 -j DROP"]
        + [
            f"-A NFKNOCK -p tcp -m tcp --dport {step - 16}:{step + 16} --tcp-flags FIN,SYN,RST,ACK SYN "
            f"-m conntrack --ctstate NEW {match}-j NFQUEUE --queue-num 7"
            for step in (40000, 50000, 60000)
            for match in (
                f"-m set --match-set {granted} src ",
                f"-m set --match-set {midway} src ",
                f"-m set --match-set {recent} src -m limit --limit 100/sec --limit-burst 200 ",
                "-m limit --limit 50/sec --limit-burst 100 ",  # strangers' tripwire hits, bounded
            )
        ]
    )


SCAFFOLDING = scaffolding(4)


def test_running_daemon_installs_exactly_the_scaffolding(server):
    server.start()
    assert server.iptables(4) == SCAFFOLDING
    assert server.iptables(6) == scaffolding(6)  # the seed door listens on both families
    other = "legacy" if server.flavour == "nft" else "nft"
    leaked = server.sandbox.run(server.sandbox.server, [f"iptables-{other}-save"]).stdout
    assert "NFKNOCK" not in leaked  # one flavour only


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_clean_stop_leaves_the_rules_and_the_ports_closed(server, alice, sig):
    server.start()
    assert server.stop(sig) == 0
    assert server.iptables(4) == SCAFFOLDING and server.iptables(6) == scaffolding(6)
    assert not connect(alice, timeout=1).connected
    server.nfknock("down")
    assert connect(alice).connected  # nothing of ours is left between the client and the service


def test_sigkill_leaves_protected_ports_closed_and_restart_is_clean(server, alice):
    server.start()
    knock(server.sandbox, alice, "40000", "50000", "60000")
    session = hold(alice)
    server.stop(signal.SIGKILL)
    assert server.iptables() == SCAFFOLDING  # leftovers of the killed run
    assert not connect(alice, timeout=1).connected  # no listener on the queue: dropped
    knock_port = connect(alice, port=40000, timeout=1)
    assert not knock_port.connected and knock_port.seconds >= 0.9  # still silent, no RST
    knock(server.sandbox, alice, "40000", "50000", "60000")
    assert not connect(alice, timeout=1).connected
    assert echoes(session)  # the admin's established session survived the crash
    server.start()
    assert server.iptables() == SCAFFOLDING  # exactly one copy
    knock(server.sandbox, alice, "40000", "50000", "60000")
    assert connect(alice).connected
    assert echoes(session)


def test_down_refuses_while_the_daemon_runs(server, alice):
    """A running daemon puts back what others remove (guard.py), `nfknock down` included: down says
    so and leaves everything as it is, instead of a removal undone a few milliseconds later."""
    server.start()
    rules = server.iptables(4)
    result = server.nfknock("down")
    assert result.returncode == 1 and "stop it first" in result.stderr, result.stderr
    assert server.iptables(4) == rules
    assert not connect(alice, timeout=1).connected
    server.stop()
    assert server.nfknock("down").returncode == 0
    assert server.iptables(4) == []


def test_down_removes_what_a_killed_daemon_left(server):
    server.start()
    server.stop(signal.SIGKILL)
    result = server.nfknock("down")
    assert result.returncode == 0 and f"removed ({server.flavour})" in result.stdout
    assert server.iptables(4) == [] and server.iptables(6) == []
    again = server.nfknock("down")
    assert again.returncode == 0 and "no nfknock rules" in again.stdout


def test_established_session_survives_start_and_stop(server, alice):
    session = hold(alice)  # made before nfknock ran
    server.start()
    assert echoes(session)
    server.stop()
    assert echoes(session)


def test_bad_rules_refuse_to_start_and_only_close_their_ports(server):
    """No last good rules (a first start): the ports the file protects are closed, no door opens
    them, and the start fails with the problem and what was done, one line each (lastgood.py)."""
    server.write_rules("doors:\n  - name: bad\n    sequence: [70000]\n    protect: [22]\n")
    process = server.start(expect_ready=False)
    assert process.wait(20) == 2
    stderr = process.stderr.read().strip().splitlines()
    assert len(stderr) == 2, stderr
    assert "door 'bad': sequence[1]: port 70000 is outside 1..65535" in stderr[0]
    assert (
        "no last good rules" in stderr[1]
        and "installed rules that keep 22/tcp closed (no door opens them)" in stderr[1]
    )
    rules = server.iptables()
    assert any("--dport 22 -j DROP" in rule for rule in rules) and not any("NFQUEUE" in rule for rule in rules)


def test_second_daemon_on_the_same_queue_is_refused(server):
    first = server.start()
    second = server.sandbox.spawn(
        server.sandbox.server, server.argv(server.workdir / "2.log"), stdout=-1, stderr=-1, text=True
    )
    assert second.wait(20) == 1
    assert "cannot bind NFQUEUE 7" in second.stderr.read()
    assert first.poll() is None
    assert server.iptables() == SCAFFOLDING


def metrics(server, port: int) -> str:
    """The running daemon's metrics, from inside its namespace (never through a proxy)."""
    import urllib.request

    from support.sandbox import entered

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with entered(server.sandbox.server):
        return opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def test_sighup_with_a_bad_file_keeps_the_old_rules(server, alice):
    server.start("--metrics-port", "9478")
    assert "nfknock_last_reload_successful 1.0" in metrics(server, 9478)
    good = (server.rules / "doors.yaml").read_text()
    server.write_rules(good.replace("40000, 50000, 60000]", "40000, 50000, 99999]"))
    server.process.send_signal(signal.SIGHUP)
    line = server.wait_log("reload refused")
    assert "port 99999 is outside 1..65535" in line
    knock(server.sandbox, alice, "40000", "50000", "60000")
    assert connect(alice).connected
    assert server.iptables() == SCAFFOLDING
    assert "nfknock_last_reload_successful 0.0" in metrics(server, 9478)  # the NfknockReloadRefused alert


def test_sighup_applies_new_rules_and_keeps_unchanged_grants(server, alice, bob):
    server.start("--metrics-port", "9478")
    knock(server.sandbox, alice, "40000", "50000", "60000")
    assert 'door="web"' not in metrics(server, 9478)
    extra = "doors:\n  - name: web\n    sequence: [1111, 2222]\n    protect: [8080/tcp]\n"
    server.write_rules(extra, name="web.yaml")
    server.process.send_signal(signal.SIGHUP)
    server.wait_log("reloaded")
    after = metrics(server, 9478)
    assert 'nfknock_lockouts_total{door="web"} 0.0' in after and "nfknock_last_reload_successful 1.0" in after
    assert connect(alice).connected  # openSSH did not change: Alice's grant lives on
    rules = server.iptables()
    assert (
        "-A NFKNOCK -p tcp -m tcp --dport 2222 -m mark --mark 0x10000000/0x10000000 -j NFQUEUE --queue-num 7" in rules
    )
    assert rules.count("-A INPUT -j NFKNOCK") == 1
    assert not connect(bob, port=8080, timeout=1).connected
    knock(server.sandbox, bob, "1111", "2222")
    time.sleep(0.1)
    assert not connect(bob, timeout=1).connected  # web opens 8080, not ssh


def test_reloads_never_open_a_window_and_keep_sessions(server, alice, bob):
    """While rules are reloaded again and again, a client without a grant keeps trying to get
    in and never does; the grant and the session of a client that knocked survive."""
    import threading

    server.start()
    knock(server.sandbox, alice, "40000", "50000", "60000")
    session = hold(alice)
    stop, breaches, tries = threading.Event(), [], [0]

    def probe():
        while not stop.is_set():
            tries[0] += 1
            if connect(bob, timeout=0.05).connected:
                breaches.append(time.monotonic())

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        for i in range(10):
            extra = f"doors:\n  - name: web\n    sequence: [{1000 + i}, 2000]\n    protect: [8080/tcp]\n"
            server.write_rules(extra, name="web.yaml")
            server.process.send_signal(signal.SIGHUP)
            server.wait_log("reloaded", after=i)
            time.sleep(0.1)
    finally:
        stop.set()
        prober.join()
    assert breaches == [] and tries[0] > 5
    assert echoes(session)
    assert connect(alice).connected
    rules = server.iptables()
    assert rules.count("-A INPUT -j NFKNOCK") == 1
    assert "-A NFKNOCK -p tcp -m tcp --dport 1009 -j DROP" in rules  # its first step: the kernel's
    assert not any("--dport 1008 " in rule for rule in rules)


def test_doctor_sees_the_running_daemon_and_a_rule_that_bypasses_it(server):
    server.start()
    args = ("doctor", "--rules", str(server.rules), "--queue-num", "7", "--firewall", server.firewall)
    result = server.nfknock(*args)
    assert result.returncode == 1  # the queue is held (by our own daemon)
    assert "FAIL NFQUEUE 7 is held by netlink port" in result.stdout
    assert f"ok   nfknock's chain is installed (iptables-{server.flavour})" in result.stdout
    server.sandbox.run(
        server.sandbox.server,
        [f"iptables-{server.flavour}", "-I", "INPUT", "1", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"],
        check=True,
    )
    result = server.nfknock(*args)
    assert "FAIL INPUT rule 1 accepts 22/tcp before nfknock's chain (IPv4)" in result.stdout
    server.stop()
    server.nfknock("down")
    result = server.nfknock(*args)
    assert "ok   NFQUEUE 7 is free" in result.stdout and "ok   no nfknock rules are installed" in result.stdout


def test_interface_limits_the_guard_to_one_link(server, alice, bob):
    alice_link = f"nk{server.sandbox.token}1s"
    server.start("--interface", alice_link)
    assert f"-A INPUT -i {alice_link} -j NFKNOCK" in server.iptables()
    assert not connect(alice, timeout=1).connected
    assert connect(bob).connected  # bob's link is not guarded: the rest of the firewall decides
    knock(server.sandbox, alice, "40000", "50000", "60000")
    assert connect(alice).connected
    server.stop()
    assert f"-A INPUT -i {alice_link} -j NFKNOCK" in server.iptables()
    server.nfknock("down")
    assert server.iptables() == []


def test_a_switch_of_flavour_and_queue_names_the_chain_left_behind_and_how_to_remove_it(server, alice, bob):
    """Started again with the other --firewall and another --queue-num, without 'nfknock down':
    the stopped daemon's chain still sends knocks and connections to queues nobody listens to,
    so the kernel drops them and the new daemon would see nothing. It says so at start, and so
    does doctor, with the command that removes that chain alone (the new one stays: closed)."""
    old = server.flavour
    server.start()
    assert server.stop() == 0  # the rules stay
    server.firewall = server.flavour = "nft" if old == "legacy" else "legacy"
    server.queue_num = 20
    server.start()
    line = server.wait_log(f"the {old} tables still hold an NFKNOCK chain")
    assert "queues 7-8" in line and "no process listens" in line and f"nfknock down --firewall {old}" in line
    knock(server.sandbox, alice, "40000", "50000", "60000")
    # The old chain drops what it queues when it comes first (knocks, new connections); a SYN the
    # new daemon accepted carries the pass mark, which the old chain returns. Closed either way:
    assert not connect(bob, timeout=1).connected
    doctor = server.nfknock("doctor", "--rules", str(server.rules), "--queue-num", "20", "--firewall", server.flavour)
    found = [line for line in doctor.stdout.splitlines() if line.startswith("warn") and f"the {old} tables" in line]
    assert found and "queues 7-8" in found[0] and f"nfknock down --firewall {old}" in found[0], doctor.stdout
    down = server.nfknock("down", "--firewall", old)
    assert down.returncode == 0, down.stderr
    assert any("NFQUEUE --queue-num 20" in rule for rule in server.iptables())  # the running daemon's stays
    knock(server.sandbox, alice, "40000", "50000", "60000")
    assert connect(alice).connected
    server.stop()
    server.start()  # nothing left behind: nothing to say
    assert f"the {old} tables still hold" not in server.log_text().split("ready:")[-2]
