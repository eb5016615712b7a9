"""The link demo and the `real` benchmark run end to end (behaviour only, never speed)."""

from __future__ import annotations

import io

import pytest

from meshcast.bench.link_real import measure_real
from meshcast.demo.link import run_demo


@pytest.mark.asyncio
async def test_demo_exchanges_messages_over_a_lossy_link_and_reports() -> None:
    out = io.StringIO()
    assert await run_demo(messages=500, out=out) == 0
    text = out.getvalue()
    assert "received 500 of 500 intact" in text
    assert "every message arrived exactly once and intact" in text


def test_real_benchmark_returns_the_three_figures() -> None:
    figures = measure_real(messages=3000)
    assert set(figures) == {"msgs_per_s", "mbytes_per_s", "cpu_s_per_mb"}
    assert all(value > 0 for value in figures.values())


def test_real_benchmark_also_runs_over_tcp() -> None:
    figures = measure_real(messages=3000, transport="tcp")
    assert figures["msgs_per_s"] > 0
