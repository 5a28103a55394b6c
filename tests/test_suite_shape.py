"""The suite's own shape: shared helpers live in tests/support, so no test module imports another
(a helper moved or renamed in one test file would otherwise break a second, unrelated one)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_test_module_imports_another():
    offenders = {path.name: sorted(name for name in imported_modules(path)
                                   if name.split(".")[:2][-1].startswith("test_")
                                   and name.startswith("tests."))
                 for path in sorted(TESTS.rglob("*.py"))}
    assert not {name: found for name, found in offenders.items() if found}, \
        "move the shared helper into tests/support"
