"""Flush: the view change that gives virtual synchrony (JGroups' FLUSH, with the part of
GMS that tells views apart).

When the overlay installs a daemon view with other members or incarnations, each daemon
freezes the view it is in (ordering delivers no more AGREED/SAFE, nothing more is sent or
taken in it, local submits wait), and sends every other member of the new view its FLUSH:
its last installed view, its (incarnation, round), its count of views, its total-order
stream prefixes, and the copies that member has not acknowledged (stability knows which).
A daemon takes the copies carried by FLUSHes from its own view through ordering's normal
receive path, and installs the new view once it holds every other member's complete
FLUSH: every survivor then holds the same union of copies and ordering ends the old view
the same way at each (`Ordering.finish`). Members whose FLUSH does not come are probed.

This protocol also owns the identity of views: the view installed, the earlier ones whose
late messages are dropped, and the messages of a view not installed here yet, kept until
it is. Theory: docs/design/group.md, "Virtual synchrony" and "Views".
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from meshcast.errors import BufferFull, DecodeError
from meshcast.group.config import FlushConfig
from meshcast.group.events import Broadcast, GroupEffect, MessageRef
from meshcast.group.ordering import PRUNED, Ordering
from meshcast.group.stability import Stability
from meshcast.group.view import GroupView
from meshcast.ids import NodeId
from meshcast.wire.client import ServiceLevel
from meshcast.wire.group import (
    NO_VIEW,
    GroupData,
    GroupFlush,
    GroupMessage,
    GroupNull,
    decode_group,
    encode_group,
)


@dataclass(frozen=True, slots=True)
class FlushStats:
    """Counters of the flush protocol (a frozen snapshot)."""

    views_installed: int = 0
    flushes_started: int = 0  # flush rounds (a view change during a flush: another)
    flush_messages_sent: int = 0  # FLUSH parts (first sends and answers to probes)
    flush_copies_sent: int = 0  # message copies carried in them
    flush_bytes_sent: int = 0  # bytes of those parts, per destination
    flush_probes_sent: int = 0  # small RETRY probes to members still silent
    flush_parts_resent: int = 0  # parts sent again because a probe lacked them
    flush_answers_deferred: int = 0  # probes not answered: our path to the prober is busy
    flush_recovered: int = 0  # messages first received inside a FLUSH
    flush_delivered: int = 0  # delivered when a flush completed
    undeliverable_on_view_change: int = 0  # discarded by a flush: lost with a daemon
    frozen_dropped: int = 0  # old-view messages arriving after this daemon's FLUSH
    stale_flush_dropped: int = 0  # a FLUSH of an earlier round
    submits_queued: int = 0  # local messages sent once the flush completes
    stale_view_dropped: int = 0  # sent in a view this daemon already left
    future_buffered: int = 0  # sent in a view not installed here yet: kept
    future_dropped: int = 0  # ...and dropped (buffer full, or that view never came)
    not_member_dropped: int = 0  # from a daemon outside the view
    duplicates_dropped: int = 0  # FLUSH parts already held
    malformed_dropped: int = 0  # carried copies that do not fit the view
    future_messages: int = 0  # kept for a view not installed yet, now (gauge)
    queued_submits: int = 0  # local messages waiting for the view change, now (gauge)


@dataclass(slots=True)
class _Counters:
    """The cumulative counters of `FlushStats`, bumped in place."""

    views_installed: int = 0
    flushes_started: int = 0
    flush_messages_sent: int = 0
    flush_copies_sent: int = 0
    flush_bytes_sent: int = 0
    flush_probes_sent: int = 0
    flush_parts_resent: int = 0
    flush_answers_deferred: int = 0
    flush_recovered: int = 0
    flush_delivered: int = 0
    undeliverable_on_view_change: int = 0
    frozen_dropped: int = 0
    stale_flush_dropped: int = 0
    submits_queued: int = 0
    stale_view_dropped: int = 0
    future_buffered: int = 0
    future_dropped: int = 0
    not_member_dropped: int = 0
    duplicates_dropped: int = 0
    malformed_dropped: int = 0


@dataclass(frozen=True, slots=True)
class Submission:
    """A local client's message that waits for the view change (`GroupEngine.submit`)."""

    groups: tuple[str, ...]
    payload: bytes
    service: ServiceLevel
    sender: str
    msg_type: int
    token: int


@dataclass(frozen=True, slots=True)
class Installed:
    """A flush completed: the old view is finished, `view` is installed."""

    view: GroupView
    old_view_id: bytes | None
    undelivered: tuple[MessageRef, ...]  # held for local members, discarded


class Verdict(enum.Enum):
    """What the engine does next with a FLUSH message (`Flush.check`)."""

    HANDLED = enum.auto()  # dropped (counted) or answered: nothing more
    REJOIN = enum.auto()  # the sender flushes towards our own view: start a flush there
    TAKE = enum.auto()  # a part of a flush: `take` it


@dataclass(slots=True)
class _Report:
    """One member's FLUSH (all parts of its latest round) towards the flush's target."""

    round: tuple[int, int]  # (incarnation, round)
    from_view: bytes
    views: int
    parts: int
    got: set[int] = field(default_factory=set)
    prefixes: dict[NodeId, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.got) == self.parts


@dataclass(slots=True)
class _Round:
    """A flush in progress towards `target` (a membership: number 0)."""

    target: GroupView
    own_prefixes: dict[NodeId, int]  # what our FLUSH reported
    reports: dict[NodeId, _Report] = field(default_factory=dict)
    # per member not fully heard: when to probe it next, and the current probe interval
    # (doubling while it stays silent, reset by each part that arrives from it: parts
    # still coming in means the rest is in flight, not lost)
    probe_at: dict[NodeId, float] = field(default_factory=dict)
    probe_delay: dict[NodeId, float] = field(default_factory=dict)


class Flush:
    """View changes of one daemon. Sans-I/O; ordering and stability are the protocols
    below it (it freezes and finishes ordering's view, asks stability what is missing).
    `backlogged(dest)`: is what we sent `dest` earlier still in flight on a reliable
    link? (FLUSH parts are not sent again while it is.)"""

    def __init__(
        self,
        local: NodeId,
        config: FlushConfig,
        ordering: Ordering,
        stability: Stability,
        backlogged: Callable[[NodeId], bool],
    ) -> None:
        self.local = local
        self.config = config
        self._ordering = ordering
        self._stability = stability
        self._backlogged = backlogged
        self.view: GroupView | None = None  # installed last (during a flush: being left)
        self._unheard: set[NodeId] = set()  # members with no message in `view` yet
        self._round: _Round | None = None
        self._rounds = 0  # our flush rounds so far
        self._views = 0  # views installed so far (the number of the last one)
        # latest (incarnation, flush round) seen per daemon: anything earlier is stale
        self._peer_round: dict[NodeId, tuple[int, int]] = {}
        # our latest FLUSH, per member of its target (each gets only the copies it lacks),
        # kept to answer probes until every member has been heard in the view it installs
        self._sent: dict[NodeId, tuple[GroupFlush, ...]] = {}
        self._retry_at = 0.0  # while flushing: the next probe due
        self._answered: dict[NodeId, float] = {}  # when we last answered a daemon's probe
        self._queued: deque[Submission] = deque()
        self._past_views: deque[bytes] = deque(maxlen=config.max_past_views)
        self._future: deque[tuple[NodeId, GroupMessage, bytes]] = deque()
        self._heard: set[NodeId] = set()  # members with a message admitted in this view
        self._counters = _Counters()

    # ------------------------------------------------------------------ queries

    @property
    def flushing(self) -> bool:
        return self._round is not None

    def statistics(self) -> FlushStats:
        c = self._counters
        return FlushStats(
            views_installed=c.views_installed,
            flushes_started=c.flushes_started,
            flush_messages_sent=c.flush_messages_sent,
            flush_copies_sent=c.flush_copies_sent,
            flush_bytes_sent=c.flush_bytes_sent,
            flush_probes_sent=c.flush_probes_sent,
            flush_parts_resent=c.flush_parts_resent,
            flush_answers_deferred=c.flush_answers_deferred,
            flush_recovered=c.flush_recovered,
            flush_delivered=c.flush_delivered,
            undeliverable_on_view_change=c.undeliverable_on_view_change,
            frozen_dropped=c.frozen_dropped,
            stale_flush_dropped=c.stale_flush_dropped,
            submits_queued=c.submits_queued,
            stale_view_dropped=c.stale_view_dropped,
            future_buffered=c.future_buffered,
            future_dropped=c.future_dropped,
            not_member_dropped=c.not_member_dropped,
            duplicates_dropped=c.duplicates_dropped,
            malformed_dropped=c.malformed_dropped,
            future_messages=len(self._future),
            queued_submits=len(self._queued),
        )

    def needed(self, target: GroupView) -> bool:
        """Does the daemon view `target` (number 0) start a flush? Not if it is the view
        installed, or the one a flush already goes to."""
        flush = self._round
        if flush is not None:
            return flush.target.view_id != target.view_id
        return self.view is None or self.view.numbered(0) != target

    def can_queue(self) -> bool:
        return len(self._queued) < self.config.max_queued_submits

    def deadline(self, now: float) -> float | None:
        return max(self._retry_at, now) if self._round is not None else None

    # ------------------------------------------------------------------ local input

    def queue(self, submission: Submission) -> None:
        """Keep a local message for the new view; BufferFull when the queue is full."""
        if not self.can_queue():
            raise BufferFull(f"{len(self._queued)} messages wait for the view change")
        self._queued.append(submission)
        self._counters.submits_queued += 1

    def take_queued(self) -> deque[Submission]:
        """The local messages queued during the flush just completed (to send now)."""
        queued, self._queued = self._queued, deque()
        return queued

    # ------------------------------------------------------------------ messages of other views

    def admit(self, source: NodeId, message: GroupMessage, raw: bytes) -> bool:
        """May a DATA, NULL or ACK message go on to stability or ordering? Not if it is
        of an earlier view (dropped), of a view not installed yet (kept for it), from
        outside the view, or of a view this daemon is flushing out of (its sender's
        FLUSH carries it)."""
        view = self.view
        if view is None or message.view_id != view.view_id:
            if message.view_id in self._past_views:
                self._counters.stale_view_dropped += 1
                return False
            self._buffer_future(source, message, raw)
            return False
        if source == self.local or source not in view.index:
            self._counters.not_member_dropped += 1
            return False
        if source not in self._heard:
            self._heard.add(source)
            self._forget_future_of(source)
        if self._round is None and self._sent and source in self._unheard:
            self._unheard.discard(source)
            if not self._unheard:  # every member installed this view: none needs our FLUSH
                self._sent = {}
                self._answered.clear()
        if self._round is not None:
            self._counters.frozen_dropped += 1  # our FLUSH is out: its sender's FLUSH has it
            return False
        return True

    def replay(self) -> Iterator[tuple[NodeId, GroupMessage, bytes]]:
        """The messages kept for a view or flush not here yet, to be taken again now (a
        message of a view left since is dropped). Each is judged as it is reached: taking
        one may install a view."""
        future, self._future = self._future, deque()
        for source, message, raw in future:
            if message.view_id in self._past_views:
                self._counters.future_dropped += 1
            else:
                yield source, message, raw

    def future_bytes(self) -> int:
        """Bytes of the messages kept for a view not installed here yet."""
        return sum(len(raw) for _, _, raw in self._future)

    def _forget_future_of(self, source: NodeId) -> None:
        """`source`'s first message in our view is here: what it sent for a view we
        never installed came before it, so that view is behind `source` too (a partition
        view we missed) and never comes here. Dropped, or it would stay until the
        buffer overflows. (A message of a view newer than ours that overtook it would be
        lost here only to be repaired: its sender keeps it until we acknowledge it.)"""
        if not any(entry[0] == source for entry in self._future):
            return
        kept = deque(entry for entry in self._future if entry[0] != source)
        self._counters.future_dropped += len(self._future) - len(kept)
        self._future = kept

    def _buffer_future(self, source: NodeId, message: GroupMessage, raw: bytes) -> None:
        if len(self._future) >= self.config.max_future_messages:
            self._future.popleft()
            self._counters.future_dropped += 1
        self._future.append((source, message, raw))
        self._counters.future_buffered += 1

    # ------------------------------------------------------------------ the flush

    def start(self, target: GroupView, now: float, effects: list[GroupEffect]) -> None:
        """Stop sending in the current view; send our FLUSH towards `target`: to each
        other member, the copies it has not acknowledged (a copy it holds, or one not
        meant for it, would only be dropped as a duplicate)."""
        self._rounds += 1
        self._counters.flushes_started += 1
        view = self.view
        prefixes = self._ordering.freeze()
        flush = _Round(target, prefixes)
        self._round = flush
        from_view = view.view_id if view is not None else NO_VIEW
        reported = tuple((int(m), p) for m, p in sorted(prefixes.items()))
        incarnation = self._incarnation_in(target)
        others = tuple(m for m in target.members if m != self.local)
        lacking = self._stability.lacking(others, self._ordering.ack_vector())
        self._sent = {}
        self._answered.clear()
        interval = self.config.flush_retry_interval
        for m in others:
            carried = lacking.get(m, [])
            chunks: list[list[tuple[int, bytes]]] = [[]]
            size = 0
            for copy in carried:
                if chunks[-1] and size + len(copy[1]) > self.config.max_part_bytes:
                    chunks.append([])
                    size = 0
                chunks[-1].append(copy)
                size += len(copy[1])
            self._sent[m] = tuple(
                GroupFlush(
                    target.view_id,
                    from_view,
                    incarnation,
                    self._rounds,
                    self._views,
                    part,
                    len(chunks),
                    reported,
                    tuple(chunk),
                )
                for part, chunk in enumerate(chunks)
            )
            self._send_parts(m, self._sent[m], effects)
            self._counters.flush_copies_sent += len(carried)
            flush.probe_at[m] = now + interval
            flush.probe_delay[m] = interval
        self._retry_at = now + interval

    def check(
        self, source: NodeId, message: GroupFlush, now: float, effects: list[GroupEffect]
    ) -> Verdict:
        """A FLUSH message (a part or a probe): drop it if stale, answer a probe, or say
        that the sender flushes towards the view we have (we missed the view change and
        its return: REJOIN, or it waits for our FLUSH for ever)."""
        if source == self.local:
            self._counters.not_member_dropped += 1
            return Verdict.HANDLED
        sender_round = (message.incarnation, message.round)
        if sender_round < self._peer_round.get(source, (0, 0)):
            self._counters.stale_flush_dropped += 1
            return Verdict.HANDLED
        view = self.view
        towards_ours = (
            self._round is None and view is not None and message.view_id == view.numbered(0).view_id
        )
        if message.retry:
            if towards_ours and sender_round > self._peer_round.get(source, (0, 0)):
                return Verdict.REJOIN  # a new round of the sender: flush with it
            self._answer(source, message, now, effects)
            return Verdict.HANDLED
        if towards_ours:
            if sender_round == self._peer_round.get(source):
                self._counters.stale_flush_dropped += 1  # a part of the round we completed
                return Verdict.HANDLED
            return Verdict.REJOIN
        return Verdict.TAKE

    def take(
        self,
        source: NodeId,
        message: GroupFlush,
        raw: bytes,
        now: float,
        effects: list[GroupEffect],
    ) -> bool:
        """A part of a member's FLUSH (after `check`): note it, take the copies it carries
        through ordering. True if it was new (the flush may now be complete)."""
        flush = self._round
        if flush is None or message.view_id != flush.target.view_id:
            self._buffer_future(source, message, raw)  # a flush we have not started yet
            return False
        if source not in flush.target.index:
            self._counters.not_member_dropped += 1
            return False
        sender_round = (message.incarnation, message.round)
        self._peer_round[source] = sender_round
        report = flush.reports.get(source)
        if report is None or report.round < sender_round:
            report = _Report(sender_round, message.from_view, message.views, message.parts)
            flush.reports[source] = report
        if message.part in report.got or message.parts != report.parts:
            self._counters.duplicates_dropped += 1
            return False
        report.got.add(message.part)
        # a part came in: the rest is in flight, probe only if it stops coming
        interval = self.config.flush_retry_interval
        flush.probe_delay[source] = interval
        flush.probe_at[source] = now + interval
        view = self.view
        if view is not None and message.from_view == view.view_id:
            for member, prefix in message.prefixes:
                m = NodeId(member)
                report.prefixes[m] = max(report.prefixes.get(m, 0), prefix)
            for origin, data in message.messages:
                self._merge(view, NodeId(origin), data, now, effects)
        return True

    def complete(self, effects: list[GroupEffect]) -> Installed | None:
        """If every other member's FLUSH is complete: end the old view (ordering delivers
        what the flush agreed on) and install the new one, numbered one more than any
        member's count of views. The engine then resets the other protocols."""
        flush = self._round
        if flush is None:
            return None
        reports = flush.reports
        for m in flush.target.members:
            if m != self.local and (m not in reports or not reports[m].complete):
                return None
        number = max([self._views, *(r.views for r in reports.values())]) + 1
        view = flush.target.numbered(number)
        old = self.view
        undelivered: tuple[MessageRef, ...] = ()
        if old is not None:
            undelivered = self._finish_view(old, flush, effects)
            self._past_views.append(old.view_id)
        self._views = number
        self._round = None
        self.view = view
        self._unheard = {m for m in view.members if m != self.local}
        self._heard = set()
        self._counters.views_installed += 1
        return Installed(view, old.view_id if old is not None else None, undelivered)

    def on_timer(self, now: float, effects: list[GroupEffect]) -> None:
        flush = self._round
        if flush is not None and now >= self._retry_at:
            self._retry(flush, now, effects)

    # ------------------------------------------------------------------ helpers

    def _finish_view(
        self, view: GroupView, flush: _Round, effects: list[GroupEffect]
    ) -> tuple[MessageRef, ...]:
        """Ordering ends `view` with each total-order stream cut at the longest prefix
        any survivor reported; the survivors are the members whose FLUSH came from it."""
        ends = dict(flush.own_prefixes)
        for report in flush.reports.values():
            if report.from_view == view.view_id:
                for m, prefix in report.prefixes.items():
                    ends[m] = max(ends.get(m, 0), prefix)
        reports = flush.reports
        survivors = tuple(
            m
            for m in view.members
            if m == self.local or (m in reports and reports[m].from_view == view.view_id)
        )
        end = self._ordering.finish(ends, survivors, effects)
        self._counters.flush_delivered += end.delivered
        self._counters.undeliverable_on_view_change += end.discarded
        return end.undelivered

    def _merge(
        self, view: GroupView, source: NodeId, raw: bytes, now: float, effects: list[GroupEffect]
    ) -> None:
        """A copy carried by a FLUSH: taken like a message received in the view."""
        try:
            message = decode_group(raw)
        except DecodeError:
            self._counters.malformed_dropped += 1
            return
        if (
            not isinstance(message, GroupData | GroupNull)
            or message.view_id != view.view_id
            or (isinstance(message, GroupData) and message.service == ServiceLevel.UNRELIABLE)
            or source not in view.index
        ):
            self._counters.malformed_dropped += 1
            return
        if source == self.local:
            return  # our own: we have it
        if (
            isinstance(message, GroupData)
            and message.service in PRUNED
            and all(d != self.local for d, _ in message.fifo)
        ):
            return  # for other daemons
        if self._ordering.received(source, message, raw, now, effects):
            self._counters.flush_recovered += 1  # not a duplicate: we lacked it

    def _send_parts(
        self, dest: NodeId, parts: Iterable[GroupFlush], effects: list[GroupEffect]
    ) -> int:
        sent = 0
        for message in parts:
            encoded = encode_group(message)
            effects.append(Broadcast((dest,), encoded))
            self._counters.flush_messages_sent += 1
            self._counters.flush_bytes_sent += len(encoded)
            sent += 1
        return sent

    def _retry(self, flush: _Round, now: float, effects: list[GroupEffect]) -> None:
        """Still flushing: probe each member whose FLUSH is incomplete and from which no
        part came for a while. A probe is small: it lists the parts we hold, and the
        member answers with the rest. Over a reliable link a FLUSH in flight is never
        sent twice: the member resends only on a probe, a probe waits until the
        member's parts stop coming in, and its interval doubles while the member stays
        silent (up to 8 x flush_retry_interval)."""
        interval = self.config.flush_retry_interval
        due: list[float] = []
        for m in flush.target.members:
            if m == self.local:
                continue
            report = flush.reports.get(m)
            if report is not None and report.complete:
                continue
            at = flush.probe_at.get(m, now)
            if now >= at:
                delay = flush.probe_delay.get(m, interval)
                probe = GroupFlush(
                    flush.target.view_id,
                    self.view.view_id if self.view is not None else NO_VIEW,
                    self._incarnation_in(flush.target),
                    self._rounds,
                    self._views,
                    0,
                    1,
                    (),
                    (),
                    retry=True,
                    held_round=report.round if report is not None else (0, 0),
                    held=tuple(sorted(report.got)) if report is not None else (),
                )
                effects.append(Broadcast((m,), encode_group(probe)))
                self._counters.flush_probes_sent += 1
                at = now + delay
                flush.probe_at[m] = at
                flush.probe_delay[m] = min(delay * 2, 8 * interval)
            due.append(at)
        self._retry_at = min(due, default=now + interval)

    def _incarnation_in(self, target: GroupView) -> int:
        return target.incarnations[target.index[self.local]] if target.incarnations else 0

    def _answer(
        self, peer: NodeId, probe: GroupFlush, now: float, effects: list[GroupEffect]
    ) -> None:
        """`peer` still waits in a flush towards the probe's target: send it the parts of
        our FLUSH for that target it lacks (at most twice per retry interval)."""
        parts = self._sent.get(peer)
        if not parts or parts[0].view_id != probe.view_id:
            return
        if self._backlogged(peer):
            self._counters.flush_answers_deferred += 1  # our parts are still on their way
            return
        if now < self._answered.get(peer, float("-inf")) + self.config.flush_retry_interval / 2:
            return
        self._answered[peer] = now
        ours = (parts[0].incarnation, parts[0].round)
        held = set(probe.held) if probe.held_round == ours else set()
        missing = [p for p in parts if p.part not in held]
        self._counters.flush_parts_resent += self._send_parts(peer, missing, effects)
