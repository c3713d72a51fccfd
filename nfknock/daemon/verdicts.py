"""The hot path: one queued packet in, exactly one verdict out.

Parse once (doors/packet.py), ask the engine with the time, hand its events to the sinks, and
give the verdict in `finally`, drop unless the engine said accept: an exception never leaves
the callback (netfilterqueue would leave the packet without a verdict), and a packet never
stops the loop. Kept flat: this runs for every packet a flood brings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..doors.engine import Engine, Verdict
from ..doors.packet import parse
from ..errors import PacketError
from ..firewall.plan import first_step_marks
from .sinks import Sinks

_ACCEPT, _DROP, _PASS = Verdict.ACCEPT, Verdict.DROP, Verdict.PASS  # enum access is slow per packet


class Verdicts:
    def __init__(
        self,
        engine: Engine,
        sinks: Sinks,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        pass_mark: int,
        log: logging.Logger,
    ):
        self.engine, self.sinks, self.clock, self.wall_clock, self.log = engine, sinks, clock, wall_clock, log
        self.pass_mark = pass_mark
        self.first_seen_marks = first_step_marks(pass_mark)
        self.first_seen_field = sum(self.first_seen_marks)
        self.unparsable: dict[str, int] = {}
        self.errors = 0
        self.handled = dict.fromkeys(Verdict, 0)

    def on_packet(self, queued) -> None:
        verdict = _DROP
        try:
            packet = parse(queued.get_payload())
            seen = queued.get_mark() & self.first_seen_field
            if seen:  # only a second step the kernel marked (first_steps.py)
                bits = sum(1 << i for i, mark in enumerate(self.first_seen_marks) if seen & mark)
                packet = packet._replace(first_seen=bits)
            now = self.clock()
            decision = self.engine.handle(packet, now, self.wall_clock())
            verdict = decision.verdict
            if decision.events:
                self.sinks.consume(decision.events, now)
        except PacketError as exc:
            self.unparsable[exc.reason] = self.unparsable.get(exc.reason, 0) + 1
        except Exception:  # never let a packet kill the loop; drop it instead
            self.errors += 1
            if self.errors <= 10 or self.errors % 1000 == 0:
                self.log.exception("internal error on a packet (dropped; %d so far)", self.errors)
        finally:
            self.handled[verdict] += 1
            try:
                if verdict is _ACCEPT:
                    queued.accept()
                elif verdict is _PASS:
                    queued.set_mark(queued.get_mark() | self.pass_mark)
                    queued.repeat()  # back to the top of INPUT; our chain returns marked packets
                else:
                    queued.drop()
            except Exception:
                self.errors += 1
                if verdict is not _DROP:
                    try:
                        queued.drop()
                    except Exception:
                        pass
