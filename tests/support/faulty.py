"""Run the nfknock command with one of its functions broken: fault injection for the fail-closed
tests. `python tests/support/faulty.py TARGET N run --rules ...` makes the N-th and every later
call of TARGET (a dotted path to a function or method) raise RuntimeError, then runs nfknock.

Nothing here is part of nfknock; the patch is made in this process only.
"""

import functools
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's nfknock, not an installed one


def break_target(target: str, from_call: int) -> None:
    module_name, _, attribute = target.rpartition(".")
    owner, name = None, attribute
    try:
        owner = importlib.import_module(module_name)
    except ModuleNotFoundError:  # a method: module.Class.method
        module_name, _, class_name = module_name.rpartition(".")
        owner = getattr(importlib.import_module(module_name), class_name)
    original = getattr(owner, name)
    calls = [0]

    @functools.wraps(original)
    def broken(*args, **kwargs):
        calls[0] += 1
        if calls[0] >= from_call:
            raise RuntimeError(f"injected fault in {target}")
        return original(*args, **kwargs)

    setattr(owner, name, broken)


if __name__ == "__main__":
    target, from_call, *argv = sys.argv[1:]
    break_target(target, int(from_call))
    from nfknock.cli import main

    sys.exit(main(argv))
