"""The package's import graph: every module imports on its own, and no two modules
import each other, directly or through others — including imports hidden inside
functions or at the bottom of a file (only ``if TYPE_CHECKING:`` blocks are exempt).
Layers import downward only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "sortednet"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(name: str) -> set[str]:
    """Package modules that ``name`` imports anywhere in its body (not under TYPE_CHECKING)."""
    path = MODULES[name]
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                full = f"{mod}.{alias.name}"
                out.add(full if full in MODULES else mod)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in out if m in MODULES and m != name}



def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := dfs(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := dfs(n)):
            return c
    return None


def test_import_graph_has_no_cycle():
    # the top-level package re-exports everything (it is the facade, never imported from inside)
    graph = {n: imports_of(n) - {"sortednet"} for n in MODULES if n != "sortednet"}
    inside = [n for n, deps in graph.items() if "sortednet" in imports_of(n)]
    assert not inside, f"modules importing the top-level package: {inside}"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_detects_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


_ALONE = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for m in [m for m in sys.modules if m == "sortednet" or m.startswith("sortednet.")]:
        del sys.modules[m]          # torch stays loaded; every sortednet module is imported afresh
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc(limit=3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_on_its_own():
    """Each module, imported first in a clean package state, pulls in what it needs by itself."""
    names = sorted(MODULES)
    r = subprocess.run([sys.executable, "-c", _ALONE, *names], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]


_EXPORT_ALONE = """
import sys, torch, transformers as T, sortednet as sn
assert "sortednet.integrations" not in sys.modules
m = T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
nest = sn.wrap(m, sn.Depth("d", [2, 4], layers="model.layers"))
print(nest.export("d=2").config.num_hidden_layers)
"""


def test_exporting_a_transformers_model_needs_no_import_of_the_integrations():
    """``export`` of a transformers model declared by hand refused until ``sortednet.integrations`` (which
    cuts its config) had been imported; it imports it itself now."""
    pytest.importorskip("transformers")
    r = subprocess.run([sys.executable, "-c", _EXPORT_ALONE], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.split()[-1] == "2", (r.stdout + r.stderr)[-3000:]


def test_an_older_torch_is_refused_at_import_by_name():
    """On torch 2.10 training inside one autocast region drifted, on 2.8 the suite's FSDP2 training cases gave
    other results than one process, in silence; on 2.6 the package raised a raw AttributeError at import. Below
    the oldest release the suite passes on, the import refuses, naming both versions."""
    code = "import torch; torch.__version__ = '2.10.0+cu128'\nimport sortednet"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parents[1])
    assert out.returncode != 0
    assert "ImportError: sortednet needs torch >= 2.11; this is torch 2.10.0+cu128" in out.stderr
    ok = subprocess.run([sys.executable, "-c", "import sortednet"], capture_output=True, text=True,
                        cwd=PKG.parents[1])
    assert ok.returncode == 0, ok.stderr
