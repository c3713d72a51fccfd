"""Coverage-guided fuzzing of everything a queued packet touches: parse, engine, verdict.

    .venv/bin/python bench/fuzz.py -atheris_runs=1000000

Each input is either raw bytes (as the kernel could hand them over) or a well-formed IPv4
TCP/UDP packet whose fields come from the input, aimed at the door's knock, tripwire and
protected ports. The property: exactly one verdict per packet and no internal error. Engine
time advances with the input, so timeouts, expiry and lockouts are exercised too.
"""

from __future__ import annotations

import logging
import socket
import sys
import tempfile
import time
from pathlib import Path

import atheris

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # this checkout's nfknock, and tests/support as `support`

from support.fakes import FakeFirewall, Queued  # noqa: E402  (not instrumented: not under test)

with atheris.instrument_imports():
    import dpkt

    import nfknock.doors.engine  # noqa: F401  (imported here so that atheris instruments them)
    import nfknock.doors.packet  # noqa: F401
    import nfknock.doors.state  # noqa: F401
    from nfknock.daemon import Daemon, DaemonConfig

RULES = """\
doors:
  - name: openSSH
    sequence: [40000, 50000/udp, 60000]
    close_sequence: [60000, 40000]
    protect: [22/tcp, 53/udp]
    seq_timeout: 5s
    open_for: 10s
    tripwire: 3
    lockout: {failures: 3, window: 20s, lock_for: 30s}
"""
PORTS = [22, 53, 39998, 39999, 40000, 40001, 49999, 50000, 50002, 60000, 60003, 60004, 1, 65535]


# The daemon trusts a rules directory only if the directory holding it is not world-writable
# (nfknock/trust.py): so rules/ inside a private temporary directory, not the directory in /tmp.
workdir = Path(tempfile.mkdtemp(prefix="nfknock-fuzz-")) / "rules"
workdir.mkdir()
(workdir / "doors.yaml").write_text(RULES)
clock = [0.0]
logger = logging.getLogger("nfknock-fuzz")
logger.addHandler(logging.NullHandler())
logger.propagate = False
daemon = Daemon(DaemonConfig(workdir, max_sources=64), FakeFirewall(), logger=logger, clock=lambda: clock[0])
runs = [0]
failed: list[bytes] = []
started = time.monotonic()


def packet_from(fdp: atheris.FuzzedDataProvider) -> bytes:
    proto = fdp.ConsumeIntInRange(0, 2)
    src = socket.inet_aton(f"10.0.{fdp.ConsumeIntInRange(0, 3)}.{fdp.ConsumeIntInRange(1, 8)}")
    dport = PORTS[fdp.ConsumeIntInRange(0, len(PORTS) - 1)]
    if proto == 0:
        l4 = dpkt.tcp.TCP(sport=fdp.ConsumeUInt(2), dport=dport, flags=fdp.ConsumeIntInRange(0, 0xFF))
        kind = dpkt.ip.IP_PROTO_TCP
    elif proto == 1:
        l4 = dpkt.udp.UDP(sport=fdp.ConsumeUInt(2), dport=dport)
        kind = dpkt.ip.IP_PROTO_UDP
    else:
        l4 = dpkt.icmp.ICMP(type=8)
        kind = dpkt.ip.IP_PROTO_ICMP
    l4.data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 24))
    ip = dpkt.ip.IP(src=src, dst=socket.inet_aton("10.0.9.9"), p=kind, data=l4)
    ip.len = len(ip)
    raw = bytearray(bytes(ip))
    # Corrupt a few bytes now and then: header length, total length, offsets, flags.
    for _ in range(fdp.ConsumeIntInRange(0, 2)):
        if raw:
            raw[fdp.ConsumeIntInRange(0, len(raw) - 1)] = fdp.ConsumeUInt(1)
    return bytes(raw)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    clock[0] += fdp.ConsumeIntInRange(0, 4000) / 1000
    mode = fdp.ConsumeIntInRange(0, 3)
    payload = fdp.ConsumeBytes(fdp.remaining_bytes()) if mode == 0 else packet_from(fdp)
    queued = Queued(payload)
    daemon.on_packet(queued)
    if len(queued.verdicts) != 1 or daemon.errors:
        failed.append(payload)
        raise AssertionError(
            f"{len(queued.verdicts)} verdicts {queued.verdicts}, {daemon.errors} internal errors for {payload!r}"
        )
    daemon.engine.expire(clock[0])
    runs[0] += 1


def report() -> None:
    elapsed = time.monotonic() - started
    outcome = "a property was violated (see above)" if failed else "0 property violations"
    print(
        f"\nnfknock fuzz: {runs[0]} inputs passed in {elapsed:.0f}s ({runs[0] / max(elapsed, 1e-9):.0f}/s), "
        f"{outcome}; unparsable by reason: {dict(sorted(daemon.unparsable.items()))}",
        flush=True,
    )


if __name__ == "__main__":
    import atexit

    atexit.register(report)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
