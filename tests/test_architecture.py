"""The package's import graph: no cycles, and no layer imports one above it.

Every ``import iqa_ray...`` counts, at module level or inside a function: an import inside a function
is still a dependency (it only hides a cycle from Python's import machinery). The layers, lowest
first, are listed in ``LAYERS``; docs/ARCHITECTURE.md draws them. A new module must be placed in
a layer here, so the contract covers it.
"""

from __future__ import annotations

import ast
import fnmatch
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "iqa_ray"

# Lowest first; a module may import modules of its own layer and of the layers below it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("iqa_ray.core", "iqa_ray.core.*")),
    ("data and models", ("iqa_ray.data", "iqa_ray.data.*", "iqa_ray.models", "iqa_ray.models.*")),
    ("training", ("iqa_ray.training", "iqa_ray.training.*", "iqa_ray.ssl", "iqa_ray.ssl.*")),
    ("evaluation", ("iqa_ray.evaluation", "iqa_ray.evaluation.*")),
    ("trainables", ("iqa_ray.trainables", "iqa_ray.trainables.*")),
    ("search", ("iqa_ray.search", "iqa_ray.search.*")),
    ("commands", ("iqa_ray", "iqa_ray.__main__", "iqa_ray.cli", "iqa_ray.cli.*")),
]


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in its code)."""
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        graph[name]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from iqa_ray.search import console` imports the module iqa_ray.search.console
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                           for a in node.names]
            for target in targets:
                if target.split(".")[0] == "iqa_ray":
                    resolved = resolve(target)
                    if resolved and resolved != name:
                        graph[name].add(resolved)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
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
    for rank, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return rank
    raise LookupError(module)


def test_there_are_no_import_cycles():
    found = cycles(import_graph())
    graph = import_graph()
    detail = "\n".join(f"  {' <-> '.join(c)}: " + "; ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a] & set(c)))
                       for c in found)
    assert not found, f"{len(found)} import cycles:\n{detail}"


def test_every_module_has_a_layer():
    unplaced = [m for m in sorted(modules()) if not any(fnmatch.fnmatchcase(m, p) for _, ps in LAYERS for p in ps)]
    assert not unplaced, f"place these modules in a layer of tests/test_architecture.py: {unplaced}"


def test_no_module_imports_a_layer_above_its_own():
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})"
              for a, targets in sorted(import_graph().items()) for b in sorted(targets) if layer_of(b) > layer_of(a)]
    assert not upward, "imports of a higher layer:\n  " + "\n  ".join(upward)


def test_the_checker_sees_cycles_through_function_level_imports(tmp_path, monkeypatch):
    """The contract can fail: a cycle hidden in a function is found, and so is an upward import."""
    package = tmp_path / "iqa_ray"
    for sub in ("core", "training"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "training" / "engine.py").write_text("import os\n\ndef fit():\n    from iqa_ray.ssl import pretrain\n")
    (package / "ssl.py").write_text("from iqa_ray.training.engine import fit\n")
    (package / "core" / "metrics.py").write_text("def srcc():\n    from iqa_ray.training import engine\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", package)
    graph = import_graph()
    assert cycles(graph) == [["iqa_ray.ssl", "iqa_ray.training.engine"]]
    assert graph["iqa_ray.core.metrics"] == {"iqa_ray.training.engine"}
    assert layer_of("iqa_ray.training.engine") > layer_of("iqa_ray.core.metrics")
    with pytest.raises(AssertionError, match="iqa_ray.core.metrics \\(core\\) -> iqa_ray.training.engine \\(training\\)"):
        test_no_module_imports_a_layer_above_its_own()


def test_reading_a_config_or_starting_a_trial_imports_no_model_library_until_a_model_is_built():
    """Every Ray worker imports the modules of what it runs: a config, the trainable. timm (with
    torchvision and torch._dynamo, about 2 s per process) and scikit-learn's mixtures load when a
    backbone or a GMM is built, so a process that only reads configs (the launcher, the probe on a
    feature cache, PIQE and BRISQUE) never pays them."""
    import json
    import subprocess
    import sys

    code = ("import json, sys\n"
            "import iqa_ray.training.config, iqa_ray.trainables.iqa, iqa_ray.search.tasks\n"
            "before = [m for m in ('timm', 'torchvision', 'sklearn.mixture') if m in sys.modules]\n"
            "from iqa_ray.models.backbones import create_backbone\n"
            "create_backbone('efficientnet_lite0', pretrained='none')\n"
            "print(json.dumps([before, 'timm' in sys.modules]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[], True]


def test_importing_ray_in_the_installed_environment_builds_no_grammar():
    """Ray imports jsonschema in every process it starts (each daemon, task worker and trial actor).
    jsonschema imports rfc3987-syntax where it is installed, which builds an Earley parser with lark
    at import: about 2.5 s of CPU per process, and a ``ray.init`` took 3x the CPU with it
    (benchmarks/process_start.py). JupyterLab brings it (jupyter-events), so JupyterLab is the
    ``lab`` extra, outside ``dev``: this fails if a dependency brings it back."""
    import subprocess
    import sys

    code = "import sys, ray\nprint(sorted(m for m in ('lark', 'rfc3987_syntax') if m in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = out.stdout.strip().splitlines()[-1]
    assert loaded == "[]", (
        f"`import ray` loaded {loaded}: rfc3987-syntax is installed here (JupyterLab's jupyter-events brings it), "
        "and every process Ray starts pays about 2.5 s of CPU for it. Install JupyterLab in an environment of its "
        "own (`pip install -e \".[lab]\"` there, docs/RESULTS.md), or `pip uninstall rfc3987-syntax lark` here.")
