"""`GroupEngine` as the composition of the four protocols: one GroupConfig split into
theirs, one GroupStats from their snapshots."""

from __future__ import annotations

import pytest

from meshcast.errors import ConfigError
from meshcast.group import (
    Broadcast,
    FlushConfig,
    GroupConfig,
    GroupEffect,
    GroupEngine,
    OrderingConfig,
    RepairConfig,
    StabilityConfig,
    split_config,
)
from meshcast.ids import NodeId
from meshcast.wire.client import ServiceLevel as S

A, B = NodeId(1), NodeId(2)


def test_split_config_gives_each_protocol_its_fields() -> None:
    config = GroupConfig(
        idle_ts_interval=0.005,
        null_lead=4096,
        max_held_messages=501,
        max_future_messages=700,
        ack_interval=0.04,
        flush_retry_interval=0.5,
        repair_after=2.0,
        max_retained_messages=9000,
        max_retained_bytes=8 << 20,
        dedup_window=64,
        max_past_views=4,
    )
    split = split_config(config)
    assert split.ordering == OrderingConfig(0.005, 4096, 501, 64)
    assert split.stability == StabilityConfig(0.04, 9000, 8 << 20)
    assert split.flush == FlushConfig(0.5, 700, 4, max_queued_submits=250)
    assert split.repair == RepairConfig(2.0)
    assert split_config(GroupConfig(max_held_messages=1)).flush.max_queued_submits == 1


def test_group_config_still_names_the_bad_key() -> None:
    with pytest.raises(ConfigError) as info:
        GroupConfig(repair_after=-1.0)
    assert info.value.key == "repair_after"


def pair() -> dict[NodeId, GroupEngine]:
    engines = {n: GroupEngine(n) for n in (A, B)}
    inbox: list[tuple[NodeId, NodeId, bytes]] = []

    def apply(node: NodeId, effects: list[GroupEffect]) -> None:
        inbox.extend(
            (node, d, e.payload) for e in effects if isinstance(e, Broadcast) for d in e.dests
        )

    for n, engine in engines.items():
        engine.set_group_daemons("g", [A, B])
        apply(n, engine.view_installed([A, B], 0.0))
    while inbox:
        source, dest, payload = inbox.pop(0)
        apply(dest, engines[dest].overlay_delivered(source, payload, 0.0))
    return engines


def test_group_stats_are_assembled_from_the_protocols_snapshots() -> None:
    engines = pair()
    a, b = engines[A], engines[B]
    [sent] = [e for e in a.submit(["g"], b"x", S.FIFO, "#c#A", 1.0) if isinstance(e, Broadcast)]
    b.overlay_delivered(A, sent.payload, 1.0)
    b.overlay_delivered(A, sent.payload, 1.0)  # a duplicate
    b.overlay_delivered(A, b"\xff not a group message", 1.0)
    stats, stack = b.statistics(), b.stack_statistics()
    assert stats.delivered == stack.ordering.delivered == 1
    assert stats.duplicates_dropped == stack.ordering.duplicates_dropped == 1
    assert stats.malformed_dropped == stack.undecodable_dropped == 1
    assert stats.views_installed == stack.flush.views_installed == 1
    assert stack.stability.retained_messages == 1  # B's copy, until copies are collected
    assert a.statistics().submitted == a.stack_statistics().ordering.submitted == 1
