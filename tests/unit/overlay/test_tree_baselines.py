"""Baseline trees: valid, and each is what its name says."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.sparse import csr_array
from scipy.sparse.csgraph import dijkstra

from meshcast.errors import UsageError
from meshcast.overlay.tree import (
    NO_PARENT,
    TreeInstance,
    dense_instance,
    random_tree,
    shortest_path_tree,
    sparse_instance,
    star_tree,
    tree_rate,
    tree_violations,
    widest_path_tree,
)


def path_to_source(parent: np.ndarray, node: int) -> list[tuple[int, int]]:
    edges = []
    while parent[node] != NO_PARENT:
        edges.append((int(parent[node]), node))
        node = int(parent[node])
    return edges


def test_star_feeds_everyone_from_the_source() -> None:
    instance = dense_instance(6, np.random.default_rng(1))
    tree = star_tree(instance)
    assert tree.parent.tolist() == [NO_PARENT] + [0] * 5
    assert tree.rate == tree_rate(instance, tree.parent)
    sparse = TreeInstance.from_matrix([1.0, 1.0, 1.0], [[0, 1, 0], [0, 0, 1], [0, 0, 0]])
    with pytest.raises(UsageError, match="star"):
        star_tree(sparse)


def test_shortest_path_tree_minimises_the_sum_of_inverse_bandwidths() -> None:
    instance = sparse_instance(60, 3, np.random.default_rng(2))
    tree = shortest_path_tree(instance)
    assert tree_violations(instance, tree.parent) == []
    lengths = np.zeros((instance.n, instance.n))
    senders, receivers = instance.edge_key // instance.n, instance.edge_key % instance.n
    lengths[senders, receivers] = 1.0 / instance.edge_key_bandwidth
    expected = dijkstra(csr_array(lengths), indices=instance.source)
    for node in range(instance.n):
        length = sum(lengths[u, v] for u, v in path_to_source(tree.parent, node))
        assert length == pytest.approx(expected[node])


def test_widest_path_tree_gives_every_node_its_widest_path() -> None:
    instance = sparse_instance(60, 3, np.random.default_rng(3))
    tree = widest_path_tree(instance)
    assert tree_violations(instance, tree.parent) == []
    matrix = instance.bandwidth_matrix()
    # widest-path values by repeated relaxation (Bellman-Ford on max-min)
    widest = np.zeros(instance.n)
    widest[instance.source] = np.inf
    for _ in range(instance.n):
        widest = np.maximum(widest, np.max(np.minimum(widest[:, None], matrix), axis=0))
    for node in range(instance.n):
        if node == instance.source:
            continue
        bottleneck = min(matrix[u, v] for u, v in path_to_source(tree.parent, node))
        assert bottleneck == widest[node]


def test_random_tree_is_valid_and_reproducible() -> None:
    instance = sparse_instance(80, 3, np.random.default_rng(4))
    first = random_tree(instance, np.random.default_rng(5))
    second = random_tree(instance, np.random.default_rng(5))
    other = random_tree(instance, np.random.default_rng(6))
    assert tree_violations(instance, first.parent) == []
    assert first.parent.tolist() == second.parent.tolist()
    assert first.parent.tolist() != other.parent.tolist()


def test_baselines_reject_unreachable_nodes() -> None:
    cut_off = TreeInstance.from_matrix([1.0, 1.0, 1.0], [[0, 1, 0], [0, 0, 0], [0, 0, 0]])
    for build in (shortest_path_tree, widest_path_tree):
        with pytest.raises(UsageError, match="reach"):
            build(cut_off)
    with pytest.raises(UsageError, match="reach"):
        random_tree(cut_off, np.random.default_rng(0))
