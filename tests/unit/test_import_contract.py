"""The scheduling core stays pure: values in, values out (ARCHITECTURE.md, STYLE.md §1).

`make lint` runs import-linter over the real import graph; this test states the same
contract at the source level so that `make test-unit` catches a violation too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import scheduling

FORBIDDEN = {
    "fleetd",
    "asyncio",
    "grpc",
    "aiokafka",
    "kubernetes",
    "prometheus_client",
    "sqlite3",
    "socket",
    "logging",
    "random",
    "time",
    "datetime",
    "threading",
    "uuid",
}

CORE_FILES = sorted(Path(scheduling.__file__).parent.rglob("*.py"))


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_core_has_source_files() -> None:
    assert CORE_FILES, "scheduling/ has no Python files: the contract below would be vacuous"


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_scheduling_imports_nothing_impure(path: Path) -> None:
    assert imported_roots(path) & FORBIDDEN == set()
