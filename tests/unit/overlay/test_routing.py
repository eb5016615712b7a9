"""Routing trees and views: deterministic, spanning, and what the policies promise."""

from __future__ import annotations

import math
import random

import pytest

from meshcast.ids import NodeId
from meshcast.overlay.routing import RoutingTable, fanout_tree, shortest_path_tree
from meshcast.overlay.view import Edge, LinkStateDatabase, View
from meshcast.wire.overlay import Lsa, LsaEntry


def lsdb_for(edges: list[tuple[int, int, float, float]], local: int = 1) -> LinkStateDatabase:
    entries: dict[int, list[LsaEntry]] = {}
    for a, b, weight, bandwidth in edges:
        entries.setdefault(a, []).append(LsaEntry(b, weight, bandwidth))
        entries.setdefault(b, []).append(LsaEntry(a, weight, bandwidth))
    db = LinkStateDatabase(NodeId(local), incarnation=1)
    for node, node_entries in entries.items():
        lsa = Lsa(node, 1, 1, bytes(8), tuple(sorted(node_entries, key=lambda e: e.neighbour)))
        if node == local:
            db.originate(lsa.entries, bytes(8))
        else:
            db.consider(lsa)
    return db


def random_edges(n: int, seed: int) -> list[tuple[int, int, float, float]]:
    rng = random.Random(seed)
    edges = {(i, rng.randrange(1, i)) for i in range(2, n + 1)}
    while len(edges) < 2 * n:
        a, b = rng.sample(range(1, n + 1), 2)
        if (b, a) not in edges:
            edges.add((a, b))
    return [(a, b, float(rng.randint(1, 9)), rng.choice([1e6, 10e6, 100e6])) for a, b in edges]


def test_view_needs_both_ends_to_report_a_link() -> None:
    db = lsdb_for([(1, 2, 1.0, 1e6)])
    db.consider(Lsa(3, 1, 1, bytes(8), (LsaEntry(2, 1.0, 1e6),)))  # 2 does not list 3
    assert db.compute_view().members == (1, 2)


def test_same_database_same_view_digest_everywhere() -> None:
    edges = random_edges(20, seed=3)
    digests = {lsdb_for(edges, local).compute_view().digest for local in range(1, 21)}
    assert len(digests) == 1


def test_newer_lsa_wins_and_older_is_ignored() -> None:
    db = LinkStateDatabase(NodeId(1), incarnation=1)
    assert db.consider(Lsa(2, 5, 2, bytes(8), ()))
    assert not db.consider(Lsa(2, 5, 1, bytes(8), ()))
    assert not db.consider(Lsa(2, 4, 9, bytes(8), ()))  # an earlier incarnation
    assert db.consider(Lsa(2, 6, 1, bytes(8), ()))  # the daemon restarted
    assert not db.consider(Lsa(1, 9, 9, bytes(8), ()))  # never adopt a copy of our own


@pytest.mark.parametrize("seed", range(10))
def test_shortest_path_tree_spans_and_is_shortest(seed: int) -> None:
    edges = random_edges(30, seed)
    view = lsdb_for(edges).compute_view()
    tree = shortest_path_tree(view, NodeId(1), {})
    assert set(tree.parent) == set(view.members) - {1}
    # Compare with Bellman-Ford distances.
    dist = dict.fromkeys(view.members, math.inf)
    dist[NodeId(1)] = 0.0
    for _ in view.members:
        for e in view.edges:
            dist[e.b] = min(dist[e.b], dist[e.a] + e.weight)
            dist[e.a] = min(dist[e.a], dist[e.b] + e.weight)
    weight = {(e.a, e.b): e.weight for e in view.edges}
    for node in tree.parent:
        length, at = 0.0, node
        while at != 1:
            up = tree.parent[at]
            length += weight[(min(at, up), max(at, up))]
            at = up
        assert length == pytest.approx(dist[node])


def test_every_daemon_builds_the_same_trees() -> None:
    edges = random_edges(25, seed=8)
    tables = []
    for local in range(1, 26):
        table = RoutingTable(NodeId(local), "shortest-path", {})
        table.install(lsdb_for(edges, local).compute_view())
        tables.append(table)
    for source in range(1, 26):
        parents = {tuple(sorted(t.tree(NodeId(source)).parent.items())) for t in tables}  # type: ignore[union-attr]
        assert len(parents) == 1


def test_fanout_sends_directly_to_every_neighbour() -> None:
    view = View.of(
        (NodeId(1), NodeId(2), NodeId(3), NodeId(4)),
        tuple(
            Edge(NodeId(a), NodeId(b), 1.0 if b == a + 1 else 5.0, 10e6)
            for a, b in [(1, 2), (1, 3), (1, 4), (2, 3), (3, 4)]
        ),
    )
    assert shortest_path_tree(view, NodeId(1), {}).parent[NodeId(3)] == 2
    tree = fanout_tree(view, NodeId(1), {})
    assert all(tree.parent[NodeId(n)] == 1 for n in (2, 3, 4))


def test_tree_rate_is_its_bottleneck() -> None:
    edges = [(1, 2, 1.0, 10e6), (2, 3, 1.0, 4e6), (2, 4, 1.0, 10e6)]
    view = lsdb_for(edges).compute_view()
    tree = shortest_path_tree(view, NodeId(1), {NodeId(2): 6e6})
    assert tree.rate_bps == pytest.approx(3e6)  # node 2 splits 6 Mbit/s over two children
    assert shortest_path_tree(view, NodeId(1), {}).rate_bps == pytest.approx(4e6)


def test_next_hop_follows_the_source_tree_then_falls_back() -> None:
    edges = [(1, 2, 1.0, 1e6), (2, 3, 1.0, 1e6), (1, 3, 5.0, 1e6)]
    table = RoutingTable(NodeId(2), "shortest-path", {})
    table.install(lsdb_for(edges, 2).compute_view())
    assert table.next_hop(NodeId(1), NodeId(3)) == 3  # 2 is on 1's path to 3
    # 3's tree does not pass through 2 on the way to 1... yet 2 can still route it:
    assert table.next_hop(NodeId(3), NodeId(1)) == 1
    assert table.next_hop(NodeId(1), NodeId(99)) is None
