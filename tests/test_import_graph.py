"""The package's import graph (docs/ARCHITECTURE.md, "Layers"): the layers are
`protocol <- messages <- context <- ai, handlers <- worker` (A <- B: B may
import A, never the other way), TYPE_CHECKING and function-level imports
counted. The protocol layer imports nothing of the package above it, the
connection modules never the composition root, and no import cycle runs
through the protocol or connection layers, or through anything at all."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "neurohttp"

# the connection layer (worker/ minus the composition root, worker.py)
CONNECTION = ["neurohttp.worker.connection", "neurohttp.worker.websocket",
              "neurohttp.worker.base", "neurohttp.worker.host", "neurohttp.worker.acceptor"]


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        name = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in its code."""
    mods = modules()
    g: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[:len(parts) - (node.level - 1)]
                                    + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]  # `from x import name`: the module x
                # (importing a package's child runs the package's __init__: not an edge back)
                if t and t != name and not name.startswith(t + "."):
                    g[name].add(t)
    return g


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def under(module: str, prefixes: list[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_protocol_layer_imports_nothing_above_it():
    bad = [f"{m} imports {t}" for m, ts in graph().items() if under(m, ["neurohttp.protocol"])
           for t in ts if not under(t, ["neurohttp.protocol"]) and t != "neurohttp"]
    assert not bad, "\n".join(sorted(bad))


def test_messages_import_only_the_protocol_layer():
    g = graph()
    bad = [t for t in g["neurohttp.messages"] if not under(t, ["neurohttp.protocol"])]
    assert not bad, bad


def test_connections_never_import_the_composition_root_or_the_layers_above():
    above = ["neurohttp.worker.worker", "neurohttp.handlers", "neurohttp.ai",
             "neurohttp.context", "neurohttp.app", "neurohttp.plugins", "neurohttp.master"]
    bad = [f"{m} imports {t}" for m, ts in graph().items() if m in CONNECTION
           for t in ts if under(t, above)]
    assert not bad, "\n".join(sorted(bad))


# module (or package) -> what it must never import (the layers above it)
FORBIDDEN = {
    "neurohttp.context": ["neurohttp.ai", "neurohttp.handlers", "neurohttp.worker",
                          "neurohttp.master", "neurohttp.app", "neurohttp.plugins",
                          "neurohttp.cli"],
    "neurohttp.ai": ["neurohttp.handlers", "neurohttp.worker", "neurohttp.master",
                     "neurohttp.cli"],
    "neurohttp.handlers": ["neurohttp.worker", "neurohttp.master", "neurohttp.cli"],
    "neurohttp.errors": ["neurohttp.context", "neurohttp.ai", "neurohttp.handlers",
                         "neurohttp.worker"],
}


def test_no_module_imports_a_layer_above_its_own():
    bad = [f"{m} imports {t}" for layer, banned in FORBIDDEN.items()
           for m, ts in graph().items() if under(m, [layer])
           for t in ts if under(t, banned)]
    assert not bad, "\n".join(sorted(set(bad)))


def test_no_import_cycle_runs_through_the_protocol_or_connection_layers():
    mine = ["neurohttp.protocol", "neurohttp.messages", *CONNECTION]
    bad = [c for c in cycles(graph()) if any(under(m, mine) for m in c)]
    assert not bad, bad


def test_no_import_cycle_anywhere():
    found = cycles(graph())
    assert not found, "\n".join(", ".join(c) for c in found)


def test_the_cycle_finder_finds_a_cycle():
    """(The check above can fail: a made-up graph with a cycle is found.)"""
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]]
