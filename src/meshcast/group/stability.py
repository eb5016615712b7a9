"""Stability: copies of the view's messages kept until every destination holds them, and
the ACKs that show it (JGroups' STABLE).

Every daemon keeps a copy of each RELIABLE, FIFO, CAUSAL, AGREED, SAFE and NULL message of
the current view that it sent or received (`meshcast.group.retention`), and broadcasts an
ACK at most every `ack_interval`, only when it changed: per member, the prefix it holds of
that member's pruned numbering to it, of its causal messages and of its total-order stream
(ordering knows what is held and passes it in: `Ordering.ack_vector`). A copy is forgotten
once every destination's ACK covers it. What is left feeds repair (`meshcast.group.repair`)
and a flush (`meshcast.group.flush`). ACKs also carry flow control: a BLOCKED ACK says a
local `block` member cannot keep up, and the other daemons' senders to its groups wait.
Theory: docs/design/group.md, "Virtual synchrony".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from meshcast.group.config import StabilityConfig
from meshcast.group.events import Broadcast, GroupEffect
from meshcast.group.retention import Copy, Numbers, Retention
from meshcast.group.view import GroupView
from meshcast.ids import NodeId
from meshcast.wire.group import MAX_BLOCKED_GROUPS, GroupAck, encode_group

# what a daemon holds, per member of the view:
# (member, pruned prefix to us, causal messages processed, total-order stream prefix)
AckVector = tuple[tuple[int, int, int, int], ...]
# acked(member, source): the (pruned, causal, total) prefixes `member` holds of `source`
Acked = Callable[[NodeId, NodeId], tuple[int, int, int]]

# the floor of a stream without members: every copy is stable
_NO_MEMBER_LACKS = 1 << 64


@dataclass(frozen=True, slots=True)
class StabilityStats:
    """Counters of the stability protocol (a frozen snapshot)."""

    acks_sent: int = 0
    blocked_acks_sent: int = 0  # ACKs saying a local `block` member is behind
    blocked_acks_received: int = 0  # ...from other daemons: local senders wait
    malformed_dropped: int = 0  # ACKs that do not fit the view
    retained_messages: int = 0  # copies kept now (gauge)
    retained_bytes: int = 0  # bytes of those copies (gauge)


@dataclass(slots=True)
class _Counters:
    """The cumulative counters of `StabilityStats`, bumped in place."""

    acks_sent: int = 0
    blocked_acks_sent: int = 0
    blocked_acks_received: int = 0
    malformed_dropped: int = 0


class Stability:
    """Copies and ACKs of one daemon, for the view installed last. Sans-I/O."""

    def __init__(self, local: NodeId, config: StabilityConfig) -> None:
        self.local = local
        self.config = config
        self._blocked = False  # a local `block` member cannot keep up
        self._blocked_groups: tuple[str, ...] = ()  # ...in these groups (() = every group)
        self._counters = _Counters()
        # per view (`reset`)
        self.view: GroupView | None = None
        self.others: tuple[NodeId, ...] = ()
        self._retained = Retention()
        self._acks: dict[NodeId, dict[NodeId, tuple[int, int, int]]] = {}
        self._last_ack: AckVector = ()
        self._ack_due = False  # something arrived (or was sent) since the last ACK
        self._last_ack_at = float("-inf")
        self._progress_at: dict[NodeId, float] = {}  # last ACK of a member covering more of ours
        # members whose last ACK said BLOCKED: the groups it named (None: every group)
        self._blocked_by: dict[NodeId, frozenset[str] | None] = {}

    def reset(self, view: GroupView, holding: AckVector, now: float) -> None:
        """A new view: forget the old one's copies and ACKs. `holding`: what we hold in
        the new view (nothing yet), so that an ACK goes only once something arrived."""
        self.view = view
        self.others = tuple(m for m in view.members if m != self.local)
        self._retained = Retention()
        self._acks = {}
        self._last_ack = holding
        self._ack_due = False
        self._last_ack_at = float("-inf")
        self._progress_at = dict.fromkeys(view.members, now)
        self._blocked_by = {}
        if self._blocked:
            self.ack_again()  # the new members must hear it too

    # ------------------------------------------------------------------ queries

    def statistics(self) -> StabilityStats:
        c = self._counters
        return StabilityStats(
            acks_sent=c.acks_sent,
            blocked_acks_sent=c.blocked_acks_sent,
            blocked_acks_received=c.blocked_acks_received,
            malformed_dropped=c.malformed_dropped,
            retained_messages=self._retained.count,
            retained_bytes=self._retained.size,
        )

    def retained_bytes(self) -> int:
        """Bytes of the copies kept now."""
        return self._retained.size

    @property
    def retained(self) -> int:
        """Copies kept now."""
        return self._retained.count

    def full(self) -> bool:
        """No room for one more copy (a peer's message must be refused)."""
        return self._retained.count >= self.config.max_retained_messages

    def window_open(self) -> bool:
        """May we send one more message of our own (our copies not yet held by every
        destination stay below a quarter of the bounds)?"""
        copies, size = self._retained.of(self.local)
        return (
            copies < max(self.config.max_retained_messages // 4, 1)
            and size < self.config.max_retained_bytes // 4
        )

    def copies(self, source: NodeId | None = None) -> Iterator[Copy]:
        """The copies kept (or `source`'s), per stream in the order kept."""
        return self._retained.copies(source)

    def progress_at(self, member: NodeId) -> float:
        """When `member`'s ACKs last covered more of our messages."""
        return self._progress_at.get(member, 0.0)

    def acked_by(self, holding: AckVector) -> Acked:
        """acked(member, source): (pruned, causal, total) `member` holds of `source`; for
        ourselves, `holding`."""
        own = {NodeId(m): (p, c, t) for m, p, c, t in holding}
        acks = self._acks
        nothing = (0, 0, 0)
        local = self.local

        def acked(member: NodeId, source: NodeId) -> tuple[int, int, int]:
            if member == local:
                return own[source]
            return acks.get(member, {}).get(source, nothing)

        return acked

    def lacking(
        self, members: tuple[NodeId, ...], holding: AckVector
    ) -> dict[NodeId, list[tuple[int, bytes]]]:
        """Per member of the view among `members`: the (source, copy) its ACKs do not
        cover, in the order kept. A member from another view takes none (it ignores our
        view's copies); a member's own messages it has."""
        out: dict[NodeId, list[tuple[int, bytes]]] = {}
        if self.view is None:
            return out
        acked = self.acked_by(holding)
        old = [m for m in members if m in self.view.index]
        for m in old:
            out[m] = []
        for copy in self._retained.copies():
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

    def holds_back(self, groups: Iterable[str]) -> bool:
        """Must a local client's message to `groups` wait? True while a `block` member of
        one of them, here or at any daemon of the view (its ACKs say BLOCKED), cannot
        keep up. Other groups keep flowing."""
        remote = self._blocked_by
        if not self._blocked and not remote:
            return False  # the usual case: checked per MULTICAST, so kept cheap
        named = frozenset(groups)
        if self._blocked and (
            not self._blocked_groups or not named.isdisjoint(self._blocked_groups)
        ):
            return True
        return any(blocked is None or not named.isdisjoint(blocked) for blocked in remote.values())

    def ack_deadline(self) -> float | None:
        """When the next ACK is due (None: nothing new to say)."""
        if self.others and self._ack_due:
            return self._last_ack_at + self.config.ack_interval
        return None

    def ack_ready(self, now: float) -> bool:
        """Is an ACK due now (something new to say, `ack_interval` after the last)?"""
        return (
            bool(self.others)
            and self._ack_due
            and now >= self._last_ack_at + self.config.ack_interval
        )

    # ------------------------------------------------------------------ inputs

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
        if self.view is not None:
            self.ack_again()

    def retain(
        self, source: NodeId, stream: str, numbers: Numbers, encoded: bytes, now: float
    ) -> None:
        """Keep a copy of a message for a flush or a repair, until every destination
        holds it (NULLs too: a lost one would leave a gap in the stream)."""
        self._retained.keep(source, stream, numbers, encoded, now)
        self._ack_due = True

    def ack_again(self) -> None:
        """Say what we hold at the next ACK even if it did not change (a duplicate came:
        our last ACK may be what was lost; or the BLOCKED flag changed)."""
        self._last_ack = ()
        self._ack_due = True

    def send_ack(self, holding: AckVector, now: float, effects: list[GroupEffect]) -> None:
        """The ACK timer (`ack_ready`): tell the others what we hold, if it changed."""
        self._ack_due = False
        if holding == self._last_ack or self.view is None:
            return
        self._last_ack, self._last_ack_at = holding, now
        self._counters.acks_sent += 1
        ack = GroupAck(self.view.view_id, holding, self._blocked, self._blocked_groups)
        if self._blocked:
            self._counters.blocked_acks_sent += 1
        effects.append(Broadcast(self.others, encode_group(ack)))

    def on_ack(self, source: NodeId, ack: GroupAck, holding: AckVector, now: float) -> None:
        """A member's ACK of this view: note what it holds, forget what all hold."""
        assert self.view is not None  # the engine routes only ACKs of the view installed
        index = self.view.index
        if len(ack.entries) != len(index) or any(NodeId(m) not in index for m, *_ in ack.entries):
            self._counters.malformed_dropped += 1
            return
        if ack.blocked:
            self._blocked_by[source] = frozenset(ack.blocked_groups) or None
            self._counters.blocked_acks_received += 1
        else:
            self._blocked_by.pop(source, None)
        mine = self._acks.setdefault(source, {})
        for m, pruned, causal, total in ack.entries:
            old = mine.get(NodeId(m), (0, 0, 0))
            new = (max(old[0], pruned), max(old[1], causal), max(old[2], total))
            mine[NodeId(m)] = new
            if m == self.local and new != old:
                self._progress_at[source] = now  # it still takes our messages in
        self._collect(holding)

    def _collect(self, holding: AckVector) -> None:
        """Forget the copies every destination has acknowledged."""
        assert self.view is not None
        acked = self.acked_by(holding)
        members = self.view.members
        # what every member holds of a source's causal (1) or total (2) stream: worked out
        # once per stream and ACK, not once per copy
        floors: dict[tuple[NodeId, int], int] = {}

        def stable(source: NodeId, stream: str, numbers: Numbers) -> bool:
            if stream == "pruned":
                return all(acked(NodeId(d), source)[0] >= n for d, n in numbers)
            key = (source, 1 if stream == "causal" else 2)
            floor = floors.get(key)
            if floor is None:
                floor = floors[key] = min(
                    (acked(m, source)[key[1]] for m in members), default=_NO_MEMBER_LACKS
                )
            return floor >= numbers[0][1]

        self._retained.collect(stable)
