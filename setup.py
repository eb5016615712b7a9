"""Optional compiled build: `MESHCAST_COMPILE=1 pip install .` (or `-e .`) compiles the
hot modules with mypyc (docs/compiled.md). Without the variable this file adds nothing:
the package is pure Python and needs no compiler. Everything else is in pyproject.toml."""

from __future__ import annotations

import os
import runpy
from pathlib import Path

from setuptools import setup

SRC = Path(__file__).resolve().parent / "src"


def compile_requested() -> bool:
    return os.environ.get("MESHCAST_COMPILE", "") not in ("", "0")


def ext_modules() -> list[object]:
    if not compile_requested():
        return []
    from mypyc.build import mypycify  # in the build environment only when compiling

    # the one list of compiled modules, read without importing meshcast (its dependencies
    # need not be installed yet)
    compiled = runpy.run_path(str(SRC / "meshcast" / "runtime" / "compiled.py"))
    paths = compiled["hot_module_paths"](SRC)
    # mypy names each module from the folders above it that hold an __init__.py:
    # src/meshcast/group/total.py is meshcast.group.total
    extensions: list[object] = mypycify([str(path) for path in paths], opt_level="3")
    return extensions


setup(ext_modules=ext_modules())
