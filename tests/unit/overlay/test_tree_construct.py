"""The maximum-throughput construction: improvement moves on hand-built trees, the search."""

from __future__ import annotations

import math

import numpy as np
import pytest

from meshcast.errors import ConfigError, UsageError
from meshcast.overlay.tree import (
    NO_PARENT,
    TRIANGULAR,
    Chain,
    InstanceModel,
    SearchConfig,
    Splice,
    TreeInstance,
    Triangular,
    dense_instance,
    max_throughput_tree,
    sparse_instance,
    star_tree,
    tree_at_target,
    tree_rate,
    tree_violations,
)
from meshcast.overlay.tree.exact import exact_max_throughput_tree
from meshcast.overlay.tree.improvement import Preference
from meshcast.overlay.tree.reduced import ReducedGraph
from meshcast.overlay.tree.working import WorkingTree

PATENT_ONLY = SearchConfig(improvement=TRIANGULAR, warm_start_candidates=0, source_alternatives=0)


def unit_instance(bounds: list[int], edges: list[tuple[int, int]]) -> TreeInstance:
    """Every edge has bandwidth 1 and node u capacity bounds[u] (0.5 for a leaf-only node),
    so at target 1 the reduced graph is exactly `edges` and u may feed bounds[u] children."""
    capacity = [float(b) if b else 0.5 for b in bounds]
    sender, receiver = zip(*edges, strict=True)
    return TreeInstance.from_edges(capacity, sender, receiver, [1.0] * len(edges))


def working(instance: TreeInstance, parent: list[int]) -> tuple[ReducedGraph, WorkingTree]:
    tree = WorkingTree.from_parent(np.array(parent, dtype=np.int64), instance.source)
    return ReducedGraph.at(instance, 1.0), tree


def test_triangular_moves_a_child_to_a_sibling_with_room() -> None:
    instance = unit_instance([1, 1, 1, 0], [(0, 1), (1, 2), (1, 3), (2, 3)])
    graph, tree = working(instance, [NO_PARENT, 0, 1, 1])
    assert TRIANGULAR.relieve(graph, tree, 1)
    assert tree.parent.tolist() == [NO_PARENT, 0, 1, 2]


def test_triangular_moves_a_child_to_the_grandparent() -> None:
    instance = unit_instance([2, 1, 0, 0], [(0, 1), (1, 2), (1, 3), (0, 3)])
    graph, tree = working(instance, [NO_PARENT, 0, 1, 1])
    assert TRIANGULAR.relieve(graph, tree, 1)
    assert tree.parent.tolist() == [NO_PARENT, 0, 1, 0]


def test_triangular_puts_a_child_with_room_in_its_parents_place() -> None:
    instance = unit_instance([1, 1, 1, 0], [(0, 1), (1, 2), (1, 3), (0, 2), (2, 1)])
    graph, tree = working(instance, [NO_PARENT, 0, 1, 1])
    assert TRIANGULAR.relieve(graph, tree, 1)
    assert tree.parent.tolist() == [NO_PARENT, 2, 0, 1]


def test_triangular_prefers_the_widest_edge_when_asked() -> None:
    # 1 is overloaded with children 2, 3, 4; both 2 and 3 could adopt 4
    capacity = [1.0, 1.0, 1.0, 2.0, 0.5]
    edges = [(0, 1, 5.0), (1, 2, 5.0), (1, 3, 5.0), (1, 4, 5.0), (2, 4, 3.0), (3, 4, 2.0)]
    edges.append((3, 0, 1.0))  # a second out-edge, so 3 may really feed two children
    sender, receiver, bandwidth = zip(*edges, strict=True)
    instance = TreeInstance.from_edges(capacity, sender, receiver, bandwidth)
    graph = ReducedGraph.at(instance, 1.0)
    for preference, adopter in ((Preference.WIDEST, 2), (Preference.MOST_ROOM, 3)):
        tree = WorkingTree.from_parent(np.array([NO_PARENT, 0, 1, 1, 1]), 0)
        assert Triangular(preference).relieve(graph, tree, 1)
        assert tree.parent[4] == adopter


def test_triangular_fails_without_changing_the_tree() -> None:
    instance = unit_instance([1, 1, 0, 0], [(0, 1), (1, 2), (1, 3)])
    graph, tree = working(instance, [NO_PARENT, 0, 1, 1])
    assert not TRIANGULAR.relieve(graph, tree, 1)
    assert tree.parent.tolist() == [NO_PARENT, 0, 1, 1]


def test_splice_closes_a_loop_through_an_ancestor() -> None:
    # 0 -> 1 -> 2 -> {3, 4}: 2 may feed one child. 3 takes 1's place, 1 hangs below 3.
    edges = [(0, 1), (1, 2), (2, 3), (2, 4), (0, 3), (3, 1)]
    instance = unit_instance([1, 1, 1, 1, 0], edges)
    graph, tree = working(instance, [NO_PARENT, 0, 1, 2, 2])
    assert not TRIANGULAR.relieve(graph, tree, 2)
    assert Splice().relieve(graph, tree, 2)
    assert tree.parent.tolist() == [NO_PARENT, 3, 1, 0, 2]
    assert tree_violations(instance, tree.parent, target=1.0) == []


def test_chain_passes_children_along_to_a_node_with_room() -> None:
    # the source may feed one child but has two; 1 is full, its child 3 can move to 4
    edges = [(0, 1), (0, 2), (1, 3), (1, 4), (1, 2), (4, 3)]
    instance = unit_instance([1, 2, 0, 0, 1], edges)
    graph, tree = working(instance, [NO_PARENT, 0, 0, 1, 1])
    assert not TRIANGULAR.relieve(graph, tree, 0)
    assert not Chain(max_moves=1).relieve(graph, tree, 0)
    assert tree.parent.tolist() == [NO_PARENT, 0, 0, 1, 1]
    assert Chain(max_moves=2).relieve(graph, tree, 0)
    assert tree.parent.tolist() == [NO_PARENT, 0, 1, 4, 1]


def test_chain_never_moves_a_node_below_its_own_subtree() -> None:
    # 2 could only go below 3, which hangs below 2
    instance = unit_instance([1, 1, 1, 1], [(0, 1), (0, 2), (2, 3), (3, 2)])
    graph, tree = working(instance, [NO_PARENT, 0, 0, 2])
    assert not Chain(max_moves=4).relieve(graph, tree, 0)
    assert tree.parent.tolist() == [NO_PARENT, 0, 0, 2]


def test_chain_of_equal_uploaders_beats_the_star() -> None:
    # the source and every node can feed one child at rate 10; all pairs have 10
    n = 5
    bandwidth = np.full((n, n), 10.0)
    instance = TreeInstance.from_matrix([10.0] * n, bandwidth)
    tree = max_throughput_tree(instance)
    assert tree.rate == 10.0
    assert star_tree(instance).rate == 10.0 / (n - 1)


def test_source_must_feed_the_one_node_that_can_carry_the_rest() -> None:
    # source 0 feeds one child; only 2 reaches 1, and only 1 reaches 3 and 4
    capacity = [4.0, 9.0, 37.0, 2.0, 2.0]
    bandwidth = np.zeros((5, 5))
    bandwidth[0, [1, 2, 4]] = [4.0, 4.0, 4.0]
    bandwidth[1, [0, 2, 3, 4]] = [9.0, 9.0, 9.0, 9.0]
    bandwidth[2, [0, 1]] = [30.0, 30.0]
    instance = TreeInstance.from_matrix(capacity, bandwidth)
    tree = max_throughput_tree(instance)
    assert tree.rate == 4.0
    assert tree.parent.tolist() == [NO_PARENT, 2, 0, 1, 1]


def test_single_node_tree_has_infinite_rate() -> None:
    tree = max_throughput_tree(TreeInstance.from_matrix([1.0], [[0.0]]))
    assert tree.parent.tolist() == [NO_PARENT]
    assert tree.rate == math.inf


def test_unreachable_node_is_a_usage_error() -> None:
    instance = TreeInstance.from_matrix([1.0, 1.0, 1.0], [[0, 1, 0], [0, 0, 0], [0, 0, 0]])
    with pytest.raises(UsageError, match="reach"):
        max_throughput_tree(instance)


def test_search_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="source_alternatives"):
        SearchConfig(source_alternatives=-1)


@pytest.mark.parametrize("config", [SearchConfig(), PATENT_ONLY], ids=["default", "patent"])
def test_random_instances_give_valid_trees_no_better_than_optimal(config: SearchConfig) -> None:
    ratios = []
    for seed in range(60):
        rng = np.random.default_rng([7, seed])
        instance = dense_instance(int(rng.integers(4, 9)), rng)
        tree = max_throughput_tree(instance, config)
        assert tree_violations(instance, tree.parent, target=tree.rate) == []
        assert tree.rate == tree_rate(instance, tree.parent)
        optimum = exact_max_throughput_tree(instance).rate
        assert tree.rate <= optimum
        ratios.append(tree.rate / optimum)
    assert np.mean(ratios) >= 0.98


def test_default_search_is_near_optimal_with_a_server_source() -> None:
    ratios = []
    for seed in range(40):
        rng = np.random.default_rng([8, seed])
        instance = dense_instance(int(rng.integers(5, 10)), rng, InstanceModel(source_uplink=100))
        tree = max_throughput_tree(instance)
        ratios.append(tree.rate / exact_max_throughput_tree(instance, known=tree).rate)
    assert min(ratios) >= 0.9
    assert np.mean(ratios) >= 0.99


def test_tree_at_target_respects_the_target_or_says_none() -> None:
    instance = dense_instance(30, np.random.default_rng(4))
    best = max_throughput_tree(instance)
    parent = tree_at_target(instance, best.rate)
    assert parent is not None
    assert tree_violations(instance, parent, target=best.rate) == []
    ceiling = float(instance.capacity[instance.source]) * 1.01
    assert tree_at_target(instance, ceiling) is None


def test_sparse_candidate_graph_gives_a_valid_tree() -> None:
    instance = sparse_instance(400, 8, np.random.default_rng(6), InstanceModel(source_uplink=100))
    tree = max_throughput_tree(instance)
    assert tree_violations(instance, tree.parent, target=tree.rate) == []
    assert tree.rate > star_like_rate(instance)


def star_like_rate(instance: TreeInstance) -> float:
    """The rate if the source fed all its candidate neighbours and they fed the rest."""
    out_degree = int(instance.outgoing.degree()[instance.source])
    return float(instance.capacity[instance.source]) / out_degree
