"""Real-kernel fixtures: namespaces on veth, a TCP service, and nfknock run as users run it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nfknock.firewall import resolve_flavour
from support import secretcheck
from support.sandbox import EchoService, Sandbox, connect, entered, nfknock_argv  # noqa: F401 (connect: for tests)

REPO = Path(__file__).resolve().parents[2]
# Every command the real-kernel tests run (scripts/setup.sh installs them): iproute2; iptables
# (both flavours: the tests run with each backend); knockd's client; nmap; fwknop client and server;
# nft (a ruleset flush, as nftables.service does).
TOOLS = (
    "ip",
    "iptables-legacy",
    "ip6tables-legacy",
    "iptables-nft",
    "ip6tables-nft",
    "iptables-nft-restore",
    "ip6tables-nft-restore",
    "ipset",
    "knock",
    "nmap",
    "fwknop",
    "fwknopd",
    "nft",
)
SERVICE_PORT = 22


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables, NFQUEUE)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing commands: {', '.join(missing)}"
    try:
        import iptc  # noqa: F401
        import netfilterqueue  # noqa: F401
    except Exception as exc:
        return f"cannot import the kernel bindings: {exc}"
    return None


@pytest.fixture(scope="session")
def kernel():
    reason = _unavailable()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"real-kernel tests cannot run under CI=true: {reason}")
        pytest.skip(reason)


def hold(client, port: int = SERVICE_PORT) -> socket.socket:
    """An established connection that the test keeps open."""
    with entered(client.namespace):
        sock = socket.socket()
    sock.settimeout(3)
    sock.connect((client.server_address, port))
    assert sock.recv(16) == b"hello\n"
    return sock


def echoes(sock: socket.socket, text: bytes = b"ping\n") -> bool:
    try:
        sock.sendall(text)
        return sock.recv(64) == text
    except OSError:
        return False


class Server:
    """nfknock run in the server namespace, as an administrator would start it."""

    def __init__(self, sandbox: Sandbox, workdir: Path, firewall: str = "auto"):
        self.sandbox = sandbox
        self.firewall = firewall
        self.flavour = resolve_flavour(firewall)  # which iptables command shows our rules
        self.workdir = workdir
        self.process: subprocess.Popen | None = None
        self.log = workdir / "nfknock.log"
        self.rules = workdir / "rules"
        self.rules.mkdir(exist_ok=True)
        self.queue_num = 7

    def write_rules(self, text: str, name: str = "doors.yaml") -> Path:
        path = self.rules / name
        path.write_text(text)
        return path

    def argv(self, log: Path, *extra: str, fault: tuple | None = None) -> list[str]:
        args = (
            "run",
            "--rules",
            str(self.rules),
            "--queue-num",
            str(self.queue_num),
            "--firewall",
            self.firewall,
            "--log-file",
            str(log),
            "--control-socket",
            str(self.workdir / f"{log.stem}.sock"),
            "--state-dir",  # never the host's /var/lib/nfknock; a test may name another after this
            str(self.workdir / "state"),
            *extra,
        )
        if fault is not None:  # tests/support/faulty.py breaks (or holds) one function of this run
            return [sys.executable, str(REPO / "tests" / "support" / "faulty.py"), *map(str, fault), *args]
        return nfknock_argv(*args)

    def start(self, *extra: str, expect_ready: bool = True, fault: tuple | None = None) -> subprocess.Popen:
        argv = self.argv(self.log, *extra, fault=fault)
        self.process = self.sandbox.spawn(
            self.sandbox.server, argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        if expect_ready:
            self.wait_log("ready:", after=self._ready_count())
        return self.process

    def _ready_count(self) -> int:
        return 0 if not self.log.exists() else self.log.read_text().count("ready:")

    def wait_log(self, text: str, after: int = 0, timeout: float = 20) -> str:
        """Wait for the (after+1)-th line containing `text`."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            lines = [line for line in self.log.read_text().splitlines() if text in line] if self.log.exists() else []
            if len(lines) > after:
                return lines[after]
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"nfknock exited ({self.process.returncode}): {self.process.stderr.read()}\n{self.log_text()}"
                )
            time.sleep(0.02)
        raise TimeoutError(f"no log line with {text!r}:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self, sig=signal.SIGTERM, timeout: float = 10) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout)

    def iptables(self, family: int = 4) -> list[str]:
        """Our rules as `iptables -S` of the flavour in use shows them."""
        tool = f"{'iptables' if family == 4 else 'ip6tables'}-{self.flavour}"
        out = self.sandbox.run(self.sandbox.server, [tool, "-S"], check=True).stdout
        return [line for line in out.splitlines() if "NFKNOCK" in line]

    def nfknock(self, *args: str) -> subprocess.CompletedProcess:
        """`nfknock ARGS` in the server's namespace; keygen's stdout shows keys by design (the
        suite's secret check looks at everything else)."""
        keygen = args[:1] == ("keygen",)
        return self.sandbox.run(self.sandbox.server, nfknock_argv(*args), cwd=REPO, prints_keys=keygen)


SEED = (REPO / "rules" / "ssh.yaml").read_text()


@pytest.fixture
def sandbox(kernel):
    with Sandbox(clients_wanted=3) as box:
        service = EchoService(box.server)
        try:
            yield box
        finally:
            service.close()


@pytest.fixture
def server(request, sandbox, tmp_path):
    """nfknock with the host's default firewall flavour, or the one a test module asks for with
    `pytestmark = pytest.mark.parametrize("server", ["legacy", "nft"], indirect=True)`."""
    srv = Server(sandbox, tmp_path, getattr(request, "param", "auto"))
    srv.write_rules(SEED)
    yield srv
    if srv.process is not None and srv.process.poll() is None:
        srv.stop()
    unread_stderr(srv.process)


def unread_stderr(process: subprocess.Popen | None) -> None:
    """What a stopped daemon wrote on stderr and no test read, to the suite's secret check (its
    log file is checked by the check itself). Never blocks: a process still holding the pipe
    gets two seconds."""
    if process is None or process.stderr is None or process.poll() is None or process.stderr.closed:
        return
    fd = process.stderr.fileno()
    os.set_blocking(fd, False)
    chunks, end = [], time.monotonic() + 2
    while time.monotonic() < end:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(0.02)
            continue
        if not chunk:
            break
        chunks.append(chunk)
    secretcheck.see("the daemon's stderr", b"".join(chunks))


@pytest.fixture
def alice(sandbox):
    return sandbox.clients[0]


@pytest.fixture
def bob(sandbox):
    return sandbox.clients[1]


@pytest.fixture
def mallory(sandbox):
    """The attacker."""
    return sandbox.clients[2]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def knock(sandbox, client, *ports: str) -> None:
    """The stock knockd client, from the client's namespace."""
    result = sandbox.run(client.namespace, ["knock", client.server_address, *ports])
    assert result.returncode == 0, result.stderr


def our_knock(sandbox, client, *args: str) -> subprocess.CompletedProcess:
    return sandbox.run(client.namespace, nfknock_argv("knock", client.server_address, *args), cwd=REPO)


def spa_door(server: Server, directory: Path, *settings: str) -> Server:
    """The server with one SPA door, spaSSH, protecting 22/tcp (plus `settings`, YAML lines), keyed
    by a fresh key pair in a root-only keys file; `server.keys` holds the pair (base64)."""
    from nfknock.doors.spa import generate_keys

    encryption, mac = generate_keys()
    keys = directory / "spa.keys"
    keys.write_text(f"KEY_BASE64: {encryption}\nHMAC_KEY_BASE64: {mac}\n")
    keys.chmod(0o600)
    lines = [f"    keys_file: {keys}", *(f"    {line}" for line in settings), "    protect: [22/tcp]"]
    server.write_rules("doors:\n  - name: spaSSH\n    kind: spa\n" + "\n".join(lines) + "\n")
    server.keys = (encryption, mac)
    return server


@pytest.fixture
def rotating(server, tmp_path):
    """The server with one rotating door (20000-29999, 60 s windows) and its secret."""
    import base64

    secret = tmp_path / "rot.key"
    secret.write_text(base64.b64encode(b"r" * 32).decode() + "\n")
    secret.chmod(0o600)
    server.write_rules(f"""\
doors:
  - name: rotSSH
    rotate: {{secret_file: {secret}, window: 60s, length: 3, ports: 20000-29999}}
    protect: [22/tcp]
""")
    return server
