"""Reading a rules file's YAML with bounds, so a hostile or botched file costs little to refuse.

PyYAML's `safe_load` builds no objects of arbitrary types, but it still lets a small file cost a
lot: an alias bomb ("billion laughs") expands into 10^8 leaves once anything walks it, deep
nesting raises RecursionError, and an invalid date raises a bare ValueError. This loader

* composes the node graph first (libyaml when PyYAML has it, which is also 4x faster) and
  refuses it before anything is constructed if, with every alias expanded, it has more than
  MAX_NODES nodes or is nested more than MAX_DEPTH levels, or if an alias refers to a node
  that contains it. Aliases themselves stay allowed: `protect: &ssh [22/tcp]` ... `protect:
  *ssh` and `<<: *defaults` are handy in a file of many doors, and cost only what they expand to;
* does not resolve timestamps: a plain `2026-02-30` (or `2026-02-28`) is the string it looks
  like, which is what a door name or any other field of a rules file wants; nothing in a rules
  file is a date. An explicit `!!timestamp` tag still constructs one (and fails on a bad date).

Every problem is a `yaml.YAMLError`; callers still catch everything (a constructor can raise
ValueError, e.g. for an integer of more than 4300 digits).
"""

from __future__ import annotations

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

MAX_NODES = 250_000  # a 1 MiB file of real doors has well under this; a bomb has 10^8
MAX_DEPTH = 16  # rules files need 5: file, doors, door, rotate/lockout, value

TIMESTAMP = "tag:yaml.org,2002:timestamp"


class LimitError(yaml.YAMLError):
    """A document refused for its size or shape, not for its syntax."""


class _Resolver(Resolver):
    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != TIMESTAMP]
        for first, resolvers in Resolver.yaml_implicit_resolvers.items()
    }


class PyLoader(Reader, Scanner, Parser, Composer, SafeConstructor, _Resolver):
    """PyYAML's pure-Python safe loader, minus timestamps."""

    def __init__(self, stream):
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        _Resolver.__init__(self)


if getattr(yaml, "__with_libyaml__", False):
    from yaml.cyaml import CParser  # type: ignore[attr-defined]

    class CLoader(CParser, SafeConstructor, _Resolver):
        """The same on libyaml's parser and composer."""

        def __init__(self, stream):
            CParser.__init__(self, stream)
            SafeConstructor.__init__(self)
            _Resolver.__init__(self)

    LOADERS: tuple[type, ...] = (CLoader, PyLoader)
else:  # pragma: no cover - PyYAML built without libyaml
    LOADERS = (PyLoader,)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if node.__class__ is yaml.MappingNode:
        return [part for pair in node.value for part in pair]
    return node.value


def check_shape(root: yaml.Node) -> None:
    """Refuse a node graph that is too big once aliases are expanded, too deep, or cyclic.

    One pass over the graph as composed (each shared node is visited once), without recursion;
    scalars, most of the nodes, are counted where they hang."""
    if root.__class__ is yaml.ScalarNode:
        return
    scalar = yaml.ScalarNode
    size: dict[int, int] = {}  # id(collection) -> nodes in its expanded tree
    depth: dict[int, int] = {}
    open_nodes: set[int] = set()  # started and not finished: exactly the path from the root
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_nodes.discard(key)
            total, deepest = 1, 0
            for child in _children(node):
                if child.__class__ is scalar:
                    total += 1
                    deepest = deepest or 1
                else:
                    total += size[id(child)]
                    deepest = max(deepest, depth[id(child)])
            if total > MAX_NODES:
                raise LimitError(f"more than {MAX_NODES} YAML nodes once aliases are expanded")
            if deepest >= MAX_DEPTH:
                raise LimitError(f"nested more than {MAX_DEPTH} levels deep")
            size[key], depth[key] = total, deepest + 1
            continue
        if key in size:
            continue
        if key in open_nodes:
            raise LimitError(f"line {node.start_mark.line + 1}: an alias refers to a node that contains it")
        open_nodes.add(key)
        if len(open_nodes) > MAX_DEPTH:
            raise LimitError(f"nested more than {MAX_DEPTH} levels deep")
        stack.append((node, True))
        stack.extend(
            (child, False) for child in _children(node) if child.__class__ is not scalar and id(child) not in size
        )


def load(text: str, loader_class: type = LOADERS[0]):
    """The one document in `text` as plain Python data (None for an empty document)."""
    loader = loader_class(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:  # the pure-Python composer recurses; libyaml stops at 1000 levels
            raise LimitError(f"nested more than {MAX_DEPTH} levels deep") from None
        if node is None:
            return None
        check_shape(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()
