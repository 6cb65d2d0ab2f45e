"""Imports point down only, with no cycles, and the algorithms import no Lightning (README: Layout).

    core, datamodules, models   ->   algorithms   ->   callbacks   ->   pipeline, entry points, benchmarks

Every `import` statement counts, also those inside functions: a lazy import hides a dependency, it does not remove it.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

LAYERS = {"core": 0, "datamodules": 1, "models": 1, "algorithms": 2, "callbacks": 3, "pipeline": 4}
TOP = {"train", "compare", "interpret", "report", "benchmarks"}
# callbacks decide what applies from core/protocol.py's capabilities, never from model classes
FORBIDDEN = {("callbacks", "models")}


def project_modules() -> dict[str, Path]:
    mods = {}
    for pkg in list(LAYERS) + ["benchmarks"]:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            rel = f.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
            mods[".".join(parts)] = f
    for f in sorted(ROOT.glob("*.py")):
        mods[f.stem] = f
    return mods


def imports_of(path: Path, module: str, known: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in the file (resolved to the longest known module name)."""
    found = set()
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([p for p in anchor if p] + ([base] if base else []))
            names = [f"{base}.{a.name}" if base else a.name for a in node.names] + [base]
        for name in names:
            parts = name.split(".")
            for i in range(len(parts), 0, -1):
                candidate = ".".join(parts[:i])
                if candidate in known and candidate != module:
                    found.add(candidate)
                    break
    return found


def layer(module: str) -> tuple[str, int]:
    top = module.split(".")[0]
    if top in LAYERS:
        return top, LAYERS[top]
    return top, 5 if top in TOP else -1


def test_imports_point_down_only():
    known = project_modules()
    bad = []
    for mod, path in known.items():
        src_name, src_rank = layer(mod)
        for dep in imports_of(path, mod, known):
            dst_name, dst_rank = layer(dep)
            if dst_rank > src_rank or (src_name, dst_name) in FORBIDDEN:
                bad.append(f"{mod} ({src_name}) imports {dep} ({dst_name})")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    known = project_modules()
    graph = {m: imports_of(p, m, known) for m, p in known.items()}
    # a package's __init__ importing its own submodules is not a cycle between concepts
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_algorithms_and_core_import_no_lightning():
    known = [m for m in project_modules() if m.split(".")[0] in ("core", "algorithms")]
    code = ("import importlib, sys\n"
            f"for m in {known!r}:\n    importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('pytorch_lightning', 'lightning')))\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"Lightning imported by core/algorithms: {out.stdout.strip()}"
