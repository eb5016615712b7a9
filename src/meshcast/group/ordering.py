"""The daemon-side ordering engine: service levels over the overlay, within one view.

Sits above `OverlayNode`, which delivers each message exactly once to the daemons listed
but in any order. Per service (theory, costs and what is missing: docs/design/group.md):

* UNRELIABLE, RELIABLE: pruned to the daemons hosting the groups; delivered on arrival,
  duplicates dropped by message id.
* FIFO: pruned; numbered per (source, destination) daemon; held back until gaps fill.
* CAUSAL: to every daemon of the view; vector clocks over the view's daemons.
* AGREED, SAFE: to every daemon of the view; Lamport timestamps, idle daemons' NULLs,
  ARU vectors (`meshcast.group.total`).

Message formats: `meshcast.wire.group`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from meshcast.errors import BufferFull, DecodeError, UsageError
from meshcast.group.causal import CausalReceiver
from meshcast.group.config import GroupConfig
from meshcast.group.events import (
    Broadcast,
    Deliver,
    GroupEffect,
    MessageRef,
    OrderingFault,
    OrderingReset,
)
from meshcast.group.fifo import FifoReceiver
from meshcast.group.total import TotalOrder
from meshcast.group.view import GroupView
from meshcast.ids import NodeId
from meshcast.wire.client import ServiceLevel
from meshcast.wire.group import (
    GroupData,
    GroupMessage,
    GroupNull,
    decode_group,
    encode_group,
)

log = logging.getLogger(__name__)

ORDERED_TOTAL = (ServiceLevel.AGREED, ServiceLevel.SAFE)


@dataclass(frozen=True, slots=True)
class GroupStats:
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
    holdback_overflow: int = 0  # a peer's message dropped at max_held_messages
    broken_stream_dropped: int = 0  # later messages of a stream broken by an overflow
    undeliverable_on_view_change: int = 0
    views_installed: int = 0


@dataclass(slots=True)
class _Held:
    source: NodeId
    data: GroupData

    def ref(self) -> MessageRef:
        d = self.data
        return MessageRef(self.source, d.msg_id, d.service, d.sender, d.groups)


class _ViewState:
    """Everything ordering knows about one view; replaced wholesale on a view change."""

    def __init__(self, local: NodeId, view: GroupView) -> None:
        self.view = view
        self.others = tuple(m for m in view.members if m != local)
        self.fifo: FifoReceiver[_Held] = FifoReceiver()
        self.causal: CausalReceiver[_Held] = CausalReceiver(len(view.members))
        self.total: TotalOrder[_Held] = TotalOrder(local, view.members)
        self.next_msg_id = 1
        self.fifo_sent: dict[NodeId, int] = {}
        self.recent: dict[NodeId, tuple[deque[int], set[int]]] = {}
        self.broken: set[tuple[NodeId, str]] = set()
        # total-order stream bookkeeping for NULLs
        self.last_stream_ts = 0  # timestamp of our last stream message
        self.last_stream_aru = 0  # ARU on it
        self.last_stream_at = float("-inf")  # when we sent it
        self.max_order_ts = 0  # highest timestamp of an AGREED/SAFE message seen
        self.max_safe_ts = 0  # highest timestamp of a SAFE message seen

    def held(self) -> int:
        return self.fifo.held + self.causal.held + self.total.held


class GroupEngine:
    """Ordering for one daemon. Inputs return effects; nothing here does I/O or reads a
    clock. Call `view_installed` before anything is sent or received."""

    def __init__(self, local: NodeId, config: GroupConfig | None = None) -> None:
        self.local = local
        self.config = config or GroupConfig()
        self._group_daemons: dict[str, frozenset[NodeId]] = {}
        self._state: _ViewState | None = None
        self._past_views: deque[bytes] = deque(maxlen=self.config.max_past_views)
        self._future: deque[tuple[NodeId, GroupMessage]] = deque()
        self._clock = 0  # Lamport clock, kept across views (it only ever grows)
        self._now = 0.0
        self._stats = GroupStats()

    # ------------------------------------------------------------------ queries

    @property
    def view(self) -> GroupView | None:
        return self._state.view if self._state is not None else None

    @property
    def clock(self) -> int:
        return self._clock

    def statistics(self) -> GroupStats:
        return self._stats

    def held(self) -> int:
        """Messages held back now (bounded by `max_held_messages`)."""
        return self._state.held() if self._state is not None else 0

    def hosts(self, groups: Iterable[str]) -> bool:
        """Does this daemon host a member of any of `groups`?"""
        return any(self.local in self._group_daemons.get(g, ()) for g in groups)

    def next_deadline(self) -> float | None:
        state = self._state
        if state is None or not self._null_needed(state):
            return None
        return max(state.last_stream_at + self.config.idle_ts_interval, self._now)

    # ------------------------------------------------------------------ inputs

    def set_group_daemons(self, group: str, daemons: Iterable[NodeId]) -> None:
        """Which daemons host members of `group` (from the group membership layer).

        A group never set here is hosted by no daemon. Every daemon must be told the same
        thing for the same messages, or they disagree on who delivers what.
        """
        self._group_daemons[group] = frozenset(daemons)

    def view_installed(
        self, members: Iterable[NodeId], now: float, incarnations: Sequence[int] = ()
    ) -> list[GroupEffect]:
        """A new daemon view (`incarnations` in the order of the sorted members).

        Same members and incarnations as now: nothing changes. Otherwise every held
        message is reported undeliverable in `OrderingReset` and ordering restarts for the
        new view; messages already received for it are then processed.
        """
        self._now = now
        view = GroupView.of(members, incarnations)
        if self.local not in view.index:
            raise UsageError(f"daemon {self.local} is not a member of the view it installs")
        old = self._state
        if old is not None and old.view.view_id == view.view_id:
            return []
        effects: list[GroupEffect] = []
        undelivered: tuple[MessageRef, ...] = ()
        if old is not None:
            held = old.fifo.drain() + old.causal.drain() + old.total.drain()
            undelivered = tuple(h.ref() for h in held if self.hosts(h.data.groups))
            self._bump(undeliverable_on_view_change=len(held))
            self._past_views.append(old.view.view_id)
        self._state = _ViewState(self.local, view)
        self._bump(views_installed=1)
        effects.append(
            OrderingReset(
                old.view.view_id if old else None, view.view_id, view.members, undelivered
            )
        )
        future, self._future = self._future, deque()
        for source, message in future:
            if message.view_id in self._past_views:
                self._bump(future_dropped=1)
            else:
                self._on_message(source, message, effects)
        return effects

    def submit(
        self,
        groups: Sequence[str],
        payload: bytes,
        service: ServiceLevel,
        sender: str,
        now: float,
        msg_type: int = 0,
    ) -> list[GroupEffect]:
        """A local client's message. Raises UsageError (no view, bad names or fields) or
        BufferFull (ordered and `max_held_messages` are held: wait for deliveries)."""
        self._now = now
        state = self._state
        if state is None:
            raise UsageError("no view installed: nothing can be sent yet")
        if not groups:
            raise UsageError("a message needs at least one group")
        groups = tuple(groups)
        own_limit = max(self.config.max_held_messages // 2, 1)
        if service in ORDERED_TOTAL and state.total.pending >= own_limit:
            raise BufferFull(f"{state.total.pending} ordered messages wait for delivery")
        self._clock += 1
        ts = self._clock
        seq = 0
        fifo: tuple[tuple[int, int], ...] = ()
        vector: tuple[int, ...] = ()
        hosted_dests = self._dests(state, groups)
        if service in ORDERED_TOTAL:
            dests = state.others
            seq = state.total.next_own_seq()
        elif service == ServiceLevel.CAUSAL:
            dests = state.others
            seq, vector = state.causal.stamp(state.view.index[self.local])
        else:
            dests = hosted_dests
            if service == ServiceLevel.FIFO:
                fifo = tuple((d, state.fifo_sent.get(d, 0) + 1) for d in dests)
        aru = state.total.aru(self._clock)
        data = GroupData(
            service,
            state.view.view_id,
            state.next_msg_id,
            ts,
            seq,
            aru,
            msg_type,
            sender,
            groups,
            fifo,
            vector,
            payload,
        )
        try:
            encoded = encode_group(data)
        except ValueError as exc:
            raise UsageError(f"cannot send this message: {exc}") from exc
        # Committed: nothing below raises.
        state.next_msg_id += 1
        for d, n in fifo:
            state.fifo_sent[NodeId(d)] = n
        self._bump(submitted=1)
        effects: list[GroupEffect] = []
        if dests:
            effects.append(Broadcast(dests, encoded))
        own = _Held(self.local, data)
        if service in ORDERED_TOTAL:
            state.last_stream_ts, state.last_stream_aru, state.last_stream_at = ts, aru, now
            state.max_order_ts = max(state.max_order_ts, ts)
            if service == ServiceLevel.SAFE:
                state.max_safe_ts = max(state.max_safe_ts, ts)
            state.total.add_own(ts, service == ServiceLevel.SAFE, own)
            self._deliver_total(state, effects)
        else:
            self._deliver(own, effects)
        return effects

    def overlay_delivered(self, source: NodeId, payload: bytes, now: float) -> list[GroupEffect]:
        """A group message the overlay handed up (sent by daemon `source`)."""
        self._now = now
        try:
            message = decode_group(payload)
        except DecodeError as exc:
            self._bump(malformed_dropped=1)
            log.debug("daemon %s: malformed group message from %s: %s", self.local, source, exc)
            return []
        effects: list[GroupEffect] = []
        self._on_message(source, message, effects)
        return effects

    def on_timer(self, now: float) -> list[GroupEffect]:
        self._now = now
        state = self._state
        effects: list[GroupEffect] = []
        if state is None or not self._null_needed(state):
            return effects
        if now < state.last_stream_at + self.config.idle_ts_interval:
            return effects
        self._clock += 1
        aru = state.total.aru(self._clock)
        null = GroupNull(state.view.view_id, self._clock, state.total.next_own_seq(), aru)
        state.last_stream_ts, state.last_stream_aru, state.last_stream_at = self._clock, aru, now
        self._bump(nulls_sent=1)
        effects.append(Broadcast(state.others, encode_group(null)))
        self._deliver_total(state, effects)
        return effects

    # ------------------------------------------------------------------ receiving

    def _on_message(
        self, source: NodeId, message: GroupMessage, effects: list[GroupEffect]
    ) -> None:
        state = self._state
        if state is None or message.view_id != state.view.view_id:
            if message.view_id in self._past_views:
                self._bump(stale_view_dropped=1)
                return
            if len(self._future) >= self.config.max_future_messages:
                self._future.popleft()
                self._bump(future_dropped=1)
            self._future.append((source, message))
            self._bump(future_buffered=1)
            return
        if source == self.local or source not in state.view.index:
            self._bump(not_member_dropped=1)
            return
        self._clock = max(self._clock, message.ts)
        if isinstance(message, GroupNull):
            self._on_stream(state, source, message.seq, message.ts, message.aru, None, effects)
            return
        service = message.service
        held = _Held(source, message)
        if service in ORDERED_TOTAL:
            state.max_order_ts = max(state.max_order_ts, message.ts)
            if service == ServiceLevel.SAFE:
                state.max_safe_ts = max(state.max_safe_ts, message.ts)
            self._on_stream(state, source, message.seq, message.ts, message.aru, held, effects)
        elif service == ServiceLevel.CAUSAL:
            self._on_causal(state, source, held, effects)
        elif service == ServiceLevel.FIFO:
            self._on_fifo(state, source, held, effects)
        else:
            recent, recent_set = state.recent.setdefault(source, (deque(), set()))
            if message.msg_id in recent_set:
                self._bump(duplicates_dropped=1)
                return
            recent.append(message.msg_id)
            recent_set.add(message.msg_id)
            if len(recent) > self.config.dedup_window:
                recent_set.discard(recent.popleft())
            self._deliver(held, effects)

    def _admit(
        self, state: _ViewState, source: NodeId, stream: str, effects: list[GroupEffect]
    ) -> bool:
        """May one more of `source`'s messages be held back in `stream`?"""
        if (source, stream) in state.broken:
            self._bump(broken_stream_dropped=1)
            return False
        if state.held() >= self.config.max_held_messages:
            state.broken.add((source, stream))
            self._bump(holdback_overflow=1)
            log.warning(
                "daemon %s: hold-back full, %s stream of %s broken", self.local, stream, source
            )
            effects.append(OrderingFault(source, stream, "hold-back limit reached"))
            return False
        return True

    def _on_stream(
        self,
        state: _ViewState,
        source: NodeId,
        seq: int,
        ts: int,
        aru: int,
        held: _Held | None,
        effects: list[GroupEffect],
    ) -> None:
        if seq < 1:
            self._bump(malformed_dropped=1)
            return
        if state.total.is_duplicate(source, seq):
            self._bump(duplicates_dropped=1)
            return
        occupies = held is not None or seq != state.total.next_expected(source)
        if occupies and not self._admit(state, source, "total", effects):
            return  # an in-order NULL takes no room: it is always taken
        safe = held is not None and held.data.service == ServiceLevel.SAFE
        state.total.offer(source, seq, ts, aru, held, safe)
        self._deliver_total(state, effects)

    def _on_causal(
        self, state: _ViewState, source: NodeId, held: _Held, effects: list[GroupEffect]
    ) -> None:
        sender = state.view.index[source]
        seq, vector = held.data.seq, held.data.vector
        if not state.causal.valid(sender, seq, vector):
            self._bump(malformed_dropped=1)
            return
        if state.causal.is_duplicate(sender, seq):
            self._bump(duplicates_dropped=1)
            return
        if not self._admit(state, source, "causal", effects):
            return
        for ready in state.causal.offer(sender, seq, vector, held):
            self._deliver(ready, effects)

    def _on_fifo(
        self, state: _ViewState, source: NodeId, held: _Held, effects: list[GroupEffect]
    ) -> None:
        seq = next((s for d, s in held.data.fifo if d == self.local), None)
        if seq is None or seq < 1:
            self._bump(malformed_dropped=1)  # not numbered for us
            return
        if state.fifo.is_duplicate(source, seq):
            self._bump(duplicates_dropped=1)
            return
        if not self._admit(state, source, "fifo", effects):
            return
        for ready in state.fifo.offer(source, seq, held):
            self._deliver(ready, effects)

    # ------------------------------------------------------------------ delivering

    def _deliver_total(self, state: _ViewState, effects: list[GroupEffect]) -> None:
        for ready in state.total.ready(self._clock):
            self._deliver(ready, effects)

    def _deliver(self, held: _Held, effects: list[GroupEffect]) -> None:
        d = held.data
        if not self.hosts(d.groups):
            self._bump(ordered_not_hosted=1)
            return
        self._bump(delivered=1)
        effects.append(
            Deliver(d.sender, d.groups, d.service, d.msg_type, d.payload, held.source, d.msg_id)
        )

    # ------------------------------------------------------------------ helpers

    def _dests(self, state: _ViewState, groups: Sequence[str]) -> tuple[NodeId, ...]:
        """Daemons of the view, other than this one, hosting any of `groups`."""
        found: set[NodeId] = set()
        for g in groups:
            found |= self._group_daemons.get(g, frozenset())
        return tuple(sorted(d for d in found if d != self.local and d in state.view.index))

    def _null_needed(self, state: _ViewState) -> bool:
        """Does some AGREED/SAFE message (anywhere) wait for our timestamp or ARU?"""
        if not state.others:
            return False
        if state.max_order_ts > state.last_stream_ts:
            return True
        useful_aru = min(state.total.aru(self._clock), state.max_safe_ts)
        return useful_aru > state.last_stream_aru

    def _bump(self, **counts: int) -> None:
        stats = self._stats
        self._stats = replace(
            stats, **{name: getattr(stats, name) + n for name, n in counts.items()}
        )
