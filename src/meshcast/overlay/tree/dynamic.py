"""Dynamic membership (claims 7-11): keep a maximum-throughput tree as nodes join and leave.

Join: attach to a member with room for one more child at the current rate over an edge
at least that wide (widest such edge first); failing that, attach below a full member and
let an improvement move relieve it; failing that, attach where the resulting bottleneck
is highest and accept a lower rate. Leave: every orphaned child rejoins the same way,
bringing its whole subtree. Rebuild from scratch when the rate has fallen to the
threshold (see `DynamicConfig.rebuild_below`). Theory: docs/design/tree.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from meshcast.errors import ConfigError, UsageError
from meshcast.overlay.tree.construct import DEFAULT_SEARCH, SearchConfig, max_throughput_tree
from meshcast.overlay.tree.improvement import DEFAULT_IMPROVEMENT, Improvement
from meshcast.overlay.tree.instance import NO_PARENT, IntArray, Tree, TreeInstance
from meshcast.overlay.tree.rate import tree_rate
from meshcast.overlay.tree.reduced import ReducedGraph
from meshcast.overlay.tree.repair import place_subtree, repair_to_target
from meshcast.overlay.tree.working import WorkingTree


@dataclass(frozen=True, slots=True)
class DynamicConfig:
    # Rebuild when rate < rebuild_below * (rate after the last rebuild), that reference
    # scaled by how the cheap upper bound on the rate moved since (see `_rate_ceiling`).
    rebuild_below: float = 0.9
    # After each event, up to this many attempts to lift the rate to the next value above
    # it by local repair (0: only the patent's join/leave/rebuild).
    raise_attempts: int = 4
    # moves for local repair (joins, leaves, raises): cheap ones, tried once per candidate parent
    repair: Improvement = field(default=DEFAULT_IMPROVEMENT)
    rebuild: SearchConfig = field(default=DEFAULT_SEARCH)  # for rebuilds from scratch
    # full members (widest edge first) below which a join tries to make room by a repair move
    repair_candidates: int = 4

    def __post_init__(self) -> None:
        if not 0 <= self.rebuild_below <= 1:
            raise ConfigError("must be within [0, 1]", key="tree.dynamic.rebuild_below")
        if self.repair_candidates < 0:
            raise ConfigError("must not be negative", key="tree.dynamic.repair_candidates")
        if self.raise_attempts < 0:
            raise ConfigError("must not be negative", key="tree.dynamic.raise_attempts")


@dataclass(frozen=True, slots=True)
class MembershipChanged:
    """What one join, leave or rebuild did to the tree."""

    node: int  # the node that joined or left (the source for a forced rebuild)
    reparented: int  # members other than a joining node whose parent changed
    rebuilt: bool  # whether the tree was rebuilt from scratch
    rate: float  # the tree's rate afterwards


class DynamicTree:
    """A tree over a changing subset of a universe of nodes whose capacities and pairwise
    bandwidths are known. The source is always a member. Not thread-safe; no I/O."""

    def __init__(
        self,
        universe: TreeInstance,
        members: Iterable[int],
        config: DynamicConfig | None = None,
    ) -> None:
        self._universe = universe
        self._config = config or DynamicConfig()
        self._tree = WorkingTree(universe.n, universe.source)
        self._rate = math.inf
        self._reference_rate = math.inf  # rate right after the last rebuild
        self._reference_ceiling = math.inf  # _rate_ceiling() right after the last rebuild
        initial = {int(node) for node in members} | {universe.source}
        for node in initial:
            self._check_node(node)
        self._tree.attached[list(initial)] = True  # placed properly by the rebuild
        self._rebuild()

    # queries

    @property
    def rate(self) -> float:
        return self._rate

    def members(self) -> list[int]:
        return np.flatnonzero(self._tree.attached).tolist()

    def tree(self) -> Tree:
        """The current tree over universe indices (non-members have no parent)."""
        return Tree(self._tree.parent.copy(), self._rate)

    def is_member(self, node: int) -> bool:
        return bool(self._tree.attached[node])

    # commands

    def join(self, node: int) -> MembershipChanged:
        """Add a node. Raises UsageError if it is not in the universe or already a member."""
        self._check_node(node)
        if self._tree.attached[node]:
            raise UsageError(f"node {node} is already a member")
        before = self._tree.parent.copy()
        self._place(node)
        return self._settle(node, before, exempt=node)

    def leave(self, node: int) -> MembershipChanged:
        """Remove a member; its orphaned children rejoin with their subtrees.
        Raises UsageError for the source, a non-member, or when an orphan has no edge from
        any remaining member (the tree is then left as it was)."""
        self._check_node(node)
        if node == self._universe.source:
            raise UsageError("the source cannot leave its own tree")
        if not self._tree.attached[node]:
            raise UsageError(f"node {node} is not a member")
        before, rate = self._tree.parent.copy(), self._rate
        orphans = sorted(self._tree.children[node])
        for child in orphans:
            self._tree.detach(child)
        self._tree.detach(node)
        self._rate = self._current_rate()
        try:
            for child in orphans:
                self._place(child)
        except UsageError:
            self._tree = WorkingTree.from_parent(before, self._universe.source)
            self._rate = rate
            raise
        return self._settle(node, before, exempt=node)

    def rebuild(self) -> MembershipChanged:
        """Rebuild from scratch now, whatever the rate."""
        before = self._tree.parent.copy()
        self._rebuild()
        return MembershipChanged(
            node=self._universe.source,
            reparented=_count_moved(before, self._tree.parent, exempt=NO_PARENT),
            rebuilt=True,
            rate=self._rate,
        )

    # internals

    def _check_node(self, node: int) -> None:
        if not 0 <= node < self._universe.n:
            raise UsageError(f"node {node} is not in the universe of {self._universe.n}")

    def _place(self, root: int) -> None:
        """Attach the detached subtree rooted at `root` (claims 8-9)."""
        if not math.isfinite(self._rate):  # a lone source: any edge will do
            self._attach_where_widest(root)
            return
        graph = ReducedGraph.at(self._universe, self._rate)
        config = self._config
        if place_subtree(graph, self._tree, root, config.repair, config.repair_candidates):
            return
        self._attach_where_widest(root)

    def _attach_where_widest(self, root: int) -> None:
        """Attach under the member where the new bottleneck, min(b(u, root), a_u / (d_u + 1)),
        is highest. Raises UsageError if no member has an edge to `root`."""
        tree, universe = self._tree, self._universe
        incoming = universe.incoming
        senders = incoming.peer[incoming.start[root] : incoming.start[root + 1]]
        bandwidth = incoming.bandwidth[incoming.start[root] : incoming.start[root + 1]]
        member = tree.attached[senders]
        if not np.any(member):
            raise UsageError(f"no member has an edge to node {root}")
        senders, bandwidth = senders[member], bandwidth[member]
        share = universe.capacity[senders] / (tree.fanout[senders] + 1)
        tree.reattach(root, int(senders[np.argmax(np.minimum(bandwidth, share))]))

    def _settle(self, node: int, before: IntArray, exempt: int) -> MembershipChanged:
        self._rate = self._current_rate()
        for _ in range(self._config.raise_attempts):
            if not self._raise_rate():
                break
        reparented = _count_moved(before, self._tree.parent, exempt)
        rebuilt = self._needs_rebuild()
        if rebuilt:
            moved_before_rebuild = self._tree.parent.copy()
            self._rebuild()
            reparented += _count_moved(moved_before_rebuild, self._tree.parent, exempt)
        return MembershipChanged(node, reparented, rebuilt, self._rate)

    def _raise_rate(self) -> bool:
        """Try to repair the tree locally so it carries more than its current rate. All or
        nothing: on failure the tree is left as it was."""
        if not math.isfinite(self._rate):
            return False
        target = float(np.nextafter(self._rate, math.inf))  # same reduced graph as the next value
        graph = ReducedGraph.at(self._universe, target)
        before = self._tree.parent.copy()
        config = self._config
        if repair_to_target(graph, self._tree, config.repair, config.repair_candidates):
            self._rate = self._current_rate()
            return True
        self._tree = WorkingTree.from_parent(before, self._universe.source)
        return False

    def _needs_rebuild(self) -> bool:
        if not math.isfinite(self._rate) or not math.isfinite(self._reference_rate):
            return False
        threshold = self._reference_rate * self._rate_ceiling() / self._reference_ceiling
        return self._rate < self._config.rebuild_below * threshold

    def _rebuild(self) -> None:
        members = np.flatnonzero(self._tree.attached)
        fresh = max_throughput_tree(self._universe.restrict(members), self._config.rebuild)
        parent = np.full(self._universe.n, NO_PARENT, dtype=np.int64)
        has_parent = fresh.parent != NO_PARENT
        parent[members[has_parent]] = members[fresh.parent[has_parent]]
        tree = WorkingTree.from_parent(parent, self._universe.source)
        self._tree = tree
        self._rate = self._current_rate()
        self._reference_rate = self._rate
        self._reference_ceiling = self._rate_ceiling()

    def _current_rate(self) -> float:
        return tree_rate(self._universe, self._tree.parent)

    def _rate_ceiling(self) -> float:
        """A cheap upper bound on any tree's rate over the members: each needs an in-edge
        from another member, and the source must feed at least one child. It moves when a
        narrow node joins or leaves, so the rebuild threshold follows it."""
        universe, attached = self._universe, self._tree.attached
        incoming = universe.incoming
        receiver = np.repeat(np.arange(universe.n), incoming.degree())
        useful = attached[incoming.peer] & attached[receiver]
        widest_in = np.zeros(universe.n)
        np.maximum.at(widest_in, receiver[useful], incoming.bandwidth[useful])
        others = attached.copy()
        others[universe.source] = False
        if not np.any(others):
            return math.inf
        return float(min(widest_in[others].min(), universe.capacity[universe.source]))


def _count_moved(before: IntArray, after: IntArray, exempt: int) -> int:
    """Members that had a parent before and have a different one now (`exempt` aside)."""
    moved = (before != NO_PARENT) & (after != NO_PARENT) & (before != after)
    if exempt != NO_PARENT:
        moved[exempt] = False
    return int(moved.sum())
