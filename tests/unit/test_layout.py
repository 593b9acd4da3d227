"""The house's floors: the shared kernel ``conveyor/`` imports nothing above it; the gateway and the worker import
each other not at all; only the launcher imports all three."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ABOVE = {
    "conveyor": {"gateway", "worker", "launcher"},
    "gateway": {"worker", "launcher"},
    "worker": {"gateway", "launcher"},
}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(ABOVE))
def test_a_package_imports_nothing_above_it(package: str) -> None:
    for path in sorted((ROOT / package).rglob("*.py")):
        wrong = imported_packages(path) & ABOVE[package]
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"
