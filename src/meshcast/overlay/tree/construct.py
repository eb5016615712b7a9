"""Maximum-throughput tree (claims 5-6): binary search on a target rate; at each target, a
spanning tree of the reduced graph, repaired by improvement moves until every node
respects its bound, or a verdict that none was found.

Theory, interpretation choices and measured quality: docs/design/tree.md.
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass, field

import numpy as np

from meshcast.errors import ConfigError, UsageError
from meshcast.overlay.tree.improvement import DEFAULT_IMPROVEMENT, Improvement
from meshcast.overlay.tree.instance import NO_PARENT, IntArray, Tree, TreeInstance
from meshcast.overlay.tree.rate import rate_candidates, tree_rate
from meshcast.overlay.tree.reduced import ReducedGraph
from meshcast.overlay.tree.repair import repair_to_target
from meshcast.overlay.tree.working import WorkingTree

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SearchConfig:
    improvement: Improvement = field(default=DEFAULT_IMPROVEMENT)  # moves that relieve a node
    # When growing from scratch fails at a target: repair the best tree found so far instead
    # (trying this many full members per subtree to re-attach), then regrow with each of
    # this many of the source's other candidate children forced in first. 0 disables each.
    warm_start_candidates: int = 4
    source_alternatives: int = 4

    def __post_init__(self) -> None:
        if self.warm_start_candidates < 0:
            raise ConfigError("must not be negative", key="tree.warm_start_candidates")
        if self.source_alternatives < 0:
            raise ConfigError("must not be negative", key="tree.source_alternatives")


DEFAULT_SEARCH = SearchConfig()


def max_throughput_tree(instance: TreeInstance, config: SearchConfig = DEFAULT_SEARCH) -> Tree:
    """The best tree the heuristic finds, rooted at the instance's source.

    Binary search over the sorted distinct values a rate can take (`rate.rate_candidates`):
    a target for which a tree is built raises the search, one for which none is found
    lowers it. Returns the widest tree built, with its recomputed rate.
    Raises UsageError if the candidate graph does not reach every node from the source.
    """
    if instance.n == 1:
        return Tree(parent=np.array([NO_PARENT], dtype=np.int64), rate=math.inf)
    first = tree_at_target(instance, _lowest_meaningful_rate(instance), config)
    if first is None:
        raise UsageError("the candidate graph does not reach every node from the source")
    best = Tree(first, tree_rate(instance, first))
    values = rate_candidates(instance, low=best.rate, high=_rate_upper_bound(instance))
    # invariant: a tree exists at values[low] (best), none was found at values[high]
    low, high = int(np.searchsorted(values, best.rate, side="right")) - 1, len(values)
    targets = 1
    while high - low > 1:
        mid = (low + high) // 2
        parent = tree_at_target(instance, float(values[mid]), config, start=best.parent)
        targets += 1
        if parent is None:
            high = mid
            continue
        rate = tree_rate(instance, parent)
        if rate > best.rate:
            best = Tree(parent, rate)
        # the tree may beat its target: jump past every value it already achieves
        low = max(mid, int(np.searchsorted(values, rate, side="right")) - 1)
    _log.debug("n=%d: rate %.6g after %d targets", instance.n, best.rate, targets)
    return best


def tree_at_target(
    instance: TreeInstance,
    target: float,
    config: SearchConfig = DEFAULT_SEARCH,
    start: IntArray | None = None,
) -> IntArray | None:
    """A spanning tree whose rate is at least `target`, as a parent array, or None if the
    heuristic finds none (a None may be a false negative: the exact problem is NP-hard).

    First grows a tree from scratch and repairs it. If that fails, repairs `start` (a
    spanning tree, e.g. the best at a lower target) if given, then regrows with another
    first child for the source: the source's choice is the one a repair move cannot undo.
    """
    graph = ReducedGraph.at(instance, target)
    others = np.arange(instance.n) != instance.source
    if np.any(graph.in_count[others] == 0) or graph.bound[instance.source] == 0:
        return None
    if int(np.minimum(graph.bound, instance.n - 1).sum()) < instance.n - 1:
        return None  # not enough child slots in total for n - 1 children
    tree = _grow(graph, first=NO_PARENT)
    if tree is None:
        return None  # some node cannot be reached at all at this target
    if _relieve_all(graph, tree, config.improvement):
        return tree.parent
    if start is not None and config.warm_start_candidates > 0:
        warm = WorkingTree.from_parent(start, instance.source)
        if repair_to_target(graph, warm, config.improvement, config.warm_start_candidates):
            return warm.parent
    receivers = graph.receivers_from(instance.source)
    alternatives = receivers[np.argsort(-graph.bound[receivers], kind="stable")].tolist()
    for first in alternatives[: config.source_alternatives]:
        tree = _grow(graph, first)
        if tree is not None and _relieve_all(graph, tree, config.improvement):
            return tree.parent
    return None


def _grow(graph: ReducedGraph, first: int) -> WorkingTree | None:
    """A spanning tree of the reduced graph that may still overload some nodes, or None if
    the reduced graph does not reach every node."""
    tree = WorkingTree(graph.instance.n, graph.instance.source)
    _grow_within_bounds(graph, tree, first)
    return tree if _attach_stranded(graph, tree) else None


def _relieve_all(graph: ReducedGraph, tree: WorkingTree, improvement: Improvement) -> bool:
    for node in np.flatnonzero(tree.fanout > graph.bound).tolist():
        while tree.fanout[node] > graph.bound[node]:
            if not improvement.relieve(graph, tree, node):
                return False
    return True


def _grow_within_bounds(graph: ReducedGraph, tree: WorkingTree, first: int) -> None:
    """Grow from the source, expanding nodes with the most child slots first. A node with
    more candidates than slots adopts, in this order: `first`, those only it can feed, then
    those with the most slots themselves (they carry the growth on); ties keep the widest
    edge. Nodes left out are attached later by `_attach_stranded`."""
    bound = graph.bound
    forced = np.zeros(graph.instance.n, dtype=np.bool_)
    if first != NO_PARENT:
        forced[first] = True
    source = tree.source
    frontier = [(-int(bound[source]), False, source)]
    while frontier:
        _, _, node = heapq.heappop(frontier)
        room = int(bound[node] - tree.fanout[node])
        if room <= 0:
            continue
        receivers = graph.receivers_from(node)
        free = receivers[~tree.attached[receivers]]
        if len(free) > room:
            only_here = graph.in_count[free] == 1
            free = free[np.lexsort((-bound[free], ~only_here, ~forced[free]))[:room]]
        for child in free.tolist():
            tree.attach(child, node)
            heapq.heappush(frontier, (-int(bound[child]), not forced[child], child))


def _attach_stranded(graph: ReducedGraph, tree: WorkingTree) -> bool:
    """Attach every node the bounded growth missed, to the least overloaded member with an
    edge to it (the improvement moves then relieve the overloads). False if some node is
    unreachable in the reduced graph."""
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
