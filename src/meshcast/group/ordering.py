"""The daemon-side ordering engine: service levels over the overlay, virtual synchrony.

Sits above `OverlayNode`, which delivers each message exactly once to the daemons listed
but in any order. Per service (theory, costs and limits: docs/design/group.md):

* UNRELIABLE: pruned to the daemons hosting the groups; delivered on arrival, duplicates
  dropped by message id; no guarantee across view changes.
* RELIABLE, FIFO: pruned; numbered per (source, destination) daemon; RELIABLE delivered
  on arrival, FIFO held back until gaps fill.
* CAUSAL: to every daemon of the view; vector clocks over the view's daemons.
* AGREED, SAFE: to every daemon of the view; Lamport timestamps, idle daemons' NULLs,
  ARU vectors (`meshcast.group.total`).

Virtual synchrony: every daemon keeps a copy of each message of the view until ACKs
show all its destinations hold it (`meshcast.group.retention`). A view change starts a
*flush*: each daemon stops sending, sends the others of the new view its remaining
copies and stream prefixes (FLUSH), and installs the new view once it has every other
member's FLUSH, after delivering the same old-view messages, in the same order, as every
other daemon that passes from the same view to the same new one.

Message formats: `meshcast.wire.group`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from meshcast.errors import BufferFull, DecodeError, UsageError
from meshcast.group.causal import CausalReceiver
from meshcast.group.config import GroupConfig
from meshcast.group.counters import Counters
from meshcast.group.events import (
    Broadcast,
    Deliver,
    GroupEffect,
    MessageRef,
    OrderingFault,
    OrderingReset,
    SubmitConfirmed,
    SubmitLost,
    ViewTransition,
)
from meshcast.group.fifo import FifoReceiver
from meshcast.group.retention import Numbers, Retention
from meshcast.group.total import TotalOrder
from meshcast.group.view import GroupView
from meshcast.ids import NodeId
from meshcast.wire.client import ServiceLevel
from meshcast.wire.group import (
    MAX_BLOCKED_GROUPS,
    NO_VIEW,
    GroupAck,
    GroupData,
    GroupFlush,
    GroupMessage,
    GroupNull,
    decode_group,
    encode_group,
)

log = logging.getLogger(__name__)

ORDERED_TOTAL = (ServiceLevel.AGREED, ServiceLevel.SAFE)
PRUNED = (ServiceLevel.RELIABLE, ServiceLevel.FIFO)
REPAIR_BATCH = 256  # own copies sent again per repair look, at most
FLUSH_PART_BYTES = 1 << 20  # carried copies per FLUSH part (one bigger copy: a part alone)


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


@dataclass(slots=True)
class _Held:
    source: NodeId
    data: GroupData
    raw: bytes  # as received or sent: the copy a flush carries
    token: int = 0  # own message: SubmitConfirmed(token) once delivered (0: not asked)

    def ref(self) -> MessageRef:
        d = self.data
        return MessageRef(self.source, d.msg_id, d.service, d.sender, d.groups)


class _ViewState:
    """Everything ordering knows about one view; replaced wholesale on a view change."""

    def __init__(self, local: NodeId, view: GroupView) -> None:
        self.view = view
        self.others = tuple(m for m in view.members if m != local)
        self.fifo: FifoReceiver[_Held] = FifoReceiver()  # RELIABLE and FIFO numbers
        self.causal: CausalReceiver[_Held] = CausalReceiver(len(view.members))
        self.total: TotalOrder[_Held] = TotalOrder(local, view.members)
        self.next_msg_id = 1
        self.pruned_sent: dict[NodeId, int] = {}
        self.recent: dict[NodeId, tuple[deque[int], set[int]]] = {}
        self.broken: set[tuple[NodeId, str]] = set()
        # virtual synchrony: copies until stable, what each member acknowledged
        self.retained = Retention()
        self.acks: dict[NodeId, dict[NodeId, tuple[int, int, int]]] = {}
        self.last_ack = self.ack_vector(local)  # nothing received: nothing to say yet
        self.ack_due = False  # something arrived (or was sent) since the last ACK
        self.last_ack_at = float("-inf")
        self.repair_at = 0.0  # next look for own copies some destination still lacks
        self.progress_at: dict[NodeId, float] = {}  # last ACK of a member covering more of ours
        self.frozen = False  # our FLUSH is out: nothing more is sent or taken in this view
        # members whose last ACK said BLOCKED: the groups it named (None: every group)
        self.blocked_by: dict[NodeId, frozenset[str] | None] = {}
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
        self.unheard = set(self.others)  # members with no message in this view yet

    def held(self) -> int:
        return self.fifo.held + self.causal.held + self.total.held

    def ack_vector(self, local: NodeId) -> tuple[tuple[int, int, int, int], ...]:
        """(member, pruned prefix, causal processed, total-order prefix) we hold, per member."""
        return tuple(
            (
                int(m),
                self.fifo.prefix(m) if m != local else 0,
                self.causal.processed[i],
                self.total.prefix(m),
            )
            for i, m in enumerate(self.view.members)
        )


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
class _Flush:
    """A flush in progress towards `target` (a membership: number 0)."""

    target: GroupView
    own_prefixes: dict[NodeId, int]  # what our FLUSH reported
    reports: dict[NodeId, _Report] = field(default_factory=dict)
    # per member not fully heard: when to probe it next, and the current probe interval
    # (doubling while it stays silent, reset by each part that arrives from it: parts
    # still coming in means the rest is in flight, not lost)
    probe_at: dict[NodeId, float] = field(default_factory=dict)
    probe_delay: dict[NodeId, float] = field(default_factory=dict)


class GroupEngine:
    """Ordering for one daemon. Inputs return effects; nothing here does I/O or reads a
    clock. Call `view_installed` before anything is sent or received."""

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
        self._backlogged = backlogged or (lambda _: False)
        self._group_daemons: dict[str, frozenset[NodeId]] = {}
        self._state: _ViewState | None = None
        self._flush: _Flush | None = None
        self._round = 0  # our flush rounds so far
        self._views = 0  # views installed so far (the number of the last one)
        # latest (incarnation, flush round) seen per daemon: anything earlier is stale
        self._peer_round: dict[NodeId, tuple[int, int]] = {}
        # our latest FLUSH, per member of its target (each gets only the copies it lacks),
        # kept to answer probes until every member has been heard in the view it installs
        self._sent_flush: dict[NodeId, tuple[GroupFlush, ...]] = {}
        self._retry_at = 0.0  # while flushing: the next probe due
        self._answered: dict[NodeId, float] = {}  # when we last answered a daemon's probe
        self._blocked = False  # a local `block` member cannot keep up
        self._blocked_groups: tuple[str, ...] = ()  # ...in these groups (() = every group)
        self._queued: deque[tuple[tuple[str, ...], bytes, ServiceLevel, str, int, int]] = deque()
        self._past_views: deque[bytes] = deque(maxlen=self.config.max_past_views)
        self._future: deque[tuple[NodeId, GroupMessage, bytes]] = deque()
        self._clock = 0  # Lamport clock, kept across views (it only ever grows)
        self._now = 0.0
        self._stats = Counters(GroupStats)

    # ------------------------------------------------------------------ queries

    @property
    def view(self) -> GroupView | None:
        """The view installed last (during a flush: the one being left)."""
        return self._state.view if self._state is not None else None

    @property
    def flushing(self) -> bool:
        return self._flush is not None

    @property
    def clock(self) -> int:
        return self._clock

    def statistics(self) -> GroupStats:
        return self._stats.snapshot()

    def held(self) -> int:
        """Messages held back now (bounded by `max_held_messages`)."""
        return self._state.held() if self._state is not None else 0

    def memory(self) -> int:
        """Bytes held for others: copies retained until stable (messages held back for
        order are among them) and messages of a view not installed here yet."""
        future = sum(len(raw) for _, _, raw in self._future)
        return future if self._state is None else future + self._state.retained.total_bytes

    def can_submit(self) -> bool:
        """Would a local message be taken now? False while our own copies not yet held
        everywhere fill the window, or the flush queue is full. (A slow `block` member
        holds back only messages to its groups: `holds_back`.)"""
        if self._flush is not None:
            return len(self._queued) < max(self.config.max_held_messages // 2, 1)
        state = self._state
        if state is None:
            return False
        own_limit = max(self.config.max_held_messages // 2, 1)
        return self._window_open(state) and state.total.pending < own_limit

    def holds_back(self, groups: Iterable[str]) -> bool:
        """Must a local client's message to `groups` wait? True while a `block` member of
        one of them, here or at any daemon of the view (its ACKs say BLOCKED), cannot
        keep up. Other groups keep flowing."""
        state = self._state
        remote = state.blocked_by if state is not None else {}
        if not self._blocked and not remote:
            return False  # the usual case: checked per MULTICAST, so kept cheap
        named = frozenset(groups)
        if self._blocked and (
            not self._blocked_groups or not named.isdisjoint(self._blocked_groups)
        ):
            return True
        return any(blocked is None or not named.isdisjoint(blocked) for blocked in remote.values())

    def set_blocked(self, groups: Iterable[str] = (), *, everything: bool = False) -> None:
        """Local `block` members of `groups` cannot keep up (or, with none, can again):
        tell the others in the next ACK, so that their senders to those groups wait too.
        `everything` (or more than MAX_BLOCKED_GROUPS groups) holds back every group."""
        listed = tuple(sorted(set(groups)))
        blocked = everything or bool(listed)
        if everything or len(listed) > MAX_BLOCKED_GROUPS:
            listed = ()
        if (blocked, listed) == (self._blocked, self._blocked_groups):
            return
        self._blocked, self._blocked_groups = blocked, listed
        if self._state is not None:
            self._state.last_ack = ()  # an ACK is due, even with nothing new in it
            self._state.ack_due = True

    def _window_open(self, state: _ViewState) -> bool:
        copies, size = state.retained.of(self.local)
        return (
            copies < max(self.config.max_retained_messages // 4, 1)
            and size < self.config.max_retained_bytes // 4
        )

    def hosts(self, groups: Iterable[str]) -> bool:
        """Does this daemon host a member of any of `groups`?"""
        return any(self.local in self._group_daemons.get(g, ()) for g in groups)

    def next_deadline(self) -> float | None:
        if self._flush is not None:
            return max(self._retry_at, self._now)
        state = self._state
        if state is None:
            return None
        deadlines = []
        if self._null_needed(state):
            if state.null_prompt:
                deadlines.append(self._now)
            else:
                deadlines.append(state.last_stream_at + self.config.idle_ts_interval)
        if state.others and state.ack_due:
            deadlines.append(state.last_ack_at + self.config.ack_interval)
        if state.others and state.retained.count:
            deadlines.append(state.repair_at)
        if not deadlines:
            return None
        return max(min(deadlines), self._now)

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

        The same members and incarnations as the view installed (or being flushed to):
        nothing changes. Otherwise a flush starts (docs/design/group.md): the view is
        installed, with `OrderingReset`, once every other member's FLUSH is here.
        """
        self._now = now
        target = GroupView.of(members, incarnations)
        if self.local not in target.index:
            raise UsageError(f"daemon {self.local} is not a member of the view it installs")
        flush, state = self._flush, self._state
        if flush is not None and flush.target.view_id == target.view_id:
            return []
        if flush is None and state is not None and state.view.numbered(0) == target:
            return []
        effects: list[GroupEffect] = []
        self._start_flush(target, effects)
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
        groups = tuple(groups)
        own_limit = max(self.config.max_held_messages // 2, 1)
        state = self._state
        if self._flush is not None:
            if len(self._queued) >= own_limit:
                raise BufferFull(f"{len(self._queued)} messages wait for the view change")
            self._queued.append((groups, payload, service, sender, msg_type, token))
            self._bump(submits_queued=1)
            return []
        if state is None:
            raise UsageError("no view installed: nothing can be sent yet")
        if service in ORDERED_TOTAL and state.total.pending >= own_limit:
            raise BufferFull(f"{state.total.pending} ordered messages wait for delivery")
        if service != ServiceLevel.UNRELIABLE and not self._window_open(state):
            raise BufferFull("too many of our messages are not yet held by every destination")
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
            if service in PRUNED:
                fifo = tuple((d, state.pruned_sent.get(d, 0) + 1) for d in dests)
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
            state.pruned_sent[NodeId(d)] = n
        self._bump(submitted=1)
        if dests:
            self._retain(state, self.local, data, encoded)
        effects: list[GroupEffect] = []
        if dests:
            effects.append(Broadcast(dests, encoded))
        own = _Held(self.local, data, encoded, token)
        if service in ORDERED_TOTAL:
            state.last_stream_ts, state.last_stream_aru, state.last_stream_at = ts, aru, now
            state.own_ordered_at = now
            state.null_prompt = False  # this message carries our timestamp and ARU
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
        self._on_message(source, message, payload, effects)
        return effects

    def on_timer(self, now: float) -> list[GroupEffect]:
        self._now = now
        state = self._state
        effects: list[GroupEffect] = []
        if self._flush is not None:
            if now >= self._retry_at:
                self._retry_flush(self._flush, effects)
            return effects
        if state is None:
            return effects
        if state.others and state.ack_due and now >= state.last_ack_at + self.config.ack_interval:
            state.ack_due = False
            vector = state.ack_vector(self.local)
            if vector != state.last_ack:
                state.last_ack, state.last_ack_at = vector, now
                self._bump(acks_sent=1)
                ack = GroupAck(state.view.view_id, vector, self._blocked, self._blocked_groups)
                if self._blocked:
                    self._bump(blocked_acks_sent=1)
                effects.append(Broadcast(state.others, encode_group(ack)))
        if state.others and state.retained.count and now >= state.repair_at:
            self._repair(state, effects)
        if not self._null_needed(state):
            return effects
        if not state.null_prompt and now < state.last_stream_at + self.config.idle_ts_interval:
            return effects
        # One NULL answers everything received since our last stream message: at most one
        # per timer firing, i.e. per batch of input the driver ran before its timer.
        state.null_prompt = False
        # Stamped ahead by a daemon that sent no ordered message of its own lately (it
        # hosts no member, or only listeners): its one NULL then covers the others' next
        # messages, which is what keeps NULLs few under a flood. A daemon that does send
        # stamps at clock + 1, or its next message would wait one answer round.
        quiet = now >= state.own_ordered_at + self.config.idle_ts_interval
        self._clock += self.config.null_lead if quiet else 1
        aru = state.total.aru(self._clock)
        null = GroupNull(state.view.view_id, self._clock, state.total.next_own_seq(), aru)
        state.last_stream_ts, state.last_stream_aru, state.last_stream_at = self._clock, aru, now
        self._bump(nulls_sent=1)
        encoded = encode_group(null)
        self._retain(state, self.local, null, encoded)
        effects.append(Broadcast(state.others, encoded))
        self._deliver_total(state, effects)
        return effects

    # ------------------------------------------------------------------ receiving

    def _on_message(
        self, source: NodeId, message: GroupMessage, raw: bytes, effects: list[GroupEffect]
    ) -> None:
        if isinstance(message, GroupFlush):
            self._on_flush(source, message, raw, effects)
            return
        state = self._state
        if state is None or message.view_id != state.view.view_id:
            if message.view_id in self._past_views:
                self._bump(stale_view_dropped=1)
                return
            self._buffer_future(source, message, raw)
            return
        if source == self.local or source not in state.view.index:
            self._bump(not_member_dropped=1)
            return
        if self._flush is None and self._sent_flush and source in state.unheard:
            state.unheard.discard(source)
            if not state.unheard:  # every member installed this view: none needs our FLUSH
                self._sent_flush = {}
                self._answered.clear()
        if state.frozen:
            self._bump(frozen_dropped=1)  # our FLUSH is out: its sender's FLUSH has it
            return
        if isinstance(message, GroupAck):
            self._on_ack(state, source, message)
            return
        self._on_data(state, source, message, raw, effects)

    def _buffer_future(self, source: NodeId, message: GroupMessage, raw: bytes) -> None:
        if len(self._future) >= self.config.max_future_messages:
            self._future.popleft()
            self._bump(future_dropped=1)
        self._future.append((source, message, raw))
        self._bump(future_buffered=1)

    def _replay_future(self, effects: list[GroupEffect]) -> None:
        """Messages kept for a view or flush not here yet: take those now applicable."""
        future, self._future = self._future, deque()
        for source, message, raw in future:
            if message.view_id in self._past_views:
                self._bump(future_dropped=1)
            else:
                self._on_message(source, message, raw, effects)

    def _on_data(
        self,
        state: _ViewState,
        source: NodeId,
        message: GroupData | GroupNull,
        raw: bytes,
        effects: list[GroupEffect],
    ) -> None:
        if isinstance(message, GroupNull):
            # A NULL does not move our clock: it promises nothing below its timestamp
            # will come from its source, and carries nothing to order after. So a NULL
            # stamped ahead (null_lead) covers our next messages too.
            self._on_stream(state, source, message, None, raw, effects)
            return
        self._clock = max(self._clock, message.ts)
        service = message.service
        held = _Held(source, message, raw)
        if service in ORDERED_TOTAL:
            state.max_order_ts = max(state.max_order_ts, message.ts)
            if service == ServiceLevel.SAFE:
                state.max_safe_ts = max(state.max_safe_ts, message.ts)
            self._on_stream(state, source, message, held, raw, effects)
        elif service == ServiceLevel.CAUSAL:
            self._on_causal(state, source, held, effects)
        elif service in PRUNED:
            self._on_pruned(state, source, held, effects)
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
        full = None
        if state.held() >= self.config.max_held_messages:
            full = "hold-back limit reached"
        elif state.retained.count >= self.config.max_retained_messages:
            full = "retention limit reached"
        if full is not None:
            state.broken.add((source, stream))
            self._bump(holdback_overflow=1)
            log.warning("daemon %s: %s, %s stream of %s broken", self.local, full, stream, source)
            effects.append(OrderingFault(source, stream, full))
            return False
        return True

    def _on_stream(
        self,
        state: _ViewState,
        source: NodeId,
        message: GroupData | GroupNull,
        held: _Held | None,
        raw: bytes,
        effects: list[GroupEffect],
    ) -> None:
        seq = message.seq
        if seq < 1:
            self._bump(malformed_dropped=1)
            return
        if state.total.is_duplicate(source, seq):
            self._duplicate(state)
            return
        occupies = held is not None or seq != state.total.next_expected(source)
        if occupies and not self._admit(state, source, "total", effects):
            return  # an in-order NULL takes no room: it is always taken
        safe = held is not None and held.data.service == ServiceLevel.SAFE
        self._retain(state, source, message, raw)
        state.total.offer(source, seq, message.ts, message.aru, held, safe)
        state.null_prompt = True  # if we now owe a NULL (timestamp or ARU), owe it at once
        self._deliver_total(state, effects)

    def _duplicate(self, state: _ViewState) -> None:
        """A copy we had: a repair or a flush. Say what we hold at the next ACK even if
        it did not change (our last ACK may be what was lost)."""
        self._bump(duplicates_dropped=1)
        state.last_ack = ()
        state.ack_due = True

    def _on_causal(
        self, state: _ViewState, source: NodeId, held: _Held, effects: list[GroupEffect]
    ) -> None:
        sender = state.view.index[source]
        seq, vector = held.data.seq, held.data.vector
        if not state.causal.valid(sender, seq, vector):
            self._bump(malformed_dropped=1)
            return
        if state.causal.is_duplicate(sender, seq):
            self._duplicate(state)
            return
        if not self._admit(state, source, "causal", effects):
            return
        self._retain(state, source, held.data, held.raw)
        for ready in state.causal.offer(sender, seq, vector, held):
            self._deliver(ready, effects)

    def _on_pruned(
        self, state: _ViewState, source: NodeId, held: _Held, effects: list[GroupEffect]
    ) -> None:
        seq = next((s for d, s in held.data.fifo if d == self.local), None)
        if seq is None or seq < 1:
            self._bump(malformed_dropped=1)  # not numbered for us
            return
        if state.fifo.is_duplicate(source, seq):
            self._duplicate(state)
            return
        if not self._admit(state, source, "pruned", effects):
            return
        self._retain(state, source, held.data, held.raw)
        in_order = held.data.service == ServiceLevel.FIFO
        for ready in state.fifo.offer(source, seq, held, in_order=in_order):
            self._deliver(ready, effects)

    # ------------------------------------------------------------------ stability

    def _retain(
        self, state: _ViewState, source: NodeId, data: GroupData | GroupNull, raw: bytes
    ) -> None:
        """Keep a copy of a message for a flush or a repair, until every destination
        holds it (NULLs too: a lost one would leave a gap in the stream)."""
        numbers: Numbers
        if isinstance(data, GroupNull) or data.service in ORDERED_TOTAL:
            stream, numbers = "total", ((0, data.seq),)
        elif data.service == ServiceLevel.CAUSAL:
            stream, numbers = "causal", ((0, data.seq),)
        else:
            stream, numbers = "pruned", data.fifo
        state.retained.keep(source, stream, numbers, raw, self._now)
        state.ack_due = True

    def _repair(self, state: _ViewState, effects: list[GroupEffect]) -> None:
        """Send our own messages again to the destinations whose ACKs still lack them
        after `repair_after`: the overlay loses what a failed link held, and a link can
        fail and come back without a view change (so no flush recovers it)."""
        state.repair_at = self._now + self.config.repair_after / 2
        due = self._now - self.config.repair_after
        acked = self._acked_by(state)
        # Only to a destination whose ACKs of our messages stopped advancing: one that
        # still takes them in is being fed (our outbox or window is merely slow).
        # ...and whose path holds nothing of ours any more: a message queued or in flight
        # on a reliable link arrives; sending it again only adds a duplicate to the queue
        stuck = {
            m
            for m in state.others
            if state.progress_at.get(m, 0.0) <= due and not self._backlogged(m)
        }
        if not stuck:
            return
        budget = REPAIR_BATCH
        for copy in state.retained.copies(self.local):
            if copy.sent_at > due:
                continue
            stream, numbers = copy.stream, copy.numbers
            if stream == "pruned":
                lacking = [
                    NodeId(d)
                    for d, n in numbers
                    if NodeId(d) in stuck and acked(NodeId(d), self.local)[0] < n
                ]
            else:
                k = 1 if stream == "causal" else 2
                lacking = [m for m in stuck if acked(m, self.local)[k] < numbers[0][1]]
            if not lacking:
                continue
            copy.sent_at = self._now
            effects.append(Broadcast(tuple(lacking), copy.encoded))
            self._bump(repairs_sent=1)
            budget -= 1
            if budget == 0:
                return

    def _acked_by(self, state: _ViewState) -> Callable[[NodeId, NodeId], tuple[int, int, int]]:
        """acked(member, source): (pruned, causal, total) `member` holds of `source`."""
        own = {NodeId(m): (p, c, t) for m, p, c, t in state.ack_vector(self.local)}
        acks = state.acks
        nothing = (0, 0, 0)

        def acked(member: NodeId, source: NodeId) -> tuple[int, int, int]:
            if member == self.local:
                return own[source]
            return acks.get(member, {}).get(source, nothing)

        return acked

    def _on_ack(self, state: _ViewState, source: NodeId, ack: GroupAck) -> None:
        index = state.view.index
        if len(ack.entries) != len(index) or any(NodeId(m) not in index for m, *_ in ack.entries):
            self._bump(malformed_dropped=1)
            return
        if ack.blocked:
            state.blocked_by[source] = frozenset(ack.blocked_groups) or None
            self._bump(blocked_acks_received=1)
        else:
            state.blocked_by.pop(source, None)
        mine = state.acks.setdefault(source, {})
        for m, pruned, causal, total in ack.entries:
            old = mine.get(NodeId(m), (0, 0, 0))
            new = (max(old[0], pruned), max(old[1], causal), max(old[2], total))
            mine[NodeId(m)] = new
            if m == self.local and new != old:
                state.progress_at[source] = self._now  # it still takes our messages in
        self._collect(state)

    def _collect(self, state: _ViewState) -> None:
        """Forget the copies every destination has acknowledged."""
        acked = self._acked_by(state)
        members = state.view.members

        def stable(source: NodeId, stream: str, numbers: Numbers) -> bool:
            if stream == "pruned":
                return all(acked(NodeId(d), source)[0] >= n for d, n in numbers)
            k = 1 if stream == "causal" else 2
            return all(acked(m, source)[k] >= numbers[0][1] for m in members)

        state.retained.collect(stable)

    # ------------------------------------------------------------------ flush

    def _start_flush(self, target: GroupView, effects: list[GroupEffect]) -> None:
        """Stop sending in the current view; send our FLUSH towards `target`: to each
        other member, the copies it has not acknowledged (a copy it holds, or one not
        meant for it, would only be dropped as a duplicate)."""
        self._round += 1
        self._bump(flushes_started=1)
        state = self._state
        prefixes: dict[NodeId, int] = {}
        if state is not None:
            state.frozen = True
            prefixes = {m: state.total.prefix(m) for m in state.view.members}
        flush = _Flush(target, prefixes)
        self._flush = flush
        from_view = state.view.view_id if state is not None else NO_VIEW
        reported = tuple((int(m), p) for m, p in sorted(prefixes.items()))
        incarnation = target.incarnations[target.index[self.local]] if target.incarnations else 0
        others = tuple(m for m in target.members if m != self.local)
        lacking = self._lacking(state, others)
        self._sent_flush = {}
        self._answered.clear()
        interval = self.config.flush_retry_interval
        for m in others:
            carried = lacking.get(m, [])
            chunks: list[list[tuple[int, bytes]]] = [[]]
            size = 0
            for copy in carried:
                if chunks[-1] and size + len(copy[1]) > FLUSH_PART_BYTES:
                    chunks.append([])
                    size = 0
                chunks[-1].append(copy)
                size += len(copy[1])
            self._sent_flush[m] = tuple(
                GroupFlush(
                    target.view_id,
                    from_view,
                    incarnation,
                    self._round,
                    self._views,
                    part,
                    len(chunks),
                    reported,
                    tuple(chunk),
                )
                for part, chunk in enumerate(chunks)
            )
            self._send_parts(m, self._sent_flush[m], effects)
            self._bump(flush_copies_sent=len(carried))
            flush.probe_at[m] = self._now + interval
            flush.probe_delay[m] = interval
        self._retry_at = self._now + interval
        self._replay_future(effects)
        self._try_complete(effects)

    def _lacking(
        self, state: _ViewState | None, members: tuple[NodeId, ...]
    ) -> dict[NodeId, list[tuple[int, bytes]]]:
        """Per member of the old view: the copies it has not acknowledged, in the order
        kept. A member from another view takes none (it ignores our view's copies)."""
        out: dict[NodeId, list[tuple[int, bytes]]] = {}
        if state is None:
            return out
        acked = self._acked_by(state)
        old = [m for m in members if m in state.view.index]
        for m in old:
            out[m] = []
        for copy in state.retained.copies():
            source = copy.source
            numbers = copy.numbers
            item = (int(source), copy.encoded)
            for m in old:
                if m == source:
                    continue  # its own message: it has it
                if copy.stream == "pruned":
                    n = next((n for d, n in numbers if d == m), None)
                    if n is not None and acked(m, source)[0] < n:
                        out[m].append(item)
                else:
                    k = 1 if copy.stream == "causal" else 2
                    if acked(m, source)[k] < numbers[0][1]:
                        out[m].append(item)
        return out

    def _send_parts(
        self, dest: NodeId, parts: Iterable[GroupFlush], effects: list[GroupEffect]
    ) -> int:
        sent = 0
        for message in parts:
            encoded = encode_group(message)
            effects.append(Broadcast((dest,), encoded))
            self._bump(flush_messages_sent=1, flush_bytes_sent=len(encoded))
            sent += 1
        return sent

    def _retry_flush(self, flush: _Flush, effects: list[GroupEffect]) -> None:
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
            at = flush.probe_at.get(m, self._now)
            if self._now >= at:
                delay = flush.probe_delay.get(m, interval)
                probe = GroupFlush(
                    flush.target.view_id,
                    self._state.view.view_id if self._state is not None else NO_VIEW,
                    self._incarnation_in(flush.target),
                    self._round,
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
                self._bump(flush_probes_sent=1)
                at = self._now + delay
                flush.probe_at[m] = at
                flush.probe_delay[m] = min(delay * 2, 8 * interval)
            due.append(at)
        self._retry_at = min(due, default=self._now + interval)

    def _incarnation_in(self, target: GroupView) -> int:
        return target.incarnations[target.index[self.local]] if target.incarnations else 0

    def _answer(self, peer: NodeId, probe: GroupFlush, effects: list[GroupEffect]) -> None:
        """`peer` still waits in a flush towards the probe's target: send it the parts of
        our FLUSH for that target it lacks (at most twice per retry interval)."""
        parts = self._sent_flush.get(peer)
        if not parts or parts[0].view_id != probe.view_id:
            return
        if self._backlogged(peer):
            self._bump(flush_answers_deferred=1)  # our parts are still on their way
            return
        if (
            self._now
            < self._answered.get(peer, float("-inf")) + self.config.flush_retry_interval / 2
        ):
            return
        self._answered[peer] = self._now
        ours = (parts[0].incarnation, parts[0].round)
        held = set(probe.held) if probe.held_round == ours else set()
        missing = [p for p in parts if p.part not in held]
        self._bump(flush_parts_resent=self._send_parts(peer, missing, effects))

    def _on_flush(
        self, source: NodeId, message: GroupFlush, raw: bytes, effects: list[GroupEffect]
    ) -> None:
        if source == self.local:
            self._bump(not_member_dropped=1)
            return
        sender_round = (message.incarnation, message.round)
        if sender_round < self._peer_round.get(source, (0, 0)):
            self._bump(stale_flush_dropped=1)
            return
        flush, state = self._flush, self._state
        if message.retry:
            # A probe. A new round of the sender towards the view we have: it saw the
            # view change and come back, we did not; flush with it.
            if (
                flush is None
                and state is not None
                and message.view_id == state.view.numbered(0).view_id
                and sender_round > self._peer_round.get(source, (0, 0))
            ):
                self._start_flush(state.view.numbered(0), effects)
                return
            self._answer(source, message, effects)
            return
        if (
            flush is None
            and state is not None
            and message.view_id == state.view.numbered(0).view_id
        ):
            if sender_round == self._peer_round.get(source):
                self._bump(stale_flush_dropped=1)  # a part of the round we completed
                return
            # The sender saw the view change and come back; we did not. Flush with it,
            # or it waits for our FLUSH for ever.
            self._start_flush(state.view.numbered(0), effects)
            flush = self._flush
        if flush is None or message.view_id != flush.target.view_id:
            self._buffer_future(source, message, raw)  # a flush we have not started yet
            return
        if source not in flush.target.index:
            self._bump(not_member_dropped=1)
            return
        self._peer_round[source] = sender_round
        report = flush.reports.get(source)
        if report is None or report.round < sender_round:
            report = _Report(sender_round, message.from_view, message.views, message.parts)
            flush.reports[source] = report
        if message.part in report.got or message.parts != report.parts:
            self._bump(duplicates_dropped=1)
            return
        report.got.add(message.part)
        # a part came in: the rest is in flight, probe only if it stops coming
        interval = self.config.flush_retry_interval
        flush.probe_delay[source] = interval
        flush.probe_at[source] = self._now + interval
        if state is not None and message.from_view == state.view.view_id:
            for member, prefix in message.prefixes:
                m = NodeId(member)
                report.prefixes[m] = max(report.prefixes.get(m, 0), prefix)
            for origin, data in message.messages:
                self._merge(state, NodeId(origin), data, effects)
        self._try_complete(effects)

    def _merge(
        self, state: _ViewState, source: NodeId, raw: bytes, effects: list[GroupEffect]
    ) -> None:
        """A copy carried by a FLUSH: taken like a message received in the view."""
        try:
            message = decode_group(raw)
        except DecodeError:
            self._bump(malformed_dropped=1)
            return
        if (
            not isinstance(message, GroupData | GroupNull)
            or message.view_id != state.view.view_id
            or (isinstance(message, GroupData) and message.service == ServiceLevel.UNRELIABLE)
            or source not in state.view.index
        ):
            self._bump(malformed_dropped=1)
            return
        if source == self.local:
            return  # our own: we have it
        pruned = isinstance(message, GroupData) and message.service in PRUNED
        if pruned and all(d != self.local for d, _ in message.fifo):  # type: ignore[union-attr]
            return  # for other daemons
        before = self._stats["duplicates_dropped"]
        self._on_data(state, source, message, raw, effects)
        if self._stats["duplicates_dropped"] == before:
            self._bump(flush_recovered=1)

    def _try_complete(self, effects: list[GroupEffect]) -> None:
        """Install the flush's view once every other member's FLUSH is complete."""
        flush = self._flush
        if flush is None:
            return
        reports = flush.reports
        for m in flush.target.members:
            if m != self.local and (m not in reports or not reports[m].complete):
                return
        number = max([self._views, *(r.views for r in reports.values())]) + 1
        view = flush.target.numbered(number)
        old = self._state
        undelivered: tuple[MessageRef, ...] = ()
        if old is not None:
            undelivered = self._finish_view(old, flush, effects)
            self._past_views.append(old.view.view_id)
        self._views = number
        self._flush = None
        self._state = _ViewState(self.local, view)
        self._state.progress_at = dict.fromkeys(view.members, self._now)
        if self._blocked:
            self._state.last_ack = ()  # the new members must hear it too
            self._state.ack_due = True
        self._bump(views_installed=1)
        effects.append(
            OrderingReset(
                old.view.view_id if old else None, view.view_id, view.members, undelivered
            )
        )
        self._replay_future(effects)
        queued, self._queued = self._queued, deque()
        for groups, payload, service, sender, msg_type, token in queued:
            try:
                effects.extend(
                    self.submit(groups, payload, service, sender, self._now, msg_type, token)
                )
            except (BufferFull, UsageError) as exc:
                log.warning("daemon %s: a message queued in a flush is lost: %s", self.local, exc)
                if token:
                    effects.append(SubmitLost(token, str(exc)))

    def _finish_view(
        self, state: _ViewState, flush: _Flush, effects: list[GroupEffect]
    ) -> tuple[MessageRef, ...]:
        """Deliver what the flush agreed on of the old view; return what it discarded.

        Every survivor (a member of both views) now holds the union of the survivors'
        copies; each takes the same decisions on that same set:
        RELIABLE/FIFO: everything held, in number order (a missing number is lost
        everywhere: its sender failed). CAUSAL: what the union makes causally complete;
        the rest waited for a message lost everywhere. AGREED/SAFE: `TotalOrder.finish`
        with each stream cut at the longest prefix any survivor reported.
        """
        ends = dict(flush.own_prefixes)
        for report in flush.reports.values():
            if report.from_view == state.view.view_id:
                for m, prefix in report.prefixes.items():
                    ends[m] = max(ends.get(m, 0), prefix)
        delivered_before = self._stats["delivered"]
        # Spread's transitional configuration: the old view's own rules first, the same
        # messages at every survivor; then, if members departed, what only the survivors
        # are known to hold (`TotalOrder.finish_split`)
        reports = flush.reports
        survivors = tuple(
            m
            for m in state.view.members
            if m == self.local or (m in reports and reports[m].from_view == state.view.view_id)
        )
        departed = [m for m in state.view.members if m not in survivors]
        regular, transitional, dropped = state.total.finish_split(ends, departed)
        for item in regular:
            self._deliver(item, effects)
        if departed:
            effects.append(ViewTransition(state.view.view_id, state.view.members, survivors))
        for item in state.fifo.drain():
            self._deliver(item, effects)
        for item in transitional:
            self._deliver(item, effects)
        dropped.extend(state.causal.drain())
        self._bump(
            flush_delivered=self._stats["delivered"] - delivered_before,
            undeliverable_on_view_change=len(dropped),
        )
        return tuple(h.ref() for h in dropped if self.hosts(h.data.groups))

    # ------------------------------------------------------------------ delivering

    def _deliver_total(self, state: _ViewState, effects: list[GroupEffect]) -> None:
        if state.frozen:
            return  # a flush decides: our prefix may outgrow what we reported
        for ready in state.total.ready(self._clock):
            self._deliver(ready, effects)

    def _deliver(self, held: _Held, effects: list[GroupEffect]) -> None:
        d = held.data
        if not self.hosts(d.groups):
            self._bump(ordered_not_hosted=1)
        else:
            self._bump(delivered=1)
            effects.append(
                Deliver(d.sender, d.groups, d.service, d.msg_type, d.payload, held.source, d.msg_id)
            )
        if held.token:
            effects.append(SubmitConfirmed(held.token))

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
        self._stats.bump(**counts)
