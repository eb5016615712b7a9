"""`meshcast bench replicate` end to end through the real command (behaviour only, never
speed): a `--quick` run prints one JSON object of the documented shape, every ratio a
finite number no plan can beat (>= 1, up to float rounding), the failure parts end with
every survivor's copy identical to the source, and `--plot` writes its PNGs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(480)

COMMAND = (sys.executable, "-m", "meshcast", "bench", "replicate", "--quick", "--json")
RUN_TIMEOUT = 400.0  # s: ~20 s of CPU simulating, plus small real, memory and failure runs
NS = {"8", "64", "512"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIN_RATIO = 0.99  # below: the bound or the simulator is wrong


def _ratio_ok(value: Any) -> bool:
    return isinstance(value, float | int) and math.isfinite(value) and value >= MIN_RATIO


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    plots = tmp_path_factory.mktemp("replicate") / "img"
    completed = subprocess.run(
        [*COMMAND, "--plot", str(plots)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.strip().splitlines()
    assert len(lines) == 1, completed.stdout  # exactly one JSON object, on one line
    return json.loads(lines[0]), plots


def test_quick_run_has_every_key_with_ratios_at_or_above_the_bound(
    quick_run: tuple[dict[str, Any], Path],
) -> None:
    result, _ = quick_run
    assert set(result) == {"sim", "real", "memory", "failure", "failure_sim"}
    sim = result["sim"]
    assert {"fastreplica", "fanout", "alm_tree", "heterogeneous", "variants", "params"} <= set(sim)
    for strategy in ("fastreplica", "fanout", "alm_tree"):
        assert set(sim[strategy]) == NS, strategy
        assert all(_ratio_ok(r) for r in sim[strategy].values()), sim[strategy]
        for n, ratio in sim[strategy].items():
            run = sim["details"][strategy][n]
            assert run["ratio"] == ratio
            assert 0 < run["bound_s"] <= run["mean_s"] * (1 + 1e-9) <= run["last_s"] * (1 + 1e-9)
            assert run["events"] > 0
            assert run["cpu_s"] >= 0
    assert set(sim["heterogeneous"]) == {"patent", "capacity_aware"}
    assert all(_ratio_ok(r) for r in sim["heterogeneous"].values())
    assert set(sim["variants"]) == {
        f"{v}_{t}" for v in ("K", "K1", "K2") for t in ("chain", "balanced")
    }
    assert all(_ratio_ok(r) for r in sim["variants"].values())
    # fanout pushes N copies through one uplink: N times the bound (N/(N+1) of it, at least)
    for n, ratio in sim["fanout"].items():
        assert ratio >= int(n) * 0.99
    assert set(sim["targets"]) == {"fastreplica_le_1.10", "capacity_aware_le_1.25"}
    assert all(isinstance(v, bool) for v in sim["targets"].values())
    assert sim["params"]["quick"] is True
    assert set(sim["params"]["fastreplica_file_mib"]) == NS
    real = result["real"]
    assert {"mode", "params", "100mbit", "400mbit", "cpu_s_per_gb", "details", "targets"} <= set(
        real
    )
    for label in ("100mbit", "400mbit"):
        assert set(real[label]) == {"fastreplica", "fanout"}
        assert all(_ratio_ok(r) for r in real[label].values()), real[label]
        for run in real["details"][label].values():
            assert run["digests_equal"] is True  # every copy is the source, byte for byte
            assert run["state"] == "complete"
        assert real["cpu_s_per_gb"][label] > 0
    memory = result["memory"]
    assert memory["digests_equal"] is True
    assert set(memory["rss_mib"]) == {"H0", "H1", "H2"}
    assert all(m["peak"] >= m["before"] > 0 for m in memory["rss_mib"].values())


def test_quick_failure_runs_keep_every_survivor_identical(
    quick_run: tuple[dict[str, Any], Path],
) -> None:
    result, _ = quick_run
    failure = result["failure"]
    assert {"slowdown", "digests_equal", "runs", "mode", "params", "details", "targets"} <= set(
        failure
    )
    assert failure["digests_equal"] is True  # every survivor's copy is the source
    assert failure["runs"] == len(failure["details"]) >= 2
    killed = [run for run in failure["details"] if run["victim"] is not None]
    assert killed, failure["details"]
    for run in failure["details"]:
        assert run["digests_equal"] is True
        assert run["survivors_s"] is not None
        assert run["survivors_s"] > 0
        if run["victim"] is None:
            assert run["state"] == "complete"
            assert run["missing"] == []
        else:
            assert run["missing"] == [run["victim"]]  # the final report names it
            assert 0 < run["killed_at_fraction"] < 1
    assert isinstance(failure["slowdown"], float)
    assert math.isfinite(failure["slowdown"])
    assert failure["params"]["strategy"] == "fastreplica"
    assert failure["params"]["buddy"] == f"H{failure['params']['recipients'] + 1}"
    sim = result["failure_sim"]
    assert {"runs", "all_survivors_identical", "mean_slowdown", "params"} <= set(sim)
    assert sim["all_survivors_identical"] is True
    assert sim["runs"] == sim["runs_identical"] == sim["runs_completed"] > 0
    assert sim["runs_buddy_failed"] > 0  # the buddy was among the crashed nodes
    assert sum(sim["failures_per_run"].values()) == sim["runs"]
    # a crash may also lighten the survivors' load: any finite positive figure
    assert isinstance(sim["mean_slowdown"], float)
    assert 0 < sim["mean_slowdown"] < math.inf


def test_plot_writes_the_figures(quick_run: tuple[dict[str, Any], Path]) -> None:
    _, plots = quick_run
    names = {"replicate_progress.png", "replicate_ratios.png"}
    assert {p.name for p in plots.iterdir()} == names
    for name in names:
        data = (plots / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > 10_000, name  # axes, labels and data, not an empty canvas
