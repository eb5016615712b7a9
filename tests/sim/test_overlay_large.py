"""100 daemons on a sparse random graph (average degree 3): views converge, trees agree,
multicast arrives exactly once along the trees, and the overlay recovers from a link cut
and a daemon crash.

One run costs ~10-15 s of CPU (most of it link-state flooding: every view change makes each
daemon re-flood its LSA over every link), so it gets fewer seeds than the small topologies.
MESHCAST_SIM_SEEDS raises them. Invariants: docs/design/overlay-tests.md.
"""

from __future__ import annotations

import os
import random

import pytest

from meshcast.sim.overlay import random_graph
from tests.sim.overlay_invariants import (
    DETECT_TIME,
    LIFE_TIME,
    OverlayHarness,
    check_exactly_once,
    check_hops_within_tree,
    check_identical_trees,
    check_views_converged,
)

SEEDS = int(os.environ.get("MESHCAST_SIM_SEEDS", "8"))
BIG_SEEDS = max(SEEDS // 4, 2)


@pytest.mark.parametrize("seed", range(BIG_SEEDS))
def test_hundred_daemons_converge_agree_and_deliver_exactly_once(seed: int) -> None:
    rng = random.Random(seed)
    h = OverlayHarness(random_graph(100, 3, rng, loss=0.01), seed=seed)
    h.run(3.0)
    check_views_converged(h)
    check_identical_trees(h, sources=rng.sample(h.nodes, 10))
    sources = rng.sample(h.nodes, 3)
    h.stream(sources, 3.0, 8.0, 0.25)
    h.run(4.0)
    a, b = rng.choice(h.edges)
    h.cut(a, b)
    victim = rng.choice([n for n in h.alive() if n not in sources])
    h.crash(victim)
    h.sim.call_later(0.2, lambda: h.restart(victim))
    h.run(4.0 + DETECT_TIME + 0.5)
    check_views_converged(h)  # the cut may leave a daemon or two on their own
    h.run(8.0 + LIFE_TIME)
    check_views_converged(h)
    check_identical_trees(h, sources=sources)
    total = sum(len(m.dests) for m in h.sent.values())
    check_exactly_once(h, min_required=total // 2)
    check_hops_within_tree(h, min_checked=total // 4)
