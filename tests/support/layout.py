"""The package's modules and who imports whom, read from the source (imports inside functions
included: a cycle hidden that way is still a cycle)."""

import ast
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "nfknock"


@cache
def modules() -> dict[str, Path]:
    """Dotted name under nfknock ('' for the package itself, 'doors' for doors/__init__) -> path."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path.relative_to(PACKAGE)
    return out


@cache
def imports(module: str) -> tuple[frozenset[str], frozenset[str]]:
    """(outside top-level modules, nfknock modules) that `module` imports anywhere in its code."""
    known = modules()
    path = known[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = [p for p in package if p]
    outside, ours = set(), set()
    for node in ast.walk(ast.parse((PACKAGE / path).read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "nfknock" or alias.name.startswith("nfknock."):
                    ours.add(alias.name.removeprefix("nfknock").lstrip("."))
                else:
                    outside.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module == "nfknock" or (node.module or "").startswith("nfknock."):
                target = node.module.removeprefix("nfknock").lstrip(".")
            else:
                outside.add((node.module or "").split(".")[0])
                continue
            found = False
            for alias in node.names:  # `from . import engine` imports a module
                name = f"{target}.{alias.name}" if target else alias.name
                if name in known:
                    ours.add(name)
                    found = True
            if not found:
                ours.add(target)
    return frozenset(outside), frozenset(ours - {module})
