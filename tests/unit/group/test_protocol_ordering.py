"""The ordering protocol alone (`meshcast.group.ordering.Ordering`), over a `Stability`:
hand-built messages, explicit now, no engine."""

from __future__ import annotations

import dataclasses

import pytest

from meshcast.errors import BufferFull, ConfigError, UsageError
from meshcast.group import (
    Broadcast,
    Deliver,
    GroupEffect,
    GroupView,
    Ordering,
    OrderingConfig,
    OrderingStats,
    Stability,
    StabilityConfig,
    SubmitConfirmed,
    ViewTransition,
)
from meshcast.ids import NodeId
from meshcast.wire.client import ServiceLevel as S
from meshcast.wire.group import GroupData, GroupNull, decode_group

A, B, C = NodeId(1), NodeId(2), NodeId(3)
VIEW = GroupView.of([A, B, C], number=1)


def stack(
    config: OrderingConfig | None = None, stability: StabilityConfig | None = None
) -> tuple[Ordering, Stability]:
    """Ordering of daemon A in VIEW, every daemon hosting group "g"."""
    keep = Stability(A, stability or StabilityConfig())
    ordering = Ordering(A, config or OrderingConfig(), keep)
    ordering.reset(VIEW)
    keep.reset(VIEW, ordering.ack_vector(), 0.0)
    ordering.set_group_daemons("g", [A, B, C])
    return ordering, keep


def fifo_from_b(n: int, body: bytes, service: S = S.FIFO) -> GroupData:
    return GroupData(service, VIEW.view_id, n, n, 0, 0, 0, "#c#B", ("g",), ((A, n),), (), body)


def bodies(effects: list[GroupEffect]) -> list[bytes]:
    return [e.payload for e in effects if isinstance(e, Deliver)]


def test_fifo_is_held_back_until_the_gap_fills_and_every_copy_is_kept() -> None:
    ordering, keep = stack()
    effects: list[GroupEffect] = []
    assert ordering.received(B, fifo_from_b(2, b"second"), b"raw2", 0.0, effects)
    assert bodies(effects) == []
    assert ordering.held() == 1
    assert ordering.received(B, fifo_from_b(1, b"first"), b"raw1", 0.0, effects)
    assert bodies(effects) == [b"first", b"second"]
    assert keep.retained == 2  # stability keeps both until B's destinations hold them
    assert ordering.ack_vector() == ((A, 0, 0, 0), (B, 2, 0, 0), (C, 0, 0, 0))


def test_a_duplicate_is_counted_and_makes_stability_ack_again() -> None:
    ordering, keep = stack()
    effects: list[GroupEffect] = []
    ordering.received(B, fifo_from_b(1, b"once"), b"raw", 0.0, effects)
    keep.send_ack(ordering.ack_vector(), 0.0, effects)
    assert not keep.ack_ready(1.0)  # told already: nothing new
    assert not ordering.received(B, fifo_from_b(1, b"once"), b"raw", 0.0, effects)
    assert bodies(effects) == [b"once"]
    assert ordering.statistics().duplicates_dropped == 1
    assert keep.ack_ready(1.0)  # the same ACK again: ours may be what was lost


def test_agreed_waits_for_every_members_timestamp() -> None:
    ordering, keep = stack()
    effects = ordering.send(("g",), b"hello", S.AGREED, "#c#A", 0.0, token=7)
    sent = [e for e in effects if isinstance(e, Broadcast)]
    assert [e.dests for e in sent] == [(B, C)]
    assert bodies(effects) == []  # B and C may still send something stamped earlier
    data = decode_group(sent[0].payload)
    assert isinstance(data, GroupData)
    assert (data.ts, data.seq) == (1, 1)
    later: list[GroupEffect] = []
    ordering.received(B, GroupNull(VIEW.view_id, 5, 1, 1), b"nb", 0.0, later)
    assert bodies(later) == []
    ordering.received(C, GroupNull(VIEW.view_id, 5, 1, 1), b"nc", 0.0, later)
    assert bodies(later) == [b"hello"]
    assert SubmitConfirmed(7) in later
    assert keep.retained == 3  # our message and both NULLs, until every ACK covers them
    assert ordering.clock == 1  # NULLs do not move the clock


def agreed(seq: int, ts: int, body: bytes) -> GroupData:
    return GroupData(S.AGREED, VIEW.view_id, seq, ts, seq, 0, 0, "#c", ("g",), (), (), body)


def feed_b_and_c(ordering: Ordering, effects: list[GroupEffect]) -> None:
    """B's AGREED 1 and 2, a NULL of C covering both, B's RELIABLE "r", then C's AGREED."""
    ordering.received(B, agreed(1, 2, b"b1"), b"rb1", 0.0, effects)
    ordering.received(B, agreed(2, 3, b"b2"), b"rb2", 0.0, effects)
    ordering.received(C, GroupNull(VIEW.view_id, 4, 1, 0), b"nc", 0.0, effects)
    ordering.received(B, fifo_from_b(1, b"r", S.RELIABLE), b"rr", 0.0, effects)
    ordering.received(C, agreed(2, 5, b"c5"), b"rc5", 0.0, effects)
    ordering.received(B, GroupNull(VIEW.view_id, 6, 3, 0), b"nb", 0.0, effects)


def test_a_batch_delivers_what_one_by_one_delivers_in_the_same_order() -> None:
    alone, _ = stack()
    one_by_one: list[GroupEffect] = []
    alone.send(("g",), b"own", S.AGREED, "#c#A", 0.0)
    feed_b_and_c(alone, one_by_one)

    batched, _ = stack()
    effects: list[GroupEffect] = []
    batched.begin_batch()
    batched.send(("g",), b"own", S.AGREED, "#c#A", 0.0)
    feed_b_and_c(batched, effects)
    # the RELIABLE message released the AGREED ones received before it, first
    assert bodies(effects) == [b"own", b"b1", b"b2", b"r"]
    batched.end_batch(effects)
    assert bodies(effects) == bodies(one_by_one) == [b"own", b"b1", b"b2", b"r", b"c5"]
    batched.end_batch(effects)  # nothing is left to deliver twice
    assert len(bodies(effects)) == 5


@pytest.mark.parametrize("service", [S.AGREED, S.CAUSAL, S.FIFO])
def test_a_message_that_does_not_encode_takes_no_number(service: S) -> None:
    ordering, _ = stack()
    with pytest.raises(UsageError):
        ordering.send(("g",), b"bad", service, "#c#A", 0.0, msg_type=1 << 16)  # not a u16
    assert ordering.clock == 0
    [sent] = [
        e for e in ordering.send(("g",), b"ok", service, "#c#A", 0.0) if isinstance(e, Broadcast)
    ]
    data = decode_group(sent.payload)
    assert isinstance(data, GroupData)
    assert (data.ts, data.msg_id) == (1, 1)
    assert data.seq == (0 if service == S.FIFO else 1)  # no gap for the receivers to wait on
    assert data.fifo == (((B, 1), (C, 1)) if service == S.FIFO else ())
    assert ordering.ack_vector()[0] == (A, 0, int(service == S.CAUSAL), int(service == S.AGREED))


def test_own_agreed_messages_are_bounded_by_a_members_share_of_half_the_hold_back() -> None:
    ordering, _ = stack(OrderingConfig(max_held_messages=12))  # 12 / (2 x 3 members)
    for _ in range(2):
        ordering.send(("g",), b"x", S.AGREED, "#c#A", 0.0)
    assert not ordering.can_send()
    with pytest.raises(BufferFull):
        ordering.send(("g",), b"x", S.AGREED, "#c#A", 0.0)
    ordering.send(("g",), b"fifo still goes", S.FIFO, "#c#A", 0.0)


def test_at_the_hold_back_bound_only_messages_out_of_order_are_dropped() -> None:
    ordering, keep = stack(OrderingConfig(max_held_messages=2))
    effects: list[GroupEffect] = []
    ordering.received(B, agreed(2, 3, b"b2"), b"rb2", 0.0, effects)
    ordering.received(B, agreed(3, 4, b"b3"), b"rb3", 0.0, effects)  # the bound
    ordering.received(B, agreed(4, 5, b"b4"), b"rb4", 0.0, effects)  # dropped, as if lost
    assert (ordering.held(), ordering.statistics().holdback_overflow) == (2, 1)
    ordering.received(C, GroupNull(VIEW.view_id, 9, 1, 0), b"nc", 0.0, effects)  # in order
    ordering.received(B, agreed(1, 2, b"b1"), b"rb1", 0.0, effects)  # in order: taken
    assert bodies(effects) == [b"b1", b"b2", b"b3"]
    assert ordering.statistics().holdback_overflow == 1
    assert keep.retained == 4  # not the one dropped: its source sends it again
    assert ordering.ack_vector()[1] == (B, 0, 0, 3)  # and our ACK says we lack it
    ordering.received(B, agreed(4, 5, b"b4"), b"rb4", 0.0, effects)  # the repair
    assert bodies(effects)[-1] == b"b4"


def test_finish_delivers_what_is_left_and_reports_the_transition() -> None:
    ordering, _ = stack()
    effects: list[GroupEffect] = []
    ordering.received(B, fifo_from_b(2, b"after a gap"), b"r", 0.0, effects)
    ordering.freeze()
    end = ordering.finish({}, (A, B), effects)  # C departed
    assert ViewTransition(VIEW.view_id, VIEW.members, (A, B)) in effects
    assert bodies(effects) == [b"after a gap"]  # its gap was lost everywhere
    assert (end.delivered, end.discarded, end.undelivered) == (1, 0, ())


def test_statistics_is_a_frozen_snapshot() -> None:
    ordering, _ = stack()
    ordering.send(("g",), b"x", S.RELIABLE, "#c#A", 0.0)
    stats = ordering.statistics()
    assert isinstance(stats, OrderingStats)
    assert (stats.submitted, stats.delivered, stats.clock) == (1, 1, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.submitted = 5  # type: ignore[misc]
    ordering.send(("g",), b"y", S.RELIABLE, "#c#A", 0.0)
    assert stats.submitted == 1
    assert ordering.statistics().submitted == 2


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("idle_ts_interval", 0.0),
        ("idle_ts_interval", float("nan")),
        ("null_lead", 0),
        ("max_held_messages", True),
        ("dedup_window", 1.5),
    ],
)
def test_config_names_the_bad_key(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        OrderingConfig(**{field: value})  # type: ignore[arg-type]
    assert info.value.key == field
