"""The flush protocol alone (`meshcast.group.flush.Flush`) over ordering and stability:
FLUSH parts carried by hand between two daemons, lost when a test says so. Explicit now."""

from __future__ import annotations

import dataclasses

import pytest

from meshcast.errors import BufferFull, ConfigError
from meshcast.group import (
    Broadcast,
    Deliver,
    Flush,
    FlushConfig,
    FlushStats,
    GroupEffect,
    GroupView,
    Ordering,
    OrderingConfig,
    Stability,
    StabilityConfig,
)
from meshcast.group.flush import Installed, Submission, Verdict
from meshcast.ids import NodeId
from meshcast.wire.client import ServiceLevel as S
from meshcast.wire.group import GroupFlush, GroupNull, decode_group, encode_group

A, B = NodeId(1), NodeId(2)


class Daemon:
    """One daemon's flush over its ordering and stability, wired as the engine wires them."""

    def __init__(self, local: NodeId, config: FlushConfig | None = None) -> None:
        self.local = local
        self.stability = Stability(local, StabilityConfig())
        self.ordering = Ordering(local, OrderingConfig(), self.stability)
        self.ordering.set_group_daemons("g", [A, B])
        self.flush = Flush(
            local, config or FlushConfig(), self.ordering, self.stability, lambda _: False
        )
        self.out: list[bytes] = []  # FLUSH parts and probes sent to the other daemon
        self.delivered: list[bytes] = []
        self.installed: list[Installed] = []

    def apply(self, effects: list[GroupEffect]) -> None:
        for effect in effects:
            if isinstance(effect, Broadcast):
                self.out.append(effect.payload)
            elif isinstance(effect, Deliver):
                self.delivered.append(effect.payload)

    def start(self, target: GroupView, now: float) -> None:
        effects: list[GroupEffect] = []
        self.flush.start(target, now, effects)
        self.apply(effects)
        self.try_complete(now)

    def receive(self, source: NodeId, raw: bytes, now: float) -> None:
        message = decode_group(raw)
        assert isinstance(message, GroupFlush)
        effects: list[GroupEffect] = []
        verdict = self.flush.check(source, message, now, effects)
        if verdict is Verdict.TAKE and self.flush.take(source, message, raw, now, effects):
            self.apply(effects)
            self.try_complete(now)
        else:
            self.apply(effects)

    def try_complete(self, now: float) -> None:
        effects: list[GroupEffect] = []
        installed = self.flush.complete(effects)
        self.apply(effects)
        if installed is not None:
            self.ordering.reset(installed.view)
            self.stability.reset(installed.view, self.ordering.ack_vector(), now)
            self.installed.append(installed)

    def timer(self, now: float) -> None:
        effects: list[GroupEffect] = []
        self.flush.on_timer(now, effects)
        self.apply(effects)

    def take_out(self) -> list[bytes]:
        out, self.out = self.out, []
        return out


def carry(frm: Daemon, to: Daemon, now: float) -> None:
    for raw in frm.take_out():
        to.receive(frm.local, raw, now)


def first_view() -> tuple[Daemon, Daemon, GroupView]:
    a, b = Daemon(A), Daemon(B)
    target = GroupView.of([A, B])
    a.start(target, 0.0)
    b.start(target, 0.0)
    carry(a, b, 0.0)
    carry(b, a, 0.0)
    return a, b, target


def test_both_install_the_same_numbered_view_once_each_flush_is_heard() -> None:
    a, b, target = first_view()
    assert [i.view for i in a.installed] == [i.view for i in b.installed] == [target.numbered(1)]
    assert a.installed[0].old_view_id is None
    stats = a.flush.statistics()
    assert (stats.flushes_started, stats.flush_messages_sent, stats.views_installed) == (1, 1, 1)
    assert stats.flush_bytes_sent > 0
    assert not a.flush.flushing
    assert a.flush.view == target.numbered(1)


def test_a_flush_carries_the_copies_a_member_lacks() -> None:
    a, b, _ = first_view()
    effects = a.ordering.send(("g",), b"lost on the way", S.FIFO, "#c#A", 1.0)
    assert any(isinstance(e, Broadcast) for e in effects)  # ...and lost: B never gets it
    again = GroupView.of([A, B], [1, 1])  # both restarted their overlay incarnation
    a.start(again, 2.0)
    b.start(again, 2.0)
    carry(a, b, 2.0)
    carry(b, a, 2.0)
    assert b.delivered == [b"lost on the way"]
    assert b.flush.statistics().flush_recovered == 1
    assert a.flush.statistics().flush_copies_sent == 1
    assert a.installed[-1].view == b.installed[-1].view == again.numbered(2)


def test_a_silent_member_is_probed_and_answers_with_the_parts_missing() -> None:
    a, b = Daemon(A), Daemon(B)
    target = GroupView.of([A, B])
    a.start(target, 0.0)
    b.start(target, 0.0)
    a.take_out()  # both FLUSHes are lost
    b.take_out()
    assert a.flush.deadline(0.0) == 0.25
    a.timer(0.25)
    assert a.flush.statistics().flush_probes_sent == 1
    assert a.flush.deadline(0.25) == 0.5
    carry(a, b, 0.25)  # the probe: B answers with its FLUSH
    assert b.flush.statistics().flush_parts_resent == 1
    carry(b, a, 0.25)
    assert a.installed
    assert not b.installed
    b.timer(0.25)  # B probes too; A still answers for the view it installed
    carry(b, a, 0.25)
    carry(a, b, 0.25)
    assert [i.view for i in b.installed] == [i.view for i in a.installed]


def test_local_messages_wait_in_a_bounded_queue_during_a_flush() -> None:
    flush = Daemon(A, FlushConfig(max_queued_submits=1)).flush
    waiting = Submission(("g",), b"x", S.AGREED, "#c#A", 0, 0)
    flush.queue(waiting)
    assert not flush.can_queue()
    with pytest.raises(BufferFull):
        flush.queue(waiting)
    assert flush.statistics().queued_submits == 1
    assert list(flush.take_queued()) == [waiting]
    assert flush.statistics() == FlushStats(submits_queued=1)


def test_messages_of_a_future_view_wait_and_of_a_past_view_are_dropped() -> None:
    a, b = Daemon(A), Daemon(B)
    view = GroupView.of([A, B]).numbered(1)
    early = GroupNull(view.view_id, 1, 1, 0)
    assert not a.flush.admit(B, early, encode_group(early))  # before A installed it
    assert a.flush.statistics().future_buffered == 1
    target = GroupView.of([A, B])
    a.start(target, 0.0)
    b.start(target, 0.0)
    carry(b, a, 0.0)
    assert [source for source, _, _ in a.flush.replay()] == [B]  # now it can be taken
    assert a.flush.admit(B, early, encode_group(early))
    again = GroupView.of([A, B], [1, 1])
    a.start(again, 1.0)
    assert not a.flush.admit(B, early, encode_group(early))  # A's FLUSH is out
    assert a.flush.statistics().frozen_dropped == 1
    b.start(again, 1.0)
    carry(b, a, 1.0)
    assert a.flush.view == again.numbered(2)
    assert not a.flush.admit(B, early, encode_group(early))
    assert a.flush.statistics().stale_view_dropped == 1


def test_messages_of_a_view_never_installed_go_once_their_sender_is_heard_here() -> None:
    """A partition view this daemon missed never comes: once its sender's first message
    in our view arrives, what it sent before for that view is dropped, not kept until
    the buffer overflows (the daemon's memory returns to its level after the faults)."""
    a, _, _ = first_view()
    missed = GroupView.of([B], [7]).numbered(9)  # B's view while cut off from A
    stale = GroupNull(missed.view_id, 5, 5, 0)
    assert not a.flush.admit(B, stale, encode_group(stale))
    assert a.flush.future_bytes() == len(encode_group(stale))
    current = GroupNull(a.flush.view.view_id, 1, 1, 0)  # type: ignore[union-attr]
    assert a.flush.admit(B, current, encode_group(current))
    assert a.flush.future_bytes() == 0
    assert a.flush.statistics().future_dropped == 1
    later = GroupNull(missed.view_id, 6, 6, 0)  # B heard already: this one waits
    assert not a.flush.admit(B, later, encode_group(later))
    assert a.flush.statistics().future_messages == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("flush_retry_interval", 0.0),
        ("max_future_messages", 0),
        ("max_past_views", -1),
        ("max_queued_submits", 2.5),
        ("max_part_bytes", 0),
    ],
)
def test_config_names_the_bad_key(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        FlushConfig(**{field: value})  # type: ignore[arg-type]
    assert info.value.key == field


def test_statistics_is_a_frozen_snapshot() -> None:
    stats = Daemon(A).flush.statistics()
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.views_installed = 1  # type: ignore[misc]
