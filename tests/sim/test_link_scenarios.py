"""Seeded simulator runs of whole link topologies; `meshcast sim --scenario X --seed N` replays one.

MESHCAST_SIM_SEEDS raises the number of seeds (CI runs the default; use thousands locally).
"""

from __future__ import annotations

import os

import pytest

from meshcast.ids import NodeId
from meshcast.link import LinkConfig, LinkFailed
from meshcast.sim.scenarios import SCENARIOS, Topology, build, run_scenario

SEEDS = int(os.environ.get("MESHCAST_SIM_SEEDS", "40"))


@pytest.mark.parametrize("seed", range(SEEDS))
def test_hop_tree_delivers_every_message_exactly_once(seed: int) -> None:
    report = run_scenario("hop-tree", seed=seed, messages=150)
    assert report["exactly_once"], f"replay: meshcast sim --scenario hop-tree --seed {seed}"


@pytest.mark.parametrize("seed", range(max(SEEDS // 4, 5)))
def test_hop_link_under_heavy_faults(seed: int) -> None:
    report = run_scenario("hop-link", seed=seed, messages=300)
    assert report["exactly_once"], f"replay: meshcast sim --scenario hop-link --seed {seed}"


@pytest.mark.parametrize("seed", range(max(SEEDS // 4, 5)))
def test_tcp_model_delivers_in_order(seed: int) -> None:
    report = run_scenario("tcp-link", seed=seed, messages=200)
    assert report["ok"], f"replay: meshcast sim --scenario tcp-link --seed {seed}"


def test_same_seed_gives_the_same_trace(tmp_path: object) -> None:
    digests = {
        run_scenario("hop-tree", seed=11, messages=50, trace_out=os.devnull)["trace_digest"]
        for _ in range(2)
    }
    other = run_scenario("hop-tree", seed=12, messages=50, trace_out=os.devnull)["trace_digest"]
    assert len(digests) == 1
    assert other not in digests


def test_every_scenario_is_replayable_by_name() -> None:
    for name in SCENARIOS:
        assert run_scenario(name, seed=1, messages=20)["ok"]


@pytest.mark.parametrize("seed", range(5))
def test_cut_link_fails_within_the_bound_on_both_sides(seed: int) -> None:
    config = LinkConfig(heartbeat_interval=0.2, failure_rounds=5)
    sim = build(Topology(((1, 2, 0.02),), loss=0.05), "hop", seed, config)
    failed: dict[NodeId, float] = {}
    sim.observe(
        lambda node, effect, now: (
            failed.setdefault(node, now) if isinstance(effect, LinkFailed) else None
        )
    )
    sim.run(until=2.0)
    assert not failed
    sim.set_link_up(NodeId(1), NodeId(2), False)
    sim.run(until=10.0)
    bound = config.failure_rounds * config.heartbeat_interval + config.heartbeat_interval
    assert set(failed) == {NodeId(1), NodeId(2)}
    assert all(2.0 < at <= 2.0 + bound for at in failed.values())
