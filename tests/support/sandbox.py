"""Throwaway test hosts on one machine: a server namespace and client namespaces on veth links.

Used by the real-kernel tests, bench/run.py and scripts/demo.py; not part of the nfknock package.
Nothing here sends a packet anywhere but inside the namespaces it created, and `close()` deletes
them (with their iptables rules and processes' sockets) even after a failure. Sockets made inside
`entered(ns)` live in that namespace for good, so a test can connect from a client namespace
without a subprocess.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from nfknock.daemon.stats import QueueCounters, read_queue_counters

from . import secretcheck

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextmanager
def entered(namespace: str):
    """Run the body with this thread in `namespace`; always come back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def process_tree(pid: int) -> list[int]:
    """`pid` and its children (a daemon's workers, a baseline's extra loops)."""
    found = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far (one that has gone counts 0)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def queue_counters(namespace: str, queue_num: int) -> QueueCounters | None:
    """The kernel's counters of one NFQUEUE in `namespace` (None: no process has bound it)."""
    with entered(namespace):  # /proc/net is the process's namespace; thread-self is this thread's
        return read_queue_counters(queue_num, Path("/proc/thread-self/net/netfilter/nfnetlink_queue"))


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Client:
    namespace: str
    address: str
    server_address: str  # the server's address on this client's link
    address6: str = ""
    server_address6: str = ""

    def server(self, family: int = 4) -> str:
        return self.server_address6 if family == 6 else self.server_address


class _Processes:
    """Processes in namespaces: `spawn` keeps them for close() to kill, `run` waits for one."""

    processes: list[subprocess.Popen]

    def spawn(self, namespace: str, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start a process inside a namespace; it is killed by close()."""
        process = subprocess.Popen(["ip", "netns", "exec", namespace, *argv], **kwargs)
        self.processes.append(process)
        return process

    def run(self, namespace: str, argv: list[str], prints_keys: bool = False, **kwargs) -> subprocess.CompletedProcess:
        """Run a command in a namespace. Its output is checked for test keys at the test's end
        (secretcheck); `prints_keys`: its stdout shows keys by design (`nfknock keygen`)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 60)
        result = subprocess.run(["ip", "netns", "exec", namespace, *argv], **kwargs)
        command = " ".join(argv[:4])[:80]
        if not prints_keys:
            secretcheck.see(f"stdout of {command}", result.stdout)
        secretcheck.see(f"stderr of {command}", result.stderr)
        return result


@dataclass
class Sandbox(_Processes):
    """A server namespace linked to `clients` client namespaces (10.199.<i>.0/24 and
    fd00:199:<i>::/64 each)."""

    clients_wanted: int = 2
    token: str = field(default_factory=lambda: secrets.token_hex(3))
    clients: list[Client] = field(default_factory=list)
    processes: list[subprocess.Popen] = field(default_factory=list)
    extra_namespaces: list[str] = field(default_factory=list)  # add_internal's

    @property
    def server(self) -> str:
        return f"nfk-{self.token}-srv"

    def __enter__(self) -> Sandbox:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        ip("netns", "add", self.server)
        ip("-n", self.server, "link", "set", "lo", "up")
        for i in range(1, self.clients_wanted + 1):
            name = f"nfk-{self.token}-c{i}"
            ip("netns", "add", name)
            self.clients.append(Client(name, f"10.199.{i}.2", f"10.199.{i}.1", f"fd00:199:{i}::2", f"fd00:199:{i}::1"))
            near, far = f"nk{self.token}{i}s", f"nk{self.token}{i}c"
            ip("link", "add", near, "netns", self.server, "type", "veth", "peer", "name", far, "netns", name)
            ip("-n", self.server, "addr", "add", f"10.199.{i}.1/24", "dev", near)
            ip("-n", name, "addr", "add", f"10.199.{i}.2/24", "dev", far)
            ip("-n", self.server, "addr", "add", f"fd00:199:{i}::1/64", "dev", near, "nodad")
            ip("-n", name, "addr", "add", f"fd00:199:{i}::2/64", "dev", far, "nodad")
            for ns, dev in ((self.server, near), (name, far), (name, "lo")):
                ip("-n", ns, "link", "set", dev, "up")

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        for name in [self.server, *(c.namespace for c in self.clients), *self.extra_namespaces]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@dataclass
class Internal:
    """A host behind the sandbox's server (the bastion), for gateway doors: its own namespace
    on a link to the server (10.199.100.0/24, fd00:199:100::/64), its default routes via the
    server, which forwards; every client routes that network via the server too."""

    namespace: str
    address: str = "10.199.100.5"
    address6: str = "fd00:199:100::5"

    def of(self, family: int) -> str:
        return self.address6 if family == 6 else self.address


def add_internal(box: Sandbox) -> Internal:
    """Build the internal host of `box` (deleted by box.close(), which deletes every namespace
    named after its token)."""
    host = Internal(f"nfk-{box.token}-int")
    box.extra_namespaces.append(host.namespace)
    ip("netns", "add", host.namespace)
    near, far = f"nk{box.token}is", f"nk{box.token}ii"
    ip("link", "add", near, "netns", box.server, "type", "veth", "peer", "name", far, "netns", host.namespace)
    ip("-n", box.server, "addr", "add", "10.199.100.1/24", "dev", near)
    ip("-n", box.server, "addr", "add", "fd00:199:100::1/64", "dev", near, "nodad")
    ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", far)
    ip("-n", host.namespace, "addr", "add", f"{host.address6}/64", "dev", far, "nodad")
    for ns, dev in ((box.server, near), (host.namespace, far), (host.namespace, "lo")):
        ip("-n", ns, "link", "set", dev, "up")
    ip("-n", host.namespace, "route", "add", "default", "via", "10.199.100.1")
    ip("-n", host.namespace, "-6", "route", "add", "default", "via", "fd00:199:100::1")
    for client in box.clients:
        ip("-n", client.namespace, "route", "add", "10.199.100.0/24", "via", client.server_address)
        ip("-n", client.namespace, "-6", "route", "add", "fd00:199:100::/64", "via", client.server_address6)
    for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
        subprocess.run(["ip", "netns", "exec", box.server, "sysctl", "-qw", f"{key}=1"], check=True)
    # IPv6 neighbour discovery waits for the link-local addresses' duplicate address detection
    # (about a second after a link comes up): until then the first routed IPv6 connect is lost.
    end = time.monotonic() + 10
    for ns in (box.server, host.namespace, *(client.namespace for client in box.clients)):
        while time.monotonic() < end:
            out = subprocess.run(["ip", "-n", ns, "-6", "addr", "show", "tentative"], capture_output=True, text=True)
            if not out.stdout.strip():
                break
            time.sleep(0.05)
    return host


def nfknock_argv(*args: str) -> list[str]:
    """The nfknock CLI of this very interpreter, so a venv never needs to be on PATH."""
    return [sys.executable, "-m", "nfknock", *args]


def wait_for_line(path: Path, text: str, process: subprocess.Popen | None = None, timeout: float = 20) -> str:
    """Wait until a log file holds a line containing `text`; fail early if the process died."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        content = path.read_text() if path.exists() else ""
        for line in content.splitlines():
            if text in line:
                return line
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before logging {text!r}:\n{content}")
        time.sleep(0.02)
    raise TimeoutError(f"no line with {text!r} in {path} after {timeout}s")


class EchoService:
    """A TCP service on the protected port: greets, then echoes lines."""

    def __init__(self, namespace: str, port: int = 22):
        with entered(namespace):
            self.listener = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn):
        with conn:
            try:
                conn.sendall(b"hello\n")
                while data := conn.recv(1024):
                    conn.sendall(data)
            except OSError:
                pass  # the client went away (reset): nothing to serve

    def close(self):
        # shutdown() wakes the thread blocked in accept(); close() alone would leave the socket
        # listening until that accept returns.
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()


@dataclass
class Attempt:
    connected: bool
    seconds: float
    greeting: bytes = b""


def connect(client, port: int = 22, timeout: float = 1.5, family: int = 4) -> Attempt:
    with entered(client.namespace):
        sock = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET)
    sock.settimeout(timeout)
    start = time.monotonic()
    try:
        sock.connect((client.server(family), port))
        elapsed = time.monotonic() - start
        return Attempt(True, elapsed, sock.recv(16))
    except OSError:
        return Attempt(False, time.monotonic() - start)
    finally:
        sock.close()


class SynFlood:
    """TCP SYNs from many made-up source addresses, built once and patched per packet.

    Raw IPv4 with IP_HDRINCL (the kernel fills in the IP checksum); the TCP checksum is the
    template's pseudo-header sum adjusted for each source address, so every packet is valid.
    """

    def __init__(self, namespace: str, dst: str, dport: int):
        with entered(namespace):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        self.dst = dst
        dst_bytes = socket.inet_aton(dst)
        self.tcp = bytearray(struct.pack("!HHIIBBHHH", 33333, dport, 1, 0, 5 << 4, 0x02, 64240, 0, 0))
        # Sum of everything the TCP checksum covers except the source address.
        words = self.tcp + dst_bytes + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(self.tcp))
        self.partial = sum(struct.unpack(f"!{len(words) // 2}H", bytes(words)))
        self.ip = bytearray(
            struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, socket.IPPROTO_TCP, 0, b"\0\0\0\0", dst_bytes)
        )

    def send(self, first_source: int, count: int) -> int:
        """Send `count` SYNs from first_source, first_source+1, ...; return how many went out."""
        ip, tcp, partial, sock, target = self.ip, self.tcp, self.partial, self.sock, (self.dst, 0)
        sent = 0
        for src in range(first_source, first_source + count):
            total = partial + (src >> 16) + (src & 0xFFFF)
            total = (total & 0xFFFF) + (total >> 16)
            total = (total & 0xFFFF) + (total >> 16)
            struct.pack_into("!I", ip, 12, src)
            struct.pack_into("!H", tcp, 16, ~total & 0xFFFF)
            try:
                sock.sendto(bytes(ip + tcp), target)
                sent += 1
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
        return sent

    def close(self) -> None:
        self.sock.close()


@dataclass
class Lan(_Processes):
    """Several server namespaces and client namespaces on one bridge (10.198.0.0/24), for fleet
    tests: servers at .1, .2, ..., clients at .101, .102, ..., and a hub namespace holding the
    bridge at .254 (where a shared service such as Redis runs). `client(i, j)` is client i seen
    from server j, in the shape the single-server helpers (connect, knock) take."""

    servers_wanted: int = 2
    clients_wanted: int = 2
    token: str = field(default_factory=lambda: secrets.token_hex(3))
    processes: list[subprocess.Popen] = field(default_factory=list)

    PREFIX = "10.198.0"

    @property
    def hub(self) -> str:
        return f"nfk-{self.token}-hub"

    @property
    def hub_address(self) -> str:
        return f"{self.PREFIX}.254"

    def server(self, index: int) -> str:
        return f"nfk-{self.token}-s{index}"

    def server_address(self, index: int) -> str:
        return f"{self.PREFIX}.{index + 1}"

    def client(self, index: int, server: int = 0) -> Client:
        return Client(f"nfk-{self.token}-c{index}", f"{self.PREFIX}.{101 + index}", self.server_address(server))

    def __enter__(self) -> Lan:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _namespaces(self) -> list[str]:
        return [
            self.hub,
            *(self.server(i) for i in range(self.servers_wanted)),
            *(self.client(i).namespace for i in range(self.clients_wanted)),
        ]

    def _build(self) -> None:
        ip("netns", "add", self.hub)
        ip("-n", self.hub, "link", "set", "lo", "up")
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "addr", "add", f"{self.hub_address}/24", "dev", "br0")
        ip("-n", self.hub, "link", "set", "br0", "up")
        members = [(self.server(i), self.server_address(i)) for i in range(self.servers_wanted)]
        members += [(self.client(i).namespace, self.client(i).address) for i in range(self.clients_wanted)]
        for n, (namespace, address) in enumerate(members):
            ip("netns", "add", namespace)
            near, far = f"nk{self.token}h{n}", f"nk{self.token}m{n}"
            ip("link", "add", near, "netns", self.hub, "type", "veth", "peer", "name", far, "netns", namespace)
            ip("-n", self.hub, "link", "set", near, "master", "br0")
            ip("-n", namespace, "addr", "add", f"{address}/24", "dev", far)
            for ns, dev in ((self.hub, near), (namespace, far), (namespace, "lo")):
                ip("-n", ns, "link", "set", dev, "up")

    def view(self, index: int) -> LanServer:
        """Server `index` in the shape of a Sandbox (its `server` namespace, spawn, run)."""
        return LanServer(self, self.server(index))

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        for name in self._namespaces():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@dataclass
class LanServer:
    lan: Lan
    server: str

    def spawn(self, namespace: str, argv: list[str], **kwargs) -> subprocess.Popen:
        return self.lan.spawn(namespace, argv, **kwargs)

    def run(self, namespace: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return self.lan.run(namespace, argv, **kwargs)


class RedisServer:
    """Debian's redis-server in a namespace (no persistence: a restart loses everything, the
    worst case for a fleet), with a password. kill() and start() for outage tests."""

    def __init__(self, lan: Lan, password: str, port: int = 6379):
        self.lan, self.password, self.port = lan, password, port
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.lan.hub_address}:{self.port}/0"

    def start(self) -> None:
        argv = ["redis-server", "--bind", self.lan.hub_address, "--port", str(self.port), "--requirepass"]
        argv += [self.password, "--save", "", "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning"]
        self.process = self.lan.spawn(self.lan.hub, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            if self.cli("PING").stdout.strip() == "PONG":
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            time.sleep(0.05)
        raise TimeoutError("redis-server did not answer PING")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """redis-cli as anyone on the network with the Redis password (not the fleet key)."""
        argv = ["redis-cli", "-h", self.lan.hub_address, "-p", str(self.port), "--no-auth-warning", "-a"]
        return self.lan.run(self.lan.hub, [*argv, self.password, *args])
