"""The Python standard library installed here, read as documents without importing it: its
modules' docstrings and the signatures of their public functions (the tiny assets' raw material)."""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path
from typing import Iterator

# Packages of the stdlib that are test suites, data tables or vendored copies, not "repositories".
STDLIB_EXCLUDE = ("test", "idlelib", "encodings", "pydoc_data", "__phello__", "turtledemo", "lib2to3",
                  "site-packages", "ensurepip", "config-3.11-x86_64-linux-gnu")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_modules() -> Iterator[tuple[str, Path]]:
    root = stdlib_dir()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in STDLIB_EXCLUDE or rel.parts[0].startswith("_") and len(rel.parts) > 1:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts and all(p.isidentifier() for p in parts):
            yield ".".join(parts), path


def signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        return f"({ast.unparse(node.args)})"
    except Exception:  # unparse of exotic defaults
        return "(...)"


def module_docs(path: Path) -> tuple[str | None, list[tuple[str, str, str]]]:
    """(module docstring, [(qualname, signature, docstring)]) without importing the module."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None, []
    items: list[tuple[str, str, str]] = []

    def visit(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name.startswith("_"):
                    continue
                doc = ast.get_docstring(node)
                sig = signature(node) if not isinstance(node, ast.ClassDef) else ""
                if doc:
                    items.append((prefix + node.name, sig, doc))
                if isinstance(node, ast.ClassDef):
                    visit(node.body, prefix + node.name + ".")

    visit(tree.body, "")
    return ast.get_docstring(tree), items


def first_paragraph(doc: str, limit: int = 400) -> str:
    para = doc.strip().split("\n\n")[0]
    para = " ".join(para.split())
    return para if len(para) <= limit else para[:limit].rsplit(" ", 1)[0] + " ..."
