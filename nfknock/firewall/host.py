"""What the host already has: which iptables flavour its `iptables` is, our chain as the other
flavour's tables hold it, and what rules in place say (queues, sets, first-step mark meanings).
Read-only: nothing here changes the kernel's rules."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from ..doors.first_steps import MarkHistory
from .plan import CHAIN, PASS_MARK, MarkBits, SetName


def marks_installed(installed: dict[int, list[str]], queue_num: int, pass_mark: int = PASS_MARK) -> MarkHistory:
    """What each (second port, mark bit) means in first-step rules already in the kernel (left by
    an earlier run of this daemon, `iptables -S` lines per family): `first_steps.decide` keeps to
    it, so that a packet those rules marked is not read with another meaning. A marking rule is
    read through the plan's codecs (SetName, MarkBits): the set it matches must be one of this
    daemon's first-step sets and the mark one of the first-step bits under `pass_mark`."""
    marks = MarkBits(pass_mark)
    held: dict = {}
    for lines in installed.values():
        for line in lines:
            found = _marking(line)
            if found is None:
                continue
            second, name, value = found
            started, bit = SetName.parse(name), marks.bit(value)
            if bit is None or started is None or started.kind != "first-step" or started.queue_num != queue_num:
                continue
            held[(second, bit)] = held.get((second, bit), frozenset()) | {(started.key, None)}
    return MarkHistory.in_place(held)


def _marking(line: str) -> tuple[tuple[str, int], str, int] | None:
    """(port, set, mark value) of a rule that marks packets to one port from a set's sources, as
    plan.RuleSpec writes it and `iptables -S` prints it
    (`-A NFKNOCK -p tcp -m tcp --dport 50000 -m set --match-set NAME src -j MARK --set-xmark V/M`);
    None for any other rule."""
    words = line.split()
    options = {word: words[i + 1] for i, word in enumerate(words[:-1]) if word.startswith("-")}
    if options.get("-j") != "MARK" or options.get("-p") not in ("tcp", "udp"):
        return None
    try:
        port = int(options["--dport"])
        name = options["--match-set"]
        value = int(options["--set-xmark"].split("/")[0], 16)
    except (KeyError, ValueError):
        return None
    return (options["-p"], port), name, value


def saved_chain(flavour: str) -> dict[int, list[str]]:
    """Our chain's rules as the tables of `flavour` hold them (both families), read with
    iptables-*-save, which dumps only tables that exist; no legacy tool runs where no legacy
    table exists (it would create one). Empty where there is nothing to read."""
    chain: dict[int, list[str]] = {4: [], 6: []}
    for family, tool in ((4, "iptables"), (6, "ip6tables")):
        binary = shutil.which(f"{tool}-{flavour}-save")
        if binary is None or (flavour == "legacy" and "filter" not in legacy_tables(family)):
            continue
        try:
            saved = subprocess.run([binary, "-t", "filter"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        chain[family] = [line for line in saved.splitlines() if line.startswith(f"-A {CHAIN} ")]
    return chain


_QUEUE_NUM = re.compile(r"--queue-num (\d+)")


_SET_NAME = re.compile(r"--(?:match-set|add-set|del-set) (\S+)")


def chain_queues(chain: dict[int, list[str]]) -> set[int]:
    """The queue numbers an NFKNOCK chain (`-A NFKNOCK ...` lines per family) sends packets to."""
    return {int(n) for lines in chain.values() for line in lines for n in _QUEUE_NUM.findall(line)}


def chain_sets(chain: dict[int, list[str]]) -> set[str]:
    """The ipsets an NFKNOCK chain's rules name."""
    return {name for lines in chain.values() for line in lines for name in _SET_NAME.findall(line)}


def spans(numbers) -> str:
    """Queue numbers as people write them: `7-8`, `7-10, 20`."""
    out: list[list[int]] = []
    for n in sorted(set(numbers)):
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def other_flavour_chain(
    flavour: str, chain: dict[int, list[str]], ours: set[int], listened: set[int], who: str = "this daemon"
) -> str | None:
    """What to say about an NFKNOCK chain the `flavour` tables hold while a daemon (`who`) with
    the other --firewall binds, or will bind, the queues `ours` (`listened`: the queues some
    process binds now, /proc/net/netfilter/nfnetlink_queue). None when the chain has no rule.

    `apply` replaces the chain and every jump to it in its own flavour, whatever queues they
    name, so a leftover of the same flavour never outlives a start; the other flavour's is never
    touched, and the kernel applies both. Its rules queue packets to the queues of the run that
    installed them: ours (both daemons' rules judge each packet), or queues nobody listens to
    (the kernel drops what they get: closed, but knocks and connections it catches never reach
    this daemon, which sees nothing and cannot say why), or another listener's. The fix removes
    that chain alone, while this daemon runs: its own chain keeps the ports closed meanwhile."""
    if not any(chain.values()):
        return None
    queued = chain_queues(chain)
    theirs = queued - ours
    families = ", ".join(f"IPv{family}" for family in sorted(chain) if chain[family])
    text = f"the {flavour} tables still hold an NFKNOCK chain ({families})"
    if queued:
        text += f" that sends packets to queues {spans(queued)}"
    if not queued:
        text += f": the kernel applies it as well as the chain of {who}"
    elif not theirs:
        text += (
            f", which {who} binds too (an earlier run with --firewall {flavour}?): the kernel applies both "
            "chains, so both judge each packet"
        )
    elif not theirs & listened:
        text += (
            f"; no process listens on {spans(theirs)} (an earlier run with --firewall {flavour} "
            f"--queue-num {min(theirs)}?): the kernel applies both chains and drops what that one queues, so the "
            f"knocks and new connections it catches never reach {who} (queues {spans(ours)})"
        )
    else:
        text += (
            f"; another process listens on {spans(theirs & listened)} (another nfknock?): the kernel applies both "
            "chains, so a packet must pass both"
        )
    return text + f"; remove it with 'nfknock down --firewall {flavour}' (it leaves the other flavour's rules alone)"


def iptables_flavour() -> str | None:
    """'nf_tables' or 'legacy' for the host's `iptables` command, None if there is none."""
    binary = shutil.which("iptables")
    if binary is None:
        return None
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\((nf_tables|legacy)\)", out)
    return match.group(1) if match else "legacy"


TABLE_NAMES = {4: Path("/proc/net/ip_tables_names"), 6: Path("/proc/net/ip6_tables_names")}


def legacy_tables(family: int) -> set[str]:
    """The legacy tables that exist in this network namespace. Opening one through iptc (or
    `iptables-legacy -S`) creates it, and from then on every iptables-nft command warns
    'iptables-legacy tables present': look here before touching one that may not exist."""
    try:
        return set(TABLE_NAMES[family].read_text().split())
    except OSError:  # ip_tables not loaded: no legacy table at all
        return set()
