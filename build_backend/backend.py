"""setuptools' build backend, plus what mypyc needs when MESHCAST_COMPILE=1 asks for the
compiled build (setup.py): a plain build needs nothing beyond [build-system] requires."""

from __future__ import annotations

import os

from setuptools.build_meta import *  # noqa: F403 (the backend's other hooks, unchanged)

# mypy brings mypyc; mypyc type-checks the hot modules against what they import:
# cryptography (the links), numpy (overlay/node.py's trees), blake3 (daemon/node.py's
# replication)
COMPILE_REQUIRES = ["mypy>=2.4", "cryptography>=42", "numpy>=1.26", "blake3>=0.4"]


def _requires() -> list[str]:
    # not setuptools' own hooks: they would run setup.py, which imports mypyc, before
    # mypyc is installed (meshcast declares no setup_requires for them to find)
    return COMPILE_REQUIRES if os.environ.get("MESHCAST_COMPILE", "") not in ("", "0") else []


def get_requires_for_build_wheel(config_settings: dict[str, object] | None = None) -> list[str]:
    return _requires()


def get_requires_for_build_editable(
    config_settings: dict[str, object] | None = None,
) -> list[str]:
    return _requires()
