"""The optional compiled build: which modules mypyc compiles, and whether they run compiled.

`MESHCAST_COMPILE=1 pip install .` (or `-e .`) compiles `HOT_MODULES` to C extension
modules with mypyc (setup.py reads the list from this file; docs/compiled.md); a plain
install is pure Python. Only the standard library is imported here: setup.py runs this
file before meshcast's dependencies are installed.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import pkgutil
from pathlib import Path

# The per-message path, as module names; a package stands for all its modules (not its
# subpackages) but those in `PURE_MODULES`.
HOT_MODULES: tuple[str, ...] = (
    "meshcast.wire",
    "meshcast.link",
    "meshcast.group",
    "meshcast.overlay.view",
    "meshcast.overlay.routing",
    "meshcast.overlay.node",
    "meshcast.daemon.node",
    "meshcast.daemon.clients",
    "meshcast.daemon.effects",
    "meshcast.daemon.status",
    "meshcast.daemon.probes",
    "meshcast.runtime.sessions",
    "meshcast.runtime.udp",
    "meshcast.runtime.endpoints",
)
# Modules that stay Python in the compiled build, because compiled code would behave
# differently: a compiled class checks its attributes' types when it is built.
PURE_MODULES: tuple[str, ...] = (
    # configs built from any value must answer ConfigError naming the key (not TypeError),
    # and a bool given for an int must be seen as one (compiled, it is stored as 1)
    "meshcast.group.config",
    "meshcast.link.config",
    # frames built by untyped callers must fail in encode() with a message that names
    # the field: compiled, the encoder reads each field as its declared type first (a
    # TypeError), and a str given for a StrEnum field no longer encodes like the member
    "meshcast.wire.client",
)
# Not on the per-message path, and not compilable as written: meshcast.errors (mypyc
# crashes on `cls.__new__` in a classmethod) and meshcast.daemon.replication (a frozen
# slotted dataclass that is an Exception fails at import when compiled).


def hot_module_paths(src: Path) -> list[Path]:
    """The source files of `HOT_MODULES` under `src` (the folder holding meshcast/)."""
    paths: list[Path] = []
    for name in HOT_MODULES:
        base = src.joinpath(*name.split("."))
        paths.extend(sorted(base.glob("*.py")) if base.is_dir() else [base.with_suffix(".py")])
    pure = {src.joinpath(*name.split(".")).with_suffix(".py") for name in PURE_MODULES}
    return [path for path in paths if path not in pure]


def is_extension_module(module_name: str) -> bool:
    """Whether `module_name` was imported from a C extension (a compiled .so/.pyd)."""
    file = getattr(importlib.import_module(module_name), "__file__", None) or ""
    return file.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def hot_module_names() -> list[str]:
    """`HOT_MODULES` with each package followed by its modules, as imported."""
    names: list[str] = []
    for name in HOT_MODULES:
        names.append(name)
        search_path = getattr(importlib.import_module(name), "__path__", None)
        if search_path is not None:
            modules = pkgutil.iter_modules(search_path, prefix=f"{name}.")
            names.extend(sorted(info.name for info in modules if not info.ispkg))
    return [name for name in names if name not in PURE_MODULES]


@functools.cache  # a STATUS report asks: the modules a process runs do not change
def compiled() -> bool:
    """Whether this process runs the compiled build: every hot module is an extension."""
    return all(is_extension_module(name) for name in hot_module_names())
