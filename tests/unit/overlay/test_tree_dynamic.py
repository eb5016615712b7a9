"""Dynamic membership: joins, leaves, rebuilds keep a valid tree and say what they moved."""

from __future__ import annotations

import math

import numpy as np
import pytest

from meshcast.errors import ConfigError, UsageError
from meshcast.overlay.tree import (
    NO_PARENT,
    DynamicConfig,
    DynamicTree,
    InstanceModel,
    Tree,
    TreeInstance,
    dense_instance,
    max_throughput_tree,
    tree_rate,
    tree_violations,
)


def check(universe: TreeInstance, tree: DynamicTree) -> None:
    """The tree spans exactly the members, is rooted at the source, and its rate is right."""
    snapshot = tree.tree()
    members = np.array(tree.members())
    assert universe.source in members.tolist()
    outsiders = np.setdiff1d(np.arange(universe.n), members)
    assert np.all(snapshot.parent[outsiders] == NO_PARENT)
    local = np.full(universe.n, NO_PARENT)
    local[members] = np.arange(len(members))
    parent = np.where(
        snapshot.parent[members] == NO_PARENT, NO_PARENT, local[snapshot.parent[members]]
    )
    sub = universe.restrict(members)
    assert tree_violations(sub, parent) == []
    assert tree.rate == tree_rate(sub, parent)


def uniform_universe(n: int, capacity: float = 10.0, bandwidth: float = 10.0) -> TreeInstance:
    return TreeInstance.from_matrix([capacity] * n, np.full((n, n), bandwidth))


def star_universe(n: int) -> TreeInstance:
    """Only the source has edges (10 each) and capacity 10: every tree is the star."""
    bandwidth = np.zeros((n, n))
    bandwidth[0, 1:] = 10.0
    return TreeInstance.from_matrix([10.0] * n, bandwidth)


def test_join_attaches_below_a_member_with_room_over_the_widest_edge() -> None:
    # source feeds at 10; node 1 joins: it can feed 2 at rate 5 (capacity 10)
    bandwidth = np.full((4, 4), 10.0)
    bandwidth[0, 2] = 2.0  # the source's edge to 2 is narrow
    universe = TreeInstance.from_matrix([10.0, 20.0, 1.0, 1.0], bandwidth)
    tree = DynamicTree(universe, [1])
    assert tree.rate == 10.0
    change = tree.join(2)
    assert tree.tree().parent[2] == 1
    assert change.reparented == 0
    assert not change.rebuilt
    check(universe, tree)


def test_join_without_room_falls_back_to_the_widest_attachment() -> None:
    # every member is full at rate 10, and no move makes room: the rate must drop
    universe = star_universe(3)
    tree = DynamicTree(universe, [1], DynamicConfig(rebuild_below=0.0, raise_attempts=0))
    change = tree.join(2)
    assert change.rate == 5.0  # some node now feeds two children
    check(universe, tree)


def test_leave_rejoins_orphans_with_their_subtrees() -> None:
    universe = dense_instance(40, np.random.default_rng(1), InstanceModel(source_uplink=100))
    tree = DynamicTree(universe, range(40))
    snapshot = tree.tree()
    internal = [v for v in range(1, 40) if np.any(snapshot.parent == v)]
    leaver = internal[0]
    orphans = np.flatnonzero(snapshot.parent == leaver).tolist()
    grandchildren = {
        int(g): int(snapshot.parent[g]) for g in np.flatnonzero(np.isin(snapshot.parent, orphans))
    }
    change = tree.leave(leaver)
    assert not tree.is_member(leaver)
    after = tree.tree().parent
    assert all(tree.is_member(o) and after[o] != leaver for o in orphans)
    if not change.rebuilt:
        assert change.reparented >= len(orphans)
        # each orphan brought its subtree along unless a repair move touched it
        kept = sum(after[g] == p for g, p in grandchildren.items())
        assert kept >= len(grandchildren) - change.reparented
    check(universe, tree)


def test_random_churn_keeps_every_invariant() -> None:
    rng = np.random.default_rng(3)
    universe = dense_instance(60, rng, InstanceModel(source_uplink=100))
    tree = DynamicTree(universe, rng.choice(np.arange(1, 60), 30, replace=False).tolist())
    check(universe, tree)
    for _ in range(120):
        members = tree.members()
        outside = sorted(set(range(60)) - set(members))
        if outside and (len(members) < 5 or rng.random() < 0.5):
            change = tree.join(int(rng.choice(outside)))
        else:
            change = tree.leave(int(rng.choice([m for m in members if m != universe.source])))
        assert change.rate == tree.rate
        assert change.reparented >= 0
        check(universe, tree)


def test_rate_stays_close_to_a_rebuild_under_churn() -> None:
    rng = np.random.default_rng(4)
    universe = dense_instance(80, rng, InstanceModel(source_uplink=100))
    tree = DynamicTree(universe, range(40))
    ratios = []
    for _ in range(60):
        members = tree.members()
        outside = sorted(set(range(80)) - set(members))
        if outside and rng.random() < 0.5:
            tree.join(int(rng.choice(outside)))
        else:
            tree.leave(int(rng.choice([m for m in members if m != 0])))
        fresh = max_throughput_tree(universe.restrict(tree.members())).rate
        ratios.append(tree.rate / fresh)
    assert np.mean(ratios) >= 0.95


def test_rebuild_happens_when_the_rate_falls_to_the_threshold() -> None:
    # in a star every join lowers the source's share a_0 / d_0 below the last rebuild's rate
    universe = star_universe(6)
    never = DynamicTree(universe, [1], DynamicConfig(rebuild_below=0.0, raise_attempts=0))
    always = DynamicTree(universe, [1], DynamicConfig(rebuild_below=1.0, raise_attempts=0))
    for node in range(2, 6):
        assert not never.join(node).rebuilt
        assert always.join(node).rebuilt
    assert always.rate == never.rate == max_throughput_tree(universe).rate == 2.0


def test_forced_rebuild_counts_moved_members() -> None:
    universe = dense_instance(30, np.random.default_rng(5))
    tree = DynamicTree(universe, range(30))
    change = tree.rebuild()
    assert change.rebuilt
    assert change.reparented == 0  # the same members give the same tree
    assert isinstance(tree.tree(), Tree)


def test_misuse_is_a_usage_error() -> None:
    universe = uniform_universe(4)
    tree = DynamicTree(universe, [1])
    with pytest.raises(UsageError, match="source"):
        tree.leave(0)
    with pytest.raises(UsageError, match="not a member"):
        tree.leave(2)
    with pytest.raises(UsageError, match="already"):
        tree.join(1)
    with pytest.raises(UsageError, match="universe"):
        tree.join(9)
    with pytest.raises(ConfigError, match="rebuild_below"):
        DynamicConfig(rebuild_below=2.0)


def test_a_lone_source_has_infinite_rate_and_accepts_a_join() -> None:
    universe = uniform_universe(3)
    tree = DynamicTree(universe, [])
    assert tree.rate == math.inf
    tree.join(2)
    assert tree.rate == 10.0
    assert tree.tree().parent[2] == 0


def test_a_narrow_node_lowers_the_rate_only_while_it_is_a_member() -> None:
    universe = dense_instance(30, np.random.default_rng(6), InstanceModel(source_uplink=100))
    matrix = universe.bandwidth_matrix()
    matrix[:, 29] = np.where(matrix[:, 29] > 0, 0.01, 0.0)  # 29 sits behind a narrow downlink
    universe = TreeInstance.from_matrix(universe.capacity, matrix)
    tree = DynamicTree(universe, range(29))
    before = tree.rate
    assert tree.join(29).rate == 0.01
    change = tree.leave(29)
    assert not change.rebuilt
    assert change.rate >= before


def test_a_leave_that_would_cut_off_an_orphan_changes_nothing() -> None:
    # 0 -> 1 -> 2 is the only way to reach 2
    universe = TreeInstance.from_matrix([10.0] * 3, [[0, 10, 0], [0, 0, 10], [0, 0, 0]])
    tree = DynamicTree(universe, [1, 2])
    before = tree.tree().parent.tolist()
    with pytest.raises(UsageError, match="no member has an edge"):
        tree.leave(1)
    assert tree.tree().parent.tolist() == before
    assert tree.members() == [0, 1, 2]
    assert tree.rate == 10.0
