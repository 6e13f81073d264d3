"""Lower folders never import higher ones: the engine and the server sit on top of the building blocks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hawker"
LOWER = ("kernels", "attention", "layers", "loader", "distributed", "models")
HIGHER = ("hawker.engine", "hawker.server", "hawker.bench", "hawker.cli", "hawker.llm")


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("folder", LOWER)
def test_lower_folders_do_not_import_higher_ones(folder: str) -> None:
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        upward = sorted(m for m in imported_modules(path) if m.startswith(HIGHER))
        assert not upward, f"{path.relative_to(PACKAGE.parent)} imports {upward}"


def test_no_module_is_longer_than_500_lines() -> None:
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 500
    }
    assert not long, long
