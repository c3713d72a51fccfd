"""Handshakes a revoke interrupts: a SYN accepted during a grant must not become a connection
after the grant ends.

Why: the daemon judges a connection on its SYN. Once that SYN is accepted, conntrack tracks the
connection, and the client's final ACK of the handshake is ESTABLISHED traffic, accepted before
the queue — so a handshake started during a grant and completed after `nfknock revoke` (or a
close sequence, or a key removed) would open a connection after the revoke. A revoke means no
new connection from that moment: the daemon deletes the source's conntrack entries for protected
TCP ports that conntrack has not yet *assured* (a completed handshake sets IPS_ASSURED), so the
handshake's last ACK arrives as a NEW mid-stream ACK, which the chain drops unless it belongs to
a session the host already has (sessions.py). Connections already established are kept.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterable
from typing import Any

from ..errors import FirewallError

IPS_ASSURED = 1 << 2  # include/uapi/linux/netfilter/nf_conntrack_common.h
# A start reads at most this many pending handshakes (Handshakes.pending): a SYN flood can leave
# hundreds of thousands, and parsing each in Python would hold the start for minutes.
SURVEY_LIMIT = 4096


class Handshakes:
    """The conntrack side of a revoke, over netlink (pyroute2), from the loop's thread only."""

    def __init__(self) -> None:
        self._table: Any = None
        self._status_filter = True  # the kernel filters on status too (until it says it cannot)

    def cut(self, src: str, ports: Iterable[int]) -> int:
        """Delete `src`'s unassured conntrack entries towards these local TCP ports; how many.
        Raises FirewallError when conntrack cannot be read or changed."""
        ports = set(ports)
        if not ports:
            return 0
        try:
            from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple  # type: ignore[import-untyped]

            table = self._open()
            family = socket.AF_INET6 if ":" in src else socket.AF_INET
            wanted = NFCTAttrTuple(family=family, saddr=src, proto=socket.IPPROTO_TCP)
            doomed = [
                entry
                for entry in self._unassured(table, wanted)
                if not entry.status & IPS_ASSURED and entry.tuple_orig.dport in ports
            ]
            cut = 0
            for entry in doomed:
                try:
                    table.delete(entry)
                    cut += 1
                except Exception as exc:
                    if getattr(exc, "code", None) != 2:  # ENOENT: it went by itself meanwhile
                        raise
            return cut
        except Exception as exc:
            self.close()  # a fresh socket next time
            raise FirewallError(f"cannot cut {src}'s pending handshakes in conntrack: {exc}") from None

    def cut_exact(self, src: str, tuples: Iterable[tuple[str, int, int]]) -> int:
        """Delete `src`'s unassured conntrack entries among these exact (local address, source
        port, local port) TCP tuples: one lookup each, no walk of the table. How many."""
        try:
            from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

            table = self._open()
            family = socket.AF_INET6 if ":" in src else socket.AF_INET
            cut = 0
            for dst, sport, dport in tuples:
                exact = NFCTAttrTuple(
                    family=family, saddr=src, daddr=dst, proto=socket.IPPROTO_TCP, sport=sport, dport=dport
                )
                try:
                    found = table.entry("get", tuple_orig=exact)
                    if found is None or found.get_attr("CTA_STATUS") & IPS_ASSURED:
                        continue
                    table.entry("del", tuple_orig=exact)
                    cut += 1
                except Exception as exc:
                    if getattr(exc, "code", None) != 2:  # ENOENT: gone (closed, expired) or never tracked
                        raise
            return cut
        except Exception as exc:
            self.close()
            raise FirewallError(f"cannot cut {src}'s pending handshakes in conntrack: {exc}") from None

    def pending(self, limit: int = SURVEY_LIMIT) -> list[tuple[str, str, int, int]]:
        """Every unassured TCP entry of this namespace as (source, local address, source port,
        local port): the handshakes an earlier process may have let begin. One dump per family.

        At most `limit` entries are read: after a SYN flood conntrack may hold hundreds of
        thousands of them, and parsing each in Python would hold a start for minutes (knocks
        unanswered meanwhile). Beyond it, FirewallError: the cutter then walks the table at a
        revoke, as it does when it knows nothing."""
        try:
            from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

            table = self._open()
            found = []
            for family in (socket.AF_INET, socket.AF_INET6):
                wanted = NFCTAttrTuple(family=family, proto=socket.IPPROTO_TCP)
                for entry in self._unassured(table, wanted, lazy=True):
                    if not entry.status & IPS_ASSURED:
                        orig = entry.tuple_orig
                        found.append((str(orig.saddr), str(orig.daddr), int(orig.sport), int(orig.dport)))
                        if len(found) > limit:
                            self.close()  # the rest of the dump stays unread
                            raise FirewallError(
                                f"conntrack holds more than {limit} pending handshakes (a SYN flood?): "
                                "not read at start"
                            )
            return found
        except FirewallError:
            raise
        except Exception as exc:
            self.close()
            raise FirewallError(f"cannot read conntrack's pending handshakes: {exc}") from None

    def _unassured(self, table: Any, wanted: Any, lazy: bool = False) -> Any:
        """The source's TCP entries, only the unassured ones when the kernel can say (5.15+:
        status filter beside the tuple filter). A busy client's finished connections (TIME_WAIT,
        assured) then stay in the kernel instead of being parsed here one by one: a revoke of a
        source with a thousand of them cost ~60 ms of CPU in Python, holding the GIL."""
        if self._status_filter:
            try:
                entries = table._generate_with_cleanup(_dump_unassured, table.asyncore, wanted)
                if lazy:  # the first entry is read here, so an old kernel's refusal is caught below
                    first = next(entries, None)
                    return iter(()) if first is None else itertools.chain((first,), entries)
                return list(entries)
            except Exception as exc:
                if getattr(exc, "code", None) not in (22, 95):  # EINVAL / EOPNOTSUPP: an older kernel
                    raise
                self._status_filter = False
        entries = table.dump_entries(tuple_orig=wanted)
        return entries if lazy else list(entries)

    def _open(self) -> Any:
        if self._table is None:
            from pyroute2 import Conntrack  # type: ignore[import-untyped]

            self._table = Conntrack()
        return self._table

    def close(self) -> None:
        if self._table is not None:
            try:
                self._table.close()
            except Exception:
                pass
            self._table = None


async def _dump_unassured(asyncore: Any, wanted: Any) -> Any:
    """pyroute2's dump_entries with a status filter beside the tuple filter (its own dump takes
    one or the other): entries whose status lacks IPS_ASSURED, filtered in the kernel."""
    return _unassured_entries(asyncore, wanted)


async def _unassured_entries(asyncore: Any, wanted: Any) -> Any:
    from pyroute2.conntrack import ConntrackEntry  # type: ignore[import-untyped]
    from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST  # type: ignore[import-untyped]
    from pyroute2.netlink.nfnetlink.nfctsocket import IPCTNL_MSG_CT_GET, nfct_msg

    wanted.attrs()  # sets the tuple's filter flags
    message = nfct_msg.create_from(
        tuple_orig=wanted,
        cta_filter={"attrs": [["CTA_FILTER_ORIG_FLAGS", wanted.flags]]},
        status=0,
        status_mask=IPS_ASSURED,
    )
    async for found in await asyncore.request(message, IPCTNL_MSG_CT_GET, msg_flags=NLM_F_REQUEST | NLM_F_DUMP):
        if not wanted.nla_eq(found["nfgen_family"], found.get_attr("CTA_TUPLE_ORIG")):
            continue
        yield ConntrackEntry(
            found["nfgen_family"],
            found.get_attr("CTA_TUPLE_ORIG"),
            found.get_attr("CTA_TUPLE_REPLY"),
            found.get_attr("CTA_STATUS"),
            found.get_attr("CTA_TIMEOUT"),
            found.get_attr("CTA_PROTOINFO"),
            found.get_attr("CTA_MARK"),
            found.get_attr("CTA_ID"),
            found.get_attr("CTA_USE"),
            found.get_attr("CTA_ZONE"),
        )
