"""The layer contract (docs/ARCHITECTURE.md, "Layers"): every fluxlab module belongs to one layer and
imports only from its own layer or the ones below it, and no two modules import each other, even
through others. Read from the source with `ast`, so function-local imports count as much as
module-level ones; nothing is imported to check it.

    core < measure < model < pipeline < apps

`python tests/unit/test_layers.py` prints the import edges between layers.
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "fluxlab"

LAYERS = ("core", "measure", "model", "pipeline", "apps")

# Every module of the package, by name; a package (kernels/, measure/, commands/) is mapped as a
# whole. A module missing here fails `test_every_module_has_a_layer`: a new module must be placed.
LAYER_OF = {
    "fluxlab": "core",               # __init__: the version and one logging filter
    "fluxlab._atomic": "core",
    "fluxlab.config": "core",
    "fluxlab.env": "core",
    "fluxlab.errors": "core",        # the user-error type (may not exist yet)
    "fluxlab.store": "core",
    "fluxlab.plots": "core",
    "fluxlab.tables": "core",        # display only: Markdown tables, the verdict table, a record browser
    "fluxlab.measure": "measure",
    "fluxlab.bench": "measure",
    "fluxlab.memory": "measure",
    "fluxlab.gradflow": "measure",
    "fluxlab.models": "model",
    "fluxlab.attention": "model",
    "fluxlab.kernels": "model",
    "fluxlab.quant": "model",
    "fluxlab.fusion": "model",        # fused q/k/v projections (base + LoRA)
    "fluxlab.flux2": "model",         # the tiny FLUX.2 [klein] pipeline
    "fluxlab._pipeline_io": "model",  # dtype context, caption corpus, atomic pipeline save
    "fluxlab.data": "pipeline",
    "fluxlab.datacheck": "pipeline",  # dataset validation (fluxlab.data re-exports it)
    "fluxlab.caches": "pipeline",
    "fluxlab.checkpoints": "pipeline",
    "fluxlab.trainer": "pipeline",
    "fluxlab.training": "pipeline",
    "fluxlab.inference": "pipeline",
    "fluxlab.targets": "pipeline",   # validation targets build models, kernels and caches
    "fluxlab.cli": "apps",
    "fluxlab.__main__": "apps",
    "fluxlab.commands": "apps",
    "fluxlab.notebook": "apps",      # the papermill runner
    "fluxlab.sweeps": "apps",
    "fluxlab._kernel": "apps",
}

# Imports inside one layer that are still forbidden: training (fluxlab.trainer and the modules of
# fluxlab/training/) and inference are siblings, and the quantization both use lives below them
# (fluxlab.quant).
def _training(m: str) -> bool:
    return m == "fluxlab.trainer" or m == "fluxlab.training" or m.startswith("fluxlab.training.")


def _siblings(a: str, b: str) -> bool:
    return (_training(a) and b == "fluxlab.inference") or (a == "fluxlab.inference" and _training(b))

# Known back-edges, each with what removes it. The list is exact: a new
# back-edge fails, and so does an entry that no longer occurs, so it can only shrink.
KNOWN_BACK_EDGES = {
    # Not in the trainer's files, but kept until the gradient_flow notebook calls the kernels' own
    # gradcheck: gradflow.gradcheck_kernels looks the registry up by name, which test_gradflow checks.
    ("fluxlab.gradflow", "fluxlab.kernels"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _target(name: str) -> str | None:
    """The fluxlab module `name` refers to (a submodule if there is one, else the package)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    """Every fluxlab module `module` imports, at module level or inside functions, including
    `importlib.import_module` / `__import__` of a literal name."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            # `from fluxlab import store` imports the module fluxlab.store, not the package.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and (
                    (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                    or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")):
            names = [node.args[0].value]  # importlib.import_module("fluxlab.x") is an import too
        for n in names:
            t = _target(n) if n.split(".")[0] == "fluxlab" else None
            if t and t != module:
                out.add(t)
    return out


def layer(module: str) -> str | None:
    t = module
    while t:
        if t in LAYER_OF:
            return LAYER_OF[t]
        t = t.rpartition(".")[0] if t != "fluxlab" else ""
    return None


def _mapped(module: str) -> bool:
    # the root package maps only itself: fluxlab.x needs an entry of its own (or its package's)
    t = module
    while t and t != "fluxlab":
        if t in LAYER_OF:
            return True
        t = t.rpartition(".")[0]
    return module == "fluxlab"


EDGES = {(m, t) for m in MODULES for t in _imports(m)}


def _violations() -> set[tuple[str, str]]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return {(a, b) for a, b in EDGES
            if rank[layer(b)] > rank[layer(a)] or _siblings(a, b)}


def test_every_module_has_a_layer():
    unmapped = sorted(m for m in MODULES if not _mapped(m))
    assert not unmapped, f"add these modules to LAYER_OF in {__file__}: {unmapped}"


def test_no_import_points_to_a_higher_layer():
    found = _violations()
    new = sorted(found - KNOWN_BACK_EDGES)
    assert not new, "imports pointing up the layers (or between training and inference): " + \
        ", ".join(f"{a} ({layer(a)}) -> {b} ({layer(b)})" for a, b in new)
    gone = sorted(KNOWN_BACK_EDGES - found)
    assert not gone, f"these back-edges are gone: remove them from KNOWN_BACK_EDGES: {gone}"


def _cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph = collections.defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                comps.append(sorted(comp))

    for v in sorted({m for e in edges for m in e}):
        if v not in index:
            visit(v)
    return comps


def test_no_import_cycles():
    assert _cycles(EDGES) == []


def test_the_checker_sees_what_it_must():
    # The contract is only as good as the parser: a cycle, a relative import, a function-local
    # import and an importlib import of a literal name must all be seen.
    assert _cycles({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == [["a", "b", "c"]]
    assert ("fluxlab.kernels.qk_norm_rope", "fluxlab.kernels._common") in EDGES  # `from ._common import`
    assert ("fluxlab.kernels.qk_norm_rope", "fluxlab.attention") in EDGES        # model -> model: allowed
    assert ("fluxlab.store", "fluxlab.env") in EDGES                              # `from fluxlab import env`
    assert ("fluxlab.commands.generate", "fluxlab.inference") in EDGES            # function-local
    assert ("fluxlab.gradflow", "fluxlab.kernels") in EDGES                       # importlib.import_module


def edge_counts() -> collections.Counter:
    return collections.Counter((layer(a), layer(b)) for a, b in EDGES)


if __name__ == "__main__":
    for (a, b), n in sorted(edge_counts().items(), key=lambda kv: (LAYERS.index(kv[0][0]), LAYERS.index(kv[0][1]))):
        up = "  UP" if LAYERS.index(b) > LAYERS.index(a) else ""
        print(f"{a:>8} -> {b:<8} {n:3d}{up}")
    print("cycles:", _cycles(EDGES))
