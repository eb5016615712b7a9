"""Baseline trees the maximum-throughput construction is compared with.

None of them looks at upload capacities; each returns a spanning tree of the candidate
graph rooted at the source, with its rate computed the same way (`rate.tree_rate`).
All raise UsageError if the candidate graph does not reach every node from the source.
"""

from __future__ import annotations

import heapq

import numpy as np

from meshcast.errors import UsageError
from meshcast.overlay.tree.instance import NO_PARENT, IntArray, Tree, TreeInstance
from meshcast.overlay.tree.rate import tree_rate


def star_tree(instance: TreeInstance) -> Tree:
    """Fan-out from the source: every node is fed directly by the source. Needs an edge
    from the source to every node (a fully connected overlay)."""
    n, source = instance.n, instance.source
    parent = np.full(n, source, dtype=np.int64)
    parent[source] = NO_PARENT
    others = np.flatnonzero(parent != NO_PARENT)
    if np.any(instance.bandwidth_between(np.full(len(others), source), others) <= 0):
        raise UsageError("a star needs an edge from the source to every node")
    return Tree(parent, tree_rate(instance, parent))


def shortest_path_tree(instance: TreeInstance) -> Tree:
    """Dijkstra from the source with edge length 1 / b(e): the per-unit transfer time of
    each hop, the cost a link-state overlay routing for delay on idle links would use."""
    return _dijkstra(instance, widest=False)


def widest_path_tree(instance: TreeInstance) -> Tree:
    """Every node reached over its widest (maximum-bottleneck) path from the source,
    ignoring how many children each node then has to feed."""
    return _dijkstra(instance, widest=True)


def random_tree(instance: TreeInstance, rng: np.random.Generator) -> Tree:
    """Random growth: repeatedly attach a uniformly chosen unattached node that has an edge
    from the tree, to a uniformly chosen tree node with an edge to it."""
    n, source = instance.n, instance.source
    parent = np.full(n, NO_PARENT, dtype=np.int64)
    attached = np.zeros(n, dtype=np.bool_)
    attached[source] = True
    outgoing = instance.outgoing
    # unattached nodes with an edge from the tree; list + positions for O(1) random removal
    frontier: list[int] = []
    position: dict[int, int] = {}

    def reveal(node: int) -> None:
        peers = outgoing.peer[outgoing.start[node] : outgoing.start[node + 1]]
        for peer in peers[~attached[peers]].tolist():
            if peer not in position:
                position[peer] = len(frontier)
                frontier.append(peer)

    reveal(source)
    for _ in range(n - 1):
        if not frontier:
            raise UsageError("the candidate graph does not reach every node from the source")
        at = int(rng.integers(len(frontier)))
        node = frontier[at]
        frontier[at] = frontier[-1]
        position[frontier[at]] = at
        frontier.pop()
        del position[node]
        senders = instance.incoming.peer[
            instance.incoming.start[node] : instance.incoming.start[node + 1]
        ]
        senders = senders[attached[senders]]
        parent[node] = int(senders[int(rng.integers(len(senders)))])
        attached[node] = True
        reveal(node)
    return Tree(parent, tree_rate(instance, parent))


def _dijkstra(instance: TreeInstance, *, widest: bool) -> Tree:
    n, source = instance.n, instance.source
    outgoing = instance.outgoing
    # keys are minimised: path length, or minus the path's bottleneck
    best = np.full(n, np.inf)
    best[source] = -np.inf if widest else 0.0
    parent: IntArray = np.full(n, NO_PARENT, dtype=np.int64)
    done = np.zeros(n, dtype=np.bool_)
    heap = [(float(best[source]), source)]
    while heap:
        key, node = heapq.heappop(heap)
        if done[node]:
            continue
        done[node] = True
        span = slice(outgoing.start[node], outgoing.start[node + 1])
        peers = outgoing.peer[span]
        bandwidth = outgoing.bandwidth[span]
        keys = np.maximum(key, -bandwidth) if widest else key + 1.0 / bandwidth
        better = (keys < best[peers]) & ~done[peers]
        for peer, peer_key in zip(peers[better].tolist(), keys[better].tolist(), strict=True):
            best[peer] = peer_key
            parent[peer] = node
            heapq.heappush(heap, (peer_key, peer))
    if not done.all():
        raise UsageError("the candidate graph does not reach every node from the source")
    return Tree(parent, tree_rate(instance, parent))
