"""The stability protocol alone (`meshcast.group.stability.Stability`): copies kept until
every destination's ACK covers them, ACKs, the BLOCKED flag. Hand-built ACKs, explicit now."""

from __future__ import annotations

import dataclasses

import pytest

from meshcast.errors import ConfigError
from meshcast.group import Broadcast, GroupEffect, GroupView, Stability, StabilityConfig
from meshcast.group.stability import AckVector
from meshcast.ids import NodeId
from meshcast.wire.group import GroupAck, decode_group

A, B, C = NodeId(1), NodeId(2), NodeId(3)
VIEW = GroupView.of([A, B, C], number=1)
NOTHING: AckVector = ((A, 0, 0, 0), (B, 0, 0, 0), (C, 0, 0, 0))
SENT_ONE: AckVector = ((A, 0, 0, 1), (B, 0, 0, 0), (C, 0, 0, 0))  # our first stream message


def stability(config: StabilityConfig | None = None) -> Stability:
    keep = Stability(A, config or StabilityConfig())
    keep.reset(VIEW, NOTHING, 0.0)
    return keep


def ack(entries: AckVector, blocked: bool = False, groups: tuple[str, ...] = ()) -> GroupAck:
    return GroupAck(VIEW.view_id, entries, blocked, groups)


def test_a_copy_is_forgotten_once_every_destination_acknowledged_it() -> None:
    keep = stability()
    keep.retain(A, "total", ((0, 1),), b"copy", 0.0)
    assert (keep.statistics().retained_messages, keep.statistics().retained_bytes) == (1, 4)
    keep.on_ack(B, ack(SENT_ONE), SENT_ONE, 0.1)
    assert keep.retained == 1  # C may still lack it
    assert keep.lacking((B, C), SENT_ONE) == {B: [], C: [(A, b"copy")]}
    keep.on_ack(C, ack(SENT_ONE), SENT_ONE, 0.2)
    assert keep.retained == 0
    assert keep.progress_at(C) == 0.2  # C's ACKs cover more of ours


def test_pruned_copies_wait_only_for_their_own_destinations() -> None:
    keep = stability()
    keep.retain(A, "pruned", ((B, 1),), b"to B only", 0.0)
    keep.on_ack(B, ack(((A, 1, 0, 0), (B, 0, 0, 0), (C, 0, 0, 0))), NOTHING, 0.1)
    assert keep.retained == 0


def test_an_ack_goes_when_something_new_is_held_and_only_then() -> None:
    keep = stability(StabilityConfig(ack_interval=0.05))
    assert keep.ack_deadline() is None
    keep.retain(B, "total", ((0, 1),), b"from B", 0.0)
    assert keep.ack_deadline() == float("-inf")  # never sent one: at once
    effects: list[GroupEffect] = []
    holding: AckVector = ((A, 0, 0, 0), (B, 0, 0, 1), (C, 0, 0, 0))
    keep.send_ack(holding, 0.0, effects)
    assert len(effects) == 1
    assert isinstance(effects[0], Broadcast)
    assert effects[0].dests == (B, C)
    assert decode_group(effects[0].payload) == ack(holding)
    keep.retain(C, "total", ((0, 1),), b"from C", 0.01)
    assert keep.ack_deadline() == pytest.approx(0.05)
    assert not keep.ack_ready(0.04)
    assert keep.ack_ready(0.05)
    keep.send_ack(holding, 0.05, effects)  # nothing new in it: not sent
    assert len(effects) == 1
    assert keep.statistics().acks_sent == 1


def test_blocked_acks_hold_back_senders_to_those_groups_only() -> None:
    here, there = stability(), Stability(B, StabilityConfig())
    there.reset(VIEW, NOTHING, 0.0)
    here.set_blocked(["slow"])
    assert here.holds_back(["slow", "other"])
    assert not here.holds_back(["other"])
    effects: list[GroupEffect] = []
    assert here.ack_ready(0.0)  # the others must hear it even with nothing new
    here.send_ack(NOTHING, 0.0, effects)
    [sent] = effects
    assert isinstance(sent, Broadcast)
    message = decode_group(sent.payload)
    assert isinstance(message, GroupAck)
    there.on_ack(A, message, NOTHING, 0.0)
    assert there.holds_back(["slow"])
    assert not there.holds_back(["other"])
    assert (here.statistics().blocked_acks_sent, there.statistics().blocked_acks_received) == (1, 1)
    there.on_ack(A, ack(NOTHING), NOTHING, 0.1)  # unblocked
    assert not there.holds_back(["slow"])


def test_an_ack_that_does_not_fit_the_view_is_dropped() -> None:
    keep = stability()
    keep.retain(A, "total", ((0, 1),), b"copy", 0.0)
    keep.on_ack(B, ack(((A, 0, 0, 1), (B, 0, 0, 0))), SENT_ONE, 0.1)  # C missing
    keep.on_ack(B, ack(((A, 0, 0, 1), (B, 0, 0, 0), (NodeId(9), 0, 0, 0))), SENT_ONE, 0.1)
    assert keep.statistics().malformed_dropped == 2
    assert keep.retained == 1


def test_the_send_window_is_a_quarter_of_the_bounds() -> None:
    config = StabilityConfig(max_retained_messages=8, max_retained_bytes=1000)
    keep = stability(config)
    keep.retain(A, "total", ((0, 1),), b"x", 0.0)
    assert keep.window_open()
    keep.retain(A, "total", ((0, 2),), b"x", 0.0)
    assert not keep.window_open()  # 2 copies of our own: a quarter of 8
    big = stability(config)
    big.retain(A, "total", ((0, 1),), bytes(250), 0.0)
    assert not big.window_open()  # a quarter of the bytes
    peers = stability(config)
    for seq in range(1, 8):
        peers.retain(B, "total", ((0, seq),), b"x", 0.0)
    assert peers.window_open()
    assert not peers.full()
    peers.retain(C, "total", ((0, 1),), b"x", 0.0)
    assert peers.full()  # no room for a peer's next message: ordering refuses it


def test_statistics_is_a_frozen_snapshot() -> None:
    keep = stability()
    stats = keep.statistics()
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.acks_sent = 1  # type: ignore[misc]
    keep.retain(A, "total", ((0, 1),), b"copy", 0.0)
    assert stats.retained_messages == 0
    assert keep.statistics().retained_messages == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ack_interval", -1.0),
        ("ack_interval", float("inf")),
        ("max_retained_messages", 0),
        ("max_retained_bytes", "64MiB"),
    ],
)
def test_config_names_the_bad_key(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        StabilityConfig(**{field: value})  # type: ignore[arg-type]
    assert info.value.key == field
