"""setuptools' build backend, plus what mypyc needs when MESHCAST_COMPILE=1 asks for the
compiled build (setup.py): a plain build needs nothing beyond [build-system] requires."""

from __future__ import annotations

import os

from setuptools.build_meta import *  # noqa: F403 (the backend's other hooks, unchanged)

# mypy brings mypyc; mypyc type-checks the hot modules, which import cryptography
COMPILE_REQUIRES = ["mypy>=2.4", "cryptography>=42"]


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
