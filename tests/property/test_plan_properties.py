"""Property tests for the replication planner: on any spec, every strategy, variant and tree
gives a valid plan (tests/unit/replicate/plan_checks.py lists the invariants and the
connection counting rule); balanced trees are balanced, K2 trees shallow, capacity-aware plans
share each group's subfiles in proportion to capacity, at an even pace, and are the patent's
plan when the capacities are equal."""

from __future__ import annotations

import dataclasses
import math

from hypothesis import given
from hypothesis import strategies as st

from meshcast.ids import NodeId
from meshcast.replicate.bound import lower_bound
from meshcast.replicate.plan import PlanSpec, Strategy, Tree, Variant, make_plan
from tests.unit.replicate.plan_checks import check_plan, group_depth

CAPACITIES = st.sampled_from([1.0, 2.5, 10.0, 40.0, 100.0]) | st.floats(
    min_value=0.01, max_value=1e4, allow_nan=False, allow_infinity=False
)


@st.composite
def specs(
    draw: st.DrawFn,
    max_recipients: int = 70,
    strategies: tuple[Strategy, ...] = tuple(Strategy),
    variants: tuple[Variant, ...] = tuple(Variant),
    trees: tuple[Tree, ...] = tuple(Tree),
    capacity_aware: bool | None = None,
) -> PlanSpec:
    n = draw(st.integers(min_value=1, max_value=max_recipients))
    if n <= 70:
        ids = draw(st.lists(st.integers(1, 2**32 - 1), min_size=n + 1, max_size=n + 1, unique=True))
    else:  # large instances: only the count matters, and drawing distinct ids is slow
        base = draw(st.integers(1, 2**31))
        ids = list(range(base, base + n + 1))
    variant = draw(st.sampled_from(variants))
    aware = draw(st.booleans()) if capacity_aware is None else capacity_aware
    if n <= 70:
        listed = st.lists(CAPACITIES, min_size=n + 1, max_size=n + 1).map(tuple)
    else:  # as for the ids: long lists are slow to draw
        listed = st.randoms(use_true_random=False).map(
            lambda rng: tuple(rng.choice((1.0, 2.5, 10.0, 40.0, 100.0)) for _ in range(n + 1))
        )
    capacities = draw(listed if aware else st.none() | listed)
    return PlanSpec(
        origin=NodeId(ids[0]),
        recipients=tuple(NodeId(i) for i in ids[1:]),
        chunk_count=draw(st.integers(min_value=1, max_value=300)),
        strategy=draw(st.sampled_from(strategies)),
        max_connections=draw(st.integers(min_value=int(variant) + 1, max_value=12)),
        variant=variant,
        tree=draw(st.sampled_from(trees)),
        capacities=capacities,
        capacity_aware=aware,
    )


@given(specs())
def test_every_plan_is_valid(spec: PlanSpec) -> None:
    check_plan(make_plan(spec))


@given(specs(capacity_aware=False))
def test_without_capacity_awareness_capacities_change_nothing(spec: PlanSpec) -> None:
    plan = make_plan(spec)
    blind = make_plan(
        PlanSpec(
            spec.origin,
            spec.recipients,
            spec.chunk_count,
            spec.strategy,
            spec.max_connections,
            spec.variant,
            spec.tree,
        )
    )
    assert plan.recipients == spec.recipients  # the given order
    assert (plan.subfiles, plan.groups, plan.parents, plan.feeds) == (
        blind.subfiles,
        blind.groups,
        blind.parents,
        blind.feeds,
    )


@given(
    specs(
        max_recipients=600,
        strategies=(Strategy.FASTREPLICA,),
        trees=(Tree.BALANCED,),
    )
)
def test_balanced_trees_have_m_close_to_m1(spec: PlanSpec) -> None:
    plan = make_plan(spec)
    groups = len(plan.groups)
    primary = plan.tree_of.count(0)
    secondary = max(plan.tree_of)
    assert abs(primary - secondary) <= 1
    assert primary + secondary <= 2 * math.isqrt(groups) + 2
    if groups >= 2:
        assert secondary >= 1


@given(specs(max_recipients=600, strategies=(Strategy.FASTREPLICA,), variants=(Variant.K2,)))
def test_k2_trees_are_logarithmically_deep(spec: PlanSpec) -> None:
    plan = make_plan(spec)
    depth = group_depth(plan)
    levels = math.floor(math.log2(len(plan.groups))) + 1
    if spec.tree is Tree.CHAIN:
        assert depth == levels
    else:  # a primary and a secondary binary tree, each of at most m groups
        assert depth <= 2 * levels


@given(specs(strategies=(Strategy.FASTREPLICA,), capacity_aware=True))
def test_capacity_aware_shares_follow_capacity_at_an_even_pace(spec: PlanSpec) -> None:
    """In every group, members fastest first; every prefix of the subfiles is shared by
    D'Hondt (no member holds more per unit of capacity than another would with one more),
    so each member's share is as close to its capacity's as whole subfiles allow, and it
    arrives at an even pace through the file."""
    plan = make_plan(spec)
    assert spec.capacities is not None
    capacity = dict(zip(spec.recipients, spec.capacities[1:], strict=True))
    if len(set(capacity.values())) == 1:
        return  # the patent's plan: nothing to balance
    for g, group in enumerate(plan.groups):
        order = [capacity[node] for node in group]
        assert order == sorted(order, reverse=True)
        held = dict.fromkeys(group, 0)
        for holder in plan.holders[g]:
            held[holder] += 1
            for a in group:
                for b in group:
                    assert held[a] / capacity[a] <= (held[b] + 1) / capacity[b] * (1 + 1e-9)


@given(specs(strategies=(Strategy.FASTREPLICA,), capacity_aware=True))
def test_capacity_aware_with_equal_capacities_is_the_patent_plan(spec: PlanSpec) -> None:
    assert spec.capacities is not None
    equal = (spec.capacities[0],) * len(spec.capacities)
    aware = make_plan(dataclasses.replace(spec, capacities=equal))
    plain = make_plan(dataclasses.replace(spec, capacities=None, capacity_aware=False))
    assert (aware.subfiles, aware.groups, aware.holders, aware.feeds) == (
        plain.subfiles,
        plain.groups,
        plain.holders,
        plain.feeds,
    )


@given(
    st.integers(min_value=0, max_value=2**40),
    CAPACITIES,
    st.lists(CAPACITIES, min_size=1, max_size=50),
)
def test_the_bound_never_exceeds_fanout_or_a_chain(
    size: int, origin: float, uploads: list[float]
) -> None:
    bound = lower_bound(size, origin, uploads)
    bits = 8 * size
    assert bound >= bits / origin * (1 - 1e-12)
    # fanout (the origin sends N copies) and a store-and-forward chain both take longer
    assert bound <= len(uploads) * bits / origin * (1 + 1e-12)
    chain = bits / origin + sum(bits / u for u in uploads[:-1])
    assert bound <= chain * (1 + 1e-12)
