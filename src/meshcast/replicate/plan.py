"""Replication plans: who sends which subfiles to whom (a pure function of a `PlanSpec`).

ALM-FastReplica (seed 002, [0038]-[0065]; SPEC-NOTES Part 3): the recipients are cut into
replication groups of k; the file into k subfiles; the origin sends subfile i to node i of
the first group (distribution), every node forwards its subfile to the rest of its group
(collection), and node i of a group feeds node i of its child groups (group communication),
in fast-forward mode along the primary tree and after completion into secondary trees.

Every node of the origin's recipients and of the plan computes the same plan from the same
spec, so only the spec travels with the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

from meshcast.ids import NodeId

__all__ = [
    "Feed",
    "FeedKind",
    "Plan",
    "PlanSpec",
    "Strategy",
    "Tree",
    "Variant",
    "make_plan",
]


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


@dataclass(frozen=True, slots=True)
class Plan:
    """`subfiles[i]` = (first chunk, end chunk) of subfile i; they cover 0..chunk_count
    exactly, in order, none empty. `groups[g]` lists group g's nodes; node j of a group
    holds subfile j (in a group smaller than k, node j % len(group) holds subfile j).
    `parents[g]` is the group feeding group g (-1: the origin). Every recipient receives
    every subfile from exactly one feed."""

    spec: PlanSpec
    k: int
    subfiles: tuple[tuple[int, int], ...]
    groups: tuple[tuple[NodeId, ...], ...]
    parents: tuple[int, ...]
    feeds: tuple[Feed, ...]
    _from: dict[NodeId, tuple[Feed, ...]] = field(default_factory=dict, compare=False)
    _to: dict[NodeId, tuple[Feed, ...]] = field(default_factory=dict, compare=False)

    def feeds_from(self, node: NodeId) -> tuple[Feed, ...]:
        return self._from.get(node, ())

    def feeds_to(self, node: NodeId) -> tuple[Feed, ...]:
        return self._to.get(node, ())


def make_plan(spec: PlanSpec) -> Plan:  # TEMPORARY (lead's scaffold; the helper's replaces it)
    """The plan for `spec` (raises `UsageError` for a spec that cannot be planned)."""
    n = len(spec.recipients)
    if spec.strategy is Strategy.FANOUT:
        feeds = [Feed(spec.origin, r, (0,), FeedKind.WHOLE) for r in spec.recipients]
        return _finish(spec, 1, ((0, spec.chunk_count),), tuple((r,) for r in spec.recipients),
                       tuple(-1 for _ in spec.recipients), feeds)
    k = max(1, min(spec.max_connections - int(spec.variant), n, spec.chunk_count))
    base, extra = divmod(spec.chunk_count, k)
    subfiles = []
    first = 0
    for i in range(k):
        end = first + base + (1 if i >= k - extra else 0)
        subfiles.append((first, end))
        first = end
    groups = tuple(tuple(spec.recipients[g:g + k]) for g in range(0, n, k))
    parents = tuple(range(-1, len(groups) - 1))
    feeds: list[Feed] = []
    def holder(g: int, i: int) -> NodeId:
        return groups[g][i % len(groups[g])]
    for g, group in enumerate(groups):
        for i in range(k):
            h = holder(g, i)
            sender = spec.origin if g == 0 else holder(g - 1, i)
            kind = FeedKind.DISTRIBUTION if g == 0 else FeedKind.PRIMARY
            feeds.append(Feed(sender, h, (i,), kind, priority=0))
        for j, member in enumerate(group):
            mine = tuple(i for i in range(k) if holder(g, i) == member)
            for other in group:
                if other != member and mine:
                    feeds.append(Feed(member, other, mine, FeedKind.COLLECTION, priority=1))
    return _finish(spec, k, tuple(subfiles), groups, parents, feeds)


def _finish(spec: PlanSpec, k: int, subfiles: tuple[tuple[int, int], ...],
            groups: tuple[tuple[NodeId, ...], ...], parents: tuple[int, ...],
            feeds: list[Feed]) -> Plan:
    plan = Plan(spec, k, subfiles, groups, parents, tuple(feeds))
    for f in feeds:
        plan._from.setdefault(f.sender, ())
        plan._from[f.sender] += (f,)
        plan._to.setdefault(f.receiver, ())
        plan._to[f.receiver] += (f,)
    return plan
