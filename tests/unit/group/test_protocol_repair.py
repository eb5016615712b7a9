"""The repair protocol alone (`meshcast.group.repair.Repair`), over a `Stability`: own
copies sent again to the destinations still lacking them. Explicit now."""

from __future__ import annotations

import dataclasses

import pytest

from meshcast.errors import ConfigError
from meshcast.group import (
    Broadcast,
    GroupEffect,
    GroupView,
    Repair,
    RepairConfig,
    RepairStats,
    Stability,
    StabilityConfig,
)
from meshcast.group.stability import AckVector
from meshcast.ids import NodeId
from meshcast.wire.group import GroupAck

A, B, C = NodeId(1), NodeId(2), NodeId(3)
VIEW = GroupView.of([A, B, C], number=1)
NOTHING: AckVector = ((A, 0, 0, 0), (B, 0, 0, 0), (C, 0, 0, 0))


class Paths:
    """The driver's answer to "is something of ours still in flight to dest?"."""

    def __init__(self) -> None:
        self.busy: set[NodeId] = set()

    def __call__(self, dest: NodeId) -> bool:
        return dest in self.busy


def protocols(config: RepairConfig | None = None) -> tuple[Repair, Stability, Paths]:
    keep = Stability(A, StabilityConfig())
    paths = Paths()
    repair = Repair(A, config or RepairConfig(repair_after=1.0), keep, paths)
    keep.reset(VIEW, NOTHING, 0.0)
    repair.reset(VIEW)
    return repair, keep, paths


def look(repair: Repair, holding: AckVector, now: float) -> list[GroupEffect]:
    effects: list[GroupEffect] = []
    if repair.due(now):
        repair.look(holding, now, effects)
    return effects


def test_a_copy_goes_again_only_to_the_destination_that_lacks_it() -> None:
    repair, keep, _ = protocols()
    assert repair.deadline() is None  # nothing kept: nothing to repair
    keep.retain(A, "pruned", ((B, 1), (C, 1)), b"ours", 0.0)
    # B acknowledged it; C stays silent
    keep.on_ack(B, GroupAck(VIEW.view_id, ((A, 1, 0, 0), (B, 0, 0, 0), (C, 0, 0, 0))), NOTHING, 0.1)
    assert look(repair, NOTHING, 0.5) == []  # not repair_after old yet
    assert repair.deadline() == 1.0  # every repair_after / 2
    assert look(repair, NOTHING, 1.0) == [Broadcast((C,), b"ours")]
    assert look(repair, NOTHING, 1.5) == []  # sent again at 1.0: wait another repair_after
    assert look(repair, NOTHING, 2.0) == [Broadcast((C,), b"ours")]
    assert repair.statistics().repairs_sent == 2


def test_nothing_goes_again_while_the_path_still_holds_our_messages() -> None:
    repair, keep, paths = protocols()
    keep.retain(A, "total", ((0, 1),), b"ours", 0.0)
    paths.busy = {B, C}
    assert look(repair, NOTHING, 1.0) == []
    paths.busy = {B}
    assert look(repair, NOTHING, 1.5) == [Broadcast((C,), b"ours")]


def test_each_look_sends_at_most_max_repairs_per_look() -> None:
    repair, keep, _ = protocols(RepairConfig(repair_after=1.0, max_repairs_per_look=2))
    for seq in range(1, 6):
        keep.retain(A, "total", ((0, seq),), b"m%d" % seq, 0.0)
    assert [e.payload for e in look(repair, NOTHING, 1.0) if isinstance(e, Broadcast)] == [
        b"m1",
        b"m2",
    ]
    assert [e.payload for e in look(repair, NOTHING, 1.5) if isinstance(e, Broadcast)] == [
        b"m3",
        b"m4",
    ]
    stats = repair.statistics()
    assert (stats.repairs_sent, stats.looks) == (4, 2)


def test_statistics_is_a_frozen_snapshot() -> None:
    repair, _, _ = protocols()
    stats = repair.statistics()
    assert stats == RepairStats()
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.repairs_sent = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value"),
    [("repair_after", 0.0), ("repair_after", float("nan")), ("max_repairs_per_look", 0)],
)
def test_config_names_the_bad_key(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        RepairConfig(**{field: value})  # type: ignore[arg-type]
    assert info.value.key == field
