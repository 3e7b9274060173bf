"""The identity of a plugin's code, for the stage hashes: editing a method's file is a new result.

``code_fingerprint("hftlab.defenses.vaccine")`` hashes the module's syntax tree and those of every
hftlab module it imports, transitively (``.perturbation``, ``.base``, ``..models.introspect`` …).
Docstrings and comments are not part of it, so editing them keeps the caches. ``hftlab.config`` is
left out: the config's values are already in every hash, and its code is parsing and validation.
Code that the plugin does not import (the training loop, the evaluation) is not covered either: after
changing it, use a new ``out_dir``.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.machinery
import importlib.util
from functools import lru_cache
from pathlib import Path

SKIPPED = frozenset({"hftlab.config"})


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _spec(name: str) -> importlib.machinery.ModuleSpec | None:
    """The module's spec (this imports its parent packages, not the module), None if there is none."""
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _submodules(base: str, names: list[str]) -> list[str]:
    """Those of ``base.name`` that are modules (``from package import module``), [] if ``base`` is not a
    package: then the names are attributes of the module ``base``."""
    spec = _spec(base)
    if spec is None or spec.submodule_search_locations is None:
        return []
    return [f"{base}.{n}" for n in names if _spec(f"{base}.{n}") is not None]


def _imported(tree: ast.AST, module: str, package: str, root: str) -> set[str]:
    """Names of the modules under the top-level package ``root`` that ``tree`` imports (anywhere in it).

    Only names under ``root`` are looked up, so fingerprinting imports no third-party package."""
    def under_root(name: str) -> bool:
        return name == root or name.startswith(root + ".")

    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) \
                if node.level else node.module or ""
            if under_root(base):
                out.update(_submodules(base, [a.name for a in node.names]) or [base])
    return {m for m in out if under_root(m) and m != module and m not in SKIPPED}


@lru_cache(maxsize=None)
def _module_tree(module: str) -> tuple[str, frozenset[str]]:
    """(dump of the module's docstring-free syntax tree, the package modules it imports), read from
    its file (the module itself is not imported)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise ValueError(f"{module}: no Python source to fingerprint")
    tree = _strip_docstrings(ast.parse(Path(spec.origin).read_text(encoding="utf-8"), spec.origin))
    package = module if spec.submodule_search_locations is not None else module.rpartition(".")[0]
    return ast.dump(tree), frozenset(_imported(tree, module, package, module.partition(".")[0]))


def code_modules(module: str) -> list[str]:
    """``module`` and the package modules it imports, transitively, sorted."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(_module_tree(m)[1])
    return sorted(seen)


@lru_cache(maxsize=None)
def code_fingerprint(module: str) -> str:
    """A hash of the code of :func:`code_modules` (``module`` and what it imports from its package)."""
    h = hashlib.sha256()
    for m in code_modules(module):
        h.update(m.encode() + b"\0" + _module_tree(m)[0].encode() + b"\0")
    return h.hexdigest()[:16]


def clear_cache() -> None:
    """Forget the fingerprints computed in this process (after editing a file in it)."""
    _module_tree.cache_clear()
    code_fingerprint.cache_clear()
