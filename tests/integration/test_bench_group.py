"""`meshcast bench group` end to end through the real command (behaviour only, never speed).

Real daemons on loopback, real client processes: a tiny run over 1 and 3 daemons must
print one JSON object of the documented shape with positive figures, and leave no
process behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from meshcast.runtime.compiled import compiled

from .process_helpers import live_command_lines, processes_of_bench_run

pytestmark = pytest.mark.timeout(120)

COMMAND = (sys.executable, "-m", "meshcast", "bench", "group", "--json")
SIZES = ("100", "1000", "10000")
SERVICES = ("RELIABLE", "AGREED")
RUN_TIMEOUT = 100.0  # s: the tiny run takes 10-30 s on a loaded 2-core machine


def _run(*args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    process = subprocess.Popen(
        [*COMMAND, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = process.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"bench group did not finish within {RUN_TIMEOUT} s; stderr:\n{err[-3000:]}")
    completed = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return completed, process.pid


def _positive_rates(cell: Any) -> bool:
    return (
        set(cell) == {"msgs_per_s", "mbit_per_s"}
        and cell["msgs_per_s"] > 0
        and cell["mbit_per_s"] > 0
    )


def test_tiny_run_prints_the_documented_json_and_stops_everything() -> None:
    completed, pid = _run("--daemons", "1,3", "--messages", "60", "--skip-rtt")
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.strip().splitlines()
    assert len(lines) == 1, completed.stdout  # exactly one JSON object, on one line
    result = json.loads(lines[0])

    throughput = result["throughput"]
    assert set(throughput) == {"1", "3"}
    for by_size in throughput.values():
        assert set(by_size) == set(SIZES)
        for by_service in by_size.values():
            assert set(by_service) == set(SERVICES)
            assert all(_positive_rates(cell) for cell in by_service.values()), by_service
    # Mbit/s is the payload carried: messages/s x size x 8 bits
    cell = throughput["3"]["1000"]["AGREED"]
    assert cell["mbit_per_s"] == pytest.approx(cell["msgs_per_s"] * 1000 * 8 / 1e6, rel=0.01)

    assert "rtt_ms" not in result
    assert "rtt_floor_ms" not in result

    runs = result["runs"]["3"]["100"]["AGREED"]
    assert runs["messages"] == 20  # 60 / 3 daemons
    assert runs["out_of_order"] == 0  # one sender, AGREED: every receiver in send order
    setup = result["setup"]
    assert setup["daemons"] == [1, 3]
    assert setup["rtt_round_trips"] is None
    assert setup["compiled"] is compiled()  # the build the daemons ran
    assert setup["event_loop"] in {"uvloop", "asyncio (uvloop is not installed)"}
    assert set(result["cpu_us_per_msg_by_cell"]) == {"1", "3"}
    headline = result["cpu_us_per_msg"]  # all daemons' CPU per 1,000-byte AGREED message
    assert set(headline) == {"1", "3"}
    assert headline["3"] == result["cpu_us_per_msg_by_cell"]["3"]["1000"]["AGREED"]["daemons"]
    assert headline["3"] is not None
    assert headline["3"] >= 0  # 20 messages: may round to 0 at the clock's 10 ms ticks
    assert set(result["daemon_counters"]) == {"1", "3"}

    assert processes_of_bench_run(pid) == []


def test_only_rtt_measures_the_round_trips_and_their_floor_with_2_3_and_6_daemons() -> None:
    completed, pid = _run("--only", "rtt", "--rtt-round-trips", "5")
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout)
    assert set(result) == {"rtt_ms", "rtt_floor_ms", "setup"}
    for part in ("rtt_ms", "rtt_floor_ms"):
        assert set(result[part]) == {"2", "3", "6"}
        for by_daemons in result[part].values():
            assert set(by_daemons) == {"min", "median", "p99"}
            assert 0 < by_daemons["min"] <= by_daemons["median"] <= by_daemons["p99"]
    assert result["setup"]["rtt_daemons"] == [2, 3, 6]
    assert result["setup"]["rtt_round_trips"] == 5
    assert processes_of_bench_run(pid) == []
    assert live_command_lines(lambda text: "meshcast.bench.rtt_floor" in text) == []


def test_usage_errors_exit_2() -> None:
    for bad in (
        ["--daemons", "0"],
        ["--sizes", "4"],
        ["--services", "loud"],
        ["--window", "0"],
        ["--only", "nothing"],
        ["--profile-rate", "0"],
        ["--profile-rate", "10001"],
        ["--profiler", "perf"],
    ):
        completed = subprocess.run(
            [*COMMAND, *bad], capture_output=True, text=True, timeout=60, check=False
        )
        assert completed.returncode == 2, (bad, completed.stderr)
        assert completed.stdout == ""
