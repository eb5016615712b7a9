"""The replication planner on small instances written out by hand (seed 002 [0038]-[0065])."""

from __future__ import annotations

import random

import pytest

from meshcast.errors import UsageError
from meshcast.ids import NodeId
from meshcast.replicate.bound import lower_bound
from meshcast.replicate.plan import (
    Feed,
    FeedKind,
    Plan,
    PlanSpec,
    Strategy,
    Tree,
    Variant,
    make_plan,
)

from .plan_checks import check_plan, fast_forward_peers, group_depth

ORIGIN = NodeId(100)
DIST, COLL, PRIM, SEC, WHOLE = (
    FeedKind.DISTRIBUTION,
    FeedKind.COLLECTION,
    FeedKind.PRIMARY,
    FeedKind.SECONDARY,
    FeedKind.WHOLE,
)


def nodes(*ids: int) -> tuple[NodeId, ...]:
    return tuple(NodeId(i) for i in ids)


def feed(
    sender: int, receiver: int, subfiles: tuple[int, ...], kind: FeedKind, priority: int
) -> Feed:
    return Feed(NodeId(sender), NodeId(receiver), subfiles, kind, kind is SEC, priority)


def test_two_groups_of_two_k1() -> None:
    """n=4, k=2: the origin feeds group (1,2); 1 and 2 exchange their subfiles and forward
    them, as they arrive, to 3 and 4, who exchange theirs."""
    plan = make_plan(PlanSpec(ORIGIN, nodes(1, 2, 3, 4), 4, max_connections=3, variant=Variant.K1))
    check_plan(plan)
    assert plan.k == 2
    assert plan.subfiles == ((0, 2), (2, 4))
    assert plan.groups == (nodes(1, 2), nodes(3, 4))
    assert plan.parents == (-1, 0)
    assert plan.feeds == (
        feed(100, 1, (0,), DIST, 0),
        feed(100, 2, (1,), DIST, 0),
        feed(1, 2, (0,), COLL, 1),
        feed(2, 1, (1,), COLL, 1),
        feed(1, 3, (0,), PRIM, 0),
        feed(2, 4, (1,), PRIM, 0),
        feed(3, 4, (0,), COLL, 1),
        feed(4, 3, (1,), COLL, 1),
    )
    # node 1 serves the next group first, then its own
    assert plan.feeds_from(NodeId(1)) == (feed(1, 3, (0,), PRIM, 0), feed(1, 2, (0,), COLL, 1))
    assert plan.feeds_to(NodeId(1)) == (feed(100, 1, (0,), DIST, 0), feed(2, 1, (1,), COLL, 1))
    assert plan.feeds_from(NodeId(99)) == ()
    # node 1: the origin, node 2, node 3 = k + 1 connections
    assert fast_forward_peers(plan, NodeId(1)) == 3


def test_last_group_smaller_takes_every_subfile_from_its_parents() -> None:
    plan = make_plan(PlanSpec(ORIGIN, nodes(1, 2, 3, 4, 5), 5, max_connections=3))
    check_plan(plan)
    assert plan.subfiles == ((0, 2), (2, 5))  # the last subfile takes the remainder
    assert plan.groups == (nodes(1, 2), nodes(3, 4), nodes(5))
    assert plan.parents == (-1, 0, 1)
    assert plan.feeds_to(NodeId(5)) == (feed(3, 5, (0,), PRIM, 0), feed(4, 5, (1,), PRIM, 0))
    assert plan.feeds_from(NodeId(5)) == ()
    assert plan.held(NodeId(5)) == (0, 1)
    assert plan.held(NodeId(4)) == (1,)
    assert plan.held(ORIGIN) == (0, 1)
    assert plan.holder(2, 1) == NodeId(5)
    assert plan.group_of(NodeId(5)) == 2
    assert plan.group_of(ORIGIN) == -1
    assert [plan.subfile_of(chunk) for chunk in range(5)] == [0, 0, 1, 1, 1]
    with pytest.raises(UsageError):
        plan.subfile_of(5)
    with pytest.raises(UsageError):
        plan.group_of(NodeId(99))


def test_a_smaller_last_group_holds_several_subfiles_and_spreads_them() -> None:
    plan = make_plan(PlanSpec(ORIGIN, nodes(*range(1, 6)), 3, max_connections=3, variant=Variant.K))
    check_plan(plan)
    assert plan.groups == (nodes(1, 2, 3), nodes(4, 5))
    # node 4 holds subfiles 0 and 2 (j % 2 == 0) and sends both to node 5 in one feed
    assert plan.feeds_from(NodeId(4)) == (feed(4, 5, (0, 2), COLL, 1),)
    assert plan.feeds_to(NodeId(4)) == (
        feed(5, 4, (1,), COLL, 1),
        feed(1, 4, (0,), SEC, 2),
        feed(3, 4, (2,), SEC, 2),
    )
    # node 4 takes subfiles from two senders of group 0 plus node 5: within k
    assert fast_forward_peers(plan, NodeId(4)) == 1


def test_plain_unicast_for_one_recipient() -> None:
    plan = make_plan(PlanSpec(ORIGIN, nodes(7), 10))
    check_plan(plan)
    assert plan.k == 1
    assert plan.subfiles == ((0, 10),)
    assert plan.feeds == (feed(100, 7, (0,), DIST, 0),)


def test_fewer_recipients_than_connections_make_one_group() -> None:
    plan = make_plan(PlanSpec(ORIGIN, nodes(1, 2, 3), 100, max_connections=9))
    check_plan(plan)
    assert plan.k == 3
    assert plan.groups == (nodes(1, 2, 3),)
    assert plan.subfiles == ((0, 33), (33, 66), (66, 100))
    assert [f.kind for f in plan.feeds].count(COLL) == 6
    # collection starts at each holder's right-hand neighbour
    assert tuple(f.receiver for f in plan.feeds_from(NodeId(3))) == nodes(1, 2)


def test_fewer_chunks_than_connections_make_one_chunk_subfiles() -> None:
    plan = make_plan(PlanSpec(ORIGIN, nodes(*range(1, 11)), 3, max_connections=9))
    check_plan(plan)
    assert plan.k == 3
    assert plan.subfiles == ((0, 1), (1, 2), (2, 3))
    assert [len(group) for group in plan.groups] == [3, 3, 3, 1]


def test_variant_k_feeds_two_groups_one_after_the_other() -> None:
    plan = make_plan(PlanSpec(ORIGIN, nodes(*range(1, 7)), 4, max_connections=2, variant=Variant.K))
    check_plan(plan)
    assert plan.k == 2
    assert plan.parents == (-1, 0, 0)
    assert plan.feeds_from(NodeId(1)) == (
        feed(1, 2, (0,), COLL, 1),
        feed(1, 3, (0,), SEC, 2),
        feed(1, 5, (0,), SEC, 3),
    )
    assert fast_forward_peers(plan, NodeId(1)) == 2  # the origin and node 2: k


def test_variant_k2_is_a_binary_tree_of_groups() -> None:
    plan = make_plan(
        PlanSpec(ORIGIN, nodes(*range(1, 15)), 8, max_connections=4, variant=Variant.K2)
    )
    check_plan(plan)
    assert plan.k == 2
    assert plan.parents == (-1, 0, 0, 1, 1, 2, 2)
    assert group_depth(plan) == 3
    assert tuple(f.receiver for f in plan.feeds_from(NodeId(1))) == nodes(3, 5, 2)
    assert fast_forward_peers(plan, NodeId(1)) == 4  # origin, 2, 3, 5: k + 2


def test_balanced_k1_primary_chain_and_secondary_chains() -> None:
    """8 groups of one: a primary chain of m=3 and m1=2 secondary chains of 3 and 2.

    ORIGIN -> 1 -> 2 -> 3         (primary, fast-forward)
         1 => 4 -> 5 -> 6    (=> after 1 completes)
              2 => 7 -> 8
    """
    plan = make_plan(
        PlanSpec(ORIGIN, nodes(*range(1, 9)), 8, max_connections=2, tree=Tree.BALANCED)
    )
    check_plan(plan)
    assert plan.parents == (-1, 0, 1, 0, 3, 4, 1, 6)
    assert plan.tree_of == (0, 0, 0, 1, 1, 1, 2, 2)
    assert plan.feeds == (
        feed(100, 1, (0,), DIST, 0),
        feed(1, 2, (0,), PRIM, 0),
        feed(2, 3, (0,), PRIM, 0),
        feed(1, 4, (0,), SEC, 2),
        feed(4, 5, (0,), PRIM, 0),
        feed(5, 6, (0,), PRIM, 0),
        feed(2, 7, (0,), SEC, 2),
        feed(7, 8, (0,), PRIM, 0),
    )


def test_chain_k1_is_a_chain() -> None:
    plan = make_plan(PlanSpec(ORIGIN, nodes(*range(1, 9)), 8, max_connections=2))
    check_plan(plan)
    assert plan.parents == (-1, 0, 1, 2, 3, 4, 5, 6)


def test_fanout_baseline() -> None:
    plan = make_plan(PlanSpec(ORIGIN, nodes(1, 2, 3), 6, strategy=Strategy.FANOUT))
    check_plan(plan)
    assert plan.k == 1
    assert plan.subfiles == ((0, 6),)
    assert plan.parents == (-1, -1, -1)
    assert plan.feeds == (
        feed(100, 1, (0,), WHOLE, 0),
        feed(100, 2, (0,), WHOLE, 0),
        feed(100, 3, (0,), WHOLE, 0),
    )


def test_alm_tree_baseline() -> None:
    plan = make_plan(PlanSpec(ORIGIN, nodes(1, 2, 3, 4, 5), 6, strategy=Strategy.ALM_TREE))
    check_plan(plan)
    assert plan.parents == (-1, 0, 0, 1, 1)
    assert plan.feeds == (
        feed(100, 1, (0,), WHOLE, 0),
        feed(1, 2, (0,), WHOLE, 0),
        feed(1, 3, (0,), WHOLE, 0),
        feed(2, 4, (0,), WHOLE, 0),
        feed(2, 5, (0,), WHOLE, 0),
    )


def test_capacity_aware_balances_groups_and_apportions_subfiles() -> None:
    capacities = (100.0, 10.0, 40.0, 20.0, 30.0)  # the origin, then nodes 1..4
    spec = PlanSpec(ORIGIN, nodes(1, 2, 3, 4), 10, max_connections=3, capacities=capacities)
    plain = make_plan(spec)
    check_plan(plain)
    assert plain.groups == (nodes(1, 2), nodes(3, 4))  # capacities ignored
    assert plain.subfiles == ((0, 5), (5, 10))
    aware = make_plan(
        PlanSpec(
            ORIGIN,
            nodes(1, 2, 3, 4),
            10,
            max_connections=3,
            capacities=capacities,
            capacity_aware=True,
        )
    )
    check_plan(aware)
    # group 0 uploads each byte twice (collection, its child), group 1 once: 2/3 and 1/3 of
    # the 100 of capacity; members fastest first
    assert aware.groups == (nodes(2, 3), nodes(4, 1))
    assert aware.subfiles == tuple((i, i + 1) for i in range(10))  # min(10, 64 k) subfiles
    # D'Hondt, subfile after subfile: 40:20 -> 7:3 and 30:10 -> 8:2, interleaved
    assert aware.holders == (
        nodes(2, 2, 3, 2, 2, 3, 2, 2, 3, 2),
        nodes(4, 4, 4, 1, 4, 4, 4, 1, 4, 4),
    )
    assert aware.held(NodeId(3)) == (2, 5, 8)
    assert aware.held(NodeId(1)) == (3, 7)
    # each holder of group 0 feeds the holders of its subfiles in group 1
    assert aware.feeds_to(NodeId(4)) == (
        feed(2, 4, (0, 1, 4, 6, 9), PRIM, 0),
        feed(3, 4, (2, 5, 8), PRIM, 0),
        feed(1, 4, (3, 7), COLL, 1),
    )
    assert aware.feeds_to(NodeId(1)) == (
        feed(2, 1, (3, 7), PRIM, 0),
        feed(4, 1, (0, 1, 2, 4, 5, 6, 8, 9), COLL, 1),
    )
    # beyond the patent's k + 1 = 3: node 2 talks to the origin, 3, 4 and 1
    assert fast_forward_peers(aware, NodeId(2)) == 4


def test_capacity_aware_puts_the_slowest_node_in_the_lone_leaf() -> None:
    """The last group, of one node, uploads nothing: the slowest node goes there."""
    plan = make_plan(
        PlanSpec(
            ORIGIN,
            nodes(1, 2, 3, 4, 5),
            10,
            max_connections=3,
            capacities=(100.0, 1.0, 50.0, 40.0, 30.0, 20.0),
            capacity_aware=True,
        )
    )
    check_plan(plan)
    assert plan.groups[2] == nodes(1)
    assert plan.held(NodeId(1)) == tuple(range(10))
    assert plan.feeds_from(NodeId(1)) == ()


def test_capacity_aware_member_with_no_share_only_receives() -> None:
    plan = make_plan(
        PlanSpec(ORIGIN, nodes(1, 2, 3), 4, capacities=(1.0, 1.0, 100.0, 1.0), capacity_aware=True)
    )
    check_plan(plan)
    assert plan.groups == (nodes(2, 1, 3),)
    assert plan.holders == (nodes(2, 2, 2, 2),)  # 4/100 < 1/1: node 2 holds every subfile
    assert plan.held(NodeId(1)) == plan.held(NodeId(3)) == ()
    assert plan.feeds_from(NodeId(1)) == ()
    assert plan.feeds_to(NodeId(1)) == (feed(2, 1, (0, 1, 2, 3), COLL, 1),)


def _upload_time(plan: Plan, capacities: tuple[float, ...], chunk: int) -> float:
    """Seconds the busiest node needs to upload what the plan gives it, at its capacity
    (a lower bound on the plan's completion: the fluid model's)."""
    capacity = dict(zip((plan.spec.origin, *plan.spec.recipients), capacities, strict=True))
    sent: dict[NodeId, int] = {}
    for f in plan.feeds:
        chunks = sum(plan.subfiles[i][1] - plan.subfiles[i][0] for i in f.subfiles)
        sent[f.sender] = sent.get(f.sender, 0) + chunks * chunk
    return max(8 * sent[node] / capacity[node] for node in sent)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_capacity_aware_uses_every_upload_on_the_bench_instance(seed: int) -> None:
    """`meshcast bench replicate`'s heterogeneous instance: the patent's plan loads the
    slow nodes like the fast ones, the capacity-aware plan in proportion to capacity, close
    to the aggregate bound N·F/(u_s + Σu_i)."""
    rng = random.Random(seed)
    capacities = (100e6, *(rng.choice((10e6, 25e6, 50e6, 100e6)) for _ in range(64)))
    chunk, chunks = 64 * 1024, 512
    recipients = nodes(*range(1, 65))
    bound = lower_bound(chunk * chunks, capacities[0], capacities[1:])
    for aware in (False, True):
        plan = make_plan(
            PlanSpec(ORIGIN, recipients, chunks, capacities=capacities, capacity_aware=aware)
        )
        check_plan(plan)
        ratio = _upload_time(plan, capacities, chunk) / bound
        if aware:
            assert ratio < 1.06
        else:
            assert ratio > 4


def test_capacity_aware_with_equal_capacities_is_the_patent_plan() -> None:
    recipients = nodes(*range(1, 12))
    plain = make_plan(PlanSpec(ORIGIN, recipients, 23, max_connections=4))
    aware = make_plan(
        PlanSpec(
            ORIGIN, recipients, 23, max_connections=4, capacities=(5.0,) * 12, capacity_aware=True
        )
    )
    assert aware.groups == plain.groups
    assert aware.subfiles == plain.subfiles == ((0, 7), (7, 15), (15, 23))
    assert aware.feeds == plain.feeds


def test_same_spec_same_plan() -> None:
    spec = PlanSpec(ORIGIN, nodes(*range(1, 40)), 77, variant=Variant.K2, tree=Tree.BALANCED)
    assert make_plan(spec) == make_plan(spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (PlanSpec(ORIGIN, nodes(1), 1, max_connections=1, variant=Variant.K1), "no connection"),
        (PlanSpec(ORIGIN, nodes(1), 1, max_connections=2, variant=Variant.K2), "no connection"),
        (PlanSpec(ORIGIN, (), 1), "no recipients"),
        (PlanSpec(ORIGIN, nodes(1, 100), 1), "origin"),
        (PlanSpec(ORIGIN, nodes(1, 2, 1), 1), "twice"),
        (PlanSpec(ORIGIN, nodes(1), 0), "chunk_count"),
        (PlanSpec(ORIGIN, nodes(1, 2), 1, capacities=(1.0, 1.0)), "capacities"),
        (PlanSpec(ORIGIN, nodes(1), 1, capacities=(1.0, 0.0)), "positive"),
        (PlanSpec(ORIGIN, nodes(1), 1, capacities=(1.0, -2.0)), "positive"),
        (PlanSpec(ORIGIN, nodes(1), 1, capacities=(float("nan"), 1.0)), "positive"),
        (PlanSpec(ORIGIN, nodes(1), 1, capacities=(float("inf"), 1.0)), "positive"),
    ],
)
def test_unplannable_specs_raise_usage_error(spec: PlanSpec, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        make_plan(spec)
