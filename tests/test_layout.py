"""The layout's rules, checked on the source: imports flow one way, and files stay short.

* tools → daemon → workers, sensors: nothing in ``daemon/``, ``workers/`` or ``sensors/`` imports
  ``tools``; ``workers/`` and ``sensors/`` never import ``daemon``; ``sensors/`` never imports
  ``workers``.
* No Python file of ``daemon/``, ``sensors/``, ``tools/``, ``tests/`` or ``scripts/`` is over 500 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"daemon": {"tools"}, "workers": {"tools", "daemon"}, "sensors": {"tools", "daemon", "workers"}}
MAX_LINES = 500
SIZE_CHECKED = ("daemon", "sensors", "workers", "tools", "tests", "scripts")
"""Every package of the project: no Python file over 500 lines."""


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, wherever the import statement is."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_flow_one_way(package: str) -> None:
    wrong = {str(p.relative_to(ROOT)): sorted(imported_packages(p) & FORBIDDEN[package])
             for p in sorted((ROOT / package).rglob("*.py"))}
    wrong = {k: v for k, v in wrong.items() if v}
    assert not wrong, f"{package}/ must not import {sorted(FORBIDDEN[package])}: {wrong}"


def test_no_file_over_500_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for pkg in SIZE_CHECKED for p in sorted((ROOT / pkg).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by job: {long}"
