"""The suite's own shape: shared helpers live in tests/support, so no test module imports another
(a helper moved or renamed in one test file would otherwise break a second, unrelated one), and
`make check` selects exactly the tier that tests/support/tiers.py keeps in-process."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support.tiers import CHECK_TIER

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


def test_make_check_selects_the_tier_the_guard_keeps_in_process():
    makefile = (TESTS.parent / "Makefile").read_text()
    [line] = [line for line in makefile.splitlines() if line.startswith("CHECK_TIER :=")]
    assert line.split(":=", 1)[1].strip() == CHECK_TIER
