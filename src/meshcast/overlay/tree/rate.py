"""The rate constraint: what a tree can carry, and the finite set of values the optimum takes.

A node u feeding d_u children sends each byte d_u times, so at rate r it needs
d_u * r <= a_u; every tree edge must carry r, so b(e) >= r. The tree's rate is
therefore min(min over tree edges of b(e), min over internal nodes of a_u / d_u),
and the best rate over all trees is one of the values b(e) or a_u / k.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from meshcast.overlay.tree.instance import NO_PARENT, FloatArray, IntArray, TreeInstance


def degree_bounds(capacity: FloatArray, target: float) -> IntArray:
    """Per node, the most children it can feed at `target`: the largest k with a_u / k >= target.

    Computed with the same float division `tree_rate` uses, so a tree that respects these
    bounds always has a rate of at least `target`, even when target is some a_u / k.
    """
    if target <= 0:
        raise ValueError("target must be positive")
    # capped so the int64 conversion cannot overflow for tiny targets; no node has 2**52 peers
    bound = np.minimum(np.floor(capacity / target), 2.0**52)
    one_more = capacity / (bound + 1) >= target
    bound = np.where(one_more, bound + 1, bound)
    one_less = (bound > 0) & (capacity / np.maximum(bound, 1) < target)
    bound = np.where(one_less, bound - 1, bound)
    return bound.astype(np.int64)


def tree_rate(instance: TreeInstance, parent: npt.ArrayLike) -> float:
    """The bottleneck rate of a spanning tree given as a parent array (inf for one node).

    Raises ValueError if a tree edge is not an edge of the instance.
    """
    par = np.asarray(parent, dtype=np.int64)
    child = np.flatnonzero(par != NO_PARENT)
    if len(child) == 0:
        return math.inf
    edge_bandwidth = instance.bandwidth_between(par[child], child)
    if np.any(edge_bandwidth <= 0):
        raise ValueError("the tree uses an edge the instance does not have")
    fanout = np.bincount(par[child], minlength=instance.n)
    internal = np.flatnonzero(fanout)
    node_share = instance.capacity[internal] / fanout[internal]
    return float(min(edge_bandwidth.min(), node_share.min()))


def rate_candidates(instance: TreeInstance, low: float = 0.0, high: float = math.inf) -> FloatArray:
    """Sorted distinct values in [low, high] that a tree's rate can take: every b(e), and
    a_u / k for k up to u's out-degree (u cannot have more children than out-edges)."""
    bandwidth = instance.outgoing.bandwidth
    edge_values = bandwidth[(bandwidth >= low) & (bandwidth <= high)]
    out_degree = instance.outgoing.degree()
    # a_u / k lies in [low, high] exactly for k in [a_u / high, a_u / low]
    k_min = np.maximum(1, np.floor(instance.capacity / high)).astype(np.int64)
    with np.errstate(divide="ignore"):
        k_max = np.minimum(out_degree, np.ceil(instance.capacity / low)).astype(np.int64)
    count = np.maximum(k_max - k_min + 1, 0)
    node = np.repeat(np.arange(instance.n), count)
    offset = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    share = instance.capacity[node] / (k_min[node] + offset)
    share = share[(share >= low) & (share <= high)]
    values: FloatArray = np.unique(np.concatenate((edge_values, share)))
    return values


def tree_violations(
    instance: TreeInstance, parent: npt.ArrayLike, target: float | None = None
) -> list[str]:
    """Every way `parent` fails to be a spanning tree rooted at the source (and, if `target`
    is given, to respect the rate constraint at it). Empty when the tree is valid."""
    par = np.asarray(parent, dtype=np.int64)
    n = instance.n
    if par.shape != (n,):
        return [f"parent array has shape {par.shape}, expected ({n},)"]
    problems: list[str] = []
    if par[instance.source] != NO_PARENT:
        problems.append("the source has a parent")
    others = np.flatnonzero(np.arange(n) != instance.source)
    orphan = others[(par[others] < 0) | (par[others] >= n)]
    if len(orphan):
        return [*problems, f"nodes without a valid parent: {orphan[:10].tolist()}"]
    if np.any(instance.bandwidth_between(par[others], others) <= 0):
        problems.append("a tree edge is not an edge of the instance")
    # pointer jumping: after ceil(log2 n) squarings every node points at its root
    root = par.copy()
    root[instance.source] = instance.source
    for _ in range(max(1, math.ceil(math.log2(n))) + 1):
        root = root[root]
    detached = np.flatnonzero(root != instance.source)
    if len(detached):
        problems.append(f"nodes on a cycle or cut off from the source: {detached[:10].tolist()}")
    if target is not None:
        bounds = degree_bounds(instance.capacity, target)
        fanout = np.bincount(par[others], minlength=n)
        over = np.flatnonzero(fanout > bounds)
        if len(over):
            problems.append(f"nodes with more children than a_u / target: {over[:10].tolist()}")
        narrow = others[instance.bandwidth_between(par[others], others) < target]
        if len(narrow):
            problems.append(f"tree edges narrower than the target into {narrow[:10].tolist()}")
    return problems
