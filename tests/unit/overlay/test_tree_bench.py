"""`meshcast bench tree`: the suite's contract (keys and value ranges), on a tiny run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from meshcast.bench import tree as bench

METHODS = {"max_throughput", "shortest_path", "star", "random", "widest_path"}


def run_small(plot: Path | None) -> dict[str, object]:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    argv = ["--instances", "12", "--events", "12", "--repeats", "1", "--pacing-messages", "200"]
    if plot is not None:
        argv += ["--plot", str(plot)]
    return bench.run(parser.parse_args(argv))


def test_suite_returns_the_documented_keys_and_plots(tmp_path: Path) -> None:
    result = run_small(tmp_path)
    json.dumps(result)  # one JSON object, nothing exotic inside
    quality = result["quality"]
    assert isinstance(quality, dict)
    assert set(quality) >= METHODS
    for stats in quality.values():
        assert 0 < stats["min"] <= stats["mean"] <= 1
        assert 0 <= stats["share_optimal"] <= 1
    build = result["build_seconds"]
    assert isinstance(build, dict)
    assert set(build) == {"1000", "10000"}
    assert all(seconds > 0 for seconds in build.values())
    dynamic = result["dynamic"]
    assert isinstance(dynamic, dict)
    assert dynamic["mean_rate_ratio"] > 0
    assert dynamic["mean_reparented"] >= 0
    pacing = result["pacing"]
    assert isinstance(pacing, dict)
    assert set(pacing) >= {"paced", "unpaced"}
    assert pacing["paced"]["drops"] == 0
    assert pacing["paced"]["goodput_mbps"] > 0
    policies = result["policies"]
    assert isinstance(policies, dict)
    assert set(policies) >= {"max-throughput", "shortest-path", "fanout"}
    assert (tmp_path / "tree_pacing.png").stat().st_size > 0
    assert (tmp_path / "tree_rate_vs_n.png").stat().st_size > 0
    assert (tmp_path / "tree_churn.png").stat().st_size > 0
    assert (tmp_path / "tree_quality.png").stat().st_size > 0
