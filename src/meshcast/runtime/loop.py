"""Running a coroutine on the fastest event loop available (uvloop when installed)."""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


# "asyncio": run on the standard library's loop even where uvloop is installed (to
# measure what uvloop buys, or to rule it out); anything else: uvloop when it exists
EVENT_LOOP_ENV = "MESHCAST_EVENT_LOOP"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """`uvloop.new_event_loop` when uvloop is importable (and MESHCAST_EVENT_LOOP is not
    "asyncio"), else None (the default loop)."""
    if os.environ.get(EVENT_LOOP_ENV) == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def event_loop_name() -> str:
    """Which event loop runs the calling coroutine: "uvloop" or "asyncio"."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """Run `main` to completion like `asyncio.run`, on uvloop when it is installed."""
    factory = loop_factory() if use_uvloop else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
