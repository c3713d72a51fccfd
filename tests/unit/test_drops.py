"""Deferred drops (daemon/drops.py): a turn's drops leave as one batch verdict naming the last
packet, every other verdict leaves at once, and nothing held is ever covered by a batch."""

import logging
import struct

from nfknock.daemon.drops import DeferredDrops, batch_message
from support.fakes import Numbered, Wire

log = logging.getLogger("test-nfknock")


def decoded(message: bytes) -> dict:
    length, kind, flags, _, _ = struct.unpack_from("=IHHII", message)
    family, version, res_id = struct.unpack_from("!BBH", message, 16)
    attr_len, attr_type = struct.unpack_from("=HH", message, 20)
    verdict, last = struct.unpack_from("!II", message, 24)
    assert length == len(message) == 32 and attr_len == 12
    return {
        "subsystem": kind >> 8,
        "type": kind & 0xFF,
        "flags": flags,
        "family": family,
        "version": version,
        "queue": res_id,
        "attr": attr_type,
        "verdict": verdict,
        "id": last,
    }


def test_the_message_is_the_kernels_batch_verdict():
    # linux/netfilter/nfnetlink.h, nfnetlink_queue.h: NFNL_SUBSYS_QUEUE 3, NFQNL_MSG_VERDICT_BATCH 3,
    # NFQA_VERDICT_HDR 2, NLM_F_REQUEST 1; NF_DROP 0, NF_ACCEPT 1
    assert decoded(batch_message(7, 0, 0x01020304)) == {
        "subsystem": 3,
        "type": 3,
        "flags": 1,
        "family": 0,
        "version": 0,
        "queue": 7,
        "attr": 2,
        "verdict": 0,
        "id": 0x01020304,
    }
    assert decoded(batch_message(65535, 1, 2**32 - 1))["queue"] == 65535


def test_a_turns_drops_leave_in_one_message_naming_the_last_packet():
    wire = Wire()
    drops = DeferredDrops(log, write=wire)
    drops.serve(41, 9)
    drops.pending += [Numbered(b"", n) for n in (5, 6, 9)]
    drops.flush()
    [(fd, message)] = wire.sent
    assert fd == 41 and decoded(message)["queue"] == 9 and decoded(message)["id"] == 9
    assert decoded(message)["verdict"] == 0  # drop, never anything else
    assert drops.pending == [] and drops.fd == -1 and drops.batches == 1
    drops.flush()  # nothing deferred: nothing sent
    drops.serve(43, 10)
    drops.flush()
    assert len(wire.sent) == 1


def test_a_failed_batch_drops_each_packet_on_its_own(caplog):
    drops = DeferredDrops(log, write=Wire(fails=True))
    drops.serve(41, 9)
    packets = [Numbered(b"", n) for n in range(3)]
    drops.pending += packets
    with caplog.at_level(logging.ERROR, logger="test-nfknock"):
        drops.flush()
    assert [p.verdicts for p in packets] == [["drop"]] * 3
    assert drops.failures == 1 and drops.batches == 0
    assert "a batch drop verdict failed" in caplog.text
