"""Scaffolding for hosts whose iptables is the nf_tables flavour, through iptables-nft-restore.

One `iptables-nft-restore --noflush` per family is one nf_tables transaction: declaring our chain
flushes it, the jumps found in INPUT are deleted and one is inserted at position 1, all at once.
The rules are the same RuleSpecs the legacy backend installs, in iptables' own syntax, so
`iptables -S` shows them exactly as `nfknock check` prints them. (Native `nft ... queue` is not
available on every kernel; iptables-nft's NFQUEUE target is.)
"""

from __future__ import annotations

import signal
import subprocess

from ..errors import FirewallError
from .backend import PerFamily, gateway_script  # noqa: F401 (gateway_script: also the nft module's)
from .plan import CHAIN, RuleSpec

TIMEOUT = 30  # seconds for one iptables-nft command
TOOLS = {4: ("iptables-nft", "iptables-nft-restore"), 6: ("ip6tables-nft", "ip6tables-nft-restore")}


def restore_script(
    specs: list[RuleSpec] | None, jumps: list[str], chain_exists: bool, interface: str | None = None
) -> str:
    """The restore input that replaces our chain with `specs` (None: removes it). `jumps` are the
    `-A INPUT ... -j NFKNOCK` lines there now; each is deleted as it is written."""
    lines = ["*filter"]
    if specs is not None:
        lines.append(f":{CHAIN} - [0:0]")
    lines += ["-D" + jump[2:] for jump in jumps]
    if specs is not None:
        lines += [str(spec) for spec in specs]
        lines.append(f"-I INPUT 1{f' -i {interface}' if interface else ''} -j {CHAIN}")
    elif chain_exists:
        lines += [f"-F {CHAIN}", f"-X {CHAIN}"]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def describe_failure(tool: str, returncode: int, stderr: str) -> str:
    """What went wrong with a finished tool, exit status or signal first, then what it said."""
    said = "; ".join(line.strip() for line in stderr.splitlines() if line.strip())
    if returncode < 0:
        try:
            name = f" ({signal.Signals(-returncode).name})"
        except ValueError:
            name = ""
        text = f"{tool} was killed by signal {-returncode}{name}"
    else:
        text = f"{tool} exited with status {returncode}"
    return f"{text}: {said}" if said else text


class NftFirewall(PerFamily):
    name = "nft"

    def __init__(self, interface: str | None = None, runner=subprocess.run):
        super().__init__(interface)
        self.runner = runner  # subprocess.run, or a fake in tests

    def set_runner(self):
        return self.runner

    def _transaction(self, family: int, specs: list[RuleSpec] | None) -> None:
        exists = self._chain_exists(family)
        script = restore_script(specs, self._jump_rules(family), exists, self.interface)
        if specs is None and not exists and script.count("\n") == 2:
            return  # nothing there, nothing to do
        self._run([TOOLS[family][1], "--noflush"], family, script)

    def _gateway(self, family: int, chain: str, specs: list[RuleSpec] | None) -> bool:
        return self._gateway_by_restore(
            TOOLS[family], family, chain, specs, lambda argv, text: self._run(argv, family, text)
        )

    def _rules(self, family: int) -> list[str]:
        if not self._chain_exists(family):
            return []
        out = self._run([TOOLS[family][0], "-S", CHAIN], family)
        return [line for line in out.splitlines() if line.startswith("-A ")]

    def _jumps(self, family: int) -> int:
        return len(self._jump_rules(family))

    def _jump_rules(self, family: int) -> list[str]:
        out = self._run([TOOLS[family][0], "-S", "INPUT"], family)
        return [line for line in out.splitlines() if line.startswith("-A INPUT") and line.split()[-2:] == ["-j", CHAIN]]

    def _chain_exists(self, family: int) -> bool:
        out = self._run([TOOLS[family][0], "-S"], family)
        return f"-N {CHAIN}" in out.splitlines()

    def _run(self, argv: list[str], family: int, stdin: str | None = None) -> str:
        try:
            result = self.runner(argv, input=stdin, capture_output=True, text=True, timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            raise FirewallError(f"{argv[0]} did not finish within {TIMEOUT} s") from None
        except (OSError, subprocess.SubprocessError) as exc:
            raise FirewallError(f"{argv[0]}: cannot run: {getattr(exc, 'strerror', None) or exc}") from None
        if result.returncode != 0:
            raise FirewallError(describe_failure(argv[0], result.returncode, result.stderr or ""))
        return result.stdout
