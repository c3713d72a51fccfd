"""Noticing when another program removes or alters nfknock's scaffolding, and putting it back fast.

Why: the promise "no port opens without a grant" lives in a chain in the kernel, and nfknock is
not the only writer of the ruleset: `nft flush ruleset` (every nftables.service reload), an
admin's `iptables -F INPUT`, `iptables-restore` of a file saved before nfknock started. Each of
them opens the protected ports to everyone until the scaffolding is back. This module is the
kernel side of the watch; nfknock/daemon/guard.py decides and logs.

nf_tables (the nft backend): the kernel announces every committed change on netlink (group
NFNLGRP_NFTABLES), one message per object and a NEWGEN message that ends each transaction and
names the process that made it. `NftEvents` is a non-blocking socket the daemon's select waits
on; `changes()` drains it and returns what touched our chain, our INPUT jump or the filter table
in a transaction that was not ours (our own repairs run in child processes whose pids we know).
The repair goes through one long-lived `iptables-nft-restore --noflush` per family (`Restorer`),
fed over a pipe, whose commit is known by its pid: ~1.6 ms for one family, ~3 ms for both, where
a fork of the same tool per repair took ~9 and ~17 ms (its start and extension loading). What it
cannot beat is the kernel: after a transaction that deleted rules, nf_tables holds the ruleset's
lock for one RCU grace period when the deleting process closes its socket (nft_rcv_nl_event,
seen in the repair's kernel stack), and adding an iptables match it runs through its xtables
layer waits for the same grace period: 8-15 ms here on 2 loaded cores (repair_script).

Legacy x_tables announce nothing. `LegacyProbe` reads the filter table with the getsockopt
calls iptables itself uses (IPT_SO_GET_INFO + IPT_SO_GET_ENTRIES; per-rule counters zeroed):
its header in one system call, all of it in ~100 us; and it watches the xtables lock file with
inotify, which every iptables-legacy command opens and closes around its change, so most
changes wake the loop at once instead of at the next look. The repair goes through a
long-lived `iptables-legacy-restore` per family, like the nft one (1-2 ms).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

from .nft import TOOLS, describe_failure, restore_script
from .plan import CHAIN, FORWARD_CHAIN, NAT_CHAIN, RuleSpec

# -- nf_tables notifications ---------------------------------------------------------------

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NFT_MSG_DELTABLE, NFT_MSG_DELCHAIN, NFT_MSG_NEWRULE, NFT_MSG_DELRULE, NFT_MSG_NEWGEN = 2, 5, 6, 8, 15
NFT_MSG_DESTROYTABLE, NFT_MSG_DESTROYCHAIN, NFT_MSG_DESTROYRULE = 26, 27, 28  # newer kernels' deletes
FAMILIES = {2: 4, 10: 6}  # NFPROTO_IPV4, NFPROTO_IPV6 -> our family numbers
TABLE = "filter"
RCVBUF = 8 << 20  # a flush of a large ruleset is one message per rule: room for it
# The jump from INPUT, as a verdict attribute in a rule's expressions: NFTA_VERDICT_CHAIN "NFKNOCK".
_JUMP_ATTR = struct.pack("=HH", 4 + len(CHAIN) + 1, 2) + CHAIN.encode() + b"\0"
# The gateway doors' chains (docs/gateway.md): (table, chain) -> the built-in chain that jumps to it.
GATEWAY = {("filter", FORWARD_CHAIN): "FORWARD", ("nat", NAT_CHAIN): "PREROUTING"}


def _jump_attr(chain: str) -> bytes:
    return struct.pack("=HH", 4 + len(chain) + 1, 2) + chain.encode() + b"\0"


@dataclass(frozen=True)
class Damage:
    """What a transaction (or a look at the table) found broken in one family."""

    family: int
    what: str  # for the log: "table filter deleted", "NFKNOCK flushed or altered", ...
    chain: bool  # our chain's content is gone or changed
    jump: bool  # the jump from INPUT is gone
    gateway: str = ""  # the gateway chain (NFKNOCK-FWD, NFKNOCK-NAT) gone or changed, or whose jump is gone


@dataclass(frozen=True)
class Changes:
    damage: tuple[Damage, ...]
    by: str  # "pid 1234 (nft)": who committed it, when the kernel said
    lost: bool = False  # the socket overflowed: what changed is unknown, assume the worst


def _attrs(data: bytes, offset: int = 0):
    """(type, payload) of each netlink attribute in `data` from `offset`."""
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            return
        yield kind & 0x3FFF, data[offset + 4 : offset + length]
        offset += (length + 3) & ~3


def _text(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode(errors="replace")


def parse_messages(data: bytes, own_pids: set[int]) -> tuple[list[Damage], list[str], bool, list[int]]:
    """The damage in the complete transactions in `data` (a recv's worth of netlink messages),
    the committers named, whether the last transaction is still open (no NEWGEN yet), and the
    pids that committed. Transactions committed by `own_pids` are skipped."""
    found: list[Damage] = []
    batch: list[Damage] = []
    who: list[str] = []
    committed: list[int] = []
    offset = 0
    while offset + NLMSG_HDR.size <= len(data):
        length, kind, _, _, portid = NLMSG_HDR.unpack_from(data, offset)
        if length < NLMSG_HDR.size:
            break
        body = data[offset + NLMSG_HDR.size + 4 : offset + length]  # after the nfgenmsg
        family = FAMILIES.get(data[offset + NLMSG_HDR.size]) if length > NLMSG_HDR.size else None
        offset += (length + 3) & ~3
        if kind >> 8 != NFNL_SUBSYS_NFTABLES:
            continue
        msg = kind & 0xFF
        if msg == NFT_MSG_NEWGEN:
            attrs = dict(_attrs(body))
            pid = struct.unpack(">I", attrs[2])[0] if 2 in attrs and len(attrs[2]) == 4 else None
            # The kernel names the committer by its pid in the initial pid namespace, and the
            # message header carries the committer's netlink port id, which a socket that bound
            # itself gets from its pid as its own namespace sees it: in a container only the
            # second matches the pid we know our restore helper by.
            ids = {pid, portid} - {None, 0}
            committed += sorted(ids)
            if not ids & own_pids and batch:
                found += batch
                name = _text(attrs.get(3, b""))
                who.append(f"pid {pid} ({name})" if pid is not None else "an unnamed process")
            batch = []
            continue
        if family is None:
            continue
        damage = _damage(msg, family, dict(_attrs(body)))
        if damage is not None:
            batch.append(damage)
    return found, who, bool(batch), committed


def _damage(msg: int, family: int, attrs: dict[int, bytes]) -> Damage | None:
    gateway = _gateway_damage(msg, family, attrs)
    if gateway is not None:
        return gateway
    if msg in (NFT_MSG_DELTABLE, NFT_MSG_DESTROYTABLE):
        if _text(attrs.get(1, b"")) == TABLE:
            return Damage(family, f"table {TABLE} deleted", chain=True, jump=True)
        return None
    if _text(attrs.get(1, b"")) != TABLE:
        return None
    if msg in (NFT_MSG_DELCHAIN, NFT_MSG_DESTROYCHAIN):
        name = _text(attrs.get(3, b""))
        if name == CHAIN:
            return Damage(family, f"chain {CHAIN} deleted", chain=True, jump=True)
        if name == "INPUT":
            return Damage(family, "chain INPUT deleted", chain=False, jump=True)
        return None
    if msg in (NFT_MSG_NEWRULE, NFT_MSG_DELRULE, NFT_MSG_DESTROYRULE):
        chain = _text(attrs.get(2, b""))
        if chain == CHAIN:
            return Damage(family, f"rules of {CHAIN} changed", chain=True, jump=False)
        if chain == "INPUT" and msg != NFT_MSG_NEWRULE and _JUMP_ATTR in attrs.get(4, b""):
            return Damage(family, f"the jump from INPUT to {CHAIN} deleted", chain=False, jump=True)
    return None


def _gateway_damage(msg: int, family: int, attrs: dict[int, bytes]) -> Damage | None:
    """A change to a gateway chain or to the jump to it: the nat table deleted, a gateway chain
    deleted or its rules changed, the jump from FORWARD or PREROUTING deleted. (The filter
    table's deletion is the main chain's damage, whose repair puts the gateway chains back too.)
    Whether the plan has such a chain at all is the guard's business."""
    table = _text(attrs.get(1, b""))
    if msg in (NFT_MSG_DELTABLE, NFT_MSG_DESTROYTABLE):
        return Damage(family, "table nat deleted", False, False, gateway=NAT_CHAIN) if table == "nat" else None
    for (where, chain), builtin in GATEWAY.items():
        if table != where:
            continue
        if msg in (NFT_MSG_DELCHAIN, NFT_MSG_DESTROYCHAIN) and _text(attrs.get(3, b"")) in (chain, builtin):
            return Damage(family, f"chain {_text(attrs.get(3, b''))} deleted", False, False, gateway=chain)
        if msg in (NFT_MSG_NEWRULE, NFT_MSG_DELRULE, NFT_MSG_DESTROYRULE):
            name = _text(attrs.get(2, b""))
            if name == chain:
                return Damage(family, f"rules of {chain} changed", False, False, gateway=chain)
            if name == builtin and msg != NFT_MSG_NEWRULE and _jump_attr(chain) in attrs.get(4, b""):
                return Damage(family, f"the jump from {builtin} to {chain} deleted", False, False, gateway=chain)
    return None


class NftEvents:
    """A netlink socket subscribed to nf_tables' change notifications, non-blocking: the daemon's
    select waits on `fileno()`, and `changes()` drains it without blocking."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            self.sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.own_pids: set[int] = set()
        self._partial = b""  # messages of a transaction whose NEWGEN has not been read yet
        self._found: list[Damage] = []  # read while waiting for our own commit, not reported yet
        self._who: list[str] = []
        self._lost = False

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def pending(self) -> bool:
        """Changes were read (while waiting for a commit of ours) and not reported yet."""
        return bool(self._found) or self._lost

    def _read(self) -> list[int]:
        """Drain the socket; keep what others broke; return the pids that committed, once per
        transaction."""
        data = self._partial
        while True:
            try:
                data += self.sock.recv(1 << 20)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self._lost, data = True, b""  # the kernel dropped notifications: assume the worst
        found, who, open_batch, committed = parse_messages(data, self.own_pids)
        self._partial = _open_tail(data) if open_batch else b""
        self._found += found
        self._who += who
        return committed

    def changes(self) -> Changes | None:
        """What other programs broke since the last call (None: nothing of ours)."""
        self._read()
        found, who, lost = self._found, self._who, self._lost
        self._found, self._who, self._lost = [], [], False
        if lost:
            everything = tuple(Damage(f, "notifications lost (socket overflow)", True, True) for f in (4, 6))
            return Changes(everything, "unknown", lost=True)
        if not found:
            return None
        return Changes(tuple(found), ", ".join(dict.fromkeys(who)))

    def wait_for(self, pids: set[int], timeout: float, alive: Callable[[int], bool] = lambda pid: True) -> set[int]:
        """Wait until each of `pids` has committed a transaction; returns those that did not
        within `timeout` seconds, or ended first (`alive`). What others change meanwhile is
        kept for `changes()`."""
        waiting = set(pids)
        deadline = time.monotonic() + timeout
        while waiting:
            waiting -= set(self._read())
            left = deadline - time.monotonic()
            if not waiting or left <= 0 or not all(alive(pid) for pid in waiting):
                break
            select.select([self.sock], [], [], min(left, 0.01))
        return waiting

    def discard(self) -> None:
        """Forget what is waiting: after a change of our own made by a process we did not name."""
        self._partial, self._found, self._who, self._lost = b"", [], [], False
        while True:
            try:
                self.sock.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise

    def close(self) -> None:
        self.sock.close()


def _open_tail(data: bytes) -> bytes:
    """The messages after the last NEWGEN (a transaction still being read)."""
    offset, tail = 0, 0
    while offset + NLMSG_HDR.size <= len(data):
        length, kind = NLMSG_HDR.unpack_from(data, offset)[:2]
        if length < NLMSG_HDR.size:
            break
        offset += (length + 3) & ~3
        if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
            tail = offset
    return data[tail:]


def jump_rule(interface: str | None) -> str:
    return f"-A INPUT{f' -i {interface}' if interface else ''} -j {CHAIN}"


PRIORITY = -10  # nice value of the Restorer processes


def _running(restorers: dict[int, Restorer], pid: int) -> bool:
    return restorers[pid].running


class Restorer:
    """A long-lived `iptables-nft-restore --noflush` (one per family), fed over a pipe: it commits
    each COMMIT as it reads it, with its extensions already loaded and no fork, so a repair of
    our chain took ~1.6 ms for one family and ~3 ms for both here, against ~9 and ~17 ms for a
    fork of the same tool per repair (33 rules a family, the seed door). Its commits are known
    by its pid in the NEWGEN notification. If it dies (a script it refused, for one), it says
    why on stderr and the next repair starts another."""

    def __init__(self, family: int, tool: str | None = None):
        self.family = family
        self.tool = tool or TOOLS[family][1]
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send(self, script: str) -> int:
        """Write one transaction; returns the pid whose commit to wait for. Raises OSError when
        the process cannot be started or its pipe is broken."""
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen(
                [self.tool, "--noflush", "--wait"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:  # a repair is a race against every stranger's SYN: let it run first
                os.setpriority(os.PRIO_PROCESS, self.process.pid, PRIORITY)
            except OSError:
                pass
        assert self.process.stdin is not None
        self.process.stdin.write(script)
        self.process.stdin.flush()
        return self.process.pid

    def failure(self) -> str:
        """Why the last transaction was not committed (the process ended, or did not answer)."""
        process, self.process = self.process, None
        if process is None:
            return f"{self.tool} did not start"
        if process.poll() is None:
            process.kill()
            process.wait()
            return f"{self.tool} did not commit within the time allowed"
        stderr = process.stderr.read() if process.stderr is not None else ""
        return describe_failure(self.tool, process.returncode, stderr or "")

    def close(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            for stream in (process.stdin, process.stderr):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def repair_script(
    specs: list[RuleSpec], hurt: Damage, interface: str | None, protected: Iterable[tuple[str, int]] = ()
) -> list[str]:
    """The restore input that undoes `hurt`, one transaction after the other. Only the jump gone
    (`iptables -F INPUT`): the jump alone. Our chain's content gone or changed: the chain
    declared (created or emptied) and refilled, the jump inserted where it went and re-placed
    where it is still there.

    With `protected` ports (nf_tables), a refill is two transactions. nf_tables runs each
    iptables match or target it has no expression of its own for (the sets, NFQUEUE, conntrack)
    through its xtables compatibility layer, and adding one first waits for the kernel to free
    the rules just deleted: one RCU grace period (seen: 8-15 ms here, under load), while the
    port is open. So the first transaction closes the protected ports with native expressions
    only (port and protocol, drop: ~0.6 ms), and the second replaces it with the whole chain.
    Meanwhile every packet to a protected port is dropped, an established session's too (TCP
    resends it), and so is a knock: closed, for the length of one grace period."""
    jump = f"-I INPUT 1{f' -i {interface}' if interface else ''} -j {CHAIN}"
    if not hurt.chain:
        return [f"*filter\n{jump}\nCOMMIT\n"]
    protected = sorted(set(protected))
    if not protected:
        return [restore_script(specs, [] if hurt.jump else [jump_rule(interface)], True, interface)]
    closing = ["*filter", f":{CHAIN} - [0:0]"]
    closing += [f"-A {CHAIN} -p {proto} -m {proto} --dport {port} -j DROP" for proto, port in protected]
    if hurt.jump:
        closing.append(jump)
    closing.append("COMMIT")
    return ["\n".join(closing) + "\n", restore_script(specs, [jump_rule(interface)], True, interface)]


def nft_repair(
    restorers: dict[int, Restorer],
    events: NftEvents,
    specs_by_family: dict[int, list[RuleSpec]],
    damage: dict[int, Damage],
    interface: str | None,
    protected: Iterable[tuple[str, int]] = (),
    closed: Callable[[], None] = lambda: None,
    timeout: float = 1.0,
) -> list[str]:
    """Put our chain back in each damaged family through its Restorer and wait for the commits:
    every family's first transaction (repair_script) before any second one, since each
    transaction holds the ruleset's lock while it waits, and a second one would hold up another
    family's closing one. `closed` is called once the protected ports are closed again.
    Returns the failures (empty: all back)."""
    protected = list(protected)
    scripts = {
        family: repair_script(specs_by_family.get(family) or [], hurt, interface, protected)
        for family, hurt in damage.items()
    }
    failures: dict[int, str] = {}
    for phase in range(max(len(steps) for steps in scripts.values())):
        waiting: dict[int, int] = {}
        for family, steps in scripts.items():
            if phase >= len(steps) or family in failures:
                continue
            restorer = restorers.setdefault(family, Restorer(family))
            try:
                pid = restorer.send(steps[phase])
            except OSError as exc:
                failures[family] = f"IPv{family}: {restorer.tool}: {exc.strerror or exc}"
                restorer.failure()
                continue
            events.own_pids.add(pid)
            waiting[family] = pid
        running = {pid: restorers[family] for family, pid in waiting.items()}
        missing = events.wait_for(set(running), timeout, partial(_running, running))
        for family, pid in waiting.items():
            if pid in missing:
                failures[family] = f"IPv{family}: {restorers[family].failure()}"
        if phase == 0:
            closed()
    return [failures[family] for family in sorted(failures)]


# -- legacy x_tables -------------------------------------------------------------------------

SOL_IP, SOL_IPV6 = 0, 41
SO_GET_INFO, SO_GET_ENTRIES = 64, 65  # IPT_ and IP6T_ alike
INFO = struct.Struct("=32sI5I5III")  # name, valid_hooks, hook_entry, underflow, num_entries, size
ENTRIES_HEADER = 40  # struct ipt_get_entries: name[32], size, then 8-aligned entries
# Where, in struct ipt_entry / ip6t_entry, a rule's target_offset (next_offset follows it), its
# comefrom (the hooks that reach it) and its packet and byte counters sit: the last two change
# with traffic and with jumps elsewhere, not with the rule.
LAYOUT = {4: (88, 90, 92, 96), 6: (140, 142, 144, 152)}
COUNTERS = 16
TARGET_HEADER = 32  # struct xt_entry_target: target_size, name[29], revision; then its data
LOCAL_IN = 1  # NF_INET_LOCAL_IN: INPUT's place in hook_entry and underflow
HOOKS = {"PREROUTING": 0, "INPUT": LOCAL_IN, "FORWARD": 2}  # NF_INET_PRE_ROUTING, ..., NF_INET_FORWARD
LEGACY_RESTORE = {4: "iptables-legacy-restore", 6: "ip6tables-legacy-restore"}
LOCK_FILE = os.environ.get("XTABLES_LOCKFILE", "/run/xtables.lock")
IN_CLOSE = 0x08 | 0x10  # IN_CLOSE_WRITE | IN_CLOSE_NOWRITE
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


@dataclass(frozen=True)
class LegacyView:
    """One family's legacy filter table as far as nfknock cares: the whole of it (to tell that
    anything changed), our chain's rules and the jumps from INPUT to it."""

    table: bytes  # every rule, packet counters and reachability marks zeroed
    chain: bytes | None  # our chain's rules, the same way (None: no such chain)
    jumps: int  # rules in INPUT that jump to our chain
    info: bytes = b""  # the table's header (LegacyProbe.info)


class LegacyProbe:
    """Reads each family's legacy filter table as iptables does (two getsockopt calls on a raw
    socket: root), without python-iptables, whose parse of our chain alone took ~5 ms here."""

    def __init__(self) -> None:
        self._socks = {4: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)}
        try:
            self._socks[6] = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        except OSError:
            pass  # no IPv6: no IPv6 table either
        self._inotify = -1
        self._open_inotify()

    def _open_inotify(self) -> None:
        try:
            fd = os.open(LOCK_FILE, os.O_CREAT | os.O_RDONLY | os.O_CLOEXEC, 0o600)  # as iptables does
            os.close(fd)
        except OSError:
            return
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            return
        if _libc.inotify_add_watch(fd, LOCK_FILE.encode(), IN_CLOSE) < 0:
            os.close(fd)
            return
        self._inotify = fd

    def fileno(self) -> int | None:
        """The inotify descriptor on the xtables lock file (None: polling only)."""
        return self._inotify if self._inotify >= 0 else None

    def drain(self) -> bool:
        """Read the lock file's events; True if there were any (an iptables command ran)."""
        seen = False
        if self._inotify >= 0:
            try:
                while os.read(self._inotify, 4096):
                    seen = True
            except BlockingIOError:
                pass
        return seen

    def info(self, family: int, table: str = "filter") -> bytes | None:
        """The table's header alone (where each hook's rules start and end, how many rules, how
        many bytes): one system call, ~10 us; None: no legacy filter table. Most changes change
        it; a rule replaced by one of the same size does not (`view` sees that)."""
        sock = self._socks.get(family)
        if sock is None:
            return None
        level = SOL_IP if family == 4 else SOL_IPV6
        info = ctypes.create_string_buffer(INFO.pack(table.encode(), 0, *[0] * 5, *[0] * 5, 0, 0), INFO.size)
        if not _getsockopt(sock.fileno(), level, SO_GET_INFO, info):
            return None
        return info.raw

    def view(
        self, family: int, table: str = "filter", chain: str = CHAIN, hook: int | None = None
    ) -> LegacyView | None:
        """The table as the kernel has it now (None: no such legacy table); `chain`: whose rules
        and jumps from the built-in chain of `hook` (LOCAL_IN: INPUT) to report."""
        sock = self._socks.get(family)
        raw = self.info(family, table)
        if sock is None or raw is None:
            return None
        level = SOL_IP if family == 4 else SOL_IPV6
        fields = INFO.unpack(raw)
        hook_entry, underflow, size = fields[2:7], fields[7:12], fields[-1]
        entries = ctypes.create_string_buffer(ENTRIES_HEADER + size)
        struct.pack_into("=32sI", entries, 0, table.encode(), size)
        if not _getsockopt(sock.fileno(), level, SO_GET_ENTRIES, entries):
            return None  # the table changed between the two calls: the next look sees it
        hook = LOCAL_IN if hook is None else hook
        return read_table(family, entries.raw[ENTRIES_HEADER:], hook_entry[hook], underflow[hook], raw, chain)

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        if self._inotify >= 0:
            os.close(self._inotify)
            self._inotify = -1


def read_table(
    family: int, raw: bytes, input_first: int, input_last: int, info: bytes = b"", name: str = CHAIN
) -> LegacyView:
    """Walk the rules of a table (struct ipt_entry / ip6t_entry, each followed by its matches and
    its target): zero what traffic and reachability change, find our chain (its rules follow an
    ERROR target that names it, up to the next ERROR target: the next chain's head or the end)
    and count the rules of INPUT whose standard target jumps to our chain's first rule."""
    blob = bytearray(raw)
    target_at, _, comefrom, counters = LAYOUT[family]
    heads: list[tuple[int, str, int]] = []  # (offset of an ERROR entry, its name, the next rule's offset)
    verdicts: list[tuple[int, int]] = []  # (offset of a rule, where its standard target goes)
    offset = 0
    while offset + counters + COUNTERS <= len(blob):
        blob[offset + comefrom : offset + comefrom + 4] = bytes(4)
        blob[offset + counters : offset + counters + COUNTERS] = bytes(COUNTERS)
        target, step = struct.unpack_from("=HH", blob, offset + target_at)
        kind = bytes(blob[offset + target + 2 : offset + target + 31]).split(b"\0", 1)[0]
        data = offset + target + TARGET_HEADER
        if kind == b"ERROR":
            heads.append((offset, _text(bytes(blob[data : data + 32])), offset + step))
        elif kind == b"" and data + 4 <= len(blob):
            verdicts.append((offset, struct.unpack_from("=i", blob, data)[0]))
        if step == 0:
            break
        offset += step
    chain: bytes | None = None
    jumps = 0
    for index, (_, chain_name, first) in enumerate(heads):
        if chain_name == name:
            end = heads[index + 1][0] if index + 1 < len(heads) else len(blob)
            chain = bytes(blob[first:end])
            jumps = sum(1 for at, verdict in verdicts if input_first <= at <= input_last and verdict == first)
            break
    return LegacyView(bytes(blob), chain, jumps, info)


def legacy_repair(
    restorers: dict[int, Restorer],
    probe: LegacyProbe,
    specs_by_family: dict[int, list[RuleSpec]],
    damage: dict[int, Damage],
    interface: str | None,
    expected: dict[int, bytes | None],
    timeout: float = 1.0,
) -> list[str]:
    """Put our chain back in each damaged family through a long-lived `iptables-legacy-restore
    --noflush --wait` (it takes the xtables lock for each table it reads and lets it go at the
    table's COMMIT), all families at once. Legacy tables announce nothing, so the commit is
    seen by reading the table until our chain is `expected` (its rules as the daemon left them)
    and jumped to. A fork of the same tool per repair took ~5 ms here, python-iptables ~10, this
    1-2 ms."""
    waiting: dict[int, Restorer] = {}
    failures: dict[int, str] = {}
    for family, hurt in damage.items():
        restorer = restorers.setdefault(family, Restorer(family, LEGACY_RESTORE[family]))
        try:
            restorer.send("".join(repair_script(specs_by_family.get(family) or [], hurt, interface)))
        except OSError as exc:
            failures[family] = f"IPv{family}: {restorer.tool}: {exc.strerror or exc}"
            restorer.failure()
            continue
        waiting[family] = restorer
    deadline = time.monotonic() + timeout
    while waiting:
        for family in list(waiting):
            view = probe.view(family)
            if view is not None and view.jumps > 0 and view.chain is not None and view.chain == expected.get(family):
                del waiting[family]
            elif not waiting[family].running or time.monotonic() > deadline:
                failures[family] = f"IPv{family}: {waiting.pop(family).failure()}"
        if waiting:
            time.sleep(0.0002)
    return [failures[family] for family in sorted(failures)]


def _getsockopt(fd: int, level: int, option: int, buffer) -> bool:
    length = ctypes.c_uint(len(buffer))
    return _libc.getsockopt(fd, level, option, buffer, ctypes.byref(length)) == 0
