"""A real-text corpus found on every machine: the docstrings of the Python standard library."""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
from collections.abc import Iterator


def _stdlib_files() -> Iterator[str]:
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


def _docstrings(path: str) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def stdlib_passages(min_chars: int = 200, max_chars: int = 2000) -> dict[str, list[str]]:
    """Paragraph-level passages from stdlib docstrings, split by source file into ``train`` and
    ``heldout`` (about 1 file in 10 held out, chosen by a hash of its path, so it is stable)."""
    splits: dict[str, list[str]] = {"train": [], "heldout": []}
    seen: set[str] = set()
    root = sysconfig.get_paths()["stdlib"]
    for path in _stdlib_files():
        rel = os.path.relpath(path, root)
        split = "heldout" if hashlib.sha1(rel.encode()).digest()[0] < 26 else "train"
        for doc in _docstrings(path):
            text = " ".join(doc.split())
            if len(text) < min_chars or text in seen:
                continue
            seen.add(text)
            splits[split].append(text[:max_chars])
    return splits
