"""The pure modules stay pure: rules, the engine and everything it imports, spa and rotation do
no I/O. Checked on their source, so a new import of the wrong kind fails here, not in review."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "nfknock"
FORBIDDEN_MODULES = {"netfilterqueue", "iptc", "os", "time", "logging", "subprocess", "select", "shutil", "signal"}
FORBIDDEN_CALLS = {"open", "socket.socket", "socket.create_connection", "Path.open", "read_text", "write_text"}


def tree(module: str) -> ast.Module:
    return ast.parse((PACKAGE / f"{module.replace('.', '/')}.py").read_text())


def imports(module: str) -> tuple[set[str], set[str]]:
    """(outside modules, nfknock modules) that `module` imports, at any depth of its code."""
    outside, ours = set(), set()
    for node in ast.walk(tree(module)):
        if isinstance(node, ast.Import):
            outside |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.rsplit(".", node.level)[0] if "." in module else ""
                target = ".".join(filter(None, [base if node.level > 1 or "." in module else "", node.module]))
                names = [target] if node.module else [alias.name for alias in node.names]
                ours |= {name for name in names if (PACKAGE / f"{name.replace('.', '/')}.py").exists()}
            else:
                outside.add(node.module.split(".")[0])
    return outside, ours


def closure(roots: list[str]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += imports(module)[1]
    return seen


PURE = sorted(closure(["rules", "engine", "spa", "rotation", "shards"]))


def test_the_engine_closure_is_what_we_think():
    assert {"engine", "sequence", "lockout", "replay", "spa_access", "state", "events", "rules"} <= set(PURE)
    assert not {"daemon", "loading", "trust", "control", "firewall"} & set(PURE)


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_nothing_that_does_io(module):
    outside, _ = imports(module)
    assert not outside & FORBIDDEN_MODULES, f"{module} imports {outside & FORBIDDEN_MODULES}"


@pytest.mark.parametrize("module", PURE)
def test_pure_module_opens_no_files_or_sockets(module):
    called = set()
    for node in ast.walk(tree(module)):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                called.add(func.id)
            elif isinstance(func, ast.Attribute):
                owner = func.value.id if isinstance(func.value, ast.Name) else ""
                called |= {f"{owner}.{func.attr}", func.attr}
    assert not called & FORBIDDEN_CALLS, f"{module} calls {called & FORBIDDEN_CALLS}"


def test_test_files_have_unique_basenames():
    """pytest imports test modules by basename (rootdir-relative, no packages): two test_x.py in
    different folders stop the whole run at collection."""
    from collections import Counter

    tests = Path(__file__).resolve().parents[1]
    names = Counter(path.name for path in tests.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
