"""Replication plans: who sends which subfiles to whom (a pure function of a `PlanSpec`).

ALM-FastReplica (seed 002, [0038]-[0065]; SPEC-NOTES Part 3): the recipients are cut into
replication groups of k; the file into k subfiles; the origin sends subfile i to node i of
the first group (distribution), every node forwards its subfile to the rest of its group
(collection), and node i of a group feeds node i of its child groups (group communication),
in fast-forward mode along the primary tree and after completion into secondary trees.

Every node of the origin's recipients and of the plan computes the same plan from the same
spec, so only the spec travels with the data. The rules (docs/design/replicate.md, "Plans"):

- k = min(max_connections - variant, recipients, chunks), at least 1; groups of k recipients
  in order (the last may be smaller, and is always a leaf); in a group of r nodes, node
  j % r holds subfile j.
- Group trees by variant: K1 a chain of fast-forward edges, K2 a breadth-first binary tree of
  fast-forward edges, K a binary tree of after-complete edges served one child after the
  other. Tree.BALANCED: a primary tree of m groups and m1 secondary trees of at most m
  groups (m1 in {m-1, m}); primary group t feeds the root of secondary tree t after complete.
- A node's fast-forward peers (distinct peers over feeds without `after_complete`, in or
  out) never exceed k + variant <= max_connections (except in capacity-aware plans).
- Capacity-aware (beyond the patent, unequal capacities): groups of the same sizes, filled
  so that each group's capacity matches the copies it must upload (the slowest nodes gather
  in the leaf groups); min(chunks, 64 k) equal subfiles, shared in each group by D'Hondt in
  file order (in proportion to capacity, interleaved over the file), so a member may hold
  many subfiles or none. A member may then talk to its whole group, its parent group and
  its child groups: up to 3k - 1 fast-forward peers for K1.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

from meshcast.errors import UsageError
from meshcast.ids import NodeId

__all__ = [
    "Feed",
    "FeedKind",
    "Plan",
    "PlanSpec",
    "Repair",
    "Strategy",
    "Tree",
    "Variant",
    "make_plan",
    "repair",
]

# A sender serves lower priorities first: the data every later group waits for (distribution,
# fast-forward tree edges), then its own group (collection), then after-complete children one
# after the other (PRIORITY_SECONDARY + the child's rank among its sender's such children).
PRIORITY_TREE = 0
PRIORITY_COLLECTION = 1
PRIORITY_SECONDARY = 2
# Capacity-aware plans: subfiles per group member, so each member's share is within about
# 1/SUBFILES_PER_MEMBER of its capacity's (at most min(chunks, this x k) subfiles).
SUBFILES_PER_MEMBER = 64
# Capacity-aware grouping: swaps tried after the greedy fill, and the groups with the most
# slack a swap may take a faster node from (bounds the planning time for many groups).
MAX_SWAPS = 256
SWAP_PARTNERS = 16


class Strategy(StrEnum):
    FASTREPLICA = "fastreplica"  # ALM-FastReplica: subfiles, replication groups, trees
    FANOUT = "fanout"  # baseline: the origin sends the whole file to every recipient
    ALM_TREE = "alm_tree"  # baseline: the whole file down a tree of recipients, fast-forward


class Variant(IntEnum):
    """Connections a node may hold beyond its group's k (patent [0062]-[0065])."""

    K = 0  # k connections: a group feeds others only after it holds its subfile
    K1 = 1  # k+1: one child group in fast-forward (the primary tree is a chain)
    K2 = 2  # k+2: two child groups in fast-forward (the primary tree is binary)


class Tree(StrEnum):
    CHAIN = "chain"  # every group in the primary tree (m = number of groups)
    BALANCED = "balanced"  # primary tree of m groups, m secondary trees of ~m groups (m ~ m1)


class FeedKind(StrEnum):
    DISTRIBUTION = "distribution"  # origin -> node i of the first group
    COLLECTION = "collection"  # node i -> the rest of its group
    PRIMARY = "primary"  # node i -> node i of a child group, fast-forward
    SECONDARY = "secondary"  # node i -> node i of a child group, once it holds its subfile
    WHOLE = "whole"  # baselines: the whole file, sender to receiver
    REPAIR = "repair"  # not planned: around a failed node, or chunks asked for again (FETCH)
    MIRROR = "mirror"  # not planned: the origin tells its buddy of the replication (no data)


@dataclass(frozen=True, slots=True)
class Feed:
    """One directed transfer of the plan: `sender` sends every chunk of `subfiles` to
    `receiver`, each as soon as it holds it (fast-forward) or, with `after_complete`, only
    once it holds all of them. A sender serves its feeds of lower `priority` first and
    shares equally (by bytes, weighted by the feeds' sizes) among feeds of one priority."""

    sender: NodeId
    receiver: NodeId
    subfiles: tuple[int, ...]
    kind: FeedKind
    after_complete: bool = False
    priority: int = 0


@dataclass(frozen=True, slots=True)
class PlanSpec:
    """The inputs of a plan. `capacities`: upload bits/s of the origin then of each
    recipient, in `recipients` order (None: all equal); the plan uses them only with
    `capacity_aware`."""

    origin: NodeId
    recipients: tuple[NodeId, ...]
    chunk_count: int
    strategy: Strategy = Strategy.FASTREPLICA
    max_connections: int = 9
    variant: Variant = Variant.K1
    tree: Tree = Tree.CHAIN
    capacities: tuple[float, ...] | None = None
    capacity_aware: bool = False
    # a daemon holding the same file that repairs failures in the origin's place (patent
    # [0081]: the origin's "buddy"); None: the origin repairs them itself
    buddy: NodeId | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """`subfiles[i]` = (first chunk, end chunk) of subfile i; they cover 0..chunk_count
    exactly, in order, none empty. `groups[g]` lists group g's nodes; `holders[g][i]` is the
    node of group g that holds subfile i (receives it from the group's parent and spreads it
    through the group). In the patent's plan there are k subfiles and node j % len(group) of
    a group holds subfile j. A capacity-aware plan has min(chunks, 64 k) subfiles, and a
    member holds a share in proportion to its capacity, spread over the file, possibly
    none. `parents[g]` is the group feeding group g (-1: the origin). `tree_of[g]` is 0 for
    a group of the primary tree and t + 1 for one of secondary tree t. Every recipient
    receives every subfile from exactly one feed. The baselines have k = 1, one subfile
    (the whole file) and one group per recipient."""

    spec: PlanSpec
    k: int
    subfiles: tuple[tuple[int, int], ...]
    groups: tuple[tuple[NodeId, ...], ...]
    parents: tuple[int, ...]
    feeds: tuple[Feed, ...]
    tree_of: tuple[int, ...] = ()
    holders: tuple[tuple[NodeId, ...], ...] = ()
    _from: dict[NodeId, tuple[Feed, ...]] = field(default_factory=dict, compare=False)
    _to: dict[NodeId, tuple[Feed, ...]] = field(default_factory=dict, compare=False)
    _group: dict[NodeId, int] = field(default_factory=dict, compare=False)
    _held: dict[NodeId, tuple[int, ...]] = field(default_factory=dict, compare=False)

    def feeds_from(self, node: NodeId) -> tuple[Feed, ...]:
        """The feeds `node` sends, in the order to serve them (by priority, then plan order)."""
        return self._from.get(node, ())

    def feeds_to(self, node: NodeId) -> tuple[Feed, ...]:
        """The feeds `node` receives (by priority, then plan order); together they carry
        every subfile once (none for the origin)."""
        return self._to.get(node, ())

    @property
    def recipients(self) -> tuple[NodeId, ...]:
        """Every recipient, in group order (in a capacity-aware plan, each group's members
        fastest first)."""
        return tuple(node for group in self.groups for node in group)

    def group_of(self, node: NodeId) -> int:
        """The group `node` belongs to, -1 for the origin (UsageError for a stranger)."""
        if node == self.spec.origin:
            return -1
        try:
            return self._group[node]
        except KeyError:
            raise UsageError(f"node {node} is not in this plan") from None

    def holder(self, group: int, subfile: int) -> NodeId:
        """The node of `group` that holds (receives from the group's parent and spreads
        through the group) `subfile`."""
        return self.holders[group][subfile]

    def held(self, node: NodeId) -> tuple[int, ...]:
        """The subfiles `node` holds in its group, in order (every subfile for the origin;
        none for a member of a capacity-aware plan that only receives)."""
        if self.group_of(node) < 0:
            return tuple(range(len(self.subfiles)))
        return self._held.get(node, ())

    def subfile_of(self, chunk: int) -> int:
        """The subfile chunk `chunk` belongs to."""
        if not 0 <= chunk < self.subfiles[-1][1]:
            raise UsageError(f"chunk {chunk} is outside 0..{self.subfiles[-1][1] - 1}")
        return bisect_right(self.subfiles, chunk, key=lambda bounds: bounds[0]) - 1


def make_plan(spec: PlanSpec) -> Plan:
    """The plan for `spec` (raises `UsageError` for a spec that cannot be planned: a variant
    leaving no connection, no recipients, the origin or a duplicate among the recipients,
    no chunks, capacities of the wrong length or not positive)."""
    recipients, capacity = _checked_order(spec)
    if spec.strategy is Strategy.FANOUT:
        return _fanout(spec, recipients)
    if spec.strategy is Strategy.ALM_TREE:
        return _alm_tree(spec, recipients)
    return _fastreplica(spec, recipients, capacity)


@dataclass(frozen=True, slots=True)
class Repair:
    """How a plan goes on around failed nodes: `feeds` carry every subfile a surviving
    recipient was to receive from a failed node (all of them `FeedKind.REPAIR`); `lost`
    lists the (recipient, subfile) pairs nobody alive can send (the origin failed, and its
    buddy too or there is none)."""

    feeds: tuple[Feed, ...]
    lost: frozenset[tuple[NodeId, int]]


def repair(plan: Plan, failed: AbstractSet[NodeId]) -> Repair:
    """The patent's repair procedures ([0079]-[0098], FIGURES 9-12), for any set of failed
    nodes, as a pure function: every survivor computes the same repair from the same set.

    The sender of subfile s to recipient r is replaced, when it has failed, by:
    - for the origin: its buddy ([0081]);
    - for an initial node (first group): the buddy, or the origin without one (FIGURES 9,
      10C; blocks 1205-1208), towards its group and its child groups alike;
    - for a subsequent node of group g, towards the rest of g: the node of g's parent group
      at r's position, so the parent group shares the load (FIGURE 11B, [0091]); towards its
      child groups, and wherever that node failed too: the failed node's own sender of s,
      replaced in turn if it failed ([0091], [0093]).
    A replacement keeps the priority and the after-complete rule of the feed it replaces.
    Feeds to failed recipients are dropped, not replaced."""
    if not failed:
        return Repair((), frozenset())
    spec = plan.spec
    root = spec.buddy if spec.buddy is not None and spec.buddy not in failed else None
    if root is None and spec.origin not in failed:
        root = spec.origin
    planned: dict[tuple[int, NodeId], Feed] = {}  # (subfile, receiver) -> its feed

    def sender_of(subfile: int, receiver: NodeId) -> Feed:
        key = (subfile, receiver)
        if key not in planned:
            planned.update(
                ((s, feed.receiver), feed)
                for feed in plan.feeds_to(receiver)
                for s in feed.subfiles
            )
        return planned[key]

    def source(subfile: int, receiver: NodeId) -> NodeId | None:
        node = sender_of(subfile, receiver).sender
        while node in failed:
            if node == spec.origin:
                return root if root != spec.origin else None
            group = plan.group_of(node)
            parent = plan.parents[group]
            if parent < 0:
                return root
            members = plan.groups[group]
            if receiver in members:
                above = plan.groups[parent]
                sharer = above[members.index(receiver) % len(above)]
                if sharer not in failed:
                    return sharer
            receiver, node = node, sender_of(subfile, node).sender
        return node

    pairs: dict[tuple[NodeId, NodeId, bool, int], set[int]] = {}
    lost: set[tuple[NodeId, int]] = set()
    for node in sorted(failed):
        for feed in plan.feeds_from(node):
            if feed.receiver in failed:
                continue
            for subfile in feed.subfiles:
                sender = source(subfile, feed.receiver)
                if sender is None:
                    lost.add((feed.receiver, subfile))
                    continue
                key = (sender, feed.receiver, feed.after_complete, feed.priority)
                pairs.setdefault(key, set()).add(subfile)
    feeds = tuple(
        Feed(sender, receiver, tuple(sorted(subfiles)), FeedKind.REPAIR, after, priority)
        for (sender, receiver, after, priority), subfiles in sorted(pairs.items())
    )
    return Repair(feeds, frozenset(lost))


def _checked_order(spec: PlanSpec) -> tuple[tuple[NodeId, ...], dict[NodeId, float] | None]:
    """The recipients in the given order and, if the plan is capacity-aware, their upload
    capacities (None when they are all equal: then there is nothing to balance and the
    plan is the patent's)."""
    if spec.max_connections - int(spec.variant) < 1:
        raise UsageError(
            f"max_connections {spec.max_connections} leaves no connection for variant "
            f"{spec.variant.name} (it needs at least {int(spec.variant) + 1})"
        )
    if not spec.recipients:
        raise UsageError("no recipients to replicate to")
    if spec.origin in spec.recipients:
        raise UsageError(f"the origin {spec.origin} is among the recipients")
    if len(set(spec.recipients)) != len(spec.recipients):
        raise UsageError("a recipient is listed twice")
    if spec.buddy is not None and (spec.buddy == spec.origin or spec.buddy in spec.recipients):
        raise UsageError(f"the buddy {spec.buddy} must be neither the origin nor a recipient")
    if spec.chunk_count < 1:
        raise UsageError(f"chunk_count {spec.chunk_count} < 1")
    capacities = spec.capacities
    if capacities is not None:
        if len(capacities) != len(spec.recipients) + 1:
            raise UsageError(
                f"{len(capacities)} capacities for an origin and {len(spec.recipients)} recipients"
            )
        if not all(math.isfinite(value) and value > 0 for value in capacities):
            raise UsageError("capacities must be positive and finite")
    if not spec.capacity_aware or capacities is None or len(set(capacities[1:])) == 1:
        return spec.recipients, None
    return spec.recipients, dict(zip(spec.recipients, capacities[1:], strict=True))


def _fastreplica(
    spec: PlanSpec, recipients: tuple[NodeId, ...], capacity: dict[NodeId, float] | None
) -> Plan:
    n = len(recipients)
    k = max(1, min(spec.max_connections - int(spec.variant), n, spec.chunk_count))
    sizes = [len(recipients[start : start + k]) for start in range(0, n, k)]
    parents, tree_of, after = _group_tree(len(sizes), spec.variant, spec.tree)
    if capacity is None:
        groups = tuple(recipients[start : start + k] for start in range(0, n, k))
        subfiles = _bounds(_equal_sizes(spec.chunk_count, k))
        holders = tuple(tuple(group[i % len(group)] for i in range(k)) for group in groups)
    else:
        children = [parents.count(g) for g in range(len(sizes))]
        groups = _balanced_groups(recipients, capacity, sizes, children)
        subfiles, holders = _apportioned_holders(spec.chunk_count, k, groups, capacity)
    feeds: list[Feed] = []
    rank: dict[int, int] = {}  # after-complete children seen per sender group
    for g, group in enumerate(groups):
        parent = parents[g]
        if parent < 0:
            feeds += _group_feeds(
                lambda _: spec.origin, holders[g], FeedKind.DISTRIBUTION, False, PRIORITY_TREE
            )
        elif after[g]:
            priority = PRIORITY_SECONDARY + rank.get(parent, 0)
            rank[parent] = rank.get(parent, 0) + 1
            feeds += _group_feeds(
                holders[parent].__getitem__, holders[g], FeedKind.SECONDARY, True, priority
            )
        else:
            feeds += _group_feeds(
                holders[parent].__getitem__, holders[g], FeedKind.PRIMARY, False, PRIORITY_TREE
            )
        feeds += _collection(group, holders[g])
    return _plan(spec, k, subfiles, groups, tuple(parents), tuple(tree_of), feeds, holders)


def _balanced_groups(
    recipients: tuple[NodeId, ...],
    capacity: dict[NodeId, float],
    sizes: Sequence[int],
    children: Sequence[int],
) -> tuple[tuple[NodeId, ...], ...]:
    """Groups of the given sizes whose capacities match their work. A group of r nodes
    with c child groups uploads every byte r - 1 + c times (collection, then its children),
    so with shares in proportion to capacity it finishes after (r - 1 + c) * F / (its
    capacity), and the plan is as fast as its slowest group. The nodes, fastest first, each
    join the group furthest below its share of the total capacity (in proportion to
    r - 1 + c: the leaf groups have the smallest, so the slowest nodes end up there); then
    swaps of a node of the slowest group for a faster one of a group with slack (the
    SWAP_PARTNERS with most), while one shortens the slowest group's time. Each group lists its members fastest first, ties in the given
    order. (Floats in a fixed order: IEEE arithmetic gives every node the same groups.)"""
    order = {node: i for i, node in enumerate(recipients)}
    work = [size - 1 + child for size, child in zip(sizes, children, strict=True)]
    total = math.fsum(capacity.values())
    target = [total * w / sum(work) if sum(work) else 0.0 for w in work]
    have = [0.0] * len(sizes)
    members: list[list[NodeId]] = [[] for _ in sizes]
    # stable: equal capacities keep the given order; the heap: (-deficit, g) of each group
    # with room, so ties go to the earlier group
    room = [(-target[g], g) for g in range(len(sizes))]
    heapq.heapify(room)
    for node in sorted(recipients, key=lambda node: -capacity[node]):
        _, g = heapq.heappop(room)
        members[g].append(node)
        have[g] += capacity[node]
        if len(members[g]) < sizes[g]:
            heapq.heappush(room, (have[g] - target[g], g))
    # bounded: each swap shortens the slowest group; partners: the groups with most slack
    for _ in range(min(2 * len(sizes), MAX_SWAPS)):
        worst = max(range(len(sizes)), key=lambda g: (work[g] / have[g], -g))
        best: tuple[float, int, NodeId, NodeId] | None = None
        slow_here = {capacity[node]: node for node in members[worst]}
        partners = heapq.nsmallest(
            SWAP_PARTNERS,
            (g for g in range(len(sizes)) if g != worst),
            key=lambda g: (work[g] / have[g], g),
        )
        for other in partners:
            fast_there = {capacity[node]: node for node in members[other]}
            for slow, x in slow_here.items():
                for fast, y in fast_there.items():
                    if fast <= slow:
                        continue
                    delta = fast - slow
                    value = max(
                        work[worst] / (have[worst] + delta), work[other] / (have[other] - delta)
                    )
                    if value < work[worst] / have[worst] and (best is None or value < best[0]):
                        best = (value, other, x, y)
        if best is None:
            break
        _, other, x, y = best
        members[worst][members[worst].index(x)] = y
        members[other][members[other].index(y)] = x
        have[worst] += capacity[y] - capacity[x]
        have[other] += capacity[x] - capacity[y]
    return tuple(
        tuple(sorted(group, key=lambda node: (-capacity[node], order[node]))) for group in members
    )


def _apportioned_holders(
    chunk_count: int, k: int, groups: Sequence[tuple[NodeId, ...]], capacity: dict[NodeId, float]
) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[NodeId, ...], ...]]:
    """The subfiles and holders of a capacity-aware plan: m = min(chunks, SUBFILES_PER_MEMBER
    * k) equal subfiles, and in each group, subfile after subfile in file order, the next
    one to the member that would hold the fewest per unit of capacity with it (the smallest
    (held + 1) / capacity, ties to the earlier member: D'Hondt's apportionment). This
    minimises the group's largest held / capacity, so its members finish together within
    about r / m, and it interleaves each member's subfiles over the whole file: every holder
    receives its share at an even pace wherever its parent's holders are, so none waits
    for data while others are busy. A member whose share rounds to nothing only receives.
    (Floats: IEEE division is correctly rounded, so every node computes the same quotients.)
    """
    m = min(chunk_count, SUBFILES_PER_MEMBER * k)
    holders = []
    for group in groups:
        count = [0] * len(group)
        heap = [(1.0 / capacity[node], j) for j, node in enumerate(group)]
        column = []
        for _ in range(m):
            _, j = heapq.heappop(heap)
            column.append(group[j])
            count[j] += 1
            heapq.heappush(heap, ((count[j] + 1) / capacity[group[j]], j))
        holders.append(tuple(column))
    return _bounds(_equal_sizes(chunk_count, m)), tuple(holders)


def _group_feeds(
    sender_of: Callable[[int], NodeId],
    holders: Sequence[NodeId],
    kind: FeedKind,
    after_complete: bool,
    priority: int,
) -> list[Feed]:
    """Subfile i from `sender_of(i)` to `holders[i]`: one feed per (sender, receiver) pair."""
    pairs: dict[tuple[NodeId, NodeId], list[int]] = {}
    for subfile, holder in enumerate(holders):
        pairs.setdefault((sender_of(subfile), holder), []).append(subfile)
    return [
        Feed(sender, receiver, tuple(subfiles), kind, after_complete, priority)
        for (sender, receiver), subfiles in pairs.items()
    ]


def _collection(group: tuple[NodeId, ...], holders: Sequence[NodeId]) -> list[Feed]:
    """Every holder to the rest of its group, starting with its right-hand neighbour so
    that not every holder serves the group's first node first."""
    size = len(group)
    held_by: dict[NodeId, list[int]] = {}
    for i, holder in enumerate(holders):
        held_by.setdefault(holder, []).append(i)
    feeds = []
    for j, sender in enumerate(group):
        held = tuple(held_by.get(sender, ()))
        if held:
            feeds += [
                Feed(
                    sender,
                    group[(j + step) % size],
                    held,
                    FeedKind.COLLECTION,
                    False,
                    PRIORITY_COLLECTION,
                )
                for step in range(1, size)
            ]
    return feeds


def _group_tree(
    count: int, variant: Variant, tree: Tree
) -> tuple[list[int], list[int], list[bool]]:
    """`parents`, `tree_of` and, for each group, whether its incoming edge waits for the
    sender to complete. Groups are numbered breadth-first: the primary tree first, then each
    secondary tree; the last group (the only one that may be smaller than k) is a leaf."""
    primary = count if tree is Tree.CHAIN else _primary_size(count)
    parents = _shape(primary, variant)
    tree_of = [0] * primary
    after = [variant is Variant.K and parent >= 0 for parent in parents]
    rest = count - primary
    trees = -(-rest // primary)
    start = primary
    for t, size in enumerate(_split(rest, trees)):
        for local in _shape(size, variant):
            parents.append(t if local < 0 else start + local)
            tree_of.append(t + 1)
            after.append(local < 0 or variant is Variant.K)
        start += size
    return parents, tree_of, after


def _shape(size: int, variant: Variant) -> list[int]:
    """Parents within one tree of `size` groups (-1: its root): a chain for K1, else a
    breadth-first binary tree."""
    if variant is Variant.K1:
        return [i - 1 for i in range(size)]
    return [(i - 1) // 2 if i else -1 for i in range(size)]


def _primary_size(count: int) -> int:
    """The smallest m with m * (m + 1) >= count: m primary groups and m1 = ceil((count -
    m) / m) secondary trees of at most m groups, with m1 in {m - 1, m} (patent [0050]:
    m and m1 similar)."""
    m = max(1, math.isqrt(count) - 1)
    while m * (m + 1) < count:
        m += 1
    return m


def _split(total: int, parts: int) -> list[int]:
    """`total` in `parts` as equal as possible, the first ones larger."""
    if parts == 0:
        return []
    base, extra = divmod(total, parts)
    return [base + 1] * extra + [base] * (parts - extra)


def _equal_sizes(total: int, parts: int) -> list[int]:
    """As equal as possible; the last subfiles take the remainder."""
    base, extra = divmod(total, parts)
    return [base] * (parts - extra) + [base + 1] * extra


def _bounds(sizes: Sequence[int]) -> tuple[tuple[int, int], ...]:
    bounds = []
    first = 0
    for size in sizes:
        bounds.append((first, first + size))
        first += size
    return tuple(bounds)


def _fanout(spec: PlanSpec, recipients: tuple[NodeId, ...]) -> Plan:
    feeds = [Feed(spec.origin, node, (0,), FeedKind.WHOLE) for node in recipients]
    groups = tuple((node,) for node in recipients)
    parents = (-1,) * len(recipients)
    return _plan(
        spec, 1, ((0, spec.chunk_count),), groups, parents, (0,) * len(groups), feeds, groups
    )


def _alm_tree(spec: PlanSpec, recipients: tuple[NodeId, ...]) -> Plan:
    parents = tuple(_shape(len(recipients), Variant.K2))
    feeds = [
        Feed(spec.origin if parent < 0 else recipients[parent], node, (0,), FeedKind.WHOLE)
        for node, parent in zip(recipients, parents, strict=True)
    ]
    groups = tuple((node,) for node in recipients)
    return _plan(
        spec, 1, ((0, spec.chunk_count),), groups, parents, (0,) * len(groups), feeds, groups
    )


def _plan(
    spec: PlanSpec,
    k: int,
    subfiles: tuple[tuple[int, int], ...],
    groups: tuple[tuple[NodeId, ...], ...],
    parents: tuple[int, ...],
    tree_of: tuple[int, ...],
    feeds: list[Feed],
    holders: tuple[tuple[NodeId, ...], ...],
) -> Plan:
    senders: dict[NodeId, list[Feed]] = {}
    receivers: dict[NodeId, list[Feed]] = {}
    for feed in feeds:
        senders.setdefault(feed.sender, []).append(feed)
        receivers.setdefault(feed.receiver, []).append(feed)
    return Plan(
        spec=spec,
        k=k,
        subfiles=subfiles,
        groups=groups,
        parents=parents,
        feeds=tuple(feeds),
        tree_of=tree_of,
        holders=holders,
        _from={node: _by_priority(out) for node, out in senders.items()},
        _to={node: _by_priority(into) for node, into in receivers.items()},
        _group={node: g for g, group in enumerate(groups) for node in group},
        _held=_held_by(holders),
    )


def _held_by(holders: tuple[tuple[NodeId, ...], ...]) -> dict[NodeId, tuple[int, ...]]:
    held: dict[NodeId, list[int]] = {}
    for column in holders:
        for i, holder in enumerate(column):
            held.setdefault(holder, []).append(i)
    return {node: tuple(subfiles) for node, subfiles in held.items()}


def _by_priority(feeds: list[Feed]) -> tuple[Feed, ...]:
    return tuple(sorted(feeds, key=lambda feed: feed.priority))  # stable: plan order next
