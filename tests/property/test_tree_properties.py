"""Property tests for the maximum-throughput tree: on any instance the construction returns a
valid spanning tree whose reported rate is its true bottleneck and never beats the optimum."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from meshcast.overlay.tree import (
    NO_PARENT,
    DynamicConfig,
    DynamicTree,
    TreeInstance,
    degree_bounds,
    max_throughput_tree,
    random_tree,
    shortest_path_tree,
    star_tree,
    tree_at_target,
    tree_rate,
    tree_violations,
    widest_path_tree,
)
from meshcast.overlay.tree.exact import exact_max_throughput_tree

RATES = st.floats(min_value=0.01, max_value=1000.0, allow_nan=False, allow_infinity=False)


@st.composite
def instances(draw: st.DrawFn, max_nodes: int = 7, complete: bool = False) -> TreeInstance:
    """Random capacities and bandwidths, some edges missing, but every node reachable:
    a random spanning arborescence is always kept."""
    n = draw(st.integers(min_value=1, max_value=max_nodes))
    capacity = draw(st.lists(RATES, min_size=n, max_size=n))
    values = draw(st.lists(RATES, min_size=n * n, max_size=n * n))
    matrix = np.array(values).reshape(n, n)
    if not complete:
        present = draw(st.lists(st.booleans(), min_size=n * n, max_size=n * n))
        keep = np.array(present).reshape(n, n)
        for v in range(1, n):  # node v can always be fed by some earlier node
            keep[draw(st.integers(min_value=0, max_value=v - 1)), v] = True
        matrix = np.where(keep, matrix, 0.0)
    source = draw(st.integers(min_value=0, max_value=n - 1))
    order = np.roll(np.arange(n), source)  # relabel so the source is the root of the chain
    return TreeInstance.from_matrix(np.array(capacity)[order], matrix[np.ix_(order, order)], source)


@given(instances())
def test_construction_returns_a_valid_tree_with_its_true_rate(instance: TreeInstance) -> None:
    tree = max_throughput_tree(instance)
    assert tree_violations(instance, tree.parent, target=tree.rate) == []
    assert tree.rate == tree_rate(instance, tree.parent)


@given(instances(max_nodes=6))
def test_construction_never_beats_the_exact_optimum(instance: TreeInstance) -> None:
    tree = max_throughput_tree(instance)
    assert tree.rate <= exact_max_throughput_tree(instance).rate


@given(instances(max_nodes=6), st.integers(min_value=0, max_value=2**32 - 1))
def test_no_baseline_beats_the_exact_optimum(instance: TreeInstance, seed: int) -> None:
    optimum = exact_max_throughput_tree(instance).rate
    for tree in (
        shortest_path_tree(instance),
        widest_path_tree(instance),
        random_tree(instance, np.random.default_rng(seed)),
    ):
        assert tree_violations(instance, tree.parent) == []
        assert tree.rate <= optimum


@given(instances(complete=True))
def test_star_is_valid_on_complete_graphs(instance: TreeInstance) -> None:
    tree = star_tree(instance)
    assert tree_violations(instance, tree.parent) == []


@given(instances(), RATES)
def test_a_tree_at_a_target_respects_it(instance: TreeInstance, target: float) -> None:
    parent = tree_at_target(instance, target)
    if parent is not None:
        assert tree_violations(instance, parent, target=target) == []


@given(st.lists(RATES, min_size=1, max_size=20), RATES)
def test_degree_bounds_are_the_largest_feasible_fanout(
    capacity: list[float], target: float
) -> None:
    caps = np.array(capacity)
    bound = degree_bounds(caps, target)
    feeds = bound > 0
    assert np.all(caps[feeds] / bound[feeds] >= target)
    assert np.all(caps / (bound + 1) < target)


@given(
    instances(max_nodes=10, complete=True),
    st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=9)), max_size=25),
)
def test_dynamic_tree_stays_valid_under_any_join_leave_sequence(
    universe: TreeInstance, events: list[tuple[bool, int]]
) -> None:
    tree = DynamicTree(universe, [], DynamicConfig())
    for joining, pick in events:
        node = pick % universe.n
        if joining and not tree.is_member(node):
            tree.join(node)
        elif not joining and tree.is_member(node) and node != universe.source:
            tree.leave(node)
        members = np.array(tree.members())
        parent = tree.tree().parent
        local = np.full(universe.n, NO_PARENT)
        local[members] = np.arange(len(members))
        sub_parent = np.where(parent[members] == NO_PARENT, NO_PARENT, local[parent[members]])
        sub = universe.restrict(members)
        assert tree_violations(sub, sub_parent) == []
        assert tree.rate == tree_rate(sub, sub_parent)
