"""Drop verdicts given in one netlink message per queue and turn, not one per packet.

Why: under a flood the loop drops nearly everything it sees, and a verdict sent per packet
(netfilterqueue's `drop()`, one `sendmsg` each) was half the loop's CPU, more than parsing and
deciding together (py-spy of the daemon under the later-step flood, bench/run.py later_rate).
The kernel takes a batch verdict (NFQNL_MSG_VERDICT_BATCH, what libnetfilter_queue's
`nfq_set_verdict_batch` sends): every packet still in the queue with an id up to the one named
gets the verdict. netfilterqueue does not wrap that call, so this module writes the message on
the queue's own netlink socket.

What keeps it exact (one verdict per packet, and only the one the engine chose):
- Only drops are deferred; accept and repeat are given at once, per packet, as before. A packet
  that got its verdict has left the kernel's queue, so a batch never reaches it.
- The kernel numbers a queue's packets in order and hands them over in order, and a packet lost
  to a full socket never entered the queue: every packet still queued with an id up to the
  highest one deferred was seen by the loop and deferred too.
- Except held connections (verdicts.py: a SYN waiting for its source's claim): a batch would
  drop them with the rest. So while anything is held, drops are given per packet again; a held
  packet's id is above every drop deferred before it.
- The deferred drops go out when the queue's `run` returns (the socket is empty, or the turn's
  budget is spent), before the loop does anything else. Should that message fail, each packet is
  dropped on its own; and whatever happens, the kernel drops what is left queued when the queue
  is unbound (fail closed).
"""

from __future__ import annotations

import logging
import os
import struct

NF_DROP = 0
_NFNL_SUBSYS_QUEUE = 3
_NFQNL_MSG_VERDICT_BATCH = 3
_NLM_F_REQUEST = 1
_NFQA_VERDICT_HDR = 2
_LENGTH = 32  # nlmsghdr 16 + nfgenmsg 4 + one attribute: 4 + verdict header 8
_ID = struct.Struct("!I")


def batch_message(queue_num: int, verdict: int, last_id: int) -> bytes:
    """The netlink message: `verdict` for every packet of queue `queue_num` with an id up to
    `last_id` (nlmsghdr and attribute headers in host order, netfilter's fields big-endian)."""
    return (
        struct.pack("=IHHII", _LENGTH, (_NFNL_SUBSYS_QUEUE << 8) | _NFQNL_MSG_VERDICT_BATCH, _NLM_F_REQUEST, 0, 0)
        + struct.pack("!BBH", 0, 0, queue_num)  # nfgenmsg: AF_UNSPEC, NFNETLINK_V0, res_id = the queue
        + struct.pack("=HH", 12, _NFQA_VERDICT_HDR)
        + struct.pack("!II", verdict, last_id)
    )


class DeferredDrops:
    """The drops of the queue the loop is running, sent as one batch verdict by `flush`."""

    def __init__(self, log: logging.Logger, write=os.write):
        self.log, self.write = log, write
        self.fd = -1
        self.head = b""  # the batch message up to the id, for the current queue
        self.pending: list = []  # the deferred packets, in the order (and id order) they came
        self.heads: dict[int, bytes] = {}  # queue number -> its message up to the id
        self.batches = 0  # batch verdicts sent (a figure for the tests and the bench)
        self.failures = 0

    def serve(self, fd: int, queue_num: int) -> None:
        """The loop is about to run the queue `queue_num`, read on `fd`."""
        self.fd = fd
        head = self.heads.get(queue_num)
        if head is None:
            head = self.heads[queue_num] = batch_message(queue_num, NF_DROP, 0)[: _LENGTH - _ID.size]
        self.head = head

    def flush(self) -> None:
        """The queue's run is over: its deferred drops in one message; none deferred until the
        next `serve`."""
        fd, self.fd = self.fd, -1
        pending = self.pending
        if not pending:
            return
        self.pending = []
        try:
            self.write(fd, self.head + _ID.pack(pending[-1].id))
            self.batches += 1
            return
        except Exception:
            self.failures += 1
            if self.failures <= 10 or self.failures % 1000 == 0:
                self.log.exception("a batch drop verdict failed (%d so far); dropping packet by packet", self.failures)
        for queued in pending:
            try:
                queued.drop()
            except Exception:
                pass
