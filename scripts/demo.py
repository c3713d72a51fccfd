"""A self-contained demo: the shipped seed door, in throwaway namespaces, step by step.

Needs root, touches nothing outside the namespaces it makes, and exits non-zero if any step
does not behave as promised — so it doubles as a smoke test on a new machine.

    sudo ./scripts/demo.sh      (or: sudo .venv/bin/python scripts/demo.py)

Not part of the nfknock package: it runs from a checkout, with the repository's rules/ and
tests/support (the namespaces), found from this file's own location.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # this checkout's nfknock, and tests/support as `support`

from support.sandbox import EchoService, Sandbox, connect, nfknock_argv, wait_for_line  # noqa: E402

RULES = REPO / "rules"


class Demo:
    def __init__(self, sandbox: Sandbox, rules: Path, log: Path):
        self.box, self.rules, self.log = sandbox, rules, log
        self.failures = 0

    def step(self, text: str, ok: bool, detail: str) -> None:
        self.failures += not ok
        print(f"  [{'ok' if ok else 'FAILED'}] {text}: {detail}", flush=True)

    def expect_closed(self, client, who: str) -> None:
        attempt = connect(client, timeout=1.5)
        self.step(
            f"{who} connects to {client.server_address}:22",
            not attempt.connected,
            "connected (the door should be closed!)"
            if attempt.connected
            else f"no answer after {attempt.seconds:.1f} s: closed",
        )

    def expect_open(self, client, who: str) -> None:
        attempt = connect(client, timeout=3)
        self.step(
            f"{who} connects to {client.server_address}:22",
            attempt.connected and attempt.seconds < 0.5,
            f"connected in {attempt.seconds * 1000:.1f} ms on the first SYN, server said "
            f"{attempt.greeting.strip().decode(errors='replace')!r}"
            if attempt.connected
            else "no answer (the door should be open!)",
        )

    def knock(self, client, ports: list[str]) -> None:
        if shutil.which("knock"):
            argv, label = ["knock", client.server_address, *ports], "stock knock client"
        else:
            argv, label = nfknock_argv("knock", client.server_address, *ports), "nfknock knock"
        result = self.box.run(client.namespace, argv)
        self.step(
            f"knock {' '.join(ports)} ({label})",
            result.returncode == 0,
            "sent" if result.returncode == 0 else result.stderr.strip(),
        )


def main() -> int:
    if os.geteuid() != 0 or not shutil.which("ip"):
        print("nfknock demo: needs root and iproute2 (it creates network namespaces)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="nfknock-demo-"))
    log = workdir / "nfknock.log"
    print("nfknock demo: a server and two clients in throwaway network namespaces, the door in rules/ssh.yaml")
    with Sandbox(clients_wanted=2) as box:
        alice, bob = box.clients
        service = EchoService(box.server)
        demo = Demo(box, RULES, log)
        print(f"  server {alice.server_address} runs a TCP service on port 22 and 'nfknock run --rules rules/'")
        daemon = box.spawn(
            box.server,
            nfknock_argv(
                "run",
                "--rules",
                str(RULES),
                "--log-file",
                str(log),
                "--control-socket",
                str(workdir / "control.sock"),
                "--state-dir",
                str(workdir / "state"),
            ),
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        try:
            wait_for_line(log, "ready:", daemon)
            demo.expect_closed(alice, f"alice ({alice.address})")
            demo.knock(alice, ["40000", "50000", "60000"])
            demo.expect_open(alice, "alice")
            demo.expect_closed(bob, f"bob ({bob.address}), who did not knock,")
            demo.knock(alice, ["60000", "50000", "40000"])
            demo.expect_closed(alice, "alice")
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(10)
            demo.step("SIGTERM the daemon", code == 0, "exited; its rules stay" if code == 0 else f"exit code {code}")
            demo.expect_closed(alice, "alice, with no daemon running,")
            down = box.run(box.server, nfknock_argv("down"), cwd=REPO)
            demo.step("nfknock down", down.returncode == 0, down.stdout.strip() or down.stderr.strip())
            demo.expect_open(alice, "alice, with nfknock's rules gone,")
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(10)
            service.close()
    print("\nthe daemon's log:")
    print("\n".join("  " + line for line in log.read_text().splitlines()))
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nnfknock demo: {'all steps behaved' if not demo.failures else f'{demo.failures} step(s) FAILED'}")
    return 1 if demo.failures else 0


if __name__ == "__main__":
    sys.exit(main())
