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
from ..firewall.plan import MarkBits, first_step_marks
from .drops import DeferredDrops
from .sinks import Sinks

_ACCEPT, _DROP, _PASS, _HOLD = Verdict.ACCEPT, Verdict.DROP, Verdict.PASS, Verdict.HOLD  # enum access is slow
NF_INET_FORWARD = 2  # the hook a queued packet came from (netfilterqueue's `hook`): the FORWARD chain
HELD_PER_SOURCE = 8  # new connections a source may have waiting for its claim (a client opens one or two)
HELD_MAX = 1024  # and all sources together; beyond, a connection is refused as before holds existed


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
        # Bit i of Packet.first_seen: the knock doors' group bits, then the rotating doors' (ROTATING_BIT).
        self.first_seen_marks = (*first_step_marks(pass_mark), MarkBits(pass_mark).rotating)
        self.first_seen_field = sum(self.first_seen_marks)
        self.unparsable: dict[str, int] = {}
        self.errors = 0
        self.handled = dict.fromkeys((_ACCEPT, _DROP, _PASS), 0)
        # New connections of sources whose claim is in flight (Verdict.HOLD): verdicted later, by
        # `release`, once the engine knows; netfilterqueue lets a packet be verdicted after its
        # callback returned (the kernel keeps it meanwhile).
        self.held: dict[str, list] = {}
        self._held_count = 0
        # Drops given as one batch verdict per queue and turn (drops.py), while the loop runs a
        # queue (`drops.fd >= 0`) and nothing is held; None: each drop at once (tests, tools).
        self.drops: DeferredDrops | None = None

    def on_packet(self, queued) -> None:
        verdict = _DROP
        packet = None
        try:
            packet = parse(queued.get_payload())
            seen = queued.get_mark() & self.first_seen_field
            if seen:  # only a second step the kernel marked (first_steps.py)
                bits = sum(1 << i for i, mark in enumerate(self.first_seen_marks) if seen & mark)
                packet = packet._replace(first_seen=bits)
            if getattr(queued, "hook", 0) == NF_INET_FORWARD:  # a gateway door's (docs/gateway.md)
                packet = packet._replace(forwarded=True)
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
            if verdict is not _HOLD or not self._hold(packet, queued):  # a held packet is verdicted later
                if verdict is _HOLD:
                    verdict = _DROP  # no room to hold it: refused, as before holds existed
                self.handled[verdict] += 1
                try:
                    if verdict is _ACCEPT:
                        # Marked as ours: a firewall manager's base rule (tools/export.py), in a
                        # table the packet meets after ours, lets through what nfknock accepted.
                        queued.set_mark(queued.get_mark() | self.pass_mark)
                        queued.accept()
                    elif verdict is _PASS:
                        queued.set_mark(queued.get_mark() | self.pass_mark)
                        queued.repeat()  # back to the top of INPUT; our chain returns marked packets
                    elif (drops := self.drops) is not None and drops.fd >= 0 and not self.held:
                        drops.pending.append(queued)  # dropped with the rest at the turn's end
                    else:
                        queued.drop()
                except Exception:
                    self.errors += 1
                    if verdict is not _DROP:
                        try:
                            queued.drop()
                        except Exception:
                            pass

    def _hold(self, packet, queued) -> bool:
        held = self.held.setdefault(packet.src, [])
        if len(held) >= HELD_PER_SOURCE or self._held_count >= HELD_MAX:
            return False
        held.append((packet, queued))
        self._held_count += 1
        return True

    def release(self, now: float) -> None:
        """Judge again the held connections of sources whose claim was answered (or ran out of
        time): accepted if the claim granted, refused otherwise. The loop calls this each turn."""
        if not self.held:
            return
        pending = self.engine.pending
        for src in [src for src in self.held if pending.get(src, 0.0) <= now]:
            for packet, queued in self.held.pop(src):
                self._held_count -= 1
                self._judge_again(packet, queued, now)

    def _judge_again(self, packet, queued, now: float) -> None:
        verdict = _DROP
        try:
            decision = self.engine.handle(packet, now, self.wall_clock())
            verdict = _ACCEPT if decision.verdict is _ACCEPT else _DROP  # never held twice
            if decision.events:
                self.sinks.consume(decision.events, now)
        except Exception:
            self.errors += 1
            self.log.exception("internal error on a held connection (dropped)")
        finally:
            self.handled[verdict] += 1
            try:
                if verdict is _ACCEPT:
                    queued.set_mark(queued.get_mark() | self.pass_mark)  # as on_packet does
                    queued.accept()
                else:
                    queued.drop()
            except Exception:
                self.errors += 1

    def drop_held(self) -> None:
        """At a stop: what waits gets its verdict (drop) before the queues are unbound."""
        for held in self.held.values():
            for _, queued in held:
                try:
                    queued.drop()
                except Exception:
                    pass
        self.held.clear()
        self._held_count = 0
