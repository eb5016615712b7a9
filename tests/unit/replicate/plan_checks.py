"""Invariants every replication plan must satisfy, shared by the unit and property tests.

Counting rule for the connection budget: a node's fast-forward connections are the distinct
peers it shares at least one feed with (sent or received) that is not `after_complete`; the
two collection feeds between a pair of group members are one connection. After-complete
feeds are left out: they start only once the sender holds their subfiles, when the
connection that brought them has ended (patent [0062]: "terminated and replaced").

Capacity-aware plans go beyond the patent and only there is the budget relaxed: a member
may exchange subfiles with every member of its parent and child groups, so its peers are
bounded by its group, its parent group (or the origin) and its child groups (at most 3k - 1
for K1), and the origin still has at most k.
"""

from __future__ import annotations

import math
from collections import Counter

from meshcast.ids import NodeId
from meshcast.replicate.plan import (
    PRIORITY_COLLECTION,
    PRIORITY_SECONDARY,
    PRIORITY_TREE,
    SUBFILES_PER_MEMBER,
    FeedKind,
    Plan,
    Strategy,
    Tree,
    Variant,
)


def fast_forward_peers(plan: Plan, node: NodeId) -> int:
    """The node's concurrent fast-forward connections (the counting rule above)."""
    peers = {feed.receiver for feed in plan.feeds_from(node) if not feed.after_complete}
    peers |= {feed.sender for feed in plan.feeds_to(node) if not feed.after_complete}
    return len(peers)


def group_depth(plan: Plan) -> int:
    """Groups on the longest path from the origin (1: every group fed by the origin)."""
    deepest = 0
    for g in range(len(plan.groups)):
        depth, at = 0, g
        while at >= 0:
            depth += 1
            at = plan.parents[at]
            assert depth <= len(plan.groups), "cycle among the groups"
        deepest = max(deepest, depth)
    return deepest


def check_plan(plan: Plan) -> None:
    """Every strategy: the subfiles, the recipients, the feeds and the per-node indexes."""
    spec = plan.spec
    chunk_count = spec.chunk_count
    # subfiles cover 0..chunk_count exactly, in order, none empty
    assert plan.subfiles[0][0] == 0
    assert plan.subfiles[-1][1] == chunk_count
    for (_, end), (first, _) in zip(plan.subfiles, plan.subfiles[1:], strict=False):
        assert end == first
    assert all(first < end for first, end in plan.subfiles)
    count = len(plan.subfiles)
    if spec.strategy is Strategy.FASTREPLICA and aware(plan):
        assert count == min(chunk_count, SUBFILES_PER_MEMBER * plan.k)
    else:
        assert count == plan.k
    # one holder per subfile per group, a member of that group; held() agrees
    assert len(plan.holders) == len(plan.groups)
    for g, group in enumerate(plan.groups):
        assert len(plan.holders[g]) == count
        assert set(plan.holders[g]) <= set(group)
        for node in group:
            held = plan.held(node)
            assert held == tuple(i for i in range(count) if plan.holder(g, i) == node)
    # the groups hold every recipient once
    assert sorted(plan.recipients) == sorted(spec.recipients)
    assert len(plan.parents) == len(plan.groups) == len(plan.tree_of)
    assert all(plan.groups)
    members = set(spec.recipients)
    # every recipient receives every subfile exactly once, never from itself; nothing to the origin
    source: dict[tuple[NodeId, int], NodeId] = {}
    for feed in plan.feeds:
        assert feed.receiver != spec.origin
        assert feed.receiver != feed.sender
        assert feed.receiver in members
        assert feed.sender == spec.origin or feed.sender in members
        assert feed.subfiles
        assert list(feed.subfiles) == sorted(set(feed.subfiles))
        assert all(0 <= subfile < count for subfile in feed.subfiles)
        assert feed.after_complete == (feed.kind is FeedKind.SECONDARY)
        for subfile in feed.subfiles:
            assert (feed.receiver, subfile) not in source, "a subfile received twice"
            source[(feed.receiver, subfile)] = feed.sender
    assert len(source) == len(members) * count
    # per subfile the feeds form a tree rooted at the origin: every sender holds what it sends
    for subfile in range(count):
        for node in members:
            at, steps = node, 0
            while at != spec.origin:
                at = source[(at, subfile)]
                steps += 1
                assert steps <= len(members), f"subfile {subfile} goes round a cycle"
    # the per-node indexes hold exactly the feeds, each sender's in priority order
    assert plan.feeds_from(spec.origin)
    assert not plan.feeds_to(spec.origin)
    every = (spec.origin, *spec.recipients)
    assert Counter(f for n in every for f in plan.feeds_from(n)) == Counter(plan.feeds)
    assert Counter(f for n in every for f in plan.feeds_to(n)) == Counter(plan.feeds)
    for node in every:
        out = plan.feeds_from(node)
        assert all(feed.sender == node for feed in out)
        assert [feed.priority for feed in out] == sorted(feed.priority for feed in out)
        assert all(feed.receiver == node for feed in plan.feeds_to(node))
    if spec.strategy is Strategy.FASTREPLICA:
        check_fastreplica(plan)
    else:
        check_baseline(plan)


def check_baseline(plan: Plan) -> None:
    spec = plan.spec
    assert plan.k == 1
    assert all(len(group) == 1 for group in plan.groups)
    assert all(feed.kind is FeedKind.WHOLE for feed in plan.feeds)
    assert all(feed.priority == 0 and not feed.after_complete for feed in plan.feeds)
    if spec.strategy is Strategy.FANOUT:
        assert all(parent == -1 for parent in plan.parents)
        assert all(feed.sender == spec.origin for feed in plan.feeds)
    else:  # a binary tree of recipients
        assert len(plan.feeds_from(spec.origin)) == 1
        assert all(len(plan.feeds_from(node)) <= 2 for node in spec.recipients)
        assert group_depth(plan) == math.floor(math.log2(len(spec.recipients))) + 1


def aware(plan: Plan) -> bool:
    """Whether the plan is capacity-aware (unequal capacities; with equal ones the planner
    makes the patent's plan)."""
    capacities = plan.spec.capacities
    return plan.spec.capacity_aware and capacities is not None and len(set(capacities[1:])) > 1


def check_fastreplica(plan: Plan) -> None:
    spec = plan.spec
    variant = spec.variant
    n = len(spec.recipients)
    assert plan.k == max(1, min(spec.max_connections - int(variant), n, spec.chunk_count))
    # groups of k, the last possibly smaller; the smaller group is a leaf
    assert all(len(group) == plan.k for group in plan.groups[:-1])
    assert 1 <= len(plan.groups[-1]) <= plan.k
    children: dict[int, list[int]] = {}
    for g, parent in enumerate(plan.parents):
        assert (parent == -1) == (g == 0)
        assert parent < g  # breadth-first numbering: parents come first
        children.setdefault(parent, []).append(g)
    if len(plan.groups[-1]) < plan.k:
        assert len(plan.groups) - 1 not in children
    # feeds between groups follow the holders; kinds and priorities follow the variant
    group_of = {node: g for g, group in enumerate(plan.groups) for node in group}
    group_of[spec.origin] = -1
    for feed in plan.feeds:
        sender_group, receiver_group = group_of[feed.sender], group_of[feed.receiver]
        receiver = plan.groups[receiver_group]
        for subfile in feed.subfiles:
            assert plan.holder(receiver_group, subfile) == feed.receiver or (
                feed.kind is FeedKind.COLLECTION
            )
        if feed.kind is FeedKind.COLLECTION:
            assert sender_group == receiver_group
            assert feed.subfiles == plan.held(feed.sender)
            assert feed.priority == PRIORITY_COLLECTION
            continue
        assert sender_group == plan.parents[receiver_group]
        if sender_group >= 0:
            assert all(plan.holder(sender_group, i) == feed.sender for i in feed.subfiles)
        assert len(receiver) == plan.k or receiver_group == len(plan.groups) - 1
        if feed.kind is FeedKind.DISTRIBUTION:
            assert sender_group == -1
            assert feed.priority == PRIORITY_TREE
        elif feed.kind is FeedKind.PRIMARY:
            assert variant is not Variant.K
            assert plan.tree_of[sender_group] == plan.tree_of[receiver_group]
            assert feed.priority == PRIORITY_TREE
        else:
            assert feed.kind is FeedKind.SECONDARY
            assert feed.priority >= PRIORITY_SECONDARY
            assert variant is Variant.K or (
                plan.tree_of[sender_group] == 0 and plan.tree_of[receiver_group] > 0
            )
    # fast-forward children per group: 1 for K1, 2 for K2, none for K
    fast = {Variant.K: 0, Variant.K1: 1, Variant.K2: 2}[variant]
    for parent, kids in children.items():
        if parent < 0:
            continue
        primary = [g for g in kids if plan.tree_of[g] == plan.tree_of[parent]]
        assert len(primary) <= max(fast, 2)
        if variant is not Variant.K:
            assert len(primary) <= fast
        # after-complete children are served one after the other: distinct priorities
        sequential = {
            feed.priority
            for node in plan.groups[parent]
            for feed in plan.feeds_from(node)
            if feed.after_complete
        }
        assert len(sequential) == len([g for g in kids if feed_after(plan, g)])
    # the connection budget (relaxed beyond the patent: capacity-aware plans)
    if aware(plan):
        assert fast_forward_peers(plan, spec.origin) <= plan.k
        for g, group in enumerate(plan.groups):
            near = len(group) - 1
            parent = plan.parents[g]
            near += len(plan.groups[parent]) if parent >= 0 else 1  # 1: the origin
            near += sum(len(plan.groups[c]) for c in children.get(g, ()))
            assert all(fast_forward_peers(plan, node) <= near for node in group)
    else:
        assert fast_forward_peers(plan, spec.origin) == plan.k
        for node in spec.recipients:
            assert fast_forward_peers(plan, node) <= plan.k + int(variant) <= spec.max_connections
        for g, group in enumerate(plan.groups):  # the patent's holders
            assert plan.holders[g] == tuple(group[i % len(group)] for i in range(plan.k))
    # primary and secondary trees
    primary_size = plan.tree_of.count(0)
    secondary = max(plan.tree_of)
    assert list(plan.tree_of) == sorted(plan.tree_of)
    if spec.tree is Tree.CHAIN:
        assert secondary == 0
    else:
        assert abs(primary_size - secondary) <= 1
        for t in range(1, secondary + 1):
            members = [g for g, tree in enumerate(plan.tree_of) if tree == t]
            assert len(members) <= primary_size
            assert plan.parents[members[0]] == t - 1  # fed by primary group t - 1
            assert all(plan.tree_of[plan.parents[g]] == t for g in members[1:])
    # equal subfiles, the last ones taking the remainder (capacity-aware too: its shares
    # are counts of subfiles)
    sizes = [end - first for first, end in plan.subfiles]
    assert sizes == sorted(sizes)
    assert sizes[-1] - sizes[0] <= 1


def feed_after(plan: Plan, group: int) -> bool:
    """Whether `group` is fed after its parent group completes."""
    return any(feed.after_complete for node in plan.groups[group] for feed in plan.feeds_to(node))
