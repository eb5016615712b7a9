"""`plan.repair`: who sends a failed node's subfiles in its place (seed 002 [0079]-[0098]).

One test per case of the patent on plans small enough to write the answer out by hand
(12 recipients, max_connections 5, K1: k = 4 and a chain of three groups (1-4), (5-8),
(9-12), node j of a group holding subfile j), then properties over random plans and random
sets of failed nodes: the planned feeds that survive plus the repair feeds bring every
surviving recipient every subfile exactly once, from live senders, in an order that can
actually run (no one waits on a subfile nobody will ever hold), and the same failures
always give the same repair.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from hypothesis import given
from hypothesis import strategies as st

from meshcast.ids import NodeId
from meshcast.replicate.plan import (
    PRIORITY_COLLECTION,
    PRIORITY_SECONDARY,
    PRIORITY_TREE,
    Feed,
    FeedKind,
    Plan,
    PlanSpec,
    Repair,
    Strategy,
    Tree,
    Variant,
    make_plan,
    repair,
)

ORIGIN = NodeId(100)
BUDDY = NodeId(200)
REP = FeedKind.REPAIR


def nodes(*ids: int) -> frozenset[NodeId]:
    return frozenset(NodeId(i) for i in ids)


def chain(
    n: int = 12,
    *,
    buddy: bool = True,
    max_connections: int = 5,
    variant: Variant = Variant.K1,
    tree: Tree = Tree.CHAIN,
) -> Plan:
    return make_plan(
        PlanSpec(
            ORIGIN,
            tuple(NodeId(i) for i in range(1, n + 1)),
            chunk_count=64,
            max_connections=max_connections,
            variant=variant,
            tree=tree,
            buddy=BUDDY if buddy else None,
        )
    )


def rep(
    sender: int, receiver: int, subfiles: tuple[int, ...], priority: int, after: bool = False
) -> Feed:
    return Feed(NodeId(sender), NodeId(receiver), subfiles, REP, after, priority)


def feed_set(fix: Repair) -> set[Feed]:
    feeds = set(fix.feeds)
    assert len(feeds) == len(fix.feeds)  # one feed per (sender, receiver, rule)
    return feeds


def test_three_group_chain_layout() -> None:
    """The plan the hand-written cases below rely on."""
    plan = chain()
    assert plan.k == 4
    assert plan.groups == tuple(
        tuple(NodeId(i) for i in range(g * 4 + 1, g * 4 + 5)) for g in range(3)
    )
    assert plan.parents == (-1, 0, 1)
    assert plan.holders[1] == tuple(NodeId(i) for i in (5, 6, 7, 8))


def test_nothing_failed_nothing_to_repair() -> None:
    assert repair(chain(), frozenset()) == Repair((), frozenset())


# ---------------------------------------------------------------- (a) an initial node


def test_initial_node_is_replaced_by_the_buddy_towards_its_group_and_child() -> None:
    """FIGURES 9-10C, blocks 1206-1208: node 1 (first group, subfile 0) fails during
    distribution or collection; the buddy sends subfile 0 to the rest of the first group
    (collection priority) and to node 5 of the next group (tree priority)."""
    fix = repair(chain(), nodes(1))
    assert feed_set(fix) == {
        rep(200, 2, (0,), PRIORITY_COLLECTION),
        rep(200, 3, (0,), PRIORITY_COLLECTION),
        rep(200, 4, (0,), PRIORITY_COLLECTION),
        rep(200, 5, (0,), PRIORITY_TREE),
    }
    assert fix.lost == frozenset()


def test_initial_node_without_a_buddy_is_replaced_by_the_origin() -> None:
    """[0096]: "origin node N_0 may itself substitute for failed node N_i^1"."""
    fix = repair(chain(buddy=False), nodes(3))
    assert feed_set(fix) == {
        rep(100, 1, (2,), PRIORITY_COLLECTION),
        rep(100, 2, (2,), PRIORITY_COLLECTION),
        rep(100, 4, (2,), PRIORITY_COLLECTION),
        rep(100, 7, (2,), PRIORITY_TREE),
    }
    assert fix.lost == frozenset()


def test_failed_recipients_get_no_repair_feeds() -> None:
    """Two initial nodes: neither is sent the other's subfile."""
    fix = repair(chain(), nodes(1, 2))
    receivers = {f.receiver for f in fix.feeds}
    assert receivers == nodes(3, 4, 5, 6)
    assert all(f.sender == BUDDY for f in fix.feeds)
    assert rep(200, 3, (0, 1), PRIORITY_COLLECTION) in fix.feeds  # merged per receiver


# ---------------------------------------------------------------- (b) a subsequent node


def test_subsequent_node_load_is_shared_by_the_parent_group() -> None:
    """FIGURE 11B, [0091]: node 6 (group 2, subfile 1) fails; each node of the parent group
    sends subfile 1 to the node of group 2 at its own position, and node 2 (the failed
    node's own sender) sends it on to node 10 of the next group."""
    fix = repair(chain(), nodes(6))
    assert feed_set(fix) == {
        rep(1, 5, (1,), PRIORITY_COLLECTION),
        rep(3, 7, (1,), PRIORITY_COLLECTION),
        rep(4, 8, (1,), PRIORITY_COLLECTION),
        rep(2, 10, (1,), PRIORITY_TREE),
    }
    assert fix.lost == frozenset()


def test_subsequent_node_of_the_last_group_has_no_child() -> None:
    fix = repair(chain(), nodes(12))
    assert feed_set(fix) == {
        rep(5, 9, (3,), PRIORITY_COLLECTION),
        rep(6, 10, (3,), PRIORITY_COLLECTION),
        rep(7, 11, (3,), PRIORITY_COLLECTION),
    }


def test_subsequent_node_repair_does_not_involve_buddy_or_origin() -> None:
    for failed in (5, 6, 7, 8, 9, 10, 11, 12):
        fix = repair(chain(), nodes(failed))
        assert fix.feeds
        assert not {f.sender for f in fix.feeds} & {ORIGIN, BUDDY}, failed


# ---------------------------------------------------------------- (c) secondary trees


def test_initial_node_feeding_secondary_trees_variant_k() -> None:
    """[0093]-[0096], blocks 1204-1205: with variant K (k = 4, groups fed after complete)
    node 1 feeds groups 2 and 3 only once it holds subfile 0; the buddy takes both feeds
    over, each still after complete and in the same order."""
    plan = chain(max_connections=4, variant=Variant.K)
    assert plan.k == 4
    assert plan.parents == (-1, 0, 0)
    fix = repair(plan, nodes(1))
    assert feed_set(fix) == {
        rep(200, 2, (0,), PRIORITY_COLLECTION),
        rep(200, 3, (0,), PRIORITY_COLLECTION),
        rep(200, 4, (0,), PRIORITY_COLLECTION),
        rep(200, 5, (0,), PRIORITY_SECONDARY, after=True),
        rep(200, 9, (0,), PRIORITY_SECONDARY + 1, after=True),
    }


def test_initial_node_feeding_a_balanced_secondary_tree() -> None:
    """Tree.BALANCED, 3 groups: a primary chain of groups 1 and 2, and group 3 the root of a
    secondary tree fed by group 1 after complete. Node 2 fails: the buddy feeds node 6 in
    fast-forward and node 10 after complete."""
    plan = chain(tree=Tree.BALANCED)
    assert plan.parents == (-1, 0, 0)
    assert plan.tree_of == (0, 0, 1)
    fix = repair(plan, nodes(2))
    assert rep(200, 6, (1,), PRIORITY_TREE) in fix.feeds
    assert rep(200, 10, (1,), PRIORITY_SECONDARY, after=True) in fix.feeds
    assert {f.receiver for f in fix.feeds} == nodes(1, 3, 4, 6, 10)


def test_subsequent_node_feeding_a_secondary_tree() -> None:
    """[0093] with a subsequent node: 24 recipients, balanced: a primary chain of groups
    0 -> 1, secondary trees 2 -> 3 (fed by group 0) and 4 -> 5 (fed by group 1). Node 7
    (group 1, subfile 2) fails: its group gets subfile 2 from the parent group by
    position, and node 19 (root of the second secondary tree) from node 3, still after
    complete."""
    plan = chain(24, tree=Tree.BALANCED)
    assert plan.parents == (-1, 0, 0, 2, 1, 4)
    fix = repair(plan, nodes(7))
    assert feed_set(fix) == {
        rep(1, 5, (2,), PRIORITY_COLLECTION),
        rep(2, 6, (2,), PRIORITY_COLLECTION),
        rep(4, 8, (2,), PRIORITY_COLLECTION),
        rep(3, 19, (2,), PRIORITY_SECONDARY, after=True),
    }


# ---------------------------------------------------------------- (d) the origin


def test_origin_failing_is_replaced_by_its_buddy() -> None:
    """[0081]: the buddy takes over the distribution to the first group."""
    fix = repair(chain(), nodes(100))
    assert feed_set(fix) == {rep(200, i, (i - 1,), PRIORITY_TREE) for i in (1, 2, 3, 4)}
    assert fix.lost == frozenset()


def test_origin_failing_without_buddy_loses_the_distribution() -> None:
    fix = repair(chain(buddy=False), nodes(100))
    assert fix.feeds == ()
    assert fix.lost == {(NodeId(i), i - 1) for i in (1, 2, 3, 4)}


def test_origin_and_buddy_failing_lose_the_distribution() -> None:
    fix = repair(chain(), nodes(100, 200))
    assert fix.feeds == ()
    assert fix.lost == {(NodeId(i), i - 1) for i in (1, 2, 3, 4)}


def test_buddy_failing_alone_changes_nothing() -> None:
    assert repair(chain(), nodes(200)) == Repair((), frozenset())


def test_buddy_failing_with_an_initial_node_leaves_the_origin_to_repair() -> None:
    fix = repair(chain(), nodes(200, 4))
    assert {f.sender for f in fix.feeds} == {ORIGIN}
    assert {f.receiver for f in fix.feeds} == nodes(1, 2, 3, 8)


def test_origin_without_buddy_and_an_initial_node_lose_its_subfile_too() -> None:
    fix = repair(chain(buddy=False), nodes(100, 1))
    assert fix.feeds == ()
    assert fix.lost == {(NodeId(i), i - 1) for i in (2, 3, 4)} | {
        (NodeId(i), 0) for i in (2, 3, 4, 5)
    }


# ---------------------------------------------------------------- (e) chains of failures


def test_failed_node_and_its_replacement_towards_the_child() -> None:
    """Node 6 fails and so does node 2, its sender and replacement towards node 10: node 10
    gets subfile 1 from the buddy (node 2's replacement); node 2's group too."""
    fix = repair(chain(), nodes(6, 2))
    assert feed_set(fix) == {
        rep(200, 1, (1,), PRIORITY_COLLECTION),
        rep(200, 3, (1,), PRIORITY_COLLECTION),
        rep(200, 4, (1,), PRIORITY_COLLECTION),
        rep(1, 5, (1,), PRIORITY_COLLECTION),
        rep(3, 7, (1,), PRIORITY_COLLECTION),
        rep(4, 8, (1,), PRIORITY_COLLECTION),
        rep(200, 10, (1,), PRIORITY_TREE),
    }


def test_failed_sharer_falls_back_to_the_failed_nodes_sender() -> None:
    """Node 6 fails and node 1, which shares its load towards node 5, too: node 5 gets
    subfile 1 from node 2 (node 6's own sender); node 1's subfile 0 comes from the buddy."""
    fix = repair(chain(), nodes(6, 1))
    assert rep(2, 5, (1,), PRIORITY_COLLECTION) in fix.feeds
    assert rep(200, 5, (0,), PRIORITY_TREE) in fix.feeds
    assert rep(2, 10, (1,), PRIORITY_TREE) in fix.feeds


def test_two_consecutive_subsequent_nodes_of_one_column() -> None:
    """16 recipients, four groups; nodes 6 and 10 (both subfile 1) fail: node 14 gets
    subfile 1 from node 2, two groups up; group 3's members from group 2 by position."""
    fix = repair(chain(16), nodes(6, 10))
    assert rep(2, 14, (1,), PRIORITY_TREE) in fix.feeds
    assert {f for f in fix.feeds if f.receiver in nodes(9, 11, 12)} == {
        rep(5, 9, (1,), PRIORITY_COLLECTION),
        rep(7, 11, (1,), PRIORITY_COLLECTION),
        rep(8, 12, (1,), PRIORITY_COLLECTION),
    }


def test_a_whole_column_fails_up_to_the_buddy() -> None:
    fix = repair(chain(16), nodes(2, 6, 10))
    assert rep(200, 14, (1,), PRIORITY_TREE) in fix.feeds
    assert all(f.subfiles == (1,) for f in fix.feeds)


def test_baseline_tree_failed_node_is_replaced_by_its_parent() -> None:
    """ALM_TREE: the whole file down a binary tree; a failed inner node's children get it
    from the failed node's parent."""
    plan = make_plan(
        PlanSpec(ORIGIN, tuple(NodeId(i) for i in range(1, 8)), 8, strategy=Strategy.ALM_TREE)
    )
    fix = repair(plan, nodes(2))  # parent 1, children 4 and 5
    assert feed_set(fix) == {
        Feed(NodeId(1), NodeId(4), (0,), REP, False, PRIORITY_TREE),
        Feed(NodeId(1), NodeId(5), (0,), REP, False, PRIORITY_TREE),
    }


# ---------------------------------------------------------------- properties


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    n = draw(st.integers(min_value=1, max_value=40))
    variant = draw(st.sampled_from(list(Variant)))
    aware = draw(st.booleans())
    capacities = (
        tuple(draw(st.sampled_from([1.0, 2.5, 10.0, 100.0])) for _ in range(n + 1))
        if aware
        else None
    )
    return make_plan(
        PlanSpec(
            ORIGIN,
            tuple(NodeId(i) for i in range(1, n + 1)),
            chunk_count=draw(st.integers(min_value=1, max_value=200)),
            strategy=draw(st.sampled_from(list(Strategy))),
            max_connections=draw(st.integers(min_value=int(variant) + 1, max_value=10)),
            variant=variant,
            tree=draw(st.sampled_from(list(Tree))),
            capacities=capacities,
            capacity_aware=aware,
            buddy=draw(st.sampled_from([BUDDY, None])),
        )
    )


@st.composite
def plans_and_failures(
    draw: st.DrawFn, origin_may_fail: bool = True
) -> tuple[Plan, frozenset[NodeId]]:
    plan = draw(plans())
    candidates = sorted(plan.spec.recipients)
    if plan.spec.buddy is not None:
        candidates.append(plan.spec.buddy)
    failed = set(draw(st.lists(st.sampled_from(candidates), max_size=len(candidates) - 1)))
    # the origin may fail only while a live buddy can take its place
    if (
        origin_may_fail
        and plan.spec.buddy is not None
        and plan.spec.buddy not in failed
        and draw(st.booleans())
    ):
        failed.add(ORIGIN)
    return plan, frozenset(failed)


def _combined(plan: Plan, failed: frozenset[NodeId], fix: Repair) -> list[Feed]:
    survivors = [f for f in plan.feeds if f.sender not in failed and f.receiver not in failed]
    return survivors + list(fix.feeds)


def _reachable(plan: Plan, feeds: Iterable[Feed], roots: set[NodeId]) -> dict[NodeId, set[int]]:
    """What each node ends up holding when every feed runs by its rule: chunks of a
    fast-forward feed pass subfile by subfile; an after-complete feed starts once its sender
    holds all of its subfiles."""
    everything = set(range(len(plan.subfiles)))
    held: dict[NodeId, set[int]] = {node: set(everything) for node in roots}
    feeds = list(feeds)
    changed = True
    while changed:
        changed = False
        for f in feeds:
            have = held.get(f.sender, set())
            if f.after_complete:
                gain = set(f.subfiles) if set(f.subfiles) <= have else set()
            else:
                gain = set(f.subfiles) & have
            mine = held.setdefault(f.receiver, set())
            if not gain <= mine:
                mine |= gain
                changed = True
    return held


@given(plans_and_failures())
def test_every_survivor_gets_every_subfile_once_from_a_live_sender(
    case: tuple[Plan, frozenset[NodeId]],
) -> None:
    plan, failed = case
    fix = repair(plan, failed)
    assert fix.lost == frozenset()
    live = {node for node in (plan.spec.origin, plan.spec.buddy) if node is not None} - failed
    for f in fix.feeds:
        assert f.kind is FeedKind.REPAIR
        assert f.sender not in failed, f
        assert f.receiver not in failed, f
        assert f.subfiles
        assert list(f.subfiles) == sorted(set(f.subfiles))
        if f.sender == plan.spec.buddy:
            assert plan.spec.buddy in live
    combined = _combined(plan, failed, fix)
    survivors = [node for node in plan.recipients if node not in failed]
    for node in survivors:
        count = Counter(s for f in combined if f.receiver == node for s in f.subfiles)
        assert count == Counter(range(len(plan.subfiles))), (node, count)
    # and the feeds can run: every survivor ends up with every subfile
    held = _reachable(plan, combined, live)
    for node in survivors:
        assert held.get(node) == set(range(len(plan.subfiles))), node


@given(plans_and_failures())
def test_repair_keeps_the_rule_of_the_feed_it_replaces(
    case: tuple[Plan, frozenset[NodeId]],
) -> None:
    """Each repaired (receiver, subfile) keeps the after-complete rule and the priority of
    the planned feed that would have carried it."""
    plan, failed = case
    planned = {(f.receiver, s): f for f in plan.feeds for s in f.subfiles}
    for f in repair(plan, failed).feeds:
        for s in f.subfiles:
            was = planned[(f.receiver, s)]
            assert was.sender in failed
            assert (f.after_complete, f.priority) == (was.after_complete, was.priority)


@given(plans_and_failures())
def test_repair_is_deterministic(case: tuple[Plan, frozenset[NodeId]]) -> None:
    """Every survivor computes the same repair: the same plan and failed set in any order
    (and on a plan rebuilt from the spec) give the same feeds."""
    plan, failed = case
    first = repair(plan, failed)
    again = repair(make_plan(plan.spec), frozenset(sorted(failed, reverse=True)))
    assert first == again
    assert list(first.feeds) == sorted(
        first.feeds, key=lambda f: (f.sender, f.receiver, f.after_complete, f.priority)
    )


@given(plans(), st.data())
def test_without_origin_or_buddy_exactly_what_they_fed_is_lost(
    plan: Plan, data: st.DataObject
) -> None:
    """The origin fails with no live buddy: each (survivor, subfile) is either still carried
    by exactly one feed from a live sender or listed in `lost` (never both, never neither),
    and only survivors are listed."""
    extra = [plan.spec.buddy] if plan.spec.buddy is not None else []
    others = data.draw(st.lists(st.sampled_from(sorted(plan.spec.recipients))))
    failed = frozenset([ORIGIN, *extra, *others])
    fix = repair(plan, failed)
    assert all(f.sender not in failed and f.receiver not in failed for f in fix.feeds)
    combined = _combined(plan, failed, fix)
    pairs = Counter((f.receiver, s) for f in combined for s in f.subfiles)
    survivors = [node for node in plan.recipients if node not in failed]
    for node in survivors:
        for s in range(len(plan.subfiles)):
            assert pairs[(node, s)] + ((node, s) in fix.lost) == 1, (node, s)
    assert all(node in survivors for node, _ in fix.lost)
