"""The house: which room may use which, and no import cycle anywhere (imports inside functions
count: hiding a cycle that way is how the old daemon and workers modules grew together)."""

from support.layout import imports, modules

# room -> rooms it must never import (its own and the shared edges are always fine)
FORBIDDEN = {
    "doors": {"firewall", "daemon", "fleet", "tools", "cli", "loading"},
    "firewall": {"daemon", "fleet", "tools", "cli"},
    "fleet": {"daemon", "tools", "cli", "firewall"},
    "daemon": {"tools", "cli"},
}


def room(module: str) -> str:
    return module.split(".")[0]


def test_no_room_reaches_into_a_room_above_it():
    wrong = [
        f"{module} imports {target}"
        for module in modules()
        for target in imports(module)[1]
        if room(target) in FORBIDDEN.get(room(module), ())
    ]
    assert wrong == []


def test_there_is_no_import_cycle():
    graph = {module: set(imports(module)[1]) for module in modules()}
    for module, targets in graph.items():  # importing a.b.c runs a/__init__ first, unless we are in a.
        for target in list(targets):
            parts = target.split(".")
            parents = {".".join(parts[:i]) for i in range(1, len(parts))}
            targets |= {p for p in parents if not (module == p or module.startswith(p + "."))}
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target) :] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert cycles == []


def test_the_layout_check_sees_imports_inside_functions():
    """The check itself: cli imports the daemon only inside a function."""
    assert "daemon" in {room(target) for target in imports("cli")[1]}
