"""Exact maximum-throughput tree for small instances: the ground truth for tests and benches.

The best rate is one of the candidate values (`rate.rate_candidates`), and feasibility is
monotone in the target (a tree that carries r carries anything lower), so a binary search
over the candidates with an exact feasibility test finds the optimum. The test: is there
a spanning arborescence rooted at the source, using only edges with b >= r, in which
each u has at most floor(a_u / r) children? That is NP-hard in general (with every bound
1 it asks for a Hamiltonian path), so it is solved as a small integer program: binary
edge variables plus a single-commodity flow for connectivity, with HiGHS through
scipy.optimize.milp. Needs scipy (a test/bench dependency, not a runtime one).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from meshcast.errors import UsageError
from meshcast.overlay.tree.instance import NO_PARENT, IntArray, Tree, TreeInstance
from meshcast.overlay.tree.rate import degree_bounds, rate_candidates, tree_rate

MAX_EXACT_NODES = 16  # beyond this the integer programs get slow; n <= 10 takes milliseconds
_INFEASIBLE = 2  # scipy.optimize.milp status code


def exact_max_throughput_tree(instance: TreeInstance, known: Tree | None = None) -> Tree:
    """An optimal tree and its rate.

    `known` (any valid tree, e.g. the heuristic's) only speeds things up: the optimum is at
    least its rate, and the value just above is tried first, since a good heuristic is
    usually optimal. Raises UsageError if n > MAX_EXACT_NODES or if the candidate graph
    does not reach every node from the source.
    """
    n = instance.n
    if n > MAX_EXACT_NODES:
        raise UsageError(f"the exact solver is for at most {MAX_EXACT_NODES} nodes, got {n}")
    if n == 1:
        return Tree(parent=np.array([NO_PARENT], dtype=np.int64), rate=math.inf)
    if known is None:
        values = rate_candidates(instance)
        parent = feasible_arborescence(instance, float(values[0]))
        if parent is None:
            raise UsageError("the candidate graph does not reach every node from the source")
        best = Tree(parent, tree_rate(instance, parent))
    else:
        best = Tree(known.parent, tree_rate(instance, known.parent))
        values = rate_candidates(instance, low=best.rate)
    # invariant: a tree exists at values[low] (best), none at values[high] or above
    low = int(np.searchsorted(values, best.rate, side="right")) - 1
    high = len(values)
    probe = low + 1  # first probe right above a known tree: one program settles most cases
    while high - low > 1:
        parent = feasible_arborescence(instance, float(values[probe]))
        if parent is None:
            high = probe
        else:
            best = Tree(parent, tree_rate(instance, parent))
            low = max(probe, int(np.searchsorted(values, best.rate, side="right")) - 1)
        probe = (low + high) // 2
    return best


def feasible_arborescence(instance: TreeInstance, target: float) -> IntArray | None:
    """A spanning tree rooted at the source with rate >= target (as a parent array), or
    None if no such tree exists."""
    n, source = instance.n, instance.source
    bound = np.minimum(degree_bounds(instance.capacity, target), n - 1)
    keep = (instance.edge_key_bandwidth >= target) & (instance.edge_key % n != source)
    sender = instance.edge_key[keep] // n
    receiver = instance.edge_key[keep] % n
    others = np.arange(n) != source
    if np.any(np.bincount(receiver, minlength=n)[others] == 0) or bound[source] == 0:
        return None
    if bound.sum() < n - 1:
        return None
    return _solve_flow_program(n, source, sender, receiver, bound)


def _solve_flow_program(
    n: int, source: int, sender: IntArray, receiver: IntArray, bound: IntArray
) -> IntArray | None:
    """Variables: x_e in {0, 1} (edge e is in the tree), then f_e in [0, n - 1] (flow on e).

    in-degree(v) = 1 for v != source; out-degree(u) <= bound_u; f_e <= (n - 1) x_e; the
    source emits n - 1 units and every other node absorbs one. Flow reaches every node
    only along chosen edges, so the chosen edges connect everything to the source: with
    one parent each, they form a spanning arborescence.
    """
    edges = len(sender)
    index = np.arange(edges)
    x_col, f_col = index, index + edges
    ones = np.ones(edges)
    is_source = np.arange(n) == source
    rows: list[IntArray] = []
    cols: list[IntArray] = []
    coefficients: list[npt.NDArray[np.float64]] = []
    lower: list[npt.NDArray[np.float64]] = []
    upper: list[npt.NDArray[np.float64]] = []

    def constrain(
        row: IntArray,
        col: IntArray,
        coefficient: npt.NDArray[np.float64],
        low: npt.NDArray[np.float64],
        high: npt.NDArray[np.float64],
    ) -> None:
        rows.append(row + sum(len(block) for block in lower))
        cols.append(col)
        coefficients.append(coefficient)
        lower.append(low)
        upper.append(high)

    parents = np.where(is_source, 0.0, 1.0)
    constrain(receiver, x_col, ones, parents, parents)
    constrain(sender, x_col, ones, np.zeros(n), bound.astype(np.float64))
    constrain(
        np.concatenate((index, index)),
        np.concatenate((f_col, x_col)),
        np.concatenate((ones, np.full(edges, -(n - 1.0)))),
        np.full(edges, -np.inf),
        np.zeros(edges),
    )
    absorbed = np.where(is_source, -(n - 1.0), 1.0)  # inflow - outflow
    constrain(
        np.concatenate((receiver, sender)),
        np.concatenate((f_col, f_col)),
        np.concatenate((ones, -ones)),
        absorbed,
        absorbed,
    )
    row_count = sum(len(block) for block in lower)
    matrix = coo_array(
        (np.concatenate(coefficients), (np.concatenate(rows), np.concatenate(cols))),
        shape=(row_count, 2 * edges),
    ).tocsr()
    result = milp(
        c=np.zeros(2 * edges),
        constraints=LinearConstraint(matrix, np.concatenate(lower), np.concatenate(upper)),
        integrality=np.concatenate((ones, np.zeros(edges))),
        bounds=Bounds(np.zeros(2 * edges), np.concatenate((ones, np.full(edges, n - 1.0)))),
    )
    if result.status == _INFEASIBLE:
        return None
    if result.x is None:
        raise RuntimeError(f"MILP solver gave no answer: {result.message}")
    used = np.flatnonzero(result.x[:edges] > 0.5)
    parent = np.full(n, NO_PARENT, dtype=np.int64)
    parent[receiver[used]] = sender[used]
    return parent
