"""Tree problem data: instance indexing and checks, the rate constraint, rate candidates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from meshcast.errors import ConfigError, UsageError
from meshcast.overlay.tree import (
    NO_PARENT,
    InstanceModel,
    Tree,
    TreeInstance,
    degree_bounds,
    dense_instance,
    rate_candidates,
    sparse_instance,
    tree_rate,
    tree_violations,
)


def three_nodes() -> TreeInstance:
    # 0 -> 1 (10), 0 -> 2 (4), 1 -> 2 (8), 2 -> 1 (3); capacities 10, 8, 1
    bandwidth = [[0, 10, 4], [0, 0, 8], [0, 3, 0]]
    return TreeInstance.from_matrix([10.0, 8.0, 1.0], bandwidth)


def test_from_matrix_indexes_edges_widest_first() -> None:
    instance = three_nodes()
    assert instance.n == 3
    assert instance.edge_count == 4
    out = instance.outgoing
    assert out.peer[out.start[0] : out.start[1]].tolist() == [1, 2]
    assert out.bandwidth[out.start[0] : out.start[1]].tolist() == [10.0, 4.0]
    into_two = instance.incoming
    assert into_two.peer[into_two.start[2] : into_two.start[3]].tolist() == [1, 0]


def test_bandwidth_between_returns_zero_for_missing_edges() -> None:
    instance = three_nodes()
    found = instance.bandwidth_between([0, 1, 2, 1], [1, 2, 1, 0])
    assert found.tolist() == [10.0, 8.0, 3.0, 0.0]


def test_count_at_least_is_a_prefix_length_per_node() -> None:
    instance = three_nodes()
    assert instance.outgoing.count_at_least(5.0).tolist() == [1, 1, 0]
    assert instance.incoming.count_at_least(4.0).tolist() == [0, 1, 2]


def test_arrays_are_read_only() -> None:
    instance = three_nodes()
    with pytest.raises(ValueError, match="read-only"):
        instance.capacity[0] = 1.0


@pytest.mark.parametrize(
    ("capacity", "sender", "receiver", "bandwidth", "message"),
    [
        ([1.0, 0.0], [0], [1], [1.0], "capacity"),
        ([1.0, math.inf], [0], [1], [1.0], "capacity"),
        ([1.0, 1.0], [0], [0], [1.0], "self-loop"),
        ([1.0, 1.0], [0], [2], [1.0], "out of range"),
        ([1.0, 1.0], [0], [1], [-1.0], "bandwidth"),
        ([1.0, 1.0], [0, 0], [1, 1], [1.0, 2.0], "duplicate"),
        ([1.0, 1.0], [0], [1, 0], [1.0], "equal length"),
    ],
)
def test_from_edges_rejects_bad_data(
    capacity: list[float],
    sender: list[int],
    receiver: list[int],
    bandwidth: list[float],
    message: str,
) -> None:
    with pytest.raises(UsageError, match=message):
        TreeInstance.from_edges(capacity, sender, receiver, bandwidth)


def test_source_must_be_a_node() -> None:
    with pytest.raises(UsageError, match="source"):
        TreeInstance.from_matrix([1.0, 1.0], [[0, 1], [1, 0]], source=2)


def test_restrict_renumbers_and_keeps_induced_edges() -> None:
    instance = three_nodes()
    sub = instance.restrict([0, 2])
    assert sub.n == 2
    assert sub.source == 0
    assert sub.bandwidth_matrix().tolist() == [[0.0, 4.0], [0.0, 0.0]]
    with pytest.raises(UsageError, match="source"):
        instance.restrict([1, 2])


@pytest.mark.parametrize("capacity", [1.0, 3.0, 7.5, 10.0, 0.3, 123.456])
@pytest.mark.parametrize("k", [1, 2, 3, 7, 10])
def test_degree_bound_at_a_share_value_admits_exactly_k(capacity: float, k: int) -> None:
    bound = degree_bounds(np.array([capacity]), capacity / k)
    assert bound[0] >= k
    assert capacity / bound[0] >= capacity / k
    assert capacity / (bound[0] + 1) < capacity / k


def test_degree_bound_is_zero_above_capacity() -> None:
    assert degree_bounds(np.array([5.0]), 5.0001).tolist() == [0]


def test_tree_counts_children() -> None:
    tree = Tree(np.array([NO_PARENT, 0, 0, 1]), rate=1.0)
    assert tree.n == 4
    assert tree.children_count().tolist() == [2, 1, 0, 0]


def test_tree_rate_is_min_of_edges_and_shares() -> None:
    instance = three_nodes()
    # chain 0 -> 1 -> 2: edges 10 and 8, shares 10/1 and 8/1
    assert tree_rate(instance, [NO_PARENT, 0, 1]) == 8.0
    # star: edges 10 and 4, source share 10/2
    assert tree_rate(instance, [NO_PARENT, 0, 0]) == 4.0
    # 0 -> 2 -> 1: edge 3 and node 2 uploads 1 to one child
    assert tree_rate(instance, [NO_PARENT, 2, 0]) == 1.0
    assert tree_rate(TreeInstance.from_matrix([1.0], [[0.0]]), [NO_PARENT]) == math.inf


def chain_only() -> TreeInstance:
    return TreeInstance.from_matrix([1.0, 1.0, 1.0], [[0, 1, 0], [0, 0, 1], [0, 0, 0]])


def test_tree_rate_rejects_missing_edge() -> None:
    with pytest.raises(ValueError, match="edge"):
        tree_rate(chain_only(), [NO_PARENT, 0, 0])


def test_tree_violations_finds_each_kind_of_problem() -> None:
    instance = three_nodes()
    assert tree_violations(instance, [NO_PARENT, 0, 1]) == []
    assert tree_violations(instance, [NO_PARENT, 0, 1], target=8.0) == []
    assert any("cycle" in p for p in tree_violations(instance, [NO_PARENT, 2, 1]))
    assert any("source has a parent" in p for p in tree_violations(instance, [1, 0, 1]))
    assert any("without a valid parent" in p for p in tree_violations(instance, [-1, 0, -1]))
    assert any("not an edge" in p for p in tree_violations(chain_only(), [NO_PARENT, 0, 0]))
    over = tree_violations(instance, [NO_PARENT, 0, 0], target=6.0)
    assert any("more children" in p for p in over)
    assert any("narrower" in p for p in over)
    assert tree_violations(instance, [NO_PARENT, 0]) != []


def test_rate_candidates_hold_every_tree_rate() -> None:
    rng = np.random.default_rng(5)
    instance = dense_instance(6, rng)
    values = rate_candidates(instance)
    assert np.all(np.diff(values) > 0)
    for _ in range(50):
        parent = np.array([NO_PARENT] + [int(rng.integers(0, v)) for v in range(1, 6)])
        assert tree_rate(instance, parent) in values


def test_rate_candidates_respect_the_window() -> None:
    instance = dense_instance(7, np.random.default_rng(1))
    everything = rate_candidates(instance)
    window = rate_candidates(instance, low=float(everything[5]), high=float(everything[20]))
    assert window.tolist() == everything[5:21].tolist()


def test_random_instances_are_reproducible_and_valid() -> None:
    first = dense_instance(8, np.random.default_rng(3))
    second = dense_instance(8, np.random.default_rng(3))
    assert np.array_equal(first.bandwidth_matrix(), second.bandwidth_matrix())
    assert first.edge_count == 8 * 7
    # bandwidth never exceeds the sender's uplink
    assert np.all(first.bandwidth_matrix() <= first.capacity[:, None])
    sparse = sparse_instance(200, 5, np.random.default_rng(3))
    degree = sparse.outgoing.degree()
    assert degree.min() >= 5
    assert sparse.edge_count < 200 * 199


def test_server_source_model_sets_the_source_uplink() -> None:
    model = InstanceModel(source_uplink=100.0)
    instance = dense_instance(10, np.random.default_rng(2), model, source=3)
    assert instance.capacity[3] == 100.0
    with pytest.raises(ConfigError, match="narrow_share"):
        InstanceModel(narrow_share=1.5)
