"""The fixed scaffolding nfknock installs, and the backends that install it.

`scaffolding()` is the whole plan, as data: per protected port, established traffic is accepted
before the queue (bulk traffic never reaches Python), NEW connections are queued, anything else
is dropped; every knock port is queued.

Knock ports are ordinary port numbers, and the host's own connections use them too: 40000 may
be the local port the kernel picks for an outbound connection (it lies in Linux's default
ephemeral range), and the replies arrive with destination port 40000. So once the protected
ports have had their say, packets of RELATED/ESTABLISHED connections return from the chain and
the rest of the host's firewall decides on them; only the others (NEW, and INVALID or UNTRACKED:
a knock with odd TCP flags may look INVALID to conntrack) reach the knock rules. A knock never
becomes established: it is dropped, so conntrack never confirms its entry (an unanswered UDP
knock stays NEW).

Ports near the knock steps are tripwires (see engine.py): new connections to them are queued
too, and nfknock hands each one back with PASS_MARK set (NF_REPEAT); the first rule of the chain
returns marked packets, so the rest of the host's firewall decides on them as if nfknock were
not there.

For TCP, only a SYN is a new connection. A mid-stream ACK that conntrack sees as NEW is either
a session conntrack does not know (an admin's SSH session when nfknock first starts, every
session after a conntrack flush) or a stranger's guess at a SYN cookie: an ACK that reaches a
listener is checked as one, and a valid cookie opens a connection without any SYN passing here.
So it is accepted only when it belongs to a session the host has, exactly (client address and
port, local address: the sessions set, sessions.py), and dropped otherwise. Ports a door protects
are closed in both address families, whichever the door listens on. There is never a per-client rule, and no rule uses
`--queue-bypass`: with no daemon bound to the queue the kernel drops, so a dead daemon means
closed. Backends turn the plan into kernel rules in one atomic step.

With several worker processes (`plan(..., workers=N)`, shards.py) every NFQUEUE rule is repeated
once per worker, with a u32 match on the last byte of the source address and that worker's
queues; nothing else in the chain changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..doors import later_steps
from ..doors.first_steps import MARK_BITS, FirstStepGroup, FirstSteps, require
from ..doors.rules import TCP_FLAG_BITS, Door, KnockDoor, SpaDoor, TcpFlags
from .shards import byte_ranges, queues, u32_match
from .spa_shape import joined, spa_shape

CHAIN = "NFKNOCK"


PASS_MARK = 0x20000000  # default bit of the packet mark (--pass-mark); other bits are left to the host


def parse_pass_mark(text: str) -> int:
    """A --pass-mark value: one bit of the 32-bit packet mark, 0xHEX (or decimal)."""
    try:
        value = int(text, 0)
    except ValueError:
        value = 0
    if not 0 < value < 1 << 32 or value & (value - 1):
        raise ValueError(f"must be a single bit of the 32-bit packet mark, such as {PASS_MARK:#x}; got {text!r}")
    return value


SET_PREFIX = "nfknock-"


# New connections per second (per protected port) from sources not in the granted set that may
# reach the main queue; a flood beyond it is dropped by the kernel.
NEW_LIMIT = ("100/sec", 200)


# New connections per second (per protected port) from sources that sent a packet to a knock or
# SPA port in the last RECENT_SECONDS (the recent set) and hold no grant yet: a bucket of their
# own, which a SYN flood alone never empties (see _noting_recent).
RECENT_LIMIT = ("100/sec", 200)


RECENT_SECONDS = 3


# New connections per second (per tripwire range) to a tripwire port of doors whose first step
# the kernel records, from sources in none of the sets that can be mid-attempt (later_steps.py):
# enough for a scanner's hits to count toward its lockout, too few for a flood to fill the queue.
TRIPWIRE_LIMIT = ("50/sec", 100)


SYN_ONLY = ("FIN,SYN,RST,ACK", "SYN")


MID_STREAM = ("SYN,ACK", "ACK")


SESSION_DIRS = "src,src,dst"  # a sessions set matches client address, client port, local address


@dataclass(frozen=True)
class RuleSpec:
    target: str  # ACCEPT, NFQUEUE, DROP or RETURN
    proto: str | None = None
    dport: int | tuple[int, int] | None = None
    ctstate: str | None = None
    queue_num: int | None = None
    tcp_flags: tuple[str, str] | None = None  # (mask, set), as iptables --tcp-flags
    mark: int | None = None  # match packets that carry this mark bit
    match_set: str | None = None  # match packets in this ipset (see granted.py, sessions.py) ...
    match_dirs: str = "src"  # ... by these fields, as iptables --match-set NAME src,src,dst
    in_interface: str | None = None  # match packets that arrived on this interface
    limit: tuple[str, int] | None = None  # (rate, burst), as iptables -m limit
    set_mark: tuple[int, int] | None = None  # target MARK: (value, mask), as --set-xmark
    add_set: tuple[str, int] | None = None  # target SET: add the source to (ipset, timeout seconds)
    del_set: str | None = None  # target SET: take the source out of this ipset
    u32: str | None = None  # an xt_u32 expression, as iptables prints it (shards.u32_match)
    # The gateway chains' (gateway_plan): the chain, `-d ADDR`, addrtype LOCAL and DNAT's target.
    chain: str = CHAIN
    destination: str | None = None
    dst_local: bool = False
    to_destination: str | None = None

    def __str__(self) -> str:
        text = f"-A {self.chain}"
        if self.destination:
            text += f" -d {self.destination}"
        if self.in_interface:
            text += f" -i {self.in_interface}"
        if self.proto:
            text += f" -p {self.proto} -m {self.proto}"
        if self.dport is not None:
            dport = f"{self.dport[0]}:{self.dport[1]}" if isinstance(self.dport, tuple) else self.dport
            text += f" --dport {dport}"
        if self.tcp_flags:
            text += f" --tcp-flags {' '.join(self.tcp_flags)}"
        if self.mark is not None:
            text += f" -m mark --mark {self.mark:#x}/{self.mark:#x}"
        if self.dst_local:
            text += " -m addrtype --dst-type LOCAL"
        if self.ctstate:
            text += f" -m conntrack --ctstate {self.ctstate}"
        if self.match_set:
            text += f" -m set --match-set {self.match_set} {self.match_dirs}"
        if self.u32:
            # Quoted as `iptables -S` prints it (the expression has no space; iptables-restore
            # takes the quotes off). Before the limit: matches are tried in order, and a limit
            # only spends a token on a packet that got that far, i.e. one of this worker's.
            text += f' -m u32 --u32 "{self.u32}"'
        if self.limit:
            text += f" -m limit --limit {self.limit[0]} --limit-burst {self.limit[1]}"
        text += f" -j {self.target}"
        if self.set_mark is not None:
            text += f" --set-xmark {self.set_mark[0]:#x}/{self.set_mark[1]:#x}"
        if self.add_set is not None:
            text += f" --add-set {self.add_set[0]} src --exist --timeout {self.add_set[1]}"
        if self.del_set is not None:
            text += f" --del-set {self.del_set} src"
        if self.queue_num is not None:
            text += f" --queue-num {self.queue_num}"
        if self.to_destination is not None:
            text += f" --to-destination {self.to_destination}"
        return text


Plan = dict[int, list[RuleSpec]]  # IP version -> the chain's rules; an empty list: no chain


@dataclass(frozen=True)
class MarkBits:
    """The codec of the first-step mark bits (first_steps.py): bit index (0..MARK_BITS-1, what a
    group's `bit` says) <-> mark value, under a pass mark. They are the MARK_BITS bits below the
    pass mark (above it when there is no room below); nfknock owns the pass mark and those of
    these bits its rules use. The plan writes marks and the host reads rules in place (host.py
    marks_installed) through this one codec."""

    pass_mark: int = PASS_MARK

    @property
    def values(self) -> tuple[int, ...]:
        """The mark value of each bit index, in index order."""
        if self.pass_mark >> MARK_BITS:
            return tuple(self.pass_mark >> shift for shift in range(1, MARK_BITS + 1))
        return tuple(self.pass_mark << shift for shift in range(1, MARK_BITS + 1))

    @property
    def field(self) -> int:
        """All of them: the mask a second-step port clears before marking."""
        return sum(self.values)

    def value(self, bit: int) -> int:
        """The mark value of bit index `bit`; ValueError outside 0..MARK_BITS-1."""
        if not 0 <= bit < MARK_BITS:
            raise ValueError(f"a first-step mark bit is 0..{MARK_BITS - 1}, not {bit}")
        return self.values[bit]

    def bit(self, value: int) -> int | None:
        """The bit index a mark value stands for; None for a value that is not one of them."""
        values = self.values
        return values.index(value) if value in values else None

    @property
    def rotating(self) -> int:
        """The one mark value saying "the kernel saw this source knock a current first step of
        the rotating door of this port range" (later_steps.py), on a second step in that range.
        Never one of `values`, so no knock door's group can take it: the next bit after them,
        below the pass mark when there is room, else above it."""
        if self.pass_mark >> (MARK_BITS + 1):
            return self.pass_mark >> (MARK_BITS + 1)
        if self.pass_mark >> MARK_BITS:  # the four fit below, the fifth does not
            return self.pass_mark << 1
        return self.pass_mark << (MARK_BITS + 1)


def first_step_marks(pass_mark: int = PASS_MARK) -> tuple[int, ...]:
    """The mark values saying "the kernel saw this source's first step", in bit index order."""
    return MarkBits(pass_mark).values


def plan(
    doors: tuple[Door, ...],
    queue_num: int,
    pass_mark: int = PASS_MARK,
    workers: int = 1,
    *,
    first_steps: FirstSteps,
) -> Plan:
    """The scaffolding for each address family, from the doors that listen on it; a port a door
    protects is closed in both families, whichever it listens on (a service on `::` answers IPv6
    too), so a family no door listens on gets a chain that only closes. Which first
    steps go to the kernel is decided over all doors, once (`first_steps`: first_steps.decide,
    the value the engine takes too; required, so that no caller can leave the mark history out).
    With `workers` above 1 the NFQUEUE rules are split over the workers (see `shard`)."""
    require(first_steps)
    chains = {
        family: shard(
            scaffolding(
                tuple(d for d in doors if family in d.families),
                queue_num,
                pass_mark,
                family,
                first_steps=first_steps,
                closed=tuple(p.key for d in doors if family not in d.families for p in d.protect),
            ),
            queue_num,
            family,
            workers,
        )
        for family in (4, 6)
    }
    return with_gateway(chains, gateway_plan(doors, queue_num, workers))


def shard(specs: list[RuleSpec], queue_num: int, family: int, workers: int) -> list[RuleSpec]:
    """The chain for `workers` worker processes (shards.py): each NFQUEUE rule is replaced, in
    place, by one rule per worker, the same but for a u32 match on the last byte of the source
    (the worker's range) and the queue (the worker's main or grant queue, as the rule had the
    daemon's). The ranges partition 0..255, so a packet that would have matched the rule matches
    exactly one worker's. Every other rule stays as it is, and so do the set names: the granted
    and first-step sets belong to the daemon, which all its workers share.

    A rule with `-m limit` keeps its rate and burst in each worker's copy: each copy has a bucket
    of its own, so the kernel lets through up to `workers` times NEW_LIMIT in all, at most
    NEW_LIMIT to any one worker (a flood from random sources spreads over all of them; one
    from a single shard fills only that worker's bucket). With one worker the chain is unchanged."""
    ranges = byte_ranges(workers)  # ValueError for a number of workers nfknock does not run
    if workers == 1:
        return specs
    out: list[RuleSpec] = []
    for spec in specs:
        if spec.target != "NFQUEUE":
            out.append(spec)
            continue
        pair = (queue_num, queue_num + 1)  # main, grant
        if spec.queue_num not in pair:
            raise ValueError(f"an NFQUEUE rule for queue {spec.queue_num}, not {queue_num} or {queue_num + 1}")
        which = pair.index(spec.queue_num)
        out += [
            replace(spec, u32=joined(u32_match(family, lo, hi), spec.u32), queue_num=queues(queue_num, i)[which])
            for i, (lo, hi) in enumerate(ranges)
        ]
    return out


def iptables_flags(flags: TcpFlags) -> tuple[str, str]:
    """knockd-style required/forbidden bits as iptables --tcp-flags (mask, comparison)."""

    def names(bits: int) -> str:
        return ",".join(name.upper() for name, bit in TCP_FLAG_BITS.items() if bits & bit) or "NONE"

    return names(flags.required | flags.forbidden), names(flags.required)


def _first_step_rules(
    groups: tuple[FirstStepGroup, ...],
    queue_num: int,
    pass_mark: int,
    family: int,
    granted: str,
    midway: dict[tuple[str, int], tuple[str, int]] | None = None,
) -> dict[tuple[str, int], list[RuleSpec]]:
    """The rules of the knock ports whose first steps the kernel records, per port. A source in
    the granted set is always queued (close sequences, knocking again: the daemon's semantics);
    anyone else's first knock only lands in the group's set, and their second knock is queued,
    marked, only from a source in that set. Everything else on those ports is dropped. (The
    rules that take a source out of the set again are `_forgetting_rules`.) `midway`: first port
    -> (midway set, timeout) of the groups whose marked second step also enters the midway set
    (later_steps.py)."""
    marks = MarkBits(pass_mark)
    midway = midway or {}
    rules: dict[tuple[str, int], list[RuleSpec]] = {}
    at_second: dict[tuple[str, int], list[tuple[str, int]]] = {}  # port -> (set, mark bit) of its groups
    entering: dict[tuple[str, int], list[RuleSpec]] = {}  # port -> its groups' midway rules
    for group in groups:
        if family not in group.families:
            continue
        proto, port = group.first
        started = first_step_set(queue_num, family, group.first)
        flags = iptables_flags(group.tcp_flags) if group.tcp_flags else None
        rules[group.first] = [
            RuleSpec("NFQUEUE", proto, port, queue_num=queue_num, match_set=granted),
            RuleSpec("SET", proto, port, tcp_flags=flags, add_set=(started, group.timeout)),
            RuleSpec("DROP", proto, port),
        ]
        for second in group.seconds:
            at_second.setdefault(second, []).append((started, marks.value(group.bit)))
            if group.first in midway:
                spec = RuleSpec("SET", second[0], second[1], mark=marks.value(group.bit), add_set=midway[group.first])
                entering.setdefault(second, []).append(spec)
    field = marks.field
    for (proto, port), marking in at_second.items():
        rules[(proto, port)] = [
            # All of them, used here or not: whoever set them, they are ours, and a bit this port
            # does not use today may mean a first step here after a reload (first_steps.py).
            RuleSpec("MARK", proto, port, set_mark=(0, field)),
            *(RuleSpec("MARK", proto, port, match_set=started, set_mark=(bit, bit)) for started, bit in marking),
            # single use: the element is spent on the packet it marks (a later packet to this
            # port, a close sequence starting here or a spoofed copy, is not marked again)
            *(RuleSpec("SET", proto, port, mark=bit, del_set=started) for started, bit in marking),
            *entering.get((proto, port), ()),  # mid-attempt from here on (later_steps.py)
            *(RuleSpec("NFQUEUE", proto, port, mark=bit, queue_num=queue_num) for _, bit in marking),
            RuleSpec("NFQUEUE", proto, port, queue_num=queue_num, match_set=granted),
            RuleSpec("DROP", proto, port),
        ]
    return rules


def _outside(first: int, last: int, holes: list[int]) -> list[int | tuple[int, int]]:
    """The ports first..last without `holes`, as single ports and ranges."""
    spans: list[int | tuple[int, int]] = []
    start = first
    for hole in sorted(h for h in set(holes) if first <= h <= last) + [last + 1]:
        if start < hole:
            spans.append(start if start == hole - 1 else (start, hole - 1))
        start = hole + 1
    return spans


def _forgetting_rules(
    groups: tuple[FirstStepGroup, ...], doors: tuple[Door, ...], queue_num: int, family: int
) -> list[RuleSpec]:
    """For each group, on every knock port and tripwire port of its doors but its own first and
    second steps: take the source out of the group's set. A knock there after the first step
    would have reset the attempt in the daemon; in the kernel it happens in packet order, before
    a second step can be marked. They come before every knock and tripwire rule (SET does not
    end the chain), so that no other door's rule on an overlapping port takes the packet first."""
    forget: list[RuleSpec] = []
    by_name = {door.name: door for door in doors}
    for group in groups:
        if family not in group.families:
            continue
        started = first_step_set(queue_num, family, group.first)
        spared = {group.first, *group.seconds}
        for name in sorted(group.doors):
            door = by_name.get(name)
            if door is None:
                continue
            assert isinstance(door, KnockDoor)  # only knock doors form groups
            flags = iptables_flags(door.tcp_flags)
            # What the door would have taken as a knock (its TCP flags) or as a tripwire hit.
            rules = [
                RuleSpec("SET", p.proto, p.port, tcp_flags=flags if p.proto == "tcp" else None, del_set=started)
                for p in door.knock_ports
                if p.key not in spared
            ]
            steps = [p.key for p in door.knock_ports] + list(spared)
            for proto, first, last in door.tripwire_ranges:
                for span in _outside(first, last, [port for kind, port in steps if kind == proto]):
                    syn = SYN_ONLY if proto == "tcp" else None
                    rules.append(RuleSpec("SET", proto, span, ctstate="NEW", tcp_flags=syn, del_set=started))
            forget += [rule for rule in rules if rule not in forget]
    return forget


SET_KINDS = ("granted", "first-step", "sessions", "recent", "midway", "rotation", "rotation-first")


@dataclass(frozen=True)
class SetName:
    """The codec of nfknock's ipset names: name <-> (kind, daemon, family, port). Every set of one
    daemon (its queue_num) starts `nfknock-q<queue_num>-`, so that one daemon's pruning never
    touches another's; an ipset name has at most 31 characters, and these stay under 27.

    - granted: sources holding a grant (granted.py): `nfknock-q0-v4`;
    - first-step: sources that knocked a first step (first_steps.py), per first port (`key`):
      `nfknock-q0-tcp40000-v4`;
    - sessions: the host's established TCP sessions on one protected port (sessions.py; `key` is
      ("tcp", port)): `nfknock-q0-s22-v4`;
    - recent: sources whose packet reached a knock or SPA port's queue in the last RECENT_SECONDS:
      `nfknock-q0-recent-v4`;
    - midway: sources whose second step of a door the kernel records was queued, for the door's
      seq_timeout (later_steps.py): `nfknock-q0-midway-v4`;
    - rotation: the current steps of the rotating doors of one port range (`key`: its protocol
      and first port; later_steps.py, rotation_sets.py), port numbers: `nfknock-q0-rtcp20000-v4`;
      where the kernel records the range's first steps, only the second steps;
    - rotation-first: the current first steps of the rotating door of one port range whose
      first steps the kernel records (later_steps.py), port numbers: `nfknock-q0-rftcp20000-v4`.
      The sources that knocked one are in the first-step set keyed by the range's first port
      (`nfknock-q0-tcp20000-v4`: no knock door's first step can lie in a gated range)."""

    kind: str
    queue_num: int
    family: int
    key: tuple[str, int] | None = None  # first-step: the first port; sessions: the protected port

    def __post_init__(self) -> None:
        keyed = self.kind in ("first-step", "sessions", "rotation", "rotation-first")
        if (
            self.kind not in SET_KINDS
            or self.family not in (4, 6)
            or not 0 <= self.queue_num <= 65535
            or keyed != (self.key is not None)
            or (self.key is not None and (self.key[0] not in ("tcp", "udp") or not 0 <= self.key[1] <= 65535))
            or (self.kind == "sessions" and self.key is not None and self.key[0] != "tcp")
        ):
            raise ValueError(f"not an nfknock set: {self!r}")

    def __str__(self) -> str:
        middle = {
            "granted": "",
            "first-step": f"{self.key[0]}{self.key[1]}-" if self.key else "",
            "sessions": f"s{self.key[1]}-" if self.key else "",
            "recent": "recent-",
            "midway": "midway-",
            "rotation": f"r{self.key[0]}{self.key[1]}-" if self.key else "",
            "rotation-first": f"rf{self.key[0]}{self.key[1]}-" if self.key else "",
        }[self.kind]
        return f"{SET_PREFIX}q{self.queue_num}-{middle}v{self.family}"

    @classmethod
    def parse(cls, name: str) -> SetName | None:
        """The fields of an nfknock set's name; None for any other name (another program's set,
        or one no version of nfknock makes)."""
        found = _SET_NAME.fullmatch(name)
        if found is None:
            return None
        queue, proto, first, session, firsts, rproto, rfirst, recent, family = found.groups()
        if recent == "midway":
            return cls("midway", int(queue), int(family))
        if rproto is not None:
            try:
                kind = "rotation-first" if firsts else "rotation"
                return cls(kind, int(queue), int(family), (rproto, int(rfirst)))
            except ValueError:
                return None
        try:
            if proto is not None:
                return cls("first-step", int(queue), int(family), (proto, int(first)))
            if session is not None:
                return cls("sessions", int(queue), int(family), ("tcp", int(session)))
            return cls("recent" if recent else "granted", int(queue), int(family))
        except ValueError:  # a number out of range
            return None


_NUMBER = r"(0|[1-9][0-9]{0,4})"  # as str(int) writes it: a name has one spelling
_SET_NAME = re.compile(
    rf"{re.escape(SET_PREFIX)}q{_NUMBER}-(?:(tcp|udp){_NUMBER}-|s{_NUMBER}-|r(f?)(tcp|udp){_NUMBER}-|(recent|midway)-)?v([46])"
)


def granted_set(queue_num: int, family: int) -> str:
    """The ipset of sources holding a grant, for one daemon (its queue) and one family."""
    return str(SetName("granted", queue_num, family))


def first_step_set(queue_num: int, family: int, key: tuple[str, int]) -> str:
    """The ipset of sources that knocked a first step (first_steps.py), for one daemon and family."""
    return str(SetName("first-step", queue_num, family, key))


def sessions_set(queue_num: int, family: int, port: int) -> str:
    """The ipset of the host's established TCP sessions on one protected port (sessions.py):
    (client address, client port, local address), for one daemon and family."""
    return str(SetName("sessions", queue_num, family, ("tcp", port)))


def recent_set(queue_num: int, family: int) -> str:
    """The ipset of sources whose packet reached a knock or SPA port's queue in the last
    RECENT_SECONDS (a first-step set's kind: hash:ip, forceadd), for one daemon and family."""
    return str(SetName("recent", queue_num, family))


def midway_set(queue_num: int, family: int) -> str:
    """The ipset of sources mid-attempt at a door whose first step the kernel records (their
    second step was queued, later_steps.py; a first-step set's kind), for one daemon and family."""
    return str(SetName("midway", queue_num, family))


def rotation_set(queue_num: int, family: int, span: tuple[str, int, int]) -> str:
    """The ipset of the current steps of the rotating doors of port range `span` (port numbers,
    later_steps.py; filled by rotation_sets.py), for one daemon and family."""
    return str(SetName("rotation", queue_num, family, (span[0], span[1])))


def rotation_first_set(queue_num: int, family: int, span: tuple[str, int, int]) -> str:
    """The ipset of the current first steps of the rotating door of port range `span` whose
    first steps the kernel records (port numbers, later_steps.py; filled by rotation_sets.py)."""
    return str(SetName("rotation-first", queue_num, family, (span[0], span[1])))


def _rotating_rules(
    gated: later_steps.LaterSteps, queue_num: int, family: int, granted: str, pass_mark: int = PASS_MARK
) -> dict[tuple[str, int, int], list[RuleSpec]]:
    """The rules of the rotating ranges the kernel gates (later_steps.py): a packet to a current
    step is queued and its source is mid-attempt from then on; any other port of the range only
    from a source in the granted, midway or (a bucket of its own) recent set; the rest is dropped.
    Where the kernel records the range's first steps, see `_rotating_first_rules`."""
    midway, recent = midway_set(queue_num, family), recent_set(queue_num, family)
    first_in_kernel = dict(gated.rotating_first)
    rules = {}
    for span, timeout in gated.rotating:
        proto, first, last = span
        steps = rotation_set(queue_num, family, span)
        whole = RuleSpec("NFQUEUE", proto, (first, last), queue_num=queue_num)
        if span in first_in_kernel:
            rules[span] = _rotating_first_rules(
                span, timeout, first_in_kernel[span], queue_num, family, granted, pass_mark
            )
            continue
        rules[span] = [
            replace(whole, match_set=granted),
            RuleSpec("SET", proto, (first, last), match_set=steps, match_dirs="dst", add_set=(midway, timeout)),
            replace(whole, match_set=steps, match_dirs="dst"),
            replace(whole, match_set=midway),
            replace(whole, match_set=recent, limit=RECENT_LIMIT),
            RuleSpec("DROP", proto, (first, last)),
        ]
    return rules


def _rotating_first_rules(
    span: tuple[str, int, int],
    timeout: int,
    first_step: tuple[int, TcpFlags | None],
    queue_num: int,
    family: int,
    granted: str,
    pass_mark: int,
) -> list[RuleSpec]:
    """A gated rotating range whose door's current first steps the kernel records (later_steps.py),
    like a knock door's (`_first_step_rules`): a stranger's knock on a current first step only
    lands in the range's first-step set (for the door's seq_timeout) and is dropped; a knock on a
    current second step is queued, marked with MarkBits.rotating, only from a source in that set
    (and the mark spends the element: single use), which enters the midway set with it; a later
    step is queued only for a source mid-attempt, as any other port of the range;
    any knock on the range by a source in that set takes it out again first (a wrong knock, or a
    repeated first step that puts it back), as a knock there would have reset the attempt in the
    daemon. Sources granted, mid-attempt or (a bucket) recent are queued as before, unmarked.

    One set match per rule, so "a second step from a source in the set" is two rules: the mark
    says "in the set" (`started`), the queue rule matches the mark and the second-steps set; the
    mark is cleared again on whatever is not queued as a second step."""
    proto, first, last = span
    seq_timeout, tcp_flags = first_step
    ports = (first, last)
    mark = MarkBits(pass_mark).rotating
    clear = MarkBits(pass_mark).field | mark
    seconds = rotation_set(queue_num, family, span)  # the current second steps
    firsts = rotation_first_set(queue_num, family, span)
    started = first_step_set(queue_num, family, (proto, first))
    midway, recent = midway_set(queue_num, family), recent_set(queue_num, family)
    flags = iptables_flags(tcp_flags) if tcp_flags is not None and proto == "tcp" else None
    queue = RuleSpec("NFQUEUE", proto, ports, queue_num=queue_num)
    return [
        # All of them, whoever set them: on this range they are ours (MarkBits).
        RuleSpec("MARK", proto, ports, set_mark=(0, clear)),
        replace(queue, match_set=granted),
        RuleSpec("MARK", proto, ports, match_set=started, set_mark=(mark, mark)),
        RuleSpec("SET", proto, ports, tcp_flags=flags, del_set=started),
        RuleSpec(
            "SET", proto, ports, tcp_flags=flags, match_set=firsts, match_dirs="dst", add_set=(started, seq_timeout)
        ),
        RuleSpec("SET", proto, ports, mark=mark, match_set=seconds, match_dirs="dst", add_set=(midway, timeout)),
        replace(queue, mark=mark, match_set=seconds, match_dirs="dst"),
        RuleSpec("MARK", proto, ports, set_mark=(0, mark)),
        replace(queue, match_set=midway),
        RuleSpec("DROP", proto, ports, match_set=firsts, match_dirs="dst"),
        replace(queue, match_set=recent, limit=RECENT_LIMIT),
        RuleSpec("DROP", proto, ports),
    ]


def _later_step_rules(
    gated: later_steps.LaterSteps, queue_num: int, family: int, granted: str
) -> tuple[dict[tuple[str, int], list[RuleSpec]], dict[tuple[str, int, int], list[RuleSpec]]]:
    """The rules of the later-step ports and tripwire ranges the kernel gates (later_steps.py):
    queued from a source in the granted or midway set, or the recent set (a bucket of its own:
    a reload that moved a door into the kernel, a source that knocked within RECENT_SECONDS);
    a later step from anyone else is dropped, as the engine would have ignored it; a tripwire
    hit from anyone else is queued within TRIPWIRE_LIMIT, and beyond it goes on to the rest of
    the firewall (what a PASS verdict does), so no rule here drops a tripwire packet."""
    midway, recent = midway_set(queue_num, family), recent_set(queue_num, family)
    ports = {
        (proto, port): [
            RuleSpec("NFQUEUE", proto, port, queue_num=queue_num, match_set=granted),
            RuleSpec("NFQUEUE", proto, port, queue_num=queue_num, match_set=midway),
            RuleSpec("NFQUEUE", proto, port, queue_num=queue_num, match_set=recent, limit=RECENT_LIMIT),
            RuleSpec("DROP", proto, port),
        ]
        for proto, port in gated.ports
    }
    # No midway set without a door that feeds it (doors of two steps only: no attempt after the
    # second step); the rules must not name a set nothing creates.
    fed = bool(gated.feeding or gated.rotating)
    tripwires = {}
    for span in gated.tripwires:
        proto, first, last = span
        hit = RuleSpec(
            "NFQUEUE",
            proto,
            (first, last),
            ctstate="NEW",
            queue_num=queue_num,
            tcp_flags=SYN_ONLY if proto == "tcp" else None,
        )
        tripwires[span] = [
            replace(hit, match_set=granted),
            *([replace(hit, match_set=midway)] if fed else []),
            replace(hit, match_set=recent, limit=RECENT_LIMIT),
            replace(hit, limit=TRIPWIRE_LIMIT),
        ]
    return ports, tripwires


def _protected_rules(
    proto: str, port: int, queue_num: int, family: int, granted: str | None, pass_mark: int = PASS_MARK
) -> list[RuleSpec]:
    """One protected port: established traffic accepted, NEW connections queued (`granted`: the
    granted set; None in a family where no door of this port listens: nothing is queued, the
    port is only closed), a TCP packet that conntrack picks up mid-stream accepted only for a
    session the host has (sessions.py), the rest dropped."""
    specs = [RuleSpec("ACCEPT", proto, port, ctstate="RELATED,ESTABLISHED")]
    flags = SYN_ONLY if proto == "tcp" else None
    if granted is not None:
        specs += [
            RuleSpec(
                "NFQUEUE", proto, port, ctstate="NEW", queue_num=queue_num + 1, tcp_flags=flags, match_set=granted
            ),
            RuleSpec(
                "NFQUEUE",
                proto,
                port,
                ctstate="NEW",
                queue_num=queue_num,
                tcp_flags=flags,
                match_set=recent_set(queue_num, family),
                limit=RECENT_LIMIT,
            ),
            RuleSpec("NFQUEUE", proto, port, ctstate="NEW", queue_num=queue_num, tcp_flags=flags, limit=NEW_LIMIT),
        ]
    if proto == "tcp":
        sessions = sessions_set(queue_num, family, port)
        session = RuleSpec(
            "ACCEPT", proto, port, ctstate="NEW", tcp_flags=MID_STREAM, match_set=sessions, match_dirs=SESSION_DIRS
        )
        # Marked first, like every packet nfknock lets through: the host's base rule (tools/export.py)
        # lets marked packets past, and an ACCEPT here does not end the other tables' chains.
        specs += [replace(session, target="MARK", set_mark=(pass_mark, pass_mark)), session]
    specs.append(RuleSpec("DROP", proto, port))
    return specs


def scaffolding(
    doors: tuple[Door, ...],
    queue_num: int,
    pass_mark: int = PASS_MARK,
    family: int = 4,
    *,
    first_steps: FirstSteps,
    closed: tuple[tuple[str, int], ...] = (),
) -> list[RuleSpec]:
    """The chain for one family. New connections to a protected port from a source in the granted
    set go to the grant queue (queue_num + 1), which a flood of strangers never reaches; from
    anyone else at most NEW_LIMIT per second go to the main queue (so a client whose grant is not
    in the set yet still gets in on its first SYN), and the rest is dropped by the kernel: what
    the daemon would have dropped anyway. Either way the daemon decides every packet it sees.
    `first_steps`: what the kernel records (first_steps.decide, over all doors of all families).
    `closed`: ports that doors listening on other families protect; here they are only closed.

    The host's own connections (they arrive on `lo`, to 127.0.0.1, ::1 or any address of the
    host) are left to the rest of the firewall: a health check or a local port forward to the
    protected port keeps working, and nothing from outside arrives on `lo`."""
    if not doors and not closed:
        return []
    require(first_steps)
    groups = first_steps.groups
    granted = granted_set(queue_num, family)
    gated = later_steps.decide(doors, first_steps, family)
    midway = {first: (midway_set(queue_num, family), timeout) for first, timeout in gated.feeding}
    later, gated_tripwires = _later_step_rules(gated, queue_num, family, granted)
    rotating = _rotating_rules(gated, queue_num, family, granted, pass_mark)
    in_kernel = {**later, **_first_step_rules(groups, queue_num, pass_mark, family, granted, midway)}
    forget = _forgetting_rules(groups, doors, queue_num, family)
    protected = dict.fromkeys(p.key for door in doors for p in door.protect)
    knocks = dict.fromkeys(p.key for door in doors for p in door.knock_ports)
    knock_ranges = dict.fromkeys(r for door in doors for r in door.knock_ranges)
    tripwires = dict.fromkeys(r for door in doors for r in door.tripwire_ranges)
    specs: list[RuleSpec] = [RuleSpec("RETURN", in_interface="lo")]
    if tripwires:
        specs.append(RuleSpec("RETURN", mark=pass_mark))
    for proto, port in protected:
        specs += _protected_rules(proto, port, queue_num, family, granted, pass_mark)
    for proto, port in dict.fromkeys(closed):
        if (proto, port) not in protected:
            specs += _protected_rules(proto, port, queue_num, family, None, pass_mark)
    if knocks or knock_ranges or tripwires:
        # Not ours from here on: replies to the host's own connections from a knock port.
        specs.append(RuleSpec("RETURN", ctstate="RELATED,ESTABLISHED"))
    specs += forget
    knocking: list[RuleSpec] = []
    shaped = spa_ports(doors)
    for proto, port in knocks:
        knocking += in_kernel.get((proto, port)) or _knock_rules(
            proto, port, queue_num, family, (proto, port) in shaped
        )
    for proto, first, last in knock_ranges:
        knocking += rotating.get((proto, first, last)) or [
            RuleSpec("NFQUEUE", proto, (first, last), queue_num=queue_num)
        ]
    specs += _noting_recent(knocking, recent_set(queue_num, family))
    for proto, first, last in tripwires:
        if (proto, first, last) in gated_tripwires:
            specs += gated_tripwires[(proto, first, last)]
            continue
        specs.append(
            RuleSpec(
                "NFQUEUE",
                proto,
                (first, last),
                ctstate="NEW",
                queue_num=queue_num,
                tcp_flags=SYN_ONLY if proto == "tcp" else None,
            )
        )
    return specs


def spa_ports(doors: tuple[Door, ...]) -> frozenset[tuple[str, int]]:
    """The SPA doors' ports where the kernel queues only what can be an SPA packet (spa_shape.py)
    and drops the rest: every SPA port but one that a knock or rotating door also listens on
    (a step, a rotating range, a tripwire range), whose packets are that door's business too."""
    spa = {door.port.key for door in doors if isinstance(door, SpaDoor)}
    others = [door for door in doors if not isinstance(door, SpaDoor)]
    taken = {p.key for door in others for p in door.knock_ports}
    ranges = [r for door in others for r in (*door.knock_ranges, *door.tripwire_ranges)]
    return frozenset(
        (proto, port)
        for proto, port in spa
        if (proto, port) not in taken and not any(kind == proto and lo <= port <= hi for kind, lo, hi in ranges)
    )


def _knock_rules(proto: str, port: int, queue_num: int, family: int, spa: bool) -> list[RuleSpec]:
    """A knock port's queue rule; at an SPA port (`spa_ports`), only for what can be an SPA packet
    (one xt_u32 match: length, alphabet, first character), and the rest dropped by the kernel,
    so a junk flood never reaches the daemon's queue."""
    if not spa:
        return [RuleSpec("NFQUEUE", proto, port, queue_num=queue_num)]
    return [
        RuleSpec("NFQUEUE", proto, port, queue_num=queue_num, u32=spa_shape(proto, family)),
        RuleSpec("DROP", proto, port),
    ]


def _noting_recent(knocking: list[RuleSpec], recent: str) -> list[RuleSpec]:
    """Before each rule that queues a knock or SPA packet, the same match adds its source to the
    recent set. Why: the client's SYN follows its last knock or SPA packet within a millisecond,
    often before the daemon has read that packet, so the source is not in the granted set yet and
    its SYN would meet the strangers' limit, which a SYN flood at the protected port keeps empty.
    From a recent source it takes a bucket of its own to the *same* main queue, behind the
    packet that opens the door (one queue is first in, first out, and one worker owns both), and
    is judged after it. A flood must send a knock from each spoofed source first to compete for
    that bucket. First knocks the kernel records are not queued, and do not count."""
    out = []
    for spec in knocking:
        if spec.target == "NFQUEUE":
            out.append(replace(spec, target="SET", queue_num=None, add_set=(recent, RECENT_SECONDS)))
        out.append(spec)
    return out


# -- gateway doors (docs/gateway.md) -------------------------------------------------------------

FORWARD_CHAIN = "NFKNOCK-FWD"  # filter table, jumped to from FORWARD position 1
NAT_CHAIN = "NFKNOCK-NAT"  # nat table, jumped to from PREROUTING position 1


@dataclass(frozen=True)
class GatewayPlan:
    """The fixed scaffolding of gateway doors, per family: the FORWARD chain (destinations
    behind this host: established accepted, new connections queued, the rest dropped) and the
    nat chain (published ports: one DNAT each). Empty lists: no chain (and no jump)."""

    forward: dict[int, list[RuleSpec]]
    nat: dict[int, list[RuleSpec]]

    @property
    def empty(self) -> bool:
        return not any(self.forward.values()) and not any(self.nat.values())


class GatedPlan(dict[int, list[RuleSpec]]):
    """A Plan that also carries the gateway scaffolding (`gateway`). A plain Plan (a dict: the
    boot-time closed plan, a test's) says nothing about the gateway chains, and a backend leaves
    them as they are; a GatedPlan with an empty gateway removes them."""

    gateway: GatewayPlan


def gateway_plan(doors: tuple[Door, ...], queue_num: int, workers: int = 1) -> GatewayPlan:
    """The gateway scaffolding for `doors` (pure). Per destination, in the FORWARD chain and
    exactly as for a protected port of this host: RELATED/ESTABLISHED accepted (bulk traffic
    never reaches Python), a new connection (a SYN for TCP) queued (grant queue for a source in
    the granted set, the main queue under RECENT_LIMIT for a recent knocker and under NEW_LIMIT
    for anyone else), everything else to that
    destination dropped: a TCP packet conntrack picks up mid-stream too (a session the host
    forwards is not in a sessions set; after a conntrack flush its client reconnects). No rule
    has --queue-bypass: with no daemon, nothing new is forwarded. Published ports: a DNAT in
    PREROUTING for packets addressed to this host; the forwarded packet then has the
    destination's address and meets the same FORWARD rules, so the verdict decides who uses it."""
    forward: dict[int, list[RuleSpec]] = {4: [], 6: []}
    nat: dict[int, list[RuleSpec]] = {4: [], 6: []}
    seen: set[tuple[str, str, int]] = set()
    published: set[tuple[str, int, int]] = set()
    for door in doors:
        for dest in door.destinations:
            if dest.key in seen:
                continue
            seen.add(dest.key)
            family, host = dest.family, str(dest.host)
            address = f"{host}/{32 if family == 4 else 128}"
            flags = SYN_ONLY if dest.proto == "tcp" else None
            base = RuleSpec("ACCEPT", dest.proto, dest.port, chain=FORWARD_CHAIN, destination=address)
            granted = granted_set(queue_num, family)
            forward[family] += [
                replace(base, ctstate="RELATED,ESTABLISHED"),
                replace(
                    base, target="NFQUEUE", ctstate="NEW", tcp_flags=flags, queue_num=queue_num + 1, match_set=granted
                ),
                # A knocker's first SYN, often ahead of its grant in the set (see _noting_recent):
                # a bucket of its own, which the door's knock rules in INPUT fill (and create).
                replace(
                    base,
                    target="NFQUEUE",
                    ctstate="NEW",
                    tcp_flags=flags,
                    queue_num=queue_num,
                    match_set=recent_set(queue_num, family),
                    limit=RECENT_LIMIT,
                ),
                replace(base, target="NFQUEUE", ctstate="NEW", tcp_flags=flags, queue_num=queue_num, limit=NEW_LIMIT),
                replace(base, target="DROP"),
            ]
        for entry in door.publish:
            family = entry.to.family
            if (entry.port.proto, entry.port.port, family) in published:
                continue
            published.add((entry.port.proto, entry.port.port, family))
            host = str(entry.to.host) if family == 4 else f"[{entry.to.host}]"
            nat[family].append(
                RuleSpec(
                    "DNAT",
                    entry.port.proto,
                    entry.port.port,
                    chain=NAT_CHAIN,
                    dst_local=True,
                    to_destination=f"{host}:{entry.to.port}",
                )
            )
    return GatewayPlan({family: shard(specs, queue_num, family, workers) for family, specs in forward.items()}, nat)


def with_gateway(chains: Plan, gateway: GatewayPlan) -> GatedPlan:
    """`chains` (plan()'s) carrying `gateway`."""
    gated = GatedPlan(chains)
    gated.gateway = gateway
    return gated
