"""The package's modules form layers without import cycles (STYLE.md: a lower module never
needs a higher one).

The import graph is read from the source with `ast`, so imports inside functions count as
much as those at the top of a module: a function-level import hides a cycle from Python's
import machinery, not from this test.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dpo_cli"

# Bottom to top. A module may import modules of its own layer and of the layers below, never
# of a layer above. A name covers the module and, for a package, everything in it. A module
# listed in no layer belongs to APP, with the training loop (a new builder or step module):
# nothing below APP may import it, so a new low-level module must be listed before a lower
# one can use it.
LAYERS: list[tuple[str, ...]] = [
    # Leaves: exceptions, the batch contract, option schemas from signatures, process plumbing, hub probes.
    ("dpo_cli.errors", "dpo_cli.batch", "dpo_cli.options", "dpo_cli.distributed", "dpo_cli.hub", "dpo_cli.schedule"),
    # Numerics and models: the LM head, attention inputs, log-probs, losses, model sources and loading, compiling.
    (
        "dpo_cli.lmhead",
        "dpo_cli.attention",
        "dpo_cli.logprobs",
        "dpo_cli.losses",
        "dpo_cli.modeling",
        "dpo_cli.compiling",
    ),
    # Data (formats, tokenizing, collating, the data section's dataclasses), the layouts, which
    # check themselves on it, and the config schema, which holds the data section's dataclasses.
    ("dpo_cli.data", "dpo_cli.layout", "dpo_cli.schema"),
    # The parts a run is built from: checkpoints, references, metrics and trackers, memory, LoRA,
    # optimizers, reports, the model card and its push, judges, benchmarks, the tasks' objectives.
    (
        "dpo_cli.checkpoint",
        "dpo_cli.reference",
        "dpo_cli.refcache",
        "dpo_cli.warmstart",
        "dpo_cli.memory",
        "dpo_cli.lora",
        "dpo_cli.metrics",
        "dpo_cli.report",
        "dpo_cli.recap",
        "dpo_cli.judges",
        "dpo_cli.evalgen",
        "dpo_cli.rundir",
        "dpo_cli.signals",
        "dpo_cli.launch",
        "dpo_cli.slurm",
        "dpo_cli.optimizers",
        "dpo_cli.tracking",
        "dpo_cli.card",
        "dpo_cli.publish",
        "dpo_cli.harness",
        "dpo_cli.reward",
        "dpo_cli.rewardformat",
        "dpo_cli.tasks",
        "dpo_cli.pairing",
        "dpo_cli.roundfiles",
    ),
    # The whole config's validation, a recorded config read back, the rounds' configs, and the
    # checks before a run: they read every part.
    ("dpo_cli.keys", "dpo_cli.config", "dpo_cli.recorded", "dpo_cli.roundconfig", "dpo_cli.preflight"),
    # The training loop, the rounds that run it, and evaluation (APP).
    ("dpo_cli.train", "dpo_cli.rounds", "dpo_cli.evaluate", "dpo_cli.evalmode", "dpo_cli.throughput"),
    # The entry point and its command line, on top.
    ("dpo_cli.cli", "dpo_cli.overrides", "dpo_cli.__main__"),
]
APP = len(LAYERS) - 2


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(node: ast.Import | ast.ImportFrom, name: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """The dotted names an import statement in module `name` loads: for `from X import y`, X.y
    where y is a submodule, else X (whose __init__ defines y); relative forms resolved."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = name.split(".") if is_package else name.split(".")[:-1]
        anchor = package[: len(package) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package modules it imports, anywhere in its source (function bodies too).

    Importing `a.b.c` also runs package `a.b`'s __init__ first: that counts as an edge to `a.b`,
    except from inside `a.b` itself (the package is then already being imported)."""
    modules = _modules(package)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _imported(node, name, is_package, modules):
                parts = target.split(".")
                for k in range(2, len(parts) + 1):
                    mod = ".".join(parts[:k])
                    inside = name == mod or name.startswith(mod + ".")
                    if mod in modules and mod != name and (k == len(parts) or not inside):
                        graph[name].add(mod)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> int:
    for k, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return k
    return APP


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module in a higher layer, as 'importer (layer) -> imported (layer)'."""
    return sorted(
        f"{m} ({layer_of(m)}) -> {t} ({layer_of(t)})"
        for m, targets in graph.items()
        for t in targets
        if layer_of(t) > layer_of(m)
    )


def private_imports() -> list[str]:
    """Every `from dpo_cli.X import _name` of a private name of another module, as 'importer: X._name'
    (a dunder such as `__version__` is public by convention)."""
    found = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("dpo_cli"):
                if node.module != name:
                    private = [a.name for a in node.names if a.name.startswith("_") and not a.name.endswith("__")]
                    found += [f"{name}: {node.module}.{a}" for a in private]
    return sorted(found)


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """Top-level, function-level, `from package import module` and relative imports are all
    edges, and so is a subpackage's __init__ imported from outside it; a cycle through a
    function-level import is found."""
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from dpo_cli import b  # hidden in a function\n",
        "b.py": "from . import c\nfrom .sub import X\n",  # X: a name sub/__init__.py defines
        "c.py": "import dpo_cli.sub.d\n",
        "sub/__init__.py": "from .d import X\n",
        "sub/d.py": "from dpo_cli.sub import e\nX = 1\n",
        "sub/e.py": "def g():\n    from dpo_cli.a import f\n",
    }
    for name, text in files.items():
        (tmp_path / "dpo_cli" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "dpo_cli" / name).write_text(text)
    graph = import_graph(tmp_path / "dpo_cli")
    assert {m.removeprefix("dpo_cli."): sorted(t.removeprefix("dpo_cli.") for t in ts) for m, ts in graph.items()} == {
        "dpo_cli": [],
        "a": ["b"],
        "b": ["c", "sub"],
        "c": ["sub", "sub.d"],  # importing sub.d runs sub/__init__.py first
        "sub": ["sub.d"],
        "sub.d": ["sub.e"],  # a submodule: not its own package's __init__, already being imported
        "sub.e": ["a"],
    }
    assert cycles(graph) == [["dpo_cli.a", "dpo_cli.b", "dpo_cli.c", "dpo_cli.sub", "dpo_cli.sub.d", "dpo_cli.sub.e"]]


def test_the_checks_find_a_cycle_and_an_upward_import():
    graph = {"dpo_cli.errors": {"dpo_cli.cli"}, "dpo_cli.cli": {"dpo_cli.errors"}, "dpo_cli.batch": set()}
    assert cycles(graph) == [["dpo_cli.cli", "dpo_cli.errors"]]
    assert upward(graph) == [f"dpo_cli.errors (0) -> dpo_cli.cli ({len(LAYERS) - 1})"]
    assert layer_of("dpo_cli.some_new_loop_module") == APP  # unlisted: with the training loop


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "modules that import each other, directly or through others: " + "; ".join(
        " <-> ".join(c) for c in found
    )


def test_no_module_imports_a_higher_layer():
    found = upward(import_graph())
    assert not found, "imports of a higher layer (see LAYERS):\n" + "\n".join(found)


def test_no_module_imports_a_private_name_of_another():
    """A name another module needs is part of its interface: make it public where it lives."""
    found = private_imports()
    assert not found, "private names imported from other modules:\n" + "\n".join(found)


def test_every_listed_module_exists():
    """A layer that names a module the package no longer has is out of date."""
    modules = _modules()
    stale = [n for names in LAYERS for n in names if n not in modules]
    assert not stale, f"LAYERS names modules that do not exist: {stale}"
