"""The layering of the code, enforced: imports are parsed from the source (every import statement,
inside functions too; ``if TYPE_CHECKING:`` blocks are types only and do not count), and the
orchestration side is imported for real to see that torch stays out of the Prefect worker."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("prolong", "flows", "tasks")
# the orchestrator's modules: the Prefect worker and the CLI's run path import these
ORCHESTRATION = ("prolong.pipeline", "prolong.snapshots", "prolong.preflight", "prolong.doctor", "prolong.lease",
                 "flows", "tasks")
# what runs inside jobs (python -m prolong.jobs.entry and everything it loads)
JOB_SIDE = ("prolong.data", "prolong.model", "prolong.train", "prolong.parallel", "prolong.eval",
            "prolong.jobs.entry")
# store paths are spelled in prolong.layout only
PATH_WORDS = re.compile(r"manifest\.json|job\.json|lease\.json|recipe\.json|progress\.json|\bCOMPLETE\b|"
                        r"checkpoints/|/checkpoints|/evals/|\.previous|streams/")


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement of a module, functions included."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[int, str]] = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.extend((child.lineno, a.name) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base]) if base else ".".join(anchor)
                for a in child.names:  # `from pkg import submodule` imports the submodule
                    found.append((child.lineno, f"{base}.{a.name}" if f"{base}.{a.name}" in ALL else base))
            visit(child)

    visit(tree)
    return found


ALL = modules()


def internal_graph() -> dict[str, set[str]]:
    graph = {name: set() for name in ALL}
    for name, path in ALL.items():
        for _, imported in imports_of(name, path):
            target = imported
            while target and target not in ALL:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                graph[name].add(target)
    return graph


def under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_model_code_knows_nothing_of_parallelism_or_training():
    bad = [f"{ALL[name].relative_to(ROOT)}:{line} imports {imp}" for name in ALL if under(name, ("prolong.model",))
           for line, imp in imports_of(name, ALL[name]) if under(imp, ("prolong.parallel", "prolong.train"))]
    assert not bad, "\n".join(bad)


def test_the_library_imports_no_prefect():
    """prolong/ is usable without Prefect: flows/ and tasks/ (the CLI included) are its adapters."""
    bad = [f"{ALL[name].relative_to(ROOT)}:{line} imports {imp}" for name in ALL if under(name, ("prolong",))
           for line, imp in imports_of(name, ALL[name]) if under(imp, ("prefect", "flows", "tasks"))]
    assert not bad, "\n".join(bad)


def test_job_side_code_never_imports_the_orchestration_side():
    bad = [f"{ALL[name].relative_to(ROOT)}:{line} imports {imp}" for name in ALL if under(name, JOB_SIDE)
           for line, imp in imports_of(name, ALL[name]) if under(imp, ORCHESTRATION)]
    assert not bad, "\n".join(bad)


def test_there_is_no_import_cycle():
    graph = internal_graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def strongconnect(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
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
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    assert not cycles, "import cycles:\n" + "\n".join(" ↔ ".join(c) for c in cycles)


def test_the_orchestration_side_never_imports_torch():
    code = ("import sys, importlib\n"
            f"mods = {[m for m in ALL if under(m, ORCHESTRATION)]!r}\n"
            "for m in mods: importlib.import_module(m)\n"
            "from prolong.recipe import load_recipe\n"
            "r = load_recipe('recipes/tiny.yaml')\n"
            "[r.stage(s).config_digest() for s in r.graph.order]  # every stage kind loaded\n"
            "print(' '.join(m for m in ('torch', 'transformers', 'deepspeed', 'streaming') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "", f"the orchestration side imported: {out.stdout.strip()}"


def test_store_paths_are_spelled_in_prolong_layout_only():
    bad = []
    for name, path in ALL.items():
        if name == "prolong.layout":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                      and isinstance(n.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                    and PATH_WORDS.search(node.value):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not bad, "store paths outside prolong/layout.py:\n" + "\n".join(bad)


@pytest.mark.parametrize("name", [m for m in ALL if under(m, PACKAGES)])
def test_library_files_stay_under_600_lines(name):
    lines = len(ALL[name].read_text().splitlines())
    assert lines <= 620, f"{ALL[name].relative_to(ROOT)}: {lines} lines"
