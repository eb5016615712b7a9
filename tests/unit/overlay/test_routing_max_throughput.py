"""The `max-throughput` routing policy: spanning trees of the view, the same tree in every
daemon, a rate at least the other policies', the construction's rate; loop-free unicast;
the measured-rate input of `OverlayNode`."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections.abc import Mapping

import pytest

from meshcast.errors import ConfigError, UsageError
from meshcast.ids import NodeId
from meshcast.overlay.node import Neighbour, OverlayConfig, OverlayNode
from meshcast.overlay.routing import (
    BUILDERS,
    RoutingTable,
    Tree,
    build_tree,
    fanout_tree,
    max_throughput_tree,
    shortest_path_tree,
)
from meshcast.overlay.tree import TreeInstance
from meshcast.overlay.tree import max_throughput_tree as construct
from meshcast.overlay.view import Edge, LinkStateDatabase, View
from meshcast.wire.overlay import Lsa, LsaEntry

EdgeSpec = tuple[int, int, float, float]  # a, b, weight, bandwidth (bit/s)
RATES = (1e6, 2e6, 5e6, 10e6, 50e6, 100e6)
UPLOADS = (1e6, 3e6, 10e6, 30e6, 100e6, math.inf)


def heterogeneous(n: int, seed: int) -> tuple[list[EdgeSpec], dict[NodeId, float]]:
    """A connected random overlay: a random spanning tree plus extra links; link bandwidths
    and uploads spread over two decades (some uploads unknown)."""
    rng = random.Random(seed)
    pairs = {(rng.randrange(1, i), i) for i in range(2, n + 1)}
    extra = rng.randint(0, n * (n - 1) // 2 - len(pairs))
    while extra > 0:
        a, b = sorted(rng.sample(range(1, n + 1), 2))
        if (a, b) not in pairs:
            pairs.add((a, b))
            extra -= 1
    edges = [(a, b, float(rng.randint(1, 9)), rng.choice(RATES)) for a, b in sorted(pairs)]
    uploads = {NodeId(i): rng.choice(UPLOADS) for i in range(1, n + 1)}
    return edges, uploads


def lsas(edges: list[EdgeSpec]) -> list[Lsa]:
    entries: dict[int, list[LsaEntry]] = {}
    for a, b, weight, bandwidth in edges:
        entries.setdefault(a, []).append(LsaEntry(b, weight, bandwidth))
        entries.setdefault(b, []).append(LsaEntry(a, weight, bandwidth))
    return [
        Lsa(node, 1, 1, bytes(8), tuple(sorted(found, key=lambda e: e.neighbour)))
        for node, found in sorted(entries.items())
    ]


def view_at(local: int, edges: list[EdgeSpec], order: random.Random | None = None) -> View:
    """The view daemon `local` computes, having heard the LSAs in a random order."""
    db = LinkStateDatabase(NodeId(local), incarnation=1)
    heard = lsas(edges)
    if order is not None:
        order.shuffle(heard)
    for lsa in heard:
        if lsa.origin == local:
            db.originate(lsa.entries, bytes(8))
        else:
            db.consider(lsa)
    return db.compute_view()


def spans(tree: Tree, view: View) -> bool:
    """Every member but the source has a parent over a view link, and reaches the source."""
    links = {(e.a, e.b) for e in view.edges}
    if set(tree.parent) != set(view.members) - {tree.source}:
        return False
    for node, up in tree.parent.items():
        if (min(node, up), max(node, up)) not in links:
            return False
    return all(tree.depth(node) < len(view.members) for node in tree.parent)


def construction_rate(view: View, source: NodeId, uploads: Mapping[NodeId, float]) -> float:
    """`overlay.tree`'s own rate on the same problem, built independently of routing."""
    index = {m: i for i, m in enumerate(view.members)}
    capacity = [min(uploads.get(m, math.inf), 1e15) for m in view.members]
    sender = [index[e.a] for e in view.edges] + [index[e.b] for e in view.edges]
    receiver = [index[e.b] for e in view.edges] + [index[e.a] for e in view.edges]
    bandwidth = [e.bandwidth_bps for e in view.edges] * 2
    instance = TreeInstance.from_edges(capacity, sender, receiver, bandwidth, index[source])
    return construct(instance).rate


def test_the_policy_is_registered() -> None:
    assert BUILDERS["max-throughput"] is max_throughput_tree


@pytest.mark.parametrize("seed", range(30))
def test_builds_a_spanning_tree_of_the_view(seed: int) -> None:
    edges, uploads = heterogeneous(random.Random(seed).randint(2, 16), seed)
    view = view_at(1, edges)
    for source in view.members:
        tree = build_tree(view, source, "max-throughput", uploads)
        assert tree.source == source
        assert spans(tree, view)


@pytest.mark.parametrize("seed", range(10))
def test_every_daemon_builds_the_same_tree(seed: int) -> None:
    """Each daemon hears the LSAs in its own order; the views and so the trees agree."""
    edges, uploads = heterogeneous(12, seed)
    order = random.Random(seed)
    tables = []
    for local in range(1, 13):
        table = RoutingTable(NodeId(local), "max-throughput", uploads)
        table.install(view_at(local, edges, order))
        tables.append(table)
    for source in range(1, 13):
        trees = [table.tree(NodeId(source)) for table in tables]
        assert len({tuple(sorted(t.parent.items())) for t in trees if t is not None}) == 1
        assert len({t.rate_bps for t in trees if t is not None}) == 1


_TREES_SCRIPT = """
import json, sys
from meshcast.ids import NodeId
from meshcast.overlay.routing import max_throughput_tree
from meshcast.overlay.view import Edge, View
spec = json.loads(sys.stdin.read())
view = View.of(tuple(NodeId(m) for m in spec["members"]),
               tuple(Edge(NodeId(a), NodeId(b), w, bw) for a, b, w, bw in spec["edges"]))
uploads = {NodeId(int(k)): v for k, v in spec["uploads"].items()}
print(json.dumps([sorted(max_throughput_tree(view, s, uploads).parent.items())
                  for s in view.members]))
"""


def test_the_tree_does_not_depend_on_the_process() -> None:
    """Two interpreters with different hash seeds (set and dict orders) agree."""
    edges, uploads = heterogeneous(14, seed=99)
    view = view_at(1, edges)
    spec = json.dumps(
        {
            "members": list(view.members),
            "edges": [[e.a, e.b, e.weight, e.bandwidth_bps] for e in view.edges],
            "uploads": {str(k): v if math.isfinite(v) else 1e300 for k, v in uploads.items()},
        }
    )
    outputs = set()
    for hash_seed in ("0", "4242"):
        done = subprocess.run(
            [sys.executable, "-c", _TREES_SCRIPT],
            input=spec,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        )
        outputs.add(done.stdout)
    assert len(outputs) == 1


@pytest.mark.parametrize("seed", range(40))
def test_rate_is_at_least_the_other_policies(seed: int) -> None:
    edges, uploads = heterogeneous(random.Random(seed).randint(3, 14), seed)
    view = view_at(1, edges)
    for source in view.members:
        best = max_throughput_tree(view, source, uploads).rate_bps
        assert best >= shortest_path_tree(view, source, uploads).rate_bps
        assert best >= fanout_tree(view, source, uploads).rate_bps


@pytest.mark.parametrize("seed", range(40))
def test_rate_is_the_constructions_rate(seed: int) -> None:
    """Routing recomputes the rate with its own rule: it matches `overlay.tree`'s (unless
    a capacity-blind tree beat the heuristic, in which case it is higher)."""
    edges, uploads = heterogeneous(random.Random(seed).randint(2, 14), seed)
    view = view_at(1, edges)
    for source in view.members:
        rate = max_throughput_tree(view, source, uploads).rate_bps
        built = construction_rate(view, source, uploads)
        blind = max(
            shortest_path_tree(view, source, uploads).rate_bps,
            fanout_tree(view, source, uploads).rate_bps,
        )
        assert rate == max(built, blind)


def test_capacities_decide_the_shape() -> None:
    """A star would overload the source; the tree relays through the daemons that can."""
    members = tuple(NodeId(i) for i in range(1, 6))
    view = View.of(
        members,
        tuple(Edge(NodeId(a), NodeId(b), 1.0, 10e6) for a in range(1, 6) for b in range(a + 1, 6)),
    )
    uploads = {NodeId(1): 10e6, NodeId(2): 20e6, NodeId(3): 20e6, NodeId(4): 1e6, NodeId(5): 1e6}
    tree = max_throughput_tree(view, NodeId(1), uploads)
    assert tree.rate_bps == 10e6
    assert tree.children[NodeId(1)] in ((NodeId(2),), (NodeId(3),))
    assert NodeId(4) not in tree.children  # the narrow daemons are leaves
    assert NodeId(5) not in tree.children
    assert shortest_path_tree(view, NodeId(1), uploads).rate_bps == pytest.approx(10e6 / 4)


def test_unknown_uploads_give_the_widest_tree() -> None:
    """With no upload known, the best rate is the bottleneck of a maximum spanning tree."""
    edges, _ = heterogeneous(15, seed=5)
    view = view_at(1, edges)
    # largest b such that the links of bandwidth >= b still connect every member
    widest = max(b for b in {e.bandwidth_bps for e in view.edges} if connected(view, b))
    for source in view.members:
        assert max_throughput_tree(view, source, {}).rate_bps == widest


def connected(view: View, at_least: float) -> bool:
    reached = {view.members[0]}
    stack = [view.members[0]]
    adjacency = view.adjacency()
    while stack:
        for neighbour, _, bandwidth in adjacency[stack.pop()]:
            if bandwidth >= at_least and neighbour not in reached:
                reached.add(neighbour)
                stack.append(neighbour)
    return len(reached) == len(view.members)


def test_single_daemon_and_unbounded_values() -> None:
    alone = View.of((NodeId(7),), ())
    assert max_throughput_tree(alone, NodeId(7), {}).rate_bps == math.inf
    pair = View.of((NodeId(1), NodeId(2)), (Edge(NodeId(1), NodeId(2), 1.0, math.inf),))
    tree = max_throughput_tree(pair, NodeId(1), {})
    assert tree.parent == {NodeId(2): NodeId(1)}
    assert tree.rate_bps == math.inf


@pytest.mark.parametrize("seed", range(10))
def test_unicast_never_loops(seed: int) -> None:
    """Reports travel hop by hop over each daemon's own tree: under max-throughput they
    must still reach the source (they go by shortest paths)."""
    edges, uploads = heterogeneous(12, seed)
    tables = {}
    for local in range(1, 13):
        table = RoutingTable(NodeId(local), "max-throughput", uploads)
        table.install(view_at(local, edges))
        tables[NodeId(local)] = table
    for start in tables:
        for dest in tables:
            at, hops = start, 0
            while at != dest:
                hop = tables[at].unicast_next_hop(dest)
                assert hop is not None
                at, hops = hop, hops + 1
                assert hops < len(tables), f"report from {start} to {dest} loops"


# ---------------------------------------------------------------------- measured link rates


def node_with(neighbours: dict[int, float], threshold: float = 0.2) -> OverlayNode:
    config = OverlayConfig(
        neighbours={NodeId(p): Neighbour(1.0, bw) for p, bw in neighbours.items()},
        upload_bps={},
        policy="max-throughput",
        rate_change_threshold=threshold,
    )
    return OverlayNode(NodeId(1), config, incarnation=1, rng=random.Random(0))


def test_measured_rate_is_advertised_past_the_hysteresis_only() -> None:
    node = node_with({2: 10e6})
    assert node.advertised_bandwidth(NodeId(2)) == 10e6
    node.update_link_rate(NodeId(2), 8.5e6, now=0.0)  # -15 %: within the band
    assert node.advertised_bandwidth(NodeId(2)) == 10e6
    node.update_link_rate(NodeId(2), 7e6, now=0.0)  # -30 %
    assert node.advertised_bandwidth(NodeId(2)) == 7e6
    node.update_link_rate(NodeId(2), 8e6, now=0.0)  # +14 % of the new value: kept
    assert node.advertised_bandwidth(NodeId(2)) == 7e6
    node.update_link_rate(NodeId(2), 50e6, now=0.0)  # never above the configured rate
    assert node.advertised_bandwidth(NodeId(2)) == 10e6


def test_measured_rate_of_a_stranger_is_refused() -> None:
    with pytest.raises(UsageError):
        node_with({2: 10e6}).update_link_rate(NodeId(3), 1e6, now=0.0)


def test_rate_change_threshold_is_checked() -> None:
    with pytest.raises(ConfigError) as info:
        node_with({2: 10e6}, threshold=1.5)
    assert info.value.key == "rate_change_threshold"
