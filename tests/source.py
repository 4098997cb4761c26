"""Shared by the tests that read fedct's source: the module an import statement names."""

from __future__ import annotations

import ast


def imported_module(node: ast.ImportFrom, package: str) -> str:
    """The absolute module of ``from ... import`` in ``package`` (relative ones resolved)."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = ".".join(parts[: len(parts) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base
