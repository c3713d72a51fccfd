"""--pass-mark on a real kernel: a host rule that sets nfknock's default bit must not open the
doors once another bit is chosen, and tripwire hand-backs use the chosen bit. Both backends."""

import pytest
from conftest import connect

from support.sandbox import EchoService

pytestmark = pytest.mark.parametrize("server", ["legacy", "nft"], indirect=True)

HOST_MARKS_EVERYTHING = ["-t", "mangle", "-A", "PREROUTING", "-j", "MARK", "--set-xmark", "0x20000000/0x20000000"]


def test_a_chosen_pass_mark_survives_a_host_rule_that_sets_the_default_bit(server, alice):
    sandbox = server.sandbox
    sandbox.run(sandbox.server, [f"iptables-{server.flavour}", *HOST_MARKS_EVERYTHING], check=True)
    service = EchoService(sandbox.server, port=40005)  # on a tripwire port of the seed door
    try:
        server.start("--pass-mark", "0x100")
        assert "-A NFKNOCK -m mark --mark 0x100/0x100 -j RETURN" in server.iptables()
        assert not connect(alice, timeout=1).connected  # the door stays shut despite the host's mark
        served = connect(alice, port=40005, timeout=3)  # handed back with bit 0x100, then returned
        assert served.connected and served.greeting == b"hello\n"
    finally:
        service.close()


def test_the_default_bit_set_by_the_host_is_the_hazard_doctor_names(server, alice):
    sandbox = server.sandbox
    sandbox.run(sandbox.server, [f"iptables-{server.flavour}", *HOST_MARKS_EVERYTHING], check=True)
    doctor = server.nfknock("doctor", "--rules", str(server.rules), "--firewall", server.firewall)
    assert f"iptables-{server.flavour} -t mangle: a rule uses mark bit 0x20000000" in doctor.stdout
    doctor = server.nfknock(
        "doctor", "--rules", str(server.rules), "--firewall", server.firewall, "--pass-mark", "0x100"
    )
    assert "no other iptables rule uses the pass-mark bit 0x100" in doctor.stdout
