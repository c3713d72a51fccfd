"""The pure rooms stay pure: every module in doors/, and the firewall's plan (plan.py, shards.py),
do no I/O. Checked per folder on the source, so a new module there is checked without being
listed, and a new import of the wrong kind fails here, not in review."""

import ast
from pathlib import Path

import pytest

from support.layout import PACKAGE, imports, modules

FORBIDDEN_MODULES = {"netfilterqueue", "iptc", "os", "time", "logging", "subprocess", "select", "shutil", "signal"}
FORBIDDEN_CALLS = {"open", "socket.socket", "socket.create_connection", "Path.open", "read_text", "write_text"}
PURE_FOLDERS = ("doors",)
PURE_MODULES = ("firewall.plan", "firewall.shards", "firewall.spa_shape")

PURE = sorted(m for m in modules() if m.split(".")[0] in PURE_FOLDERS or m in PURE_MODULES)


def test_the_pure_rooms_are_what_we_think():
    assert {"doors.engine", "doors.sequence", "doors.rules", "doors.first_steps", "firewall.plan"} <= set(PURE)


@pytest.mark.parametrize("module", PURE)
def test_a_pure_module_imports_only_pure_modules(module):
    """So that purity holds for everything the engine and the plan reach, not just their files."""
    outside, ours = imports(module)
    assert not outside & FORBIDDEN_MODULES, f"{module} imports {outside & FORBIDDEN_MODULES}"
    allowed = set(PURE) | {"errors", "", "doors", "firewall"}
    assert ours <= allowed, f"{module} imports {ours - allowed}, which may do I/O"


@pytest.mark.parametrize("module", PURE)
def test_pure_module_opens_no_files_or_sockets(module):
    called = set()
    for node in ast.walk(ast.parse((PACKAGE / modules()[module]).read_text())):
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
