"""Seeded overlay membership: views converge and are agreed, every daemon computes the same
trees, views follow link failures, a partition gives two views that merge again.

Invariants: docs/design/overlay-tests.md. MESHCAST_SIM_SEEDS raises the number of seeds.
"""

from __future__ import annotations

import os
import random

import pytest

from meshcast.ids import NodeId
from meshcast.sim.overlay import OverlayEdge, full_mesh, random_graph
from tests.sim.overlay_invariants import (
    CONVERGE_TIME,
    DETECT_TIME,
    LIFE_TIME,
    OverlayHarness,
    check_exactly_once,
    check_identical_trees,
    check_views_converged,
    views_of,
)

SEEDS = int(os.environ.get("MESHCAST_SIM_SEEDS", "8"))
MID_SEEDS = max(SEEDS // 4, 2)  # 20 daemons


def topology(size: int, seed: int, loss: float = 0.0) -> list[OverlayEdge]:
    """6 daemons: full mesh; larger: a sparse connected random graph with weights 1-10."""
    if size == 6:
        return full_mesh(6, loss=loss)
    return random_graph(size, 4, random.Random(seed), loss=loss)


def sized(seeds_small: int, seeds_mid: int) -> list[tuple[int, int]]:
    return [(6, s) for s in range(seeds_small)] + [(20, s) for s in range(seeds_mid)]


@pytest.mark.parametrize(("size", "seed"), sized(SEEDS, MID_SEEDS))
def test_views_converge_are_agreed_and_trees_are_identical(size: int, seed: int) -> None:
    h = OverlayHarness(topology(size, seed, loss=0.05), seed=seed)
    h.run(3.0)
    check_views_converged(h)
    check_identical_trees(h)
    # A quiet network installs no further view: the membership is stable.
    installed = h.view_change_times()
    h.run(6.0)
    assert h.view_change_times() == installed, f"seed={seed}: views changed in a quiet network"


@pytest.mark.parametrize(("size", "seed"), sized(SEEDS, MID_SEEDS))
def test_views_follow_link_failures_and_repairs(size: int, seed: int) -> None:
    rng = random.Random(seed)
    h = OverlayHarness(topology(size, seed), seed=seed)
    h.run(2.0)
    cut = rng.sample(h.edges, max(2, len(h.edges) // 4))
    for a, b in cut:
        h.cut(a, b)
    h.run(h.now + DETECT_TIME + 0.5)
    check_views_converged(h)  # one view per component: the network may now be split
    check_identical_trees(h)
    for a, b in cut:
        h.restore(a, b)
    h.run(h.now + CONVERGE_TIME)
    assert len(h.components()) == 1
    check_views_converged(h)
    check_identical_trees(h)


@pytest.mark.parametrize(("size", "seed"), sized(SEEDS, MID_SEEDS))
def test_partition_gives_two_views_then_one_merged_view(size: int, seed: int) -> None:
    rng = random.Random(seed)
    h = OverlayHarness(topology(size, seed, loss=0.02), seed=seed)
    h.run(2.0)
    nodes = list(h.nodes)
    rng.shuffle(nodes)
    left, right = nodes[: size // 2], nodes[size // 2 :]
    split_at = h.now
    h.partition([left, right])
    h.run(h.now + DETECT_TIME + 0.5)
    components = h.components()
    if size == 6:
        assert len(components) == 2  # a full mesh splits into exactly the two groups
    check_views_converged(h)
    check_identical_trees(h)
    assert len(views_of(h, h.nodes)) == len(components)
    # Each side keeps working on its own: messages inside a component arrive exactly once.
    for comp in components:
        source = min(comp)
        for _ in range(5):
            h.multicast(source, comp)
    h.run(h.now + LIFE_TIME + 0.1)
    h.heal()
    h.run(h.now + CONVERGE_TIME)
    check_views_converged(h)
    check_identical_trees(h)
    merged = views_of(h, h.nodes)
    assert len(merged) == 1
    assert set(next(iter(merged.values())).members) == set(h.nodes)
    # Every daemon installed its side's view during the split, then the merged one.
    for n in h.nodes:
        side = next(c for c in components if n in c)
        history = [(t, set(v.members)) for t, v in h.recorder.views[n]]
        assert any(t > split_at and m == side for t, m in history), (
            f"seed={seed}: daemon {n} never installed its side {sorted(side)}"
        )
        assert history[-1][1] == set(h.nodes)
    check_exactly_once(h, min_required=5 * size // 2)


@pytest.mark.parametrize("seed", range(SEEDS))
def test_daemon_restarted_before_detection_rejoins(seed: int) -> None:
    rng = random.Random(seed)
    h = OverlayHarness(full_mesh(6, loss=0.02), seed=seed)
    h.run(2.0)
    victim = rng.choice(h.nodes)
    h.crash(victim)
    h.run(h.now + rng.uniform(0.05, 0.3))  # back before its neighbours give up on it
    h.restart(victim)
    h.run(h.now + CONVERGE_TIME)
    check_views_converged(h)
    check_identical_trees(h)
    assert victim in h.overlay(victim).view.members  # type: ignore[union-attr]


def test_daemon_restarted_after_its_neighbours_gave_up_rejoins() -> None:
    # The neighbour detects the crash at ~1.5 s and then retries every 1.5 s; restart
    # offsets spread over one whole period must all lead back to one view.
    stuck = []
    for tenth in range(15):
        restart_at = 2.0 + tenth / 10
        h = OverlayHarness(full_mesh(2), seed=1)
        h.run(1.0)
        h.crash(NodeId(2))
        h.run(restart_at)
        h.restart(NodeId(2))
        h.run(restart_at + 10.0)
        if len(views_of(h, h.nodes)) != 1:
            stuck.append(restart_at)
    assert not stuck, f"daemon 2 restarted at t={stuck} never rejoined daemon 1 (10 s later)"
