"""Exact maximum-throughput tree for small instances (ground truth for tests and benchmarks).

The best rate is one of the candidate values (`rate.rate_candidates`), and feasibility is
monotone in the target: a tree that carries r carries anything lower. So a binary search
over the candidates with an exact feasibility test finds the optimum. The test — is there
a spanning arborescence rooted at the source using only edges with b >= r, in which u has
at most floor(a_u / r) children? — is NP-hard in general (bound 1 everywhere is a
Hamiltonian path), so it is solved as a small integer program (single-commodity flow)
with HiGHS through scipy.optimize.milp. Needs scipy; meant for n up to about 12.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from meshcast.errors import UsageError
from meshcast.overlay.tree.instance import NO_PARENT, IntArray, Tree, TreeInstance
from meshcast.overlay.tree.rate import degree_bounds, rate_candidates, tree_rate

MAX_EXACT_NODES = 16


def exact_max_throughput_tree(instance: TreeInstance, known: Tree | None = None) -> Tree:
    """An optimal tree and its rate. `known`, a valid tree (e.g. the heuristic's), only
    narrows the search: the optimum is at least its rate.

    Raises UsageError if the instance has more than MAX_EXACT_NODES nodes or if the
    candidate graph does not reach every node from the source.
    """
    n = instance.n
    if n > MAX_EXACT_NODES:
        raise UsageError(f"the exact solver is for at most {MAX_EXACT_NODES} nodes, got {n}")
    if n == 1:
        return Tree(parent=np.array([NO_PARENT], dtype=np.int64), rate=math.inf)
    values = rate_candidates(instance)
    if known is not None:
        values = values[values >= tree_rate(instance, known.parent)]
    best: Tree | None = known
    low, high = -1, len(values)  # invariant: feasible at values[low] (or low == -1), not at high
    if known is None:
        parent = feasible_arborescence(instance, float(values[0]))
        if parent is None:
            raise UsageError("the candidate graph does not reach every node from the source")
        best, low = Tree(parent, tree_rate(instance, parent)), 0
    else:
        low = 0
    while high - low > 1:
        mid = (low + high) // 2
        parent = feasible_arborescence(instance, float(values[mid]))
        if parent is None:
            high = mid
        else:
            best = Tree(parent, tree_rate(instance, parent))
            low = max(mid, int(np.searchsorted(values, best.rate, side="right")) - 1)
    assert best is not None
    return best


def feasible_arborescence(instance: TreeInstance, target: float) -> IntArray | None:
    """A spanning tree rooted at the source with rate >= target, or None if none exists."""
    n, source = instance.n, instance.source
    bound = np.minimum(degree_bounds(instance.capacity, target), n - 1)
    keep = instance.edge_key_bandwidth >= target
    sender = instance.edge_key[keep] // n
    receiver = instance.edge_key[keep] % n
    into_source = receiver == source
    sender, receiver = sender[~into_source], receiver[~into_source]
    others = np.arange(n) != source
    if np.any(np.bincount(receiver, minlength=n)[others] == 0) or bound[source] == 0:
        return None
    if bound.sum() < n - 1:
        return None
    return _solve_flow_program(n, source, sender, receiver, bound)


def _solve_flow_program(
    n: int, source: int, sender: IntArray, receiver: IntArray, bound: IntArray
) -> IntArray | None:
    edges = len(sender)
    index = np.arange(edges)
    x_cols, f_cols = index, index + edges
    blocks: list[tuple[IntArray, IntArray, np.ndarray]] = []
    lower: list[np.ndarray] = []
    upper: list[np.ndarray] = []
    row_base = 0

    def block(
        row: IntArray, col: IntArray, val: np.ndarray, lo: np.ndarray, hi: np.ndarray
    ) -> None:
        nonlocal row_base
        blocks.append((row + row_base, col, val))
        lower.append(lo)
        upper.append(hi)
        row_base += len(lo)

    one_parent = np.where(np.arange(n) == source, 0.0, 1.0)
    block(receiver, x_cols, np.ones(edges), one_parent, one_parent)
    block(sender, x_cols, np.ones(edges), np.zeros(n), bound.astype(float))
    # flow only on used edges: f_e - (n - 1) x_e <= 0
    block(
        np.concatenate((index, index)),
        np.concatenate((f_cols, x_cols)),
        np.concatenate((np.ones(edges), np.full(edges, -(n - 1.0)))),
        np.full(edges, -np.inf),
        np.zeros(edges),
    )
    # the source emits n - 1 units, every other node keeps one: inflow - outflow = 1
    balance = np.where(np.arange(n) == source, -(n - 1.0), 1.0)
    block(
        np.concatenate((receiver, sender)),
        np.concatenate((f_cols, f_cols)),
        np.concatenate((np.ones(edges), -np.ones(edges))),
        balance,
        balance,
    )
    rows = np.concatenate([b[0] for b in blocks])
    cols = np.concatenate([b[1] for b in blocks])
    vals = np.concatenate([b[2] for b in blocks])
    matrix = coo_array((vals, (rows, cols)), shape=(row_base, 2 * edges)).tocsr()
    constraints = LinearConstraint(matrix, np.concatenate(lower), np.concatenate(upper))
    integrality = np.concatenate((np.ones(edges), np.zeros(edges)))
    variable_bounds = Bounds(
        np.zeros(2 * edges), np.concatenate((np.ones(edges), np.full(edges, n - 1.0)))
    )
    result = milp(
        c=np.zeros(2 * edges),
        constraints=constraints,
        integrality=integrality,
        bounds=variable_bounds,
    )
    if result.x is None:
        return None
    used = np.flatnonzero(result.x[:edges] > 0.5)
    parent = np.full(n, NO_PARENT, dtype=np.int64)
    parent[receiver[used]] = sender[used]
    return parent
