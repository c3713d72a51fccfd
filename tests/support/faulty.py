"""Run the nfknock command with one of its functions broken: fault injection for the fail-closed
tests. `python tests/support/faulty.py TARGET N run --rules ...` makes the N-th and every later
call of TARGET (a dotted path to a function or method) raise RuntimeError, then runs nfknock.

`python tests/support/faulty.py --hold TARGET N GATE run ...` instead holds the N-th call of
TARGET (in each process: forked workers count their own): it creates GATE.held, waits until GATE
exists (30 s at most), then makes the call. A test then sees what the kernel does with packets
that arrive while the daemon is at that point, without timing anything.

`python tests/support/faulty.py --clock-offset SECONDS run ...` runs nfknock with a wall clock
(time.time) that many seconds off, as on a host whose clock is wrong (faketime-style; patched
before nfknock is imported, so its default wall clocks are the patched one).

Nothing here is part of nfknock; the patch is made in this process only.
"""

import functools
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's nfknock, not an installed one


def _owner(target: str) -> tuple[object, str]:
    module_name, _, attribute = target.rpartition(".")
    owner, name = None, attribute
    try:
        owner = importlib.import_module(module_name)
    except ModuleNotFoundError:  # a method: module.Class.method
        module_name, _, class_name = module_name.rpartition(".")
        owner = getattr(importlib.import_module(module_name), class_name)
    return owner, name


def break_target(target: str, from_call: int) -> None:
    owner, name = _owner(target)
    original = getattr(owner, name)
    calls = [0]

    @functools.wraps(original)
    def broken(*args, **kwargs):
        calls[0] += 1
        if calls[0] >= from_call:
            raise RuntimeError(f"injected fault in {target}")
        return original(*args, **kwargs)

    setattr(owner, name, broken)


def hold_target(target: str, call: int, gate: Path) -> None:
    owner, name = _owner(target)
    original = getattr(owner, name)
    calls = [0]

    @functools.wraps(original)
    def held(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            gate.with_name(gate.name + ".held").touch()
            end = time.monotonic() + 30
            while not gate.exists() and time.monotonic() < end:
                time.sleep(0.01)
        return original(*args, **kwargs)

    setattr(owner, name, held)


def offset_clock(seconds: float) -> None:
    real = time.time
    time.time = lambda: real() + seconds


if __name__ == "__main__":
    if sys.argv[1] == "--clock-offset":
        offset, *argv = sys.argv[2:]
        offset_clock(float(offset))
    elif sys.argv[1] == "--hold":
        target, call, gate, *argv = sys.argv[2:]
        hold_target(target, int(call), Path(gate))
    else:
        target, from_call, *argv = sys.argv[1:]
        break_target(target, int(from_call))
    from nfknock.cli import main

    sys.exit(main(argv))
