"""Which build runs: the mypyc-compiled hot modules or pure Python (docs/compiled.md)."""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshcast.runtime import compiled

SRC = Path(compiled.__file__).resolve().parent.parent.parent


def test_every_hot_module_is_on_disk() -> None:
    paths = compiled.hot_module_paths(SRC)
    assert all(path.is_file() for path in paths)
    # a package stands for its modules: wire's codecs are all in the list
    assert SRC / "meshcast" / "wire" / "group.py" in paths
    # what setup.py compiles is what compiled() checks
    names = {".".join(p.relative_to(SRC).with_suffix("").parts) for p in paths}
    assert {name.removesuffix(".__init__") for name in names} == set(compiled.hot_module_names())


def test_the_modules_that_must_stay_python_are_not_compiled() -> None:
    paths = compiled.hot_module_paths(SRC)
    assert SRC / "meshcast" / "errors.py" not in paths  # mypyc cannot build them
    assert SRC / "meshcast" / "daemon" / "replication.py" not in paths
    for name in compiled.PURE_MODULES:
        assert SRC.joinpath(*name.split(".")).with_suffix(".py") not in paths
        assert compiled.is_extension_module(name) is False


def test_compiled_says_whether_the_hot_modules_are_extension_modules() -> None:
    total = importlib.import_module("meshcast.group.total")
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    assert compiled.compiled() == str(total.__file__).endswith(suffixes)
    assert compiled.is_extension_module("meshcast.errors") is False
    assert compiled.is_extension_module("meshcast.ids") is False


@pytest.mark.skipif(
    "MESHCAST_EXPECT_COMPILED" not in os.environ,
    reason="MESHCAST_EXPECT_COMPILED=0|1 says which build the suite must run on (.ci/run)",
)
def test_the_suite_runs_on_the_build_ci_asked_for() -> None:
    assert compiled.compiled() == (os.environ["MESHCAST_EXPECT_COMPILED"] == "1")


def test_the_compile_hints_need_no_mypy_extensions() -> None:
    """The pure package runs without mypy_extensions: `mypyc_attr` then changes nothing."""
    code = (
        "import sys\n"
        "sys.modules['mypy_extensions'] = None  # an import of it fails\n"
        "from meshcast.compile_hints import mypyc_attr\n"
        "@mypyc_attr(allow_interpreted_subclasses=True)\n"
        "class Layer:\n"
        "    pass\n"
        "print(Layer.__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "Layer"
