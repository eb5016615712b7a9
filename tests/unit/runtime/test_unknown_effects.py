"""The daemon's count of effects it has no case for: every one counted, each type logged
once at error level (a forgotten case must not flood the log)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest

from meshcast.runtime.daemon import DaemonStats, UnknownEffects


@dataclass(frozen=True)
class Novel:
    value: int


@dataclass(frozen=True)
class Other:
    pass


def test_unknown_effects_are_counted_and_logged_once_per_type(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("meshcast.test.unknown")
    unknown = UnknownEffects(log)
    with caplog.at_level(logging.DEBUG, logger="meshcast.test.unknown"):
        for i in range(5):
            unknown.dropped(Novel(i), "the session table")
        unknown.dropped(Other(), "the overlay")
    assert unknown.count == 6
    records = [r for r in caplog.records if r.name == "meshcast.test.unknown"]
    assert [r.levelno for r in records] == [logging.ERROR, logging.ERROR]
    assert "Novel" in records[0].getMessage()
    assert "the session table" in records[0].getMessage()
    assert "Other" in records[1].getMessage()


def test_the_daemon_statistics_carry_the_count() -> None:
    assert DaemonStats().unknown_effects == 0
    assert DaemonStats(unknown_effects=3).as_dict()["unknown_effects"] == 3
