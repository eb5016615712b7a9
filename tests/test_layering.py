"""Protocol packages stay sans-I/O and dependencies point down only (STYLE.md §1)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "meshcast"
PROTOCOL_PACKAGES = ("wire", "link", "overlay", "group")
FORBIDDEN_MODULES = {"asyncio", "socket", "time", "threading", "subprocess", "selectors"}
LAYER_ORDER = ["wire", "link", "overlay", "group", "replicate"]
DRIVERS = {"sim", "runtime", "bench", "cli"}


def python_files(package: str) -> list[Path]:
    return sorted((SRC / package).rglob("*.py"))


def imported_modules(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", PROTOCOL_PACKAGES)
def test_protocol_code_does_no_io_and_reads_no_clock(package: str) -> None:
    for path in python_files(package):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        roots = {name.split(".")[0] for name in imported_modules(tree)}
        assert not roots & FORBIDDEN_MODULES, f"{path} imports {roots & FORBIDDEN_MODULES}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id == "random":
                    assert node.attr == "Random", f"{path}:{node.lineno} uses random.{node.attr}"
                if node.value.id == "os":
                    assert node.attr != "urandom", f"{path}:{node.lineno} uses os.urandom"


@pytest.mark.parametrize("package", LAYER_ORDER)
def test_layers_never_import_upwards_or_drivers(package: str) -> None:
    above = set(LAYER_ORDER[LAYER_ORDER.index(package) + 1 :]) | DRIVERS
    for path in python_files(package) if (SRC / package).exists() else []:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for module in imported_modules(tree):
            parts = module.split(".")
            if parts[0] == "meshcast" and len(parts) > 1:
                assert parts[1] not in above, f"{path} imports {module}"
