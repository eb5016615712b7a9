"""The max-throughput policy in the simulator: a source paced at its tree's rate never
overruns a shared upload, one that is not does; the policy against the others on the
same network; trees follow measured link rates; delivery stays exactly-once.

The pacing runs use `meshcast.bench.pacing` (six sites behind shared access links; see
docs/design/tree.md, "Integration"). That network has no random element (no loss or
jitter), so those runs are parametrized over sources rather than seeds. Rates here are
virtual-time behaviour of the protocol, not the speed of this machine.
"""

from __future__ import annotations

import os
import random
from functools import cache

import pytest

from meshcast.bench.overlay import sites
from meshcast.bench.pacing import StreamResult, run_stream, site_named
from meshcast.ids import NodeId
from meshcast.sim.overlay import OverlayEdge
from tests.sim.overlay_invariants import (
    LIFE_TIME,
    OverlayHarness,
    check_exactly_once,
    check_hops_within_tree,
    check_identical_trees,
    check_views_converged,
)

SEEDS = int(os.environ.get("MESHCAST_SIM_SEEDS", "8"))
MESSAGES = 1_000  # per stream: well past the first window (1,000 messages) at 2 x 1 MiB
SOURCE = "CNDS"  # the best-connected site


@cache
def stream(source: str, policy: str, paced: bool) -> StreamResult:
    return run_stream(site_named(source), policy, paced=paced, messages=MESSAGES)


@pytest.mark.parametrize("source", [s.name for s in sites()])
def test_paced_source_never_overruns_an_upload(source: str) -> None:
    """Claim 1: at the tree's rate no access queue overflows and the slowest receiver
    gets the bottleneck rate (less the header overhead and `rate_share`'s margin)."""
    paced = stream(source, "max-throughput", True)
    assert paced.drops == 0
    assert paced.link_failures == 0
    assert paced.delivered_share == 1.0
    assert paced.goodput_mbps >= 0.9 * paced.tree_rate_mbps


def test_unpaced_source_overruns_its_upload() -> None:
    """The source's overlay links, each paced at its own bandwidth, add up to more than
    the upload they share: its queue fills, packets drop, the links retransmit, and a
    window of messages waits in the network."""
    paced = stream(SOURCE, "max-throughput", True)
    unpaced = stream(SOURCE, "max-throughput", False)
    assert unpaced.tree_rate_mbps == paced.tree_rate_mbps  # the same tree
    assert unpaced.drops > 0
    assert unpaced.retransmissions > paced.retransmissions + unpaced.drops // 2
    assert unpaced.max_queue_kib > 2 * paced.max_queue_kib
    assert unpaced.latency_ms_mean > 10 * paced.latency_ms_mean
    assert unpaced.delivered_share == 1.0  # Hop recovers every drop here


@pytest.mark.parametrize("policy", ["shortest-path", "fanout"])
def test_max_throughput_beats_the_other_policies(policy: str) -> None:
    best = stream(SOURCE, "max-throughput", True)
    other = stream(SOURCE, policy, True)
    assert best.tree_rate_mbps > other.tree_rate_mbps
    assert best.goodput_mbps > other.goodput_mbps
    assert other.drops == 0  # paced at its own (lower) rate, it does not overrun either


# ---------------------------------------------------------------------- measured link rates

# Five daemons, fully meshed at 10 Mbit/s; daemons 2 and 3 have room to relay, 4 and 5
# (1 Mbit/s) do not. The max-throughput tree of 1 relays through 2 or 3 at 10 Mbit/s.
UPLOADS = {1: 10e6, 2: 20e6, 3: 20e6, 4: 1e6, 5: 1e6}


def mesh() -> list[OverlayEdge]:
    return [OverlayEdge(a, b, bandwidth_bps=10e6) for a in range(1, 6) for b in range(a + 1, 6)]


def measure(h: OverlayHarness, node: int, peer: int, rate_bps: float) -> None:
    h.sim.act(NodeId(node), lambda n, now: n.update_link_rate(NodeId(peer), rate_bps, now))


@pytest.mark.parametrize("seed", range(max(SEEDS // 4, 2)))
def test_trees_follow_measured_link_rates(seed: int) -> None:
    h = OverlayHarness(mesh(), seed=seed, policy="max-throughput", upload_bps=UPLOADS)
    h.run(2.0)
    check_views_converged(h)
    source = NodeId(1)
    before = h.overlay(source).routing.tree(source)
    assert before is not None
    assert before.rate_bps == 10e6
    (relay,) = before.children[source]
    h.stream([source], 2.0, 4.5, 0.02)
    views = len(h.recorder.views[source])

    measure(h, 1, relay, 9e6)  # -10 %: inside the hysteresis band, nothing changes
    h.run(2.5)
    assert len(h.recorder.views[source]) == views

    measure(h, 1, relay, 2e6)  # the link to the relay is far slower than configured
    h.run(3.5)
    check_views_converged(h)
    check_identical_trees(h)
    for n in h.nodes:
        view = h.overlay(n).view
        assert view is not None
        measured = {(e.a, e.b): e.bandwidth_bps for e in view.edges if e.bandwidth_bps != 10e6}
        assert measured == {(min(source, relay), max(source, relay)): 2e6}, f"at daemon {n}"
    after = h.overlay(source).routing.tree(source)
    assert after is not None
    assert after.rate_bps == 10e6  # the other relay takes over
    assert after.parent.get(relay) != source
    h.run(4.5 + LIFE_TIME + 0.1)
    expected = sum(len(m.dests) for m in h.sent.values())
    assert check_exactly_once(h, min_required=expected) == expected


# ---------------------------------------------------------------------- delivery


def heterogeneous(seed: int, n: int = 10) -> tuple[list[OverlayEdge], dict[int, float]]:
    rng = random.Random(seed)
    pairs = {(rng.randrange(1, i), i) for i in range(2, n + 1)}
    while len(pairs) < 2 * n:
        a, b = sorted(rng.sample(range(1, n + 1), 2))
        pairs.add((a, b))
    edges = [
        OverlayEdge(a, b, bandwidth_bps=rng.choice((5e6, 20e6, 100e6)), loss=0.02)
        for a, b in sorted(pairs)
    ]
    return edges, {i: rng.choice((2e6, 10e6, 50e6)) for i in range(1, n + 1)}


@pytest.mark.parametrize("seed", range(max(SEEDS // 2, 2)))
def test_exactly_once_over_max_throughput_trees(seed: int) -> None:
    edges, uploads = heterogeneous(seed)
    h = OverlayHarness(edges, seed=seed, policy="max-throughput", upload_bps=uploads)
    h.run(2.0)
    check_views_converged(h)
    check_identical_trees(h)
    sources = random.Random(seed).sample(h.nodes, 3)
    h.stream(sources, 2.0, 4.0, 0.02)
    h.run(4.0 + LIFE_TIME + 0.1)
    expected = sum(len(m.dests) for m in h.sent.values())
    assert check_exactly_once(h, min_required=expected) == expected
    check_hops_within_tree(h, min_checked=expected // 2)
