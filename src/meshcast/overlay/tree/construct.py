"""Maximum-throughput tree (claims 5-6): binary search on a target rate, and at each target
a spanning tree of the reduced graph repaired by improvement moves.

Theory, interpretation choices and measured quality: docs/design/tree.md.
"""

from __future__ import annotations

import heapq
import logging
import math

import numpy as np

from meshcast.errors import UsageError
from meshcast.overlay.tree.improvement import DEFAULT_IMPROVEMENT, Improvement
from meshcast.overlay.tree.instance import IntArray, Tree, TreeInstance
from meshcast.overlay.tree.rate import rate_candidates, tree_rate
from meshcast.overlay.tree.reduced import ReducedGraph
from meshcast.overlay.tree.working import WorkingTree

_log = logging.getLogger(__name__)


def max_throughput_tree(
    instance: TreeInstance, improvement: Improvement = DEFAULT_IMPROVEMENT
) -> Tree:
    """The best tree the heuristic finds, rooted at the instance's source.

    Searches the sorted distinct values a rate can take (see `rate.rate_candidates`):
    a target for which a tree is built raises the search, one for which none is found
    lowers it. Returns the widest tree built, with its recomputed rate.
    Raises UsageError if the candidate graph does not reach every node from the source.
    """
    if instance.n == 1:
        return Tree(parent=np.array([-1], dtype=np.int64), rate=math.inf)
    floor = _lowest_meaningful_rate(instance)
    first = tree_at_target(instance, floor, improvement)
    if first is None:
        raise UsageError("the candidate graph does not reach every node from the source")
    best = Tree(first, tree_rate(instance, first))
    values = rate_candidates(instance, low=best.rate, high=_rate_upper_bound(instance))
    # invariant: a tree exists at values[low] (or below it), none was found at values[high]
    low, high = 0, len(values)
    steps = 1
    while high - low > 1:
        mid = (low + high) // 2
        parent = tree_at_target(instance, float(values[mid]), improvement)
        steps += 1
        if parent is None:
            high = mid
            continue
        rate = tree_rate(instance, parent)
        if rate > best.rate:
            best = Tree(parent, rate)
        # the tree may beat its target: jump straight past every value it already achieves
        low = max(mid, int(np.searchsorted(values, rate, side="right")) - 1)
    _log.debug("n=%d: rate %.6g after %d targets", instance.n, best.rate, steps)
    return best


def tree_at_target(
    instance: TreeInstance, target: float, improvement: Improvement = DEFAULT_IMPROVEMENT
) -> IntArray | None:
    """A spanning tree whose rate is at least `target`, as a parent array, or None if the
    heuristic finds none (a None may be a false negative: the exact problem is NP-hard)."""
    graph = ReducedGraph.at(instance, target)
    others = np.arange(instance.n) != instance.source
    if np.any(graph.in_count[others] == 0) or graph.bound[instance.source] == 0:
        return None
    if int(np.minimum(graph.bound, instance.n - 1).sum()) < instance.n - 1:
        return None  # not enough child slots in total for n - 1 children
    tree = WorkingTree(instance.n, instance.source)
    _grow_within_bounds(graph, tree)
    if not _attach_stranded(graph, tree):
        return None
    for node in np.flatnonzero(tree.fanout > graph.bound).tolist():
        while tree.fanout[node] > graph.bound[node]:
            if not improvement.relieve(graph, tree, node):
                return None
    return tree.parent


def _grow_within_bounds(graph: ReducedGraph, tree: WorkingTree) -> None:
    """Grow from the source, expanding nodes with the most child slots first. A node with
    more candidates than slots first adopts those only it can feed, then those with the
    most slots themselves (they carry the growth on); ties keep the widest edge."""
    bound = graph.bound
    source = tree.source
    frontier = [(-int(bound[source]), source)]
    while frontier:
        _, node = heapq.heappop(frontier)
        room = int(bound[node] - tree.fanout[node])
        if room <= 0:
            continue
        receivers = graph.receivers_from(node)
        free = receivers[~tree.attached[receivers]]
        if len(free) > room:
            only_here = graph.in_count[free] == 1
            free = free[np.lexsort((-bound[free], ~only_here))[:room]]
        for child in free.tolist():
            tree.attach(child, node)
            heapq.heappush(frontier, (-int(bound[child]), child))


def _attach_stranded(graph: ReducedGraph, tree: WorkingTree) -> bool:
    """Attach every node the bounded growth missed, overloading parents if need be (the
    improvement moves fix that). False if some node is unreachable in the reduced graph."""
    pending = np.flatnonzero(~tree.attached).tolist()
    while pending:
        left = []
        for node in pending:
            senders = graph.senders_into(node)
            senders = senders[tree.attached[senders]]
            if len(senders) == 0:
                left.append(node)
                continue
            overload = tree.fanout[senders] - graph.bound[senders]
            tree.attach(node, int(senders[np.argmin(overload)]))
        if len(left) == len(pending):
            return False
        pending = left
    return True


def _lowest_meaningful_rate(instance: TreeInstance) -> float:
    """A target at which every edge survives and no node is bounded below its out-degree,
    so the growth alone builds a spanning tree whenever the graph has one."""
    out_degree = np.maximum(instance.outgoing.degree(), 1)
    return float(min(instance.outgoing.bandwidth.min(), (instance.capacity / out_degree).min()))


def _rate_upper_bound(instance: TreeInstance) -> float:
    """No tree beats this: every non-source node needs an in-edge, the source a child."""
    incoming = instance.incoming
    widest_in = np.where(
        incoming.degree() > 0,
        incoming.bandwidth[np.minimum(incoming.start[:-1], instance.edge_count - 1)],
        0.0,
    )
    widest_in[instance.source] = np.inf
    return float(min(widest_in.min(), instance.capacity[instance.source]))
