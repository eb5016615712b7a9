"""Source-based routing trees computed identically by every daemon from the same view.

* `shortest-path`: Dijkstra over link weights from each source (Spread §2.2); ties are
  broken by the smaller parent id, so every daemon builds the very same tree.
* `fanout`: the source sends straight to every daemon it has a link to; daemons it has no
  link to hang off the shortest-path tree.
* `max-throughput`: the tree of seed 000 (`meshcast.overlay.tree`) over the view's links,
  the spanning tree with the highest bottleneck rate the construction finds, given each
  daemon's upload capacity. It depends only on the view and the upload capacities (sorted
  members and edges in, a deterministic construction), so every daemon builds the same one.

A tree also knows its bottleneck rate — the least of its edge bandwidths and of each
forwarding daemon's upload capacity shared among its children — at which the source is
paced (seed 000, claim 1). Every policy computes it with the same rule (`_tree`).
Theory of the max-throughput policy: docs/design/tree.md, "Integration".
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from meshcast.ids import NodeId
from meshcast.overlay.view import View

POLICIES = ("shortest-path", "fanout", "max-throughput")


@dataclass(frozen=True, slots=True)
class Tree:
    source: NodeId
    parent: Mapping[NodeId, NodeId]  # every member but the source -> its parent
    children: Mapping[NodeId, tuple[NodeId, ...]]
    rate_bps: float  # bottleneck rate; inf when the tree has no edge

    def depth(self, node: NodeId) -> int:
        hops = 0
        while node != self.source:
            node = self.parent[node]
            hops += 1
        return hops

    def next_hops(self, at: NodeId) -> dict[NodeId, NodeId]:
        """For every node below `at`: the child of `at` on the way to it."""
        table: dict[NodeId, NodeId] = {}
        for child in self.children.get(at, ()):
            stack = [child]
            while stack:
                node = stack.pop()
                table[node] = child
                stack.extend(self.children.get(node, ()))
        return table


def _tree(
    source: NodeId, parent: dict[NodeId, NodeId], view: View, upload_bps: Mapping[NodeId, float]
) -> Tree:
    children: dict[NodeId, list[NodeId]] = {}
    for node in sorted(parent):
        children.setdefault(parent[node], []).append(node)
    bandwidth = {(e.a, e.b): e.bandwidth_bps for e in view.edges}
    rate = math.inf
    for node, up in parent.items():
        rate = min(rate, bandwidth[(min(node, up), max(node, up))])
    for node, kids in children.items():
        rate = min(rate, upload_bps.get(node, math.inf) / len(kids))
    return Tree(source, parent, {n: tuple(k) for n, k in children.items()}, rate)


def _dijkstra(view: View, source: NodeId) -> dict[NodeId, NodeId]:
    adjacency = view.adjacency()
    distance = {source: 0.0}
    parent: dict[NodeId, NodeId] = {}
    done: set[NodeId] = set()
    heap: list[tuple[float, int, NodeId]] = [(0.0, 0, source)]
    while heap:
        dist, _, node = heapq.heappop(heap)
        if node in done:
            continue
        done.add(node)
        for neighbour, weight, _ in adjacency[node]:
            candidate = dist + weight
            best = distance.get(neighbour)
            # Equal distance: keep the smaller parent id, so the tree is the same everywhere.
            if best is None or candidate < best or (candidate == best and node < parent[neighbour]):
                distance[neighbour] = candidate
                parent[neighbour] = node
                heapq.heappush(heap, (candidate, neighbour, neighbour))
    return parent


def shortest_path_tree(view: View, source: NodeId, upload_bps: Mapping[NodeId, float]) -> Tree:
    return _tree(source, _dijkstra(view, source), view, upload_bps)


# An unknown (infinite) upload or link bandwidth enters the construction as this, since its
# instance needs finite numbers: 1 Pbit/s, far above any rate a daemon is configured with.
UNBOUNDED_BPS = 1e15


def max_throughput_tree(view: View, source: NodeId, upload_bps: Mapping[NodeId, float]) -> Tree:
    """The maximum-throughput tree (seed 000, claims 5-6) over the view's links.

    Only view edges are candidates (the overlay graph is sparse), each usable in both
    directions at its bandwidth. A member without a known upload capacity counts as
    unbounded. The rate is recomputed with `_tree`'s rule, as for every policy. Should the
    shortest-path or fanout tree be wider than the construction's, that one is returned.
    """
    # numpy is loaded on first use, so importing routing (every daemon does) stays cheap
    from meshcast.overlay.tree import NO_PARENT, TreeInstance
    from meshcast.overlay.tree import max_throughput_tree as construct

    members = view.members  # sorted: the same local numbering in every daemon
    index = {member: i for i, member in enumerate(members)}
    capacity = [_finite(upload_bps.get(member, math.inf)) for member in members]
    sender: list[int] = []
    receiver: list[int] = []
    bandwidth: list[float] = []
    for e in view.edges:  # sorted by (a, b)
        rate = _finite(e.bandwidth_bps)
        sender += [index[e.a], index[e.b]]
        receiver += [index[e.b], index[e.a]]
        bandwidth += [rate, rate]
    instance = TreeInstance.from_edges(capacity, sender, receiver, bandwidth, index[source])
    built = construct(instance)
    parent = {
        members[child]: members[up]
        for child, up in enumerate(built.parent.tolist())
        if up != NO_PARENT
    }
    tree = _tree(source, parent, view, upload_bps)
    # Both rules take the least of the same edge bandwidths and upload / fan-out quotients,
    # so they agree exactly, unless an unbounded input bites (the construction then saw
    # UNBOUNDED_BPS) or the tree uses a link reported dead (it saw 1 bit/s).
    assert (
        tree.rate_bps == built.rate
        or built.rate >= UNBOUNDED_BPS / len(members)
        or tree.rate_bps <= 0
    ), (tree.rate_bps, built.rate)
    # The construction is a heuristic (the exact problem is NP-hard): on a rare view a
    # capacity-blind tree is wider (2 in 2,000 random views). The policy never does worse.
    for baseline in (shortest_path_tree, fanout_tree):
        other = baseline(view, source, upload_bps)
        if other.rate_bps > tree.rate_bps:
            tree = other
    return tree


def _finite(rate_bps: float) -> float:
    """A rate the construction accepts: unknown (inf) becomes UNBOUNDED_BPS; a rate that
    is not positive (a link measured dead) becomes 1 bit/s, the last edge to be picked."""
    if math.isnan(rate_bps) or rate_bps <= 0:
        return 1.0
    return min(rate_bps, UNBOUNDED_BPS)


def fanout_tree(view: View, source: NodeId, upload_bps: Mapping[NodeId, float]) -> Tree:
    parent = _dijkstra(view, source)
    for neighbour, _, _ in view.adjacency()[source]:
        parent[neighbour] = source
    # Re-parenting direct neighbours cannot orphan anyone: their old parents stay in the tree.
    return _tree(source, parent, view, upload_bps)


TreeBuilder = Callable[[View, NodeId, Mapping[NodeId, float]], Tree]

BUILDERS: dict[str, TreeBuilder] = {
    "shortest-path": shortest_path_tree,
    "fanout": fanout_tree,
    "max-throughput": max_throughput_tree,
}


def build_tree(view: View, source: NodeId, policy: str, upload_bps: Mapping[NodeId, float]) -> Tree:
    try:
        builder = BUILDERS[policy]
    except KeyError:
        raise ValueError(f"unknown routing policy {policy!r}") from None
    return builder(view, source, upload_bps)


class RoutingTable:
    """Trees of the current view, built on first use and dropped at each view change."""

    def __init__(self, local: NodeId, policy: str, upload_bps: Mapping[NodeId, float]) -> None:
        if policy not in BUILDERS:
            raise ValueError(f"unknown routing policy {policy!r}")
        self.local = local
        self.policy = policy
        self._upload = dict(upload_bps)
        self._view: View | None = None
        self._trees: dict[NodeId, Tree] = {}
        self._next_hops: dict[NodeId, dict[NodeId, NodeId]] = {}
        self._unicast: dict[NodeId, NodeId] | None = None

    def install(self, view: View) -> None:
        self._view = view
        self._trees.clear()
        self._next_hops.clear()
        self._unicast = None

    @property
    def view(self) -> View | None:
        return self._view

    def tree(self, source: NodeId) -> Tree | None:
        if self._view is None or source not in self._view:
            return None
        tree = self._trees.get(source)
        if tree is None:
            tree = build_tree(self._view, source, self.policy, self._upload)
            self._trees[source] = tree
        return tree

    def next_hop(self, source: NodeId, dest: NodeId) -> NodeId | None:
        """Where this daemon forwards `source`'s packet for `dest`.

        On the source's tree when this daemon is an ancestor of `dest`; otherwise (views
        briefly differ during a change) as `unicast_next_hop`, so a packet in flight is not
        lost; None when `dest` is unreachable.
        """
        table = self._next_hops.get(source)
        if table is None:
            tree = self.tree(source)
            table = tree.next_hops(self.local) if tree is not None else {}
            self._next_hops[source] = table
        hop = table.get(dest)
        if hop is not None or source == self.local:
            return hop
        return self.unicast_next_hop(dest)

    def unicast_next_hop(self, dest: NodeId) -> NodeId | None:
        """Where this daemon sends a message of its own (a progress report) or one it
        relays for `dest` alone: along its shortest-path tree, whatever the policy.

        Each daemon routes such a message over its *own* tree. With shortest paths every
        hop is on a shortest path to `dest`, so the remaining distance falls at each hop
        and the message cannot loop. The trees of the other policies are not consistent
        that way: two max-throughput trees can each send `dest`'s traffic through the
        other daemon, and a report would bounce between them forever.
        None when `dest` is unreachable.
        """
        if self._unicast is None:
            view = self._view
            if view is None or self.local not in view:
                self._unicast = {}
            else:
                tree = (
                    self._trees.get(self.local) if self.policy == "shortest-path" else None
                ) or shortest_path_tree(view, self.local, self._upload)
                self._unicast = tree.next_hops(self.local)
        return self._unicast.get(dest)
