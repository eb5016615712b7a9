"""Ordering: the service levels over the overlay, hold-back and delivery; the ordering
protocol of the group stack (docs/design/group.md, "The protocol stack").

Sits above `OverlayNode`, which delivers each message exactly once to the daemons listed
but in any order. Per service (theory, costs and limits: docs/design/group.md):

* UNRELIABLE: pruned to the daemons hosting the groups; delivered on arrival, duplicates
  dropped by message id; no guarantee across view changes.
* RELIABLE, FIFO: pruned; numbered per (source, destination) daemon; RELIABLE delivered
  on arrival, FIFO held back until gaps fill (`meshcast.group.fifo`).
* CAUSAL: to every daemon of the view; vector clocks over the view's daemons
  (`meshcast.group.causal`).
* AGREED, SAFE: to every daemon of the view; Lamport timestamps, idle daemons' NULLs,
  ARU vectors (`meshcast.group.total`).

Every message taken in is kept by the stability protocol until all its destinations hold
it (`Stability.retain`); what this daemon holds is `ack_vector`. A flush freezes the view
(`freeze`) and ends it (`finish`). Message formats: `meshcast.wire.group`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from meshcast.errors import BufferFull, UsageError
from meshcast.group.causal import CausalReceiver
from meshcast.group.config import OrderingConfig
from meshcast.group.events import (
    Broadcast,
    Deliver,
    GroupEffect,
    MessageRef,
    SubmitConfirmed,
    ViewTransition,
)
from meshcast.group.fifo import FifoReceiver
from meshcast.group.retention import Numbers
from meshcast.group.total import TotalOrder
from meshcast.group.view import GroupView
from meshcast.ids import NodeId
from meshcast.wire.client import ServiceLevel
from meshcast.wire.group import GroupData, GroupNull, encode_group

if TYPE_CHECKING:
    from meshcast.group.stability import AckVector, Stability

log = logging.getLogger(__name__)

ORDERED_TOTAL = (ServiceLevel.AGREED, ServiceLevel.SAFE)
PRUNED = (ServiceLevel.RELIABLE, ServiceLevel.FIFO)
# The levels compared per message, read once: compiled, a Final name is a C static, while
# `ServiceLevel.SAFE` goes through the enum class's __getattr__ hook at every use.
UNRELIABLE: Final = ServiceLevel.UNRELIABLE
FIFO: Final = ServiceLevel.FIFO
CAUSAL: Final = ServiceLevel.CAUSAL
SAFE: Final = ServiceLevel.SAFE
# a NULL nobody waited for is stamped ahead only if this daemon sent no ordered message of
# its own for this many idle_ts_intervals (`Ordering.on_timer`)
DEFERRED_QUIET_FACTOR = 10


@dataclass(frozen=True, slots=True)
class OrderingStats:
    """Counters of the ordering protocol (a frozen snapshot)."""

    submitted: int = 0
    delivered: int = 0  # Deliver effects
    nulls_sent: int = 0
    ordered_not_hosted: int = 0  # processed for ordering, no local member to deliver to
    duplicates_dropped: int = 0
    malformed_dropped: int = 0  # fields that do not fit the view
    holdback_overflow: int = 0  # a peer's message dropped at a bound (sent again later)
    held_messages: int = 0  # held back now (gauge)
    clock: int = 0  # the Lamport clock (gauge)


@dataclass(slots=True)
class _Counters:
    """The cumulative counters of `OrderingStats`, bumped in place on the hot path."""

    submitted: int = 0
    delivered: int = 0
    nulls_sent: int = 0
    ordered_not_hosted: int = 0
    duplicates_dropped: int = 0
    malformed_dropped: int = 0
    holdback_overflow: int = 0


@dataclass(slots=True)
class Held:
    """A message held for ordering (or our own, until delivered here)."""

    source: NodeId
    data: GroupData
    raw: bytes  # as received or sent: the copy a flush carries
    token: int = 0  # own message: SubmitConfirmed(token) once delivered (0: not asked)

    def __init__(self, source: NodeId, data: GroupData, raw: bytes, token: int = 0) -> None:
        self.source = source
        self.data = data
        self.raw = raw
        self.token = token

    def ref(self) -> MessageRef:
        d = self.data
        return MessageRef(self.source, d.msg_id, d.service, d.sender, d.groups)


@dataclass(frozen=True, slots=True)
class ViewEnd:
    """What `Ordering.finish` did with what was left of a view."""

    delivered: int  # Deliver effects
    discarded: int  # messages that could not be delivered with their guarantee
    undelivered: tuple[MessageRef, ...]  # ...of those, the ones for local members


class _Streams:
    """Everything ordering knows about one view; replaced wholesale on a view change."""

    def __init__(self, local: NodeId, view: GroupView) -> None:
        self.view = view
        self.others = tuple(m for m in view.members if m != local)
        self.fifo: FifoReceiver[Held] = FifoReceiver()  # RELIABLE and FIFO numbers
        self.causal: CausalReceiver[Held] = CausalReceiver(len(view.members))
        self.total: TotalOrder[Held] = TotalOrder(local, view.members)
        self.next_msg_id = 1
        self.pruned_sent: dict[NodeId, int] = {}
        self.recent: dict[NodeId, tuple[deque[int], set[int]]] = {}
        self.frozen = False  # a flush decides what is left: deliver no more AGREED/SAFE
        # total-order stream bookkeeping for NULLs
        self.last_stream_ts = 0  # timestamp of our last stream message
        self.last_stream_aru = 0  # ARU on it
        self.last_stream_at = float("-inf")  # when we sent it
        self.own_ordered_at = float("-inf")  # when we last sent an AGREED/SAFE message
        # a peer's stream message came in since our last one: if it makes us owe a NULL,
        # the NULL goes at the next timer (at once), not idle_ts_interval later
        self.null_prompt = False
        self.max_order_ts = 0  # highest timestamp of an AGREED/SAFE message seen
        self.max_safe_ts = 0  # highest timestamp of a SAFE message seen

    def held(self) -> int:
        return self.fifo.held + self.causal.held + self.total.held


def _numbering(data: GroupData | GroupNull) -> tuple[str, Numbers]:
    """The stream a message is numbered in by its source, and its numbers there."""
    if isinstance(data, GroupNull) or data.service in ORDERED_TOTAL:
        return "total", ((0, data.seq),)
    if data.service == CAUSAL:
        return "causal", ((0, data.seq),)
    return "pruned", data.fifo


class Ordering:
    """Ordering for one daemon, in the view installed last. Sans-I/O: inputs carry `now`
    and append or return effects. `reset` before anything is sent or received."""

    def __init__(self, local: NodeId, config: OrderingConfig, stability: Stability) -> None:
        self.local = local
        self.config = config
        self._stability = stability  # keeps a copy of each message taken in
        self._own_limit = 1  # own AGREED/SAFE messages waiting for delivery (`reset`)
        self._group_daemons: dict[str, frozenset[NodeId]] = {}
        self._streams: _Streams | None = None
        self._clock = 0  # Lamport clock, kept across views (it only ever grows)
        self._counters = _Counters()
        # inside a batch (`begin_batch`), AGREED/SAFE delivery waits for its end: one
        # pass over the total order per batch, not one per message
        self._batching = False
        self._total_due = False  # a message of the batch may have made some deliverable

    def reset(self, view: GroupView) -> None:
        """A new view: every stream starts again (the clock goes on)."""
        self._streams = _Streams(self.local, view)
        self._total_due = False
        # every member's own messages waiting for delivery wait at every other member
        # too: half the hold-back bound, shared by the members
        self._own_limit = max(self.config.max_held_messages // (2 * len(view.members)), 1)

    def begin_batch(self) -> None:
        """Messages follow as one batch (a client's frames of one turn, an overlay
        BATCH): until `end_batch`, the AGREED/SAFE messages they make deliverable wait.
        They keep their order; anything else delivered meanwhile goes after them."""
        self._batching = True

    def end_batch(self, effects: list[GroupEffect]) -> None:
        """Deliver what the batch made deliverable in the total order."""
        self._batching = False
        self._release_total(effects)

    # ------------------------------------------------------------------ queries

    @property
    def clock(self) -> int:
        return self._clock

    def statistics(self) -> OrderingStats:
        c = self._counters
        return OrderingStats(
            submitted=c.submitted,
            delivered=c.delivered,
            nulls_sent=c.nulls_sent,
            ordered_not_hosted=c.ordered_not_hosted,
            duplicates_dropped=c.duplicates_dropped,
            malformed_dropped=c.malformed_dropped,
            holdback_overflow=c.holdback_overflow,
            held_messages=self.held(),
            clock=self._clock,
        )

    def held(self) -> int:
        """Messages held back now (bounded by `max_held_messages`)."""
        return self._streams.held() if self._streams is not None else 0

    def can_send(self) -> bool:
        """Would a local message be taken now (see `send`'s BufferFull)?"""
        streams = self._streams
        if streams is None:
            return False
        return self._stability.window_open() and streams.total.pending < self._own_limit

    def hosts(self, groups: Iterable[str]) -> bool:
        """Does this daemon host a member of any of `groups`?"""
        local, daemons = self.local, self._group_daemons
        for g in groups:  # a loop, not any() over a generator: asked per message
            hosts = daemons.get(g)
            if hosts is not None and local in hosts:
                return True
        return False

    def ack_vector(self) -> AckVector:
        """(member, pruned prefix, causal processed, total-order prefix) we hold, per
        member of the view (what our ACKs say)."""
        streams = self._streams
        if streams is None:
            return ()
        local = self.local
        return tuple(
            (
                int(m),
                streams.fifo.prefix(m) if m != local else 0,
                streams.causal.processed[i],
                streams.total.prefix(m),
            )
            for i, m in enumerate(streams.view.members)
        )

    def deadline(self, now: float) -> float | None:
        """When a NULL is owed (None: none is)."""
        streams = self._streams
        if streams is None or not self._null_needed(streams):
            return None
        if streams.null_prompt:
            return now
        return streams.last_stream_at + self.config.idle_ts_interval

    # ------------------------------------------------------------------ inputs

    def set_group_daemons(self, group: str, daemons: Iterable[NodeId]) -> None:
        """Which daemons host members of `group` (a group never set: none)."""
        self._group_daemons[group] = frozenset(daemons)

    def send(
        self,
        groups: tuple[str, ...],
        payload: bytes,
        service: ServiceLevel,
        sender: str,
        now: float,
        msg_type: int = 0,
        token: int = 0,
    ) -> list[GroupEffect]:
        """A local client's message, in the view installed. Raises UsageError (no view,
        fields that do not encode) or BufferFull (the send window or our own ordered
        messages are full: wait, see `can_send`)."""
        streams = self._streams
        if streams is None:
            raise UsageError("no view installed: nothing can be sent yet")
        self._check_room(streams, service)
        data, dests = self._stamp(streams, groups, payload, service, sender, msg_type, token)
        try:
            encoded = encode_group(data)
        except ValueError as exc:
            raise UsageError(f"cannot send this message: {exc}") from exc
        self._commit(streams, data)  # nothing below raises
        effects: list[GroupEffect] = []
        if dests:
            stream, numbers = _numbering(data)
            self._stability.retain(self.local, stream, numbers, encoded, now)
            effects.append(Broadcast(dests, encoded))
        self._deliver_own(streams, Held(self.local, data, encoded, token), now, effects)
        return effects

    def received(
        self,
        source: NodeId,
        message: GroupData | GroupNull,
        raw: bytes,
        now: float,
        effects: list[GroupEffect],
    ) -> bool:
        """A DATA or NULL message of the view from member `source` (not us). Returns
        False if it was a duplicate, True otherwise (taken, or dropped and counted)."""
        streams = self._streams
        assert streams is not None  # the engine routes only messages of the view installed
        if isinstance(message, GroupNull):
            # A NULL does not move our clock: it promises nothing below its timestamp
            # will come from its source, and carries nothing to order after. So a NULL
            # stamped ahead (null_lead) covers our next messages too.
            return self._on_stream(streams, source, message, None, raw, now, effects)
        self._clock = max(self._clock, message.ts)
        service = message.service
        held = Held(source, message, raw)
        if service in ORDERED_TOTAL:
            streams.max_order_ts = max(streams.max_order_ts, message.ts)
            if service == SAFE:
                streams.max_safe_ts = max(streams.max_safe_ts, message.ts)
            return self._on_stream(streams, source, message, held, raw, now, effects)
        if service == CAUSAL:
            return self._on_causal(streams, source, held, now, effects)
        if service in PRUNED:
            return self._on_pruned(streams, source, held, now, effects)
        return self._on_unreliable(streams, source, held, effects)

    def on_timer(self, now: float, effects: list[GroupEffect]) -> None:
        """Send the NULL we owe, if it is due (`deadline`)."""
        streams = self._streams
        if streams is None or not self._null_needed(streams):
            return
        if not streams.null_prompt and now < streams.last_stream_at + self.config.idle_ts_interval:
            return
        # One NULL answers everything received since our last stream message: at most one
        # per timer firing, i.e. per batch of input the driver ran before its timer.
        prompt, streams.null_prompt = streams.null_prompt, False
        # Stamped ahead by a daemon that sent no ordered message of its own lately (it
        # hosts no member, or only listeners): its one NULL then covers the others' next
        # messages, which is what keeps NULLs few under a flood. A daemon that does send
        # stamps at clock + 1, or its next message would wait one answer round. A NULL
        # nobody waited for goes idle_ts_interval after our last stream message, so it
        # looks further back: one side of a request/reply slower than idle_ts_interval
        # would otherwise jump its clock every round, and its every request would wait
        # for an answer round from each idle daemon before delivery.
        lately = self.config.idle_ts_interval * (1 if prompt else DEFERRED_QUIET_FACTOR)
        quiet = now >= streams.own_ordered_at + lately
        self._clock += self.config.null_lead if quiet else 1
        aru = streams.total.aru(self._clock)
        null = GroupNull(streams.view.view_id, self._clock, streams.total.next_own_seq(), aru)
        streams.last_stream_ts, streams.last_stream_aru = self._clock, aru
        streams.last_stream_at = now
        self._counters.nulls_sent += 1
        encoded = encode_group(null)
        self._stability.retain(self.local, "total", ((0, null.seq),), encoded, now)
        effects.append(Broadcast(streams.others, encoded))
        self._deliver_total(streams, effects)

    def freeze(self) -> dict[NodeId, int]:
        """A flush started: deliver no more AGREED/SAFE in this view (its outcome decides
        them). Returns the total-order stream prefix held of every member."""
        streams = self._streams
        if streams is None:
            return {}
        streams.frozen = True
        return {m: streams.total.prefix(m) for m in streams.view.members}

    def finish(
        self, ends: Mapping[NodeId, int], survivors: tuple[NodeId, ...], effects: list[GroupEffect]
    ) -> ViewEnd:
        """End the view a flush completed: deliver what it agreed on, discard the rest.

        Every survivor (a member of both views) now holds the union of the survivors'
        copies; each takes the same decisions on that same set:
        RELIABLE/FIFO: everything held, in number order (a missing number is lost
        everywhere: its sender failed). CAUSAL: what the union makes causally complete;
        the rest waited for a message lost everywhere. AGREED/SAFE: `TotalOrder.finish`
        with each stream cut at `ends`, the longest prefix any survivor reported.
        Spread's transitional configuration: the old view's own rules first, the same
        messages at every survivor; then, if members departed (`ViewTransition`), what
        only the survivors are known to hold (`TotalOrder.finish_split`).
        """
        streams = self._streams
        if streams is None:
            return ViewEnd(0, 0, ())
        view = streams.view
        delivered_before = self._counters.delivered
        departed = [m for m in view.members if m not in survivors]
        regular, transitional, dropped = streams.total.finish_split(ends, departed)
        for item in regular:
            self._deliver(item, effects)
        if departed:
            effects.append(ViewTransition(view.view_id, view.members, survivors))
        for item in streams.fifo.drain():
            self._deliver(item, effects)
        for item in transitional:
            self._deliver(item, effects)
        dropped.extend(streams.causal.drain())
        undelivered = tuple(h.ref() for h in dropped if self.hosts(h.data.groups))
        return ViewEnd(self._counters.delivered - delivered_before, len(dropped), undelivered)

    # ------------------------------------------------------------------ sending

    def _check_room(self, streams: _Streams, service: ServiceLevel) -> None:
        if service in ORDERED_TOTAL and streams.total.pending >= self._own_limit:
            raise BufferFull(f"{streams.total.pending} ordered messages wait for delivery")
        if service != UNRELIABLE and not self._stability.window_open():
            raise BufferFull("too many of our messages are not yet held by every destination")

    def _stamp(
        self,
        streams: _Streams,
        groups: tuple[str, ...],
        payload: bytes,
        service: ServiceLevel,
        sender: str,
        msg_type: int,
        token: int = 0,
    ) -> tuple[GroupData, tuple[NodeId, ...]]:
        """Number a local message in its service's stream; return it and whom it goes to.
        Nothing is taken yet (`_commit`): a message that does not encode uses no number,
        or it would leave a gap that holds back our later messages everywhere."""
        ts = self._clock + 1
        seq = 0
        fifo: tuple[tuple[int, int], ...] = ()
        vector: tuple[int, ...] = ()
        if service in ORDERED_TOTAL:
            dests = streams.others
            seq = streams.total.prefix(self.local) + 1
        elif service == CAUSAL:
            dests = streams.others
            vector = tuple(streams.causal.processed)
            seq = vector[streams.view.index[self.local]] + 1
        else:
            dests = self._dests(streams, groups)
            if service in PRUNED:
                fifo = tuple((d, streams.pruned_sent.get(d, 0) + 1) for d in dests)
        aru = streams.total.aru(ts)
        data = GroupData(
            service,
            streams.view.view_id,
            streams.next_msg_id,
            ts,
            seq,
            aru,
            msg_type,
            sender,
            groups,
            fifo,
            vector,
            payload,
            confirm=token != 0,
        )
        return data, dests

    def _commit(self, streams: _Streams, data: GroupData) -> None:
        """Take the numbers `_stamp` gave a local message that encoded."""
        self._clock = data.ts
        streams.next_msg_id += 1
        if data.service in ORDERED_TOTAL:
            streams.total.next_own_seq()
        elif data.service == CAUSAL:
            streams.causal.stamp(streams.view.index[self.local])
        for d, n in data.fifo:
            streams.pruned_sent[NodeId(d)] = n
        self._counters.submitted += 1

    def _deliver_own(
        self, streams: _Streams, own: Held, now: float, effects: list[GroupEffect]
    ) -> None:
        """Our own message, sent: delivered here at once, or (AGREED/SAFE) in its turn."""
        data = own.data
        if data.service not in ORDERED_TOTAL:
            self._deliver(own, effects)
            return
        ts = data.ts
        streams.last_stream_ts, streams.last_stream_aru = ts, data.aru
        streams.last_stream_at = streams.own_ordered_at = now
        streams.null_prompt = False  # this message carries our timestamp and ARU
        streams.max_order_ts = max(streams.max_order_ts, ts)
        safe = data.service == SAFE
        if safe:
            streams.max_safe_ts = max(streams.max_safe_ts, ts)
        streams.total.add_own(ts, safe, own)
        self._deliver_total(streams, effects)

    def _dests(self, streams: _Streams, groups: Sequence[str]) -> tuple[NodeId, ...]:
        """Daemons of the view, other than this one, hosting any of `groups`."""
        found: set[NodeId] = set()
        for g in groups:
            found |= self._group_daemons.get(g, frozenset())
        return tuple(sorted(d for d in found if d != self.local and d in streams.view.index))

    # ------------------------------------------------------------------ receiving

    def _on_unreliable(
        self, streams: _Streams, source: NodeId, held: Held, effects: list[GroupEffect]
    ) -> bool:
        msg_id = held.data.msg_id
        recent, recent_set = streams.recent.setdefault(source, (deque(), set()))
        if msg_id in recent_set:
            self._counters.duplicates_dropped += 1
            return False
        recent.append(msg_id)
        recent_set.add(msg_id)
        if len(recent) > self.config.dedup_window:
            recent_set.discard(recent.popleft())
        self._deliver(held, effects)
        return True

    def _admit(self, streams: _Streams, source: NodeId, stream: str) -> bool:
        """May one more of `source`'s messages, one that cannot be taken in order, be held
        back in `stream`? Not at a bound: it is dropped as if lost (our ACKs do not cover
        it, so its source sends it again, `meshcast.group.repair`). A message that comes
        in order is always taken: it only ever lets held ones go."""
        if streams.held() < self.config.max_held_messages and not self._stability.full():
            return True
        self._counters.holdback_overflow += 1
        log.debug("daemon %s: hold-back full, %s message of %s dropped", self.local, stream, source)
        return False

    def _on_stream(
        self,
        streams: _Streams,
        source: NodeId,
        message: GroupData | GroupNull,
        held: Held | None,
        raw: bytes,
        now: float,
        effects: list[GroupEffect],
    ) -> bool:
        seq = message.seq
        if seq < 1:
            self._counters.malformed_dropped += 1
            return True
        if streams.total.is_duplicate(source, seq):
            self._duplicate()
            return False
        if seq != streams.total.next_expected(source) and not self._admit(streams, source, "total"):
            return True
        safe = held is not None and held.data.service == SAFE
        self._stability.retain(source, "total", ((0, seq),), raw, now)
        streams.total.offer(source, seq, message.ts, message.aru, held, safe)
        # if we now owe a NULL, owe it at once where another daemon waits for it: for our
        # timestamp (`_awaited_elsewhere`), or for our ARU (a NULL moved it, SAFE waits)
        if held is None:
            if streams.max_safe_ts > streams.last_stream_aru:
                streams.null_prompt = True
        elif self._awaited_elsewhere(held.data):
            streams.null_prompt = True
        self._deliver_total(streams, effects)
        return True

    def _awaited_elsewhere(self, data: GroupData) -> bool:
        """Does another daemon wait to deliver `data`, so that our timestamp is owed at
        once? It does if it hosts a member of one of its groups, if the sender asked for
        a confirmation (its daemon delivers it first), or for SAFE (ARUs must travel).
        Otherwise the NULL waits for idle_ts_interval, and our own next message (a reply)
        usually carries the timestamp first: no NULL, no datagram per message and peer."""
        if data.confirm or data.service == SAFE:
            return True
        local, daemons = self.local, self._group_daemons
        for g in data.groups:  # a loop, not any() over a generator: asked per message
            hosts = daemons.get(g)
            if hosts and (len(hosts) > 1 or local not in hosts):
                return True
        return False

    def _duplicate(self) -> None:
        """A copy we had: a repair or a flush. Say what we hold at the next ACK even if
        it did not change (our last ACK may be what was lost)."""
        self._counters.duplicates_dropped += 1
        self._stability.ack_again()

    def _on_causal(
        self, streams: _Streams, source: NodeId, held: Held, now: float, effects: list[GroupEffect]
    ) -> bool:
        sender = streams.view.index[source]
        seq, vector = held.data.seq, held.data.vector
        if not streams.causal.valid(sender, seq, vector):
            self._counters.malformed_dropped += 1
            return True
        if streams.causal.is_duplicate(sender, seq):
            self._duplicate()
            return False
        if not streams.causal.deliverable(sender, seq, vector) and not self._admit(
            streams, source, "causal"
        ):
            return True
        self._stability.retain(source, "causal", ((0, seq),), held.raw, now)
        for ready in streams.causal.offer(sender, seq, vector, held):
            self._deliver(ready, effects)
        return True

    def _on_pruned(
        self, streams: _Streams, source: NodeId, held: Held, now: float, effects: list[GroupEffect]
    ) -> bool:
        seq = next((s for d, s in held.data.fifo if d == self.local), None)
        if seq is None or seq < 1:
            self._counters.malformed_dropped += 1  # not numbered for us
            return True
        if streams.fifo.is_duplicate(source, seq):
            self._duplicate()
            return False
        if seq != streams.fifo.prefix(source) + 1 and not self._admit(streams, source, "pruned"):
            return True
        self._stability.retain(source, "pruned", held.data.fifo, held.raw, now)
        in_order = held.data.service == FIFO
        for ready in streams.fifo.offer(source, seq, held, in_order=in_order):
            self._deliver(ready, effects)
        return True

    # ------------------------------------------------------------------ delivering

    def _deliver_total(self, streams: _Streams, effects: list[GroupEffect]) -> None:
        if self._batching:
            self._total_due = True
        elif not streams.frozen:  # frozen: a flush decides; our prefix may outgrow it
            for ready in streams.total.ready(self._clock):
                self._deliver(ready, effects)

    def _release_total(self, effects: list[GroupEffect]) -> None:
        """Deliver the AGREED/SAFE messages a batch made deliverable so far."""
        if self._total_due:
            self._total_due = False
            streams = self._streams
            if streams is not None and not streams.frozen:
                for ready in streams.total.ready(self._clock):
                    self._deliver(ready, effects)

    def _deliver(self, held: Held, effects: list[GroupEffect]) -> None:
        d = held.data
        if self._total_due and d.service not in ORDERED_TOTAL:
            self._release_total(effects)  # what the batch sent before this goes first
        if not self.hosts(d.groups):
            self._counters.ordered_not_hosted += 1
        else:
            self._counters.delivered += 1
            effects.append(
                Deliver(d.sender, d.groups, d.service, d.msg_type, d.payload, held.source, d.msg_id)
            )
        if held.token:
            effects.append(SubmitConfirmed(held.token))

    def _null_needed(self, streams: _Streams) -> bool:
        """Does some AGREED/SAFE message (anywhere) wait for our timestamp or ARU?"""
        if not streams.others:
            return False
        if streams.max_order_ts > streams.last_stream_ts:
            return True
        useful_aru = min(streams.total.aru(self._clock), streams.max_safe_ts)
        return useful_aru > streams.last_stream_aru
