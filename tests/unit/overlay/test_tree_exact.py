"""The exact solver agrees with brute force, and its feasibility test is monotone."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from meshcast.errors import UsageError
from meshcast.overlay.tree import (
    NO_PARENT,
    TreeInstance,
    dense_instance,
    max_throughput_tree,
    rate_candidates,
    tree_rate,
    tree_violations,
)
from meshcast.overlay.tree.exact import (
    MAX_EXACT_NODES,
    exact_max_throughput_tree,
    feasible_arborescence,
)


def brute_force_optimum(instance: TreeInstance) -> float:
    """The best rate over every parent assignment (n <= 6: at most 5^5 candidates)."""
    best = 0.0
    others = [v for v in range(instance.n) if v != instance.source]
    for choice in itertools.product(range(instance.n), repeat=len(others)):
        parent = np.full(instance.n, NO_PARENT, dtype=np.int64)
        parent[others] = choice
        if not tree_violations(instance, parent):
            best = max(best, tree_rate(instance, parent))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_exact_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng([11, seed])
    n = int(rng.integers(3, 6))
    # drop some edges so that missing edges matter too
    instance = dense_instance(n, rng)
    matrix = instance.bandwidth_matrix()
    matrix[rng.random((n, n)) < 0.25] = 0.0
    matrix[instance.source, 1] = 1.0  # keep the graph reachable from the source
    for v in range(2, n):
        matrix[v - 1, v] = max(matrix[v - 1, v], 0.5)
    instance = TreeInstance.from_matrix(instance.capacity, matrix)
    exact = exact_max_throughput_tree(instance)
    assert tree_violations(instance, exact.parent) == []
    assert exact.rate == tree_rate(instance, exact.parent)
    assert exact.rate == brute_force_optimum(instance)
    assert (
        exact_max_throughput_tree(instance, known=max_throughput_tree(instance)).rate == exact.rate
    )


def test_feasibility_is_monotone_in_the_target() -> None:
    instance = dense_instance(7, np.random.default_rng(3))
    verdicts = [
        feasible_arborescence(instance, float(v)) is not None for v in rate_candidates(instance)
    ]
    first_infeasible = verdicts.index(False)
    assert all(verdicts[:first_infeasible])
    assert not any(verdicts[first_infeasible:])


def test_a_feasible_answer_respects_the_target() -> None:
    instance = dense_instance(8, np.random.default_rng(9))
    target = exact_max_throughput_tree(instance).rate
    parent = feasible_arborescence(instance, target)
    assert parent is not None
    assert tree_violations(instance, parent, target=target) == []


def test_size_limit_and_unreachable_nodes_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="at most"):
        exact_max_throughput_tree(dense_instance(MAX_EXACT_NODES + 1, np.random.default_rng(1)))
    cut_off = TreeInstance.from_matrix([1.0, 1.0, 1.0], [[0, 1, 0], [0, 0, 0], [0, 0, 0]])
    with pytest.raises(UsageError, match="reach"):
        exact_max_throughput_tree(cut_off)
