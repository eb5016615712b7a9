"""Which event loop the runtime runs on: uvloop where installed, unless told otherwise."""

from __future__ import annotations

import importlib.util

import pytest

from meshcast.runtime.loop import EVENT_LOOP_ENV, event_loop_name, loop_factory, run

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


async def _name() -> str:
    return event_loop_name()


@pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed")
def test_uvloop_runs_by_default_where_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(EVENT_LOOP_ENV, raising=False)
    assert loop_factory() is not None
    assert run(_name()) == "uvloop"


def test_the_environment_can_ask_for_the_standard_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVENT_LOOP_ENV, "asyncio")
    assert loop_factory() is None
    assert run(_name()) == "asyncio"


def test_the_caller_can_ask_for_the_standard_loop() -> None:
    assert run(_name(), use_uvloop=False) == "asyncio"
