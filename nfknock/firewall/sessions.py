"""The host's established TCP sessions on protected ports, as the kernel's sessions sets.

Why: after a conntrack flush (or when nfknock first starts on a host whose conntrack never saw a
session), the next packet of a live SSH session reaches our chain as a NEW mid-stream ACK. It
must pass, or every admin's session dies. But an ACK that reaches a *listener* is checked as a
SYN cookie, and a valid cookie opens a connection that no SYN nfknock judged ever asked for: a
stranger that may send ACKs to a protected port can brute-force its way in (issue: about 2^29
guesses). So the chain accepts such an ACK only when it belongs, exactly, to a session the host
has: (client address, client port, local address) in the port's sessions set, a `hash:ip,port,ip`
ipset per protected TCP port and family. That ACK then reaches its own socket, never a listener.

The sets are filled from the sockets themselves (/proc/net/tcp and tcp6 of this network
namespace, past the handshake: a connection the kernel is still setting up is not a session), by
the daemon, before its rules go in and then every SYNC_EVERY seconds. Elements carry a timeout
(SESSION_TIMEOUT, refreshed while the socket lives), so with no daemon they age out: closed. A
session younger than one sync that loses its conntrack entry is dropped; its client reconnects.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ..errors import FirewallError
from .granted import _restore as restore
from .plan import SESSION_DIRS, Plan, SetName

SYNC_EVERY = 5.0  # seconds between looks at the host's sockets
REFRESH_EVERY = 30.0  # seconds between re-writes of every element's timeout
SESSION_TIMEOUT = 120  # seconds an element outlives the last look that saw its socket
MAX_ELEMENTS = 65536
PROC = {4: Path("/proc/net/tcp"), 6: Path("/proc/net/tcp6")}

# Socket states (include/net/tcp_states.h) of a connection past its handshake, not yet gone:
# ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING. Not SYN_RECV (a handshake
# the kernel has not completed: a revoked grant's, for one), TIME_WAIT, LISTEN.
OPEN_STATES = frozenset({0x01, 0x04, 0x05, 0x08, 0x09, 0x0B})

Element = tuple[str, int, str]  # client address, client port, local address
SetKey = tuple[int, int]  # family, protected TCP port


def session_sets(plan: Plan) -> dict[str, SetKey]:
    """The sessions sets the plan's rules refer to, with the family and port each one is for."""
    return {
        spec.match_set: (family, spec.dport)
        for family, specs in plan.items()
        for spec in specs
        if spec.match_dirs == SESSION_DIRS and spec.match_set and isinstance(spec.dport, int)
    }


def _address(hex_text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp* writes it: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_text)
    return ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))


def open_sessions(text: str, ports: Iterable[int]) -> Iterator[tuple[int, int, Element]]:
    """(family, local port, element) for each connection in a /proc/net/tcp or tcp6 table whose
    local port is one of `ports` and whose state is past the handshake. An IPv4 client on a
    dual-stack socket (::ffff:a.b.c.d in tcp6) is an IPv4 session: that is how its packets arrive."""
    wanted = set(ports)
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4:
            continue
        try:
            local, remote, state = fields[1], fields[2], int(fields[3], 16)
            local_hex, local_port = local.split(":")
            remote_hex, remote_port = remote.split(":")
            port = int(local_port, 16)
            if port not in wanted or state not in OPEN_STATES:
                continue
            mine, peer = _address(local_hex), _address(remote_hex)
        except ValueError:
            continue
        if isinstance(mine, ipaddress.IPv6Address) and mine.ipv4_mapped and isinstance(peer, ipaddress.IPv6Address):
            if peer.ipv4_mapped is None:
                continue
            mine, peer = mine.ipv4_mapped, peer.ipv4_mapped
        yield mine.version, port, (str(peer), int(remote_port, 16), str(mine))


def read_sessions(ports: Iterable[int], tables: dict[int, Path] = PROC) -> dict[SetKey, set[Element]]:
    """The open sessions on these local TCP ports, per (family, port), from this namespace's
    socket tables (a table that cannot be read, IPv6 disabled for one, holds none)."""
    ports = set(ports)
    found: dict[SetKey, set[Element]] = {}
    if not ports:
        return found
    for path in tables.values():
        try:
            text = path.read_text()
        except OSError:
            continue
        for family, port, element in open_sessions(text, ports):
            found.setdefault((family, port), set()).add(element)
    return found


def _element(element: Element) -> str:
    client, port, local = element
    return f"{client},tcp:{port},{local}"


def _create_lines(sets: dict[str, SetKey]) -> list[str]:
    return [
        f"create {name} hash:ip,port,ip family {'inet' if family == 4 else 'inet6'} "
        f"timeout {SESSION_TIMEOUT} maxelem {MAX_ELEMENTS} -exist"
        for name, (family, _) in sets.items()
    ]


def create_session_sets(plan: Plan, runner: Callable = subprocess.run) -> None:
    """Create the sessions sets the plan refers to (kept as they are when they exist)."""
    lines = _create_lines(session_sets(plan))
    if lines:
        error = restore(runner, lines)
        if error:
            raise FirewallError(f"cannot create the sessions sets: {error} (is the 'ipset' package installed?)")


class SessionSets:
    """Keeps the sessions sets equal to the host's open sessions (one process does this: the
    daemon, or with workers its supervisor). `sync` adds what is new and deletes what closed;
    every REFRESH_EVERY seconds it re-adds everything, which renews the elements' timeouts."""

    def __init__(
        self,
        runner: Callable = subprocess.run,
        reader: Callable[[Iterable[int]], dict[SetKey, set[Element]]] = read_sessions,
    ):
        self.runner = runner
        self.reader = reader
        self.written: dict[str, set[Element]] = {}
        self.refreshed: float | None = None

    def sync(self, plan: Plan, now: float) -> None:
        """Bring the plan's sessions sets up to date (creating any that is missing). Raises
        FirewallError if `ipset restore` refuses: the caller decides whether that is fatal."""
        sets = session_sets(plan)
        if not sets:
            self.written = {}
            return
        found = self.reader({port for _, port in sets.values()})
        refresh = self.refreshed is None or now - self.refreshed >= REFRESH_EVERY
        lines = _create_lines(sets) if refresh else []
        written: dict[str, set[Element]] = {}
        for name, key in sets.items():
            now_open = found.get(key, set())
            before = self.written.get(name, set())
            adding = now_open if refresh else now_open - before
            lines += [f"add {name} {_element(e)} timeout {SESSION_TIMEOUT} -exist" for e in sorted(adding)]
            lines += [f"del {name} {_element(e)} -exist" for e in sorted(before - now_open)]
            written[name] = now_open
        if lines:
            error = restore(self.runner, lines)
            if error:
                raise FirewallError(f"cannot update the sessions sets: {error}")
        self.written = written
        if refresh:
            self.refreshed = now


def prune_session_sets(queue_num: int, plan: Plan, runner: Callable = subprocess.run) -> list[str]:
    """Destroy this daemon's sessions sets that the plan no longer refers to (after it is applied,
    so no rule uses them): a port no door protects any more. Returns their names; raises
    FirewallError naming what could not be destroyed."""
    wanted = session_sets(plan)
    try:
        listed = runner(["ipset", "list", "-n"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise FirewallError(f"ipset: {exc}") from None
    stale = [
        name
        for name in listed.stdout.split()
        if (fields := SetName.parse(name)) and fields.kind == "sessions" and fields.queue_num == queue_num
        if name not in wanted
    ]
    if stale:
        error = restore(runner, [f"destroy {name}" for name in stale])
        if error:
            raise FirewallError(f"sessions sets not removed: {error}")
    return stale
