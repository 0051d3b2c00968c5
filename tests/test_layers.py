"""The import layers (docs/ARCHITECTURE.md): protocol <- messages <- context <-
ai, handlers <- worker. A module may import its own layer and the layers
below, never one above, TYPE_CHECKING and function-level imports included;
and no import cycle among the modules these rules cover."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "neurohttp"

# module (or package) -> what it must never import
FORBIDDEN = {
    "neurohttp.context": ["neurohttp.ai", "neurohttp.handlers", "neurohttp.worker",
                          "neurohttp.master", "neurohttp.app", "neurohttp.plugins",
                          "neurohttp.cli"],
    "neurohttp.ai": ["neurohttp.handlers", "neurohttp.worker", "neurohttp.master",
                     "neurohttp.cli"],
    "neurohttp.handlers": ["neurohttp.worker", "neurohttp.master", "neurohttp.cli"],
    "neurohttp.messages": ["neurohttp.context", "neurohttp.ai", "neurohttp.handlers",
                           "neurohttp.worker", "neurohttp.app"],
    "neurohttp.errors": ["neurohttp.context", "neurohttp.ai", "neurohttp.handlers",
                         "neurohttp.worker"],
    "neurohttp.protocol.ws_handshake": ["neurohttp.messages", "neurohttp.errors"],
}


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path) -> set[str]:
    """Every neurohttp module `name` imports, anywhere in its code."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in found if m == "neurohttp" or m.startswith("neurohttp.")}


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_no_module_imports_a_layer_above_its_own():
    bad = []
    for layer, banned in FORBIDDEN.items():
        for name, path in modules().items():
            if under(name, layer):
                bad += [f"{name} imports {imp}" for imp in imports(name, path)
                        if any(under(imp, b) for b in banned)]
    assert not bad, "\n".join(sorted(set(bad)))


# The connection layer's modules, being rewritten on their own (issue 10 item 2):
# their TYPE_CHECKING import of the Worker still closes a cycle among them.
CONNECTION_LAYER = ("neurohttp.worker.connection", "neurohttp.worker.websocket",
                    "neurohttp.worker.base", "neurohttp.worker.acceptor")


def test_no_import_cycle_outside_the_connection_layer():
    """Tarjan over every module but the connection layer's (the composition
    root, worker/worker.py, included: handlers typed with the Worker made a
    cycle through it)."""
    mods = {n: p for n, p in modules().items()
            if not any(under(n, c) for c in CONNECTION_LAYER)}
    graph = {}
    for n, p in mods.items():
        targets = set()
        for imp in imports(n, p):
            while imp and imp not in mods:
                imp = imp.rpartition(".")[0]
            if imp and imp != n and not (mods[imp].name == "__init__.py" and under(n, imp)):
                targets.add(imp)
        graph[n] = targets
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles
