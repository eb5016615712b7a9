"""Seeded overlay delivery: exactly once to every reachable destination under loss, link
failures and daemon crashes; hop counts follow the trees; in-flight messages survive view
changes; only destinations receive (pruning); long destination lists are split.

Invariants: docs/design/overlay-tests.md. MESHCAST_SIM_SEEDS raises the number of seeds.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from functools import partial

import pytest

from meshcast.ids import NodeId
from meshcast.sim.overlay import OverlayEdge, full_mesh, random_graph
from tests.sim.overlay_invariants import (
    CONVERGE_TIME,
    LIFE_TIME,
    OverlayHarness,
    check_exactly_once,
    check_hops_within_tree,
    check_identical_trees,
    check_views_converged,
)

SEEDS = int(os.environ.get("MESHCAST_SIM_SEEDS", "8"))
MID_SEEDS = max(SEEDS // 4, 2)  # 20 daemons


def topology(size: int, seed: int, loss: float = 0.0) -> list[OverlayEdge]:
    if size == 6:
        return full_mesh(6, loss=loss)
    return random_graph(size, 4, random.Random(seed), loss=loss)


def sized(seeds_small: int, seeds_mid: int) -> list[tuple[int, int]]:
    return [(6, s) for s in range(seeds_small)] + [(20, s) for s in range(seeds_mid)]


@pytest.mark.parametrize(("size", "seed"), sized(SEEDS, MID_SEEDS))
def test_exactly_once_under_link_loss(size: int, seed: int) -> None:
    rng = random.Random(seed)
    h = OverlayHarness(topology(size, seed, loss=0.05), seed=seed)
    h.run(2.0)
    sources = rng.sample(h.nodes, 3)
    h.stream(sources, 2.0, 3.5, 0.04)  # to every daemon
    subset = rng.sample(h.nodes, size // 2)  # and to a random half
    h.stream(sources[:1], 2.01, 3.5, 0.04, dests=subset)
    h.run(3.5 + LIFE_TIME + 0.1)
    expected = sum(len(m.dests) for m in h.sent.values())
    assert check_exactly_once(h, min_required=expected) == expected
    check_hops_within_tree(h, min_checked=expected // 2)


@pytest.mark.parametrize(("size", "seed"), sized(SEEDS, MID_SEEDS))
def test_exactly_once_under_link_failures_and_crashes(size: int, seed: int) -> None:
    """Random link cuts and repairs, and daemon crashes with a restart before the
    neighbours notice, while three sources stream at 10 messages/s each."""
    rng = random.Random(seed)
    h = OverlayHarness(topology(size, seed, loss=0.05), seed=seed)
    h.run(2.0)
    stop = 7.0 if size == 6 else 5.5
    h.stream(rng.sample(h.nodes, 3), 2.0, stop + 1.0, 0.1)
    t = 2.5
    while t < stop:
        h.run(t)
        if rng.random() < 0.6:
            a, b = rng.choice(h.edges)
            if (a, b) in h.state.down:
                h.restore(a, b)
            else:
                h.cut(a, b)
        else:
            victim = rng.choice(h.alive())
            h.crash(victim)
            h.sim.call_later(rng.uniform(0.05, 0.3), partial(h.restart, victim))
        t += rng.uniform(0.3, 1.2)
    h.run(stop + 0.5)
    for a, b in sorted(h.state.down):
        h.restore(a, b)
    h.run(stop + 1.0 + max(CONVERGE_TIME, LIFE_TIME) + 0.1)
    check_views_converged(h)
    check_identical_trees(h)
    total = sum(len(m.dests) for m in h.sent.values())
    check_exactly_once(h, min_required=total // 4)
    check_hops_within_tree(h, min_checked=total // 10)


@pytest.mark.parametrize("seed", range(SEEDS))
def test_in_flight_messages_survive_a_view_change(seed: int) -> None:
    """A link comes back while a source streams over long links: every daemon changes view
    and trees with messages in flight, and none of them is lost or duplicated."""
    rng = random.Random(seed)
    # A ring of 8 with 20-40 ms links; the chord 1-5 is down at first, then restored,
    # which moves daemons onto new trees while dozens of messages are in flight.
    n = 8
    edges = [
        OverlayEdge(i, i % n + 1, delay=rng.uniform(0.02, 0.04), weight=1.0, loss=0.02)
        for i in range(1, n + 1)
    ]
    edges.append(OverlayEdge(1, 5, delay=0.01, weight=1.0))
    h = OverlayHarness(edges, seed=seed)
    h.run(0.1)
    h.cut(NodeId(1), NodeId(5))
    h.run(3.0)
    source = NodeId(rng.choice([1, 2, 8]))
    before = h.overlay(source).routing.tree(source)
    h.stream([source], 3.0 + 2 * 1.0 + 0.5, 9.0, 0.005)  # from well after the cut
    h.run(6.0)
    h.restore(NodeId(1), NodeId(5))
    h.run(9.0 + LIFE_TIME)
    after = h.overlay(source).routing.tree(source)
    assert before is not None
    assert after is not None
    assert dict(before.parent) != dict(after.parent), "the restored chord must change the tree"
    expected = sum(len(m.dests) for m in h.sent.values())
    assert check_exactly_once(h, min_required=expected) == expected


@pytest.mark.parametrize("seed", range(SEEDS))
def test_only_destinations_receive_and_links_carry_one_copy(seed: int) -> None:
    """Pruning: DATA crosses a link only towards destinations below it in the source's tree,
    each link carries one copy of a message, and non-destinations deliver nothing."""
    rng = random.Random(seed)
    h = OverlayHarness(random_graph(20, 4, rng), seed=seed, tap=True)
    h.run(2.0)
    check_views_converged(h)
    for _ in range(30):
        source = rng.choice(h.nodes)
        dests = rng.sample(h.nodes, rng.randint(1, 6))
        h.multicast(source, dests)
    h.run(2.0 + LIFE_TIME)
    expected = sum(len(m.dests) for m in h.sent.values())
    assert check_exactly_once(h, min_required=expected) == expected
    # A DATA message on link u->v lists only destinations whose tree path crosses u->v,
    # and a link carries one copy of a message.
    copies: dict[tuple[int, NodeId, NodeId], int] = {}
    for (u, v), entries in h.log.sent.items():
        for msg_id, listed in entries:
            msg = h.sent[msg_id]
            for d in listed:
                path = msg.path[NodeId(d)]
                assert (u, v) in itertools.pairwise(path), (
                    f"seed={seed}: message {msg_id} for {d} crossed {u}->{v}, off its path {path}"
                )
            copies[(msg_id, u, v)] = copies.get((msg_id, u, v), 0) + 1
    assert all(c == 1 for c in copies.values()), f"seed={seed}: a link carried a message twice"
    # ...and every link of the pruned tree (the union of the paths) carried it.
    needed = {
        (m.msg_id, a, b)
        for m in h.sent.values()
        for d in m.dests
        for a, b in zip(m.path[d], m.path[d][1:], strict=False)
    }
    assert set(copies) == needed, f"seed={seed}: links used differ from the pruned trees"


@pytest.mark.parametrize("seed", [0])
def test_more_than_fifty_destinations_are_split_across_packets(seed: int) -> None:
    """61 destinations behind one next hop: the source sends ceil(61/50) = 2 DATA messages
    on that link (default limit 50), whose lists partition the destinations."""
    leaves = 60
    edges = [OverlayEdge(1, 2)] + [OverlayEdge(2, 3 + i) for i in range(leaves)]
    h = OverlayHarness(edges, seed=seed, tap=True)
    h.run(2.0)
    check_views_converged(h)
    dests = [NodeId(n) for n in range(2, 3 + leaves)]
    msg = h.multicast(NodeId(1), dests, size=256)
    assert msg is not None
    h.run(2.0 + LIFE_TIME)
    lists = h.log.messages(NodeId(1), NodeId(2))
    assert len(lists) == math.ceil(len(dests) / 50) == 2
    assert all(len(d) <= 50 for d in lists)
    assert sorted(d for dl in lists for d in dl) == sorted(dests)
    # Past the hub every copy is for one leaf: one DATA message per leaf link.
    for leaf in dests[1:]:
        assert h.log.messages(NodeId(2), leaf) == [(leaf,)]
    assert check_exactly_once(h, min_required=len(dests)) == len(dests)


def test_configured_destination_limit_splits_lists() -> None:
    edges = [OverlayEdge(1, 2)] + [OverlayEdge(2, n) for n in range(3, 13)]
    h = OverlayHarness(edges, seed=3, tap=True, max_dests_per_packet=4)
    h.run(2.0)
    dests = [NodeId(n) for n in range(2, 13)]  # 11 behind next hop 2
    h.multicast(NodeId(1), dests)
    h.run(2.0 + LIFE_TIME)
    assert [len(d) for d in h.log.messages(NodeId(1), NodeId(2))] == [4, 4, 3]
    assert check_exactly_once(h, min_required=11) == 11


@pytest.mark.parametrize("seed", range(MID_SEEDS))
def test_unicast_baseline_sends_one_copy_per_destination(seed: int) -> None:
    """multi_destination=False: every DATA message names one destination, so a link carries
    one copy per destination below it, and a message costs the sum of the tree depths."""
    rng = random.Random(seed)
    h = OverlayHarness(random_graph(12, 3, rng), seed=seed, tap=True, multi_destination=False)
    h.run(2.0)
    for _ in range(10):
        h.multicast(rng.choice(h.nodes), h.nodes)
    h.run(2.0 + LIFE_TIME)
    expected = sum(len(m.dests) for m in h.sent.values())
    assert check_exactly_once(h, min_required=expected) == expected
    assert all(len(dests) == 1 for entries in h.log.sent.values() for _, dests in entries)
    depth_sum = sum(sum(m.depth.values()) for m in h.sent.values())
    assert h.log.total_messages() == depth_sum
