"""The group protocol stack of one daemon: `GroupEngine` composes ordering, stability,
repair and flush (docs/design/group.md, "The protocol stack").

Each protocol is a class with its own config and `statistics()`:

* `Ordering` (group/ordering.py): service levels, numbering, hold-back, delivery, NULLs;
* `Stability` (group/stability.py): copies kept until every destination holds them, ACKs;
* `Repair` (group/repair.py): own copies sent again to destinations still lacking them;
* `Flush` (group/flush.py): view changes with virtual synchrony, and view identity.

The engine routes each input to the protocol that owns it and passes what one protocol
needs from another explicitly (what ordering holds goes to stability as an ACK vector;
the flush asks stability what each member lacks). Message formats: `meshcast.wire.group`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from meshcast.compile_hints import mypyc_attr
from meshcast.errors import BufferFull, DecodeError, UsageError
from meshcast.group.config import GroupConfig, split_config
from meshcast.group.events import GroupEffect, OrderingReset, SubmitLost
from meshcast.group.flush import Flush, FlushStats, Installed, Submission, Verdict
from meshcast.group.ordering import Ordering, OrderingStats
from meshcast.group.repair import Repair, RepairStats
from meshcast.group.stability import Stability, StabilityStats
from meshcast.group.view import GroupView
from meshcast.ids import NodeId
from meshcast.wire.client import ServiceLevel
from meshcast.wire.group import (
    GroupAck,
    GroupFlush,
    GroupMessage,
    decode_group,
    is_batch,
    split_batch,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GroupStats:
    """Counters of the whole stack (a frozen snapshot, from the protocols' own)."""

    submitted: int = 0
    delivered: int = 0  # Deliver effects
    nulls_sent: int = 0
    ordered_not_hosted: int = 0  # processed for ordering, no local member to deliver to
    duplicates_dropped: int = 0
    malformed_dropped: int = 0  # undecodable, or fields that do not fit the view
    stale_view_dropped: int = 0  # sent in a view this daemon already left
    future_buffered: int = 0  # sent in a view not installed here yet: kept
    future_dropped: int = 0  # ...and dropped (buffer full, or that view never came)
    not_member_dropped: int = 0  # from a daemon outside the view
    holdback_overflow: int = 0  # a peer's message dropped at a bound (sent again later)
    undeliverable_on_view_change: int = 0  # discarded by a flush: lost with a daemon
    views_installed: int = 0
    acks_sent: int = 0
    flushes_started: int = 0  # flush rounds (a view change during a flush: another)
    flush_messages_sent: int = 0  # FLUSH parts (first sends and answers to probes)
    flush_copies_sent: int = 0  # message copies carried in them
    flush_bytes_sent: int = 0  # bytes of those parts, per destination
    flush_probes_sent: int = 0  # small RETRY probes to members still silent
    flush_parts_resent: int = 0  # parts sent again because a probe lacked them
    flush_answers_deferred: int = 0  # probes not answered: our path to the prober is busy
    flush_recovered: int = 0  # messages first received inside a FLUSH
    flush_delivered: int = 0  # delivered when a flush completed
    frozen_dropped: int = 0  # old-view messages arriving after this daemon's FLUSH
    stale_flush_dropped: int = 0  # a FLUSH of an earlier round
    submits_queued: int = 0  # local messages sent once the flush completes
    repairs_sent: int = 0  # own copies sent again to destinations lacking them
    blocked_acks_sent: int = 0  # ACKs saying a local `block` member is behind
    blocked_acks_received: int = 0  # ...from other daemons: local senders wait


@dataclass(frozen=True, slots=True)
class StackStats:
    """Each protocol's own snapshot, and the undecodable messages the engine dropped."""

    ordering: OrderingStats
    stability: StabilityStats
    repair: RepairStats
    flush: FlushStats
    undecodable_dropped: int


@mypyc_attr(allow_interpreted_subclasses=True)  # DaemonLayers: tests subclass it
class GroupEngine:
    """The group stack of one daemon. Inputs return effects; nothing here does I/O or
    reads a clock. Call `view_installed` before anything is sent or received."""

    def __init__(
        self,
        local: NodeId,
        config: GroupConfig | None = None,
        *,
        backlogged: Callable[[NodeId], bool] | None = None,
    ) -> None:
        """`backlogged(dest)`: the driver's answer (from the overlay, `OverlayNode.
        backlogged`) to "is what we sent `dest` earlier still in flight on a reliable
        link?"; repairs and FLUSH parts sent again wait while it is. None: never."""
        self.local = local
        self.config = config or GroupConfig()
        split = split_config(self.config)
        in_flight = backlogged or (lambda _: False)
        self._stability = Stability(local, split.stability)
        self._ordering = Ordering(local, split.ordering, self._stability)
        self._repair = Repair(local, split.repair, self._stability, in_flight)
        self._flush = Flush(local, split.flush, self._ordering, self._stability, in_flight)
        self._undecodable = 0
        self._now = 0.0  # of the latest input: no deadline is reported before it

    # ------------------------------------------------------------------ queries

    @property
    def view(self) -> GroupView | None:
        """The view installed last (during a flush: the one being left)."""
        return self._flush.view

    @property
    def flushing(self) -> bool:
        return self._flush.flushing

    @property
    def clock(self) -> int:
        return self._ordering.clock

    def statistics(self) -> GroupStats:
        o = self._ordering.statistics()
        s = self._stability.statistics()
        r = self._repair.statistics()
        f = self._flush.statistics()
        return GroupStats(
            submitted=o.submitted,
            delivered=o.delivered,
            nulls_sent=o.nulls_sent,
            ordered_not_hosted=o.ordered_not_hosted,
            duplicates_dropped=o.duplicates_dropped + f.duplicates_dropped,
            malformed_dropped=(
                self._undecodable + o.malformed_dropped + s.malformed_dropped + f.malformed_dropped
            ),
            stale_view_dropped=f.stale_view_dropped,
            future_buffered=f.future_buffered,
            future_dropped=f.future_dropped,
            not_member_dropped=f.not_member_dropped,
            holdback_overflow=o.holdback_overflow,
            undeliverable_on_view_change=f.undeliverable_on_view_change,
            views_installed=f.views_installed,
            acks_sent=s.acks_sent,
            flushes_started=f.flushes_started,
            flush_messages_sent=f.flush_messages_sent,
            flush_copies_sent=f.flush_copies_sent,
            flush_bytes_sent=f.flush_bytes_sent,
            flush_probes_sent=f.flush_probes_sent,
            flush_parts_resent=f.flush_parts_resent,
            flush_answers_deferred=f.flush_answers_deferred,
            flush_recovered=f.flush_recovered,
            flush_delivered=f.flush_delivered,
            frozen_dropped=f.frozen_dropped,
            stale_flush_dropped=f.stale_flush_dropped,
            submits_queued=f.submits_queued,
            repairs_sent=r.repairs_sent,
            blocked_acks_sent=s.blocked_acks_sent,
            blocked_acks_received=s.blocked_acks_received,
        )

    def stack_statistics(self) -> StackStats:
        """The protocols' own snapshots (with their gauges), one per protocol."""
        return StackStats(
            self._ordering.statistics(),
            self._stability.statistics(),
            self._repair.statistics(),
            self._flush.statistics(),
            self._undecodable,
        )

    def memory(self) -> int:
        """Bytes held for others: copies kept until stable (messages held back for
        order are among them) and messages of a view not installed here yet."""
        return self._stability.retained_bytes() + self._flush.future_bytes()

    def held(self) -> int:
        """Messages held back now (bounded by `max_held_messages`)."""
        return self._ordering.held()

    def can_submit(self) -> bool:
        """Would a local message be taken now? False while our own copies not yet held
        everywhere fill the window, or the flush queue is full. (A slow `block` member
        holds back only messages to its groups: `holds_back`.)"""
        if self._flush.flushing:
            return self._flush.can_queue()
        return self._ordering.can_send()

    def holds_back(self, groups: Iterable[str]) -> bool:
        """Must a local client's message to `groups` wait? True while a `block` member of
        one of them, here or at any daemon of the view (its ACKs say BLOCKED), cannot
        keep up. Other groups keep flowing."""
        return self._stability.holds_back(groups)

    def set_blocked(self, groups: Iterable[str] = (), *, everything: bool = False) -> None:
        """Local `block` members of `groups` cannot keep up (or, with none, can again):
        tell the others in the next ACK, so that their senders to those groups wait too.
        `everything` (or more than MAX_BLOCKED_GROUPS groups) holds back every group."""
        self._stability.set_blocked(groups, everything=everything)

    def hosts(self, groups: Iterable[str]) -> bool:
        """Does this daemon host a member of any of `groups`?"""
        return self._ordering.hosts(groups)

    def next_deadline(self) -> float | None:
        now = self._now
        if self._flush.flushing:
            return self._flush.deadline(now)
        if self._flush.view is None:
            return None
        deadlines = [
            at
            for at in (
                self._ordering.deadline(now),
                self._stability.ack_deadline(),
                self._repair.deadline(),
            )
            if at is not None
        ]
        if not deadlines:
            return None
        return max(min(deadlines), now)

    # ------------------------------------------------------------------ inputs

    def set_group_daemons(self, group: str, daemons: Iterable[NodeId]) -> None:
        """Which daemons host members of `group` (from the group membership layer).

        A group never set here is hosted by no daemon. Every daemon must be told the same
        thing for the same messages, or they disagree on who delivers what.
        """
        self._ordering.set_group_daemons(group, daemons)

    def view_installed(
        self, members: Iterable[NodeId], now: float, incarnations: Sequence[int] = ()
    ) -> list[GroupEffect]:
        """A new daemon view (`incarnations` in the order of the sorted members).

        The same members and incarnations as the view installed (or being flushed to):
        nothing changes. Otherwise a flush starts (docs/design/group.md): the view is
        installed, with `OrderingReset`, once every other member's FLUSH is here.
        """
        self._now = now
        target = GroupView.of(members, incarnations)
        if self.local not in target.index:
            raise UsageError(f"daemon {self.local} is not a member of the view it installs")
        if not self._flush.needed(target):
            return []
        effects: list[GroupEffect] = []
        self._start_flush(target, now, effects)
        return effects

    def submit(
        self,
        groups: Sequence[str],
        payload: bytes,
        service: ServiceLevel,
        sender: str,
        now: float,
        msg_type: int = 0,
        token: int = 0,
    ) -> list[GroupEffect]:
        """A local client's message (during a flush: queued for the new view). Raises
        UsageError (no view, bad names or fields) or BufferFull (the send window, the
        own ordered messages or the flush queue are full: wait, see `can_submit`).
        A `token` asks for `SubmitConfirmed(token)` once the message is delivered here
        (or `SubmitLost(token)` if it never can be)."""
        self._now = now
        if not groups:
            raise UsageError("a message needs at least one group")
        named = tuple(groups)
        if self._flush.flushing:
            self._flush.queue(Submission(named, payload, service, sender, msg_type, token))
            return []
        if self._flush.view is None:
            raise UsageError("no view installed: nothing can be sent yet")
        return self._ordering.send(named, payload, service, sender, now, msg_type, token)

    def begin_batch(self) -> None:
        """`submit`s of one batch follow (a client's frames of one turn): their AGREED and
        SAFE deliveries here wait for `end_batch`, one pass over the total order."""
        self._ordering.begin_batch()

    def end_batch(self) -> list[GroupEffect]:
        """The batch's deliveries, in the order they would have had one by one."""
        effects: list[GroupEffect] = []
        self._ordering.end_batch(effects)
        return effects

    def overlay_delivered(self, source: NodeId, payload: bytes, now: float) -> list[GroupEffect]:
        """A group message, or a BATCH of them, the overlay handed up (sent by daemon
        `source`); a batch's messages are taken in order, each as if it came alone."""
        self._now = now
        effects: list[GroupEffect] = []
        if is_batch(payload):
            try:
                raws = split_batch(payload)
            except DecodeError as exc:
                self._malformed(source, exc)
                return effects
            self._ordering.begin_batch()
            try:
                for raw in raws:
                    self._take(source, raw, now, effects)
            finally:
                self._ordering.end_batch(effects)
        else:
            self._take(source, payload, now, effects)
        return effects

    def _take(self, source: NodeId, raw: bytes, now: float, effects: list[GroupEffect]) -> None:
        try:
            message = decode_group(raw)
        except DecodeError as exc:
            self._malformed(source, exc)
            return
        self._on_message(source, message, raw, now, effects)

    def _malformed(self, source: NodeId, exc: DecodeError) -> None:
        self._undecodable += 1
        log.debug("daemon %s: malformed group message from %s: %s", self.local, source, exc)

    def on_timer(self, now: float) -> list[GroupEffect]:
        self._now = now
        effects: list[GroupEffect] = []
        if self._flush.flushing:
            self._flush.on_timer(now, effects)
            return effects
        if self._flush.view is None:
            return effects
        if self._stability.ack_ready(now):
            self._stability.send_ack(self._ordering.ack_vector(), now, effects)
        if self._repair.due(now):
            self._repair.look(self._ordering.ack_vector(), now, effects)
        self._ordering.on_timer(now, effects)
        return effects

    # ------------------------------------------------------------------ routing

    def _on_message(
        self,
        source: NodeId,
        message: GroupMessage,
        raw: bytes,
        now: float,
        effects: list[GroupEffect],
    ) -> None:
        if isinstance(message, GroupFlush):
            # what a batch made deliverable goes before a flush starts (it freezes that)
            self._ordering.end_batch(effects)
            self._on_flush(source, message, raw, now, effects)
            return
        if not self._flush.admit(source, message, raw):
            return  # of another view, from outside it, or our FLUSH is out
        if isinstance(message, GroupAck):
            self._stability.on_ack(source, message, self._ordering.ack_vector(), now)
        else:
            self._ordering.received(source, message, raw, now, effects)

    def _on_flush(
        self,
        source: NodeId,
        message: GroupFlush,
        raw: bytes,
        now: float,
        effects: list[GroupEffect],
    ) -> None:
        verdict = self._flush.check(source, message, now, effects)
        if verdict is Verdict.HANDLED:
            return
        if verdict is Verdict.REJOIN:
            # The sender saw the view change and come back; we did not. Flush with it,
            # or it waits for our FLUSH for ever.
            assert self._flush.view is not None  # REJOIN: towards the view we have
            self._start_flush(self._flush.view.numbered(0), now, effects)
            if message.retry:
                return
        if self._flush.take(source, message, raw, now, effects):
            self._try_complete(now, effects)

    # ------------------------------------------------------------------ view changes

    def _start_flush(self, target: GroupView, now: float, effects: list[GroupEffect]) -> None:
        self._flush.start(target, now, effects)
        self._replay_future(now, effects)
        self._try_complete(now, effects)

    def _try_complete(self, now: float, effects: list[GroupEffect]) -> None:
        """Install the flush's view once every other member's FLUSH is complete; then
        take what waited for it: messages of the new view, local submits."""
        installed = self._flush.complete(effects)
        if installed is None:
            return
        self._install(installed, now, effects)
        self._replay_future(now, effects)
        for queued in self._flush.take_queued():
            try:
                effects.extend(
                    self.submit(
                        queued.groups,
                        queued.payload,
                        queued.service,
                        queued.sender,
                        now,
                        queued.msg_type,
                        queued.token,
                    )
                )
            except (BufferFull, UsageError) as exc:
                log.warning("daemon %s: a message queued in a flush is lost: %s", self.local, exc)
                if queued.token:
                    effects.append(SubmitLost(queued.token, str(exc)))

    def _install(self, installed: Installed, now: float, effects: list[GroupEffect]) -> None:
        """Every protocol starts the new view afresh."""
        view = installed.view
        self._ordering.reset(view)
        self._stability.reset(view, self._ordering.ack_vector(), now)
        self._repair.reset(view)
        effects.append(
            OrderingReset(installed.old_view_id, view.view_id, view.members, installed.undelivered)
        )

    def _replay_future(self, now: float, effects: list[GroupEffect]) -> None:
        """Messages kept for a view or flush not here yet: take those now applicable."""
        for source, message, raw in self._flush.replay():
            self._on_message(source, message, raw, now, effects)
