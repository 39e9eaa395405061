"""The rooms of ``worker/`` and which way their imports point (issue 16).

A test rather than a convention: an import that crosses a wall fails here, with the module
and the line, before a reviewer has to notice it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "worker"

#: room -> the rooms it must never import (whatever else it may)
FORBIDDEN: dict[str, set[str]] = {
    "ucan": {"commands", "amqp", "service", "operate", "produce", "cli", "keyfile", "config"},
    "commands": {"amqp", "service", "operate", "produce", "cli"},
    "amqp": {"service", "operate", "produce", "cli", "commands"},
    "service": {"operate", "produce", "cli"},
    "operate": {"service", "produce", "cli"},
    "produce": {"service", "operate", "cli"},
    "config": {"service", "operate", "produce", "cli"},
    "errors": {"service", "operate", "produce", "cli", "amqp", "ucan", "commands"},
    "keyfile": {"service", "operate", "produce", "cli"},
}


def room_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_rooms(path: Path) -> list[tuple[int, str]]:
    """(line, room) of every ``worker.*`` import in the module, nested ones included."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "worker":
                names = [f"worker.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "worker" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if room_of(p) in FORBIDDEN)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_one_way(path: Path) -> None:
    room = room_of(path)
    crossing = [
        f"{path.relative_to(PACKAGE)}:{line} imports worker.{target}"
        for line, target in imported_rooms(path)
        if target in FORBIDDEN[room]
    ]
    assert not crossing, f"{room} may not import {sorted(FORBIDDEN[room])}: {crossing}"


def test_every_room_says_what_it_is_for_and_what_it_may_import() -> None:
    for room in ("ucan", "commands", "amqp", "service", "operate", "produce"):
        doc = ast.get_docstring(ast.parse((PACKAGE / room / "__init__.py").read_text()))
        assert doc, f"worker/{room}/__init__.py has no docstring"
        assert "import" in doc.lower(), f"worker/{room}/__init__.py does not say what it imports"


def test_cli_only_routes() -> None:
    """The command line holds the argument tree and dispatch; no command's work."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    functions = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert functions <= {"_setting_flags", "build_parser", "_handler", "main", "__call__"}
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef)]


def test_no_module_is_near_a_thousand_lines() -> None:
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 850
    }
    assert not long
