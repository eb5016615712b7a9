"""Replicated group membership: which clients are in which group, identical at every daemon.

A client's join or leave is not applied where it happens. The daemon submits it through
the `GroupEngine` as an AGREED message to the reserved internal group `MEMBERSHIP_GROUP`
(``#membership``: client group names may never start with ``#``, so no client can send
to it or join it). Every daemon applies the operations when the total order delivers
them, so every daemon applies the same operations in the same order and holds the same
table group → members (private names, with the daemon that hosts each). Each change
yields a `MembershipChanged` for the group. Theory and limits: docs/design/group.md,
"Sessions and membership".

Daemon view changes:

* a daemon that left the view takes its members with it: every daemon removes them when
  the engine installs the view after its flush (deterministic: the same view gives the
  same removals, after the same old-view operations) and emits `network` changes,
  coordinated by the lowest daemon id of the new view;
* then every daemon submits a STATE operation: the complete list of its own clients'
  memberships. It teaches a daemon that just arrived the memberships of the others (and
  the other side of a healed partition). A difference between a STATE and the table is
  applied as a `network` change.

The operations' payload (JOIN, LEAVE, DISCONNECT, STATE) is encoded and decoded by
`meshcast.wire.membership`; one that does not decode is a counted drop
(`malformed_dropped`), never an exception.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from meshcast.compile_hints import mypyc_attr
from meshcast.errors import BufferFull, DecodeError, UsageError
from meshcast.group.engine import GroupEngine
from meshcast.group.events import Broadcast, Deliver, GroupEffect, OrderingReset, ViewTransition
from meshcast.ids import NodeId
from meshcast.wire.client import Cause, ServiceLevel, ViewId
from meshcast.wire.membership import (
    MembershipOp,
    OpKind,
    State,
    StateEntry,
    decode_membership,
    encode_membership,
)

log = logging.getLogger(__name__)

MEMBERSHIP_GROUP = "#membership"  # reserved: the group of membership operations
_MEMBERSHIP_GROUPS = (MEMBERSHIP_GROUP,)
MEMBERSHIP_MSG_TYPE = 0xFFFF  # msg_type of membership operations (informative only)
_OP_CAUSES = {
    OpKind.JOIN: Cause.JOIN,
    OpKind.LEAVE: Cause.LEAVE,
    OpKind.DISCONNECT: Cause.DISCONNECT,
}
MAX_PENDING_OPS = 10_000  # operations waiting for a view (or for room in the engine)


@dataclass(frozen=True, slots=True)
class MembershipChanged:
    """Group `group` has a new view (the same event, in the same order, at every daemon)."""

    group: str
    view_id: ViewId
    members: tuple[str, ...]  # private names, by daemon id then name (`canonical`)
    cause: Cause
    who: tuple[str, ...]
    hosts: tuple[NodeId, ...]  # daemons of `members`, in the same order


MembershipEffect = GroupEffect | MembershipChanged


@dataclass(slots=True)
class _Counters:
    """The counters of `MembershipStats`, bumped in place (`+= 1`, checked by mypy)."""

    operations_submitted: int = 0
    operations_applied: int = 0
    operations_queued: int = 0
    states_submitted: int = 0
    malformed_dropped: int = 0
    changes: int = 0


@dataclass(frozen=True, slots=True)
class MembershipStats:
    """Counters of the group membership layer (a frozen snapshot, `statistics()`)."""

    operations_submitted: int = 0
    operations_applied: int = 0
    operations_queued: int = 0  # submitted later: no view yet, or the engine was full
    states_submitted: int = 0
    malformed_dropped: int = 0  # an operation that does not decode
    changes: int = 0  # MembershipChanged events


@dataclass(slots=True)
class _Group:
    counter: int = 0
    coordinator: int = 1  # NodeId of the daemon that made the latest change
    members: list[tuple[str, NodeId]] = field(default_factory=list)


def _operation(kind: OpKind, member: str, groups: tuple[str, ...]) -> MembershipOp:
    """The operation, checked now as its encoding will be (UsageError: a bad name or count)."""
    op = MembershipOp(kind, member, groups)
    try:
        encode_membership(op)
    except ValueError as exc:
        raise UsageError(f"bad membership operation: {exc}") from None
    return op


def canonical(g: _Group) -> None:
    """Members in one order whatever order the changes were applied in: by daemon id,
    then name. (Join order is not used: a daemon that catches up from a STATE learns
    the members without the order they joined in, and would disagree.)"""
    g.members.sort(key=lambda member: (member[1], member[0]))


@mypyc_attr(allow_interpreted_subclasses=True)  # DaemonLayers: tests subclass it
class GroupMembership:
    """Group membership on top of one daemon's `GroupEngine` (sans-I/O).

    Route every engine input through this object (`view_installed`,
    `overlay_delivered`, `on_timer`, `submit`): it applies the membership operations the
    engine delivers, turns them into `MembershipChanged` effects, keeps the engine's
    group → hosting daemons map up to date, and passes every other effect through.
    """

    def __init__(self, engine: GroupEngine) -> None:
        self.engine = engine
        self.local = engine.local
        self._groups: dict[str, _Group] = {}
        # this daemon's clients' memberships as submitted: group -> members, in order
        self._intent: dict[str, dict[str, None]] = {}
        self._pending: list[MembershipOp] = []
        self._view: tuple[NodeId, ...] = ()
        # every daemon hosts the operations, from the start: operations of a new view
        # can be delivered (replayed) before this layer has seen that view's reset
        engine.set_group_daemons(MEMBERSHIP_GROUP, {engine.local})
        # STATEs applied in the current view: daemon -> group -> its own members
        self._announced: dict[NodeId, dict[str, tuple[str, ...]]] = {}
        self._transitional: set[str] = set()  # groups in a transitional view until the reset
        self._counters = _Counters()

    # ------------------------------------------------------------------ queries

    def members(self, group: str) -> tuple[str, ...]:
        g = self._groups.get(group)
        return tuple(m for m, _ in g.members) if g else ()

    def view_id(self, group: str) -> ViewId | None:
        g = self._groups.get(group)
        return ViewId(g.counter, g.coordinator) if g else None

    def local_members(self, group: str) -> tuple[str, ...]:
        """Members of `group` hosted by this daemon (applied, not merely requested)."""
        g = self._groups.get(group)
        return tuple(m for m, d in g.members if d == self.local) if g else ()

    def table(self) -> dict[str, tuple[tuple[str, NodeId], ...]]:
        """The whole table: group -> (member, daemon) in order (identical everywhere)."""
        return {name: tuple(g.members) for name, g in sorted(self._groups.items())}

    def statistics(self) -> MembershipStats:
        c = self._counters
        return MembershipStats(
            operations_submitted=c.operations_submitted,
            operations_applied=c.operations_applied,
            operations_queued=c.operations_queued,
            states_submitted=c.states_submitted,
            malformed_dropped=c.malformed_dropped,
            changes=c.changes,
        )

    def next_deadline(self) -> float | None:
        return self.engine.next_deadline()

    # ------------------------------------------------------------------ commands

    def join(self, member: str, group: str, now: float) -> list[MembershipEffect]:
        """Ask every daemon to add local client `member` to `group` (applied when ordered)."""
        return self._request(_operation(OpKind.JOIN, member, (group,)), now)

    def leave(self, member: str, group: str, now: float) -> list[MembershipEffect]:
        return self._request(_operation(OpKind.LEAVE, member, (group,)), now)

    def disconnect(self, member: str, groups: Sequence[str], now: float) -> list[MembershipEffect]:
        """Local client `member` is gone: remove it from `groups` (cause `disconnect`)."""
        if not groups:
            return []
        return self._request(_operation(OpKind.DISCONNECT, member, tuple(groups)), now)

    def submit(
        self,
        groups: Sequence[str],
        payload: bytes,
        service: ServiceLevel,
        sender: str,
        now: float,
        msg_type: int = 0,
        token: int = 0,
    ) -> list[MembershipEffect]:
        """A client's data message (raises what `GroupEngine.submit` raises; `token`: see
        there)."""
        if any(g.startswith("#") for g in groups):
            raise UsageError("group names starting with '#' are reserved")
        return self._filter(
            self.engine.submit(groups, payload, service, sender, now, msg_type, token), now
        )

    def begin_batch(self) -> None:
        """Client messages of one batch follow (`GroupEngine.begin_batch`)."""
        self.engine.begin_batch()

    def end_batch(self, now: float) -> list[MembershipEffect]:
        return self._filter(self.engine.end_batch(), now)

    # ------------------------------------------------------------------ inputs

    def view_installed(
        self, members: Iterable[NodeId], now: float, incarnations: Sequence[int] = ()
    ) -> list[MembershipEffect]:
        """A new daemon view. The engine flushes first; when it installs the view
        (`OrderingReset`, from this or a later input) the members of departed daemons are
        dropped and ours re-announced (`_view_changed`)."""
        view = tuple(sorted(set(members)))
        effects = self._filter(self.engine.view_installed(view, now, incarnations), now)
        effects.extend(self._flush_pending(now))
        return effects

    def overlay_delivered(
        self, source: NodeId, payload: bytes, now: float
    ) -> list[MembershipEffect]:
        effects = self._filter(self.engine.overlay_delivered(source, payload, now), now)
        if self._pending:
            effects.extend(self._flush_pending(now))
        return effects

    def on_timer(self, now: float) -> list[MembershipEffect]:
        effects = self._filter(self.engine.on_timer(now), now)
        if self._pending:
            effects.extend(self._flush_pending(now))
        return effects

    # ------------------------------------------------------------------ submitting

    def _request(self, op: MembershipOp, now: float) -> list[MembershipEffect]:
        if self._pending or self.engine.view is None or self.engine.flushing:
            return self._queue(op)
        try:
            return self._submit_op(op, now)
        except BufferFull:
            return self._queue(op)

    def _queue(self, op: MembershipOp) -> list[MembershipEffect]:
        if len(self._pending) >= MAX_PENDING_OPS:
            raise BufferFull(f"{len(self._pending)} membership operations wait already")
        self._pending.append(op)
        self._counters.operations_queued += 1
        return []

    def _submit_op(self, op: MembershipOp, now: float) -> list[MembershipEffect]:
        payload = encode_membership(op)
        member = op.member
        raw = self.engine.submit(
            (MEMBERSHIP_GROUP,), payload, ServiceLevel.AGREED, "", now, MEMBERSHIP_MSG_TYPE
        )
        # Committed: record the intent the next STATE will announce.
        for g in op.groups:
            if op.kind == OpKind.JOIN:
                self._intent.setdefault(g, {})[member] = None
            else:
                local = self._intent.get(g)
                if local is not None:
                    local.pop(member, None)
                    if not local:
                        del self._intent[g]
        self._counters.operations_submitted += 1
        return self._filter(raw, now)

    def _flush_pending(self, now: float) -> list[MembershipEffect]:
        effects: list[MembershipEffect] = []
        if self.engine.view is None or self.engine.flushing:
            return effects
        while self._pending:
            try:
                effects.extend(self._submit_op(self._pending[0], now))
            except BufferFull:
                break
            self._pending.pop(0)
        return effects

    def _announce(self, now: float) -> list[MembershipEffect]:
        state = State(
            tuple(
                StateEntry(name, g.counter, g.coordinator, tuple((m, int(d)) for m, d in g.members))
                for name, g in sorted(self._groups.items())
            ),
            tuple((g, tuple(members)) for g, members in sorted(self._intent.items())),
        )
        try:
            raw = self.engine.submit(
                (MEMBERSHIP_GROUP,),
                encode_membership(state),
                ServiceLevel.AGREED,
                "",
                now,
                MEMBERSHIP_MSG_TYPE,
            )
        except (BufferFull, UsageError) as exc:
            log.warning("daemon %s: membership state not announced: %s", self.local, exc)
            return []
        self._counters.states_submitted += 1
        return self._filter(raw, now)

    # ------------------------------------------------------------------ applying

    def _filter(self, raw: list[GroupEffect], now: float) -> list[MembershipEffect]:
        effects: list[MembershipEffect] = []
        announce = False
        for effect in raw:
            if isinstance(effect, Deliver):  # most effects: a loop, no generator
                groups = effect.groups
                if groups == _MEMBERSHIP_GROUPS:
                    effects.extend(self._apply(effect.source, effect.payload))
                    continue
                for g in groups:
                    if g.startswith("#"):
                        self._counters.malformed_dropped += 1  # only daemons name these
                        break
                else:
                    effects.append(effect)
            elif isinstance(effect, ViewTransition):
                effects.extend(self._transition(effect.survivors))
                effects.append(effect)
            elif isinstance(effect, OrderingReset):
                effects.extend(self._view_changed(effect.members))
                effects.append(effect)
                announce = True
            else:
                effects.append(effect)
        if announce:  # after every effect of the old view
            effects.extend(self._announce(now))
            effects.extend(self._flush_pending(now))
        return effects

    def _transition(self, survivors: tuple[NodeId, ...]) -> list[MembershipEffect]:
        """Daemons left the view: each group with members on them gets a *transitional*
        view (Spread's TRANSITION): the members on the daemons that move on together. The
        table does not change; the regular `network` view follows once the flush is over,
        and the messages between the two are delivered in the transitional configuration."""
        moving = set(survivors)
        effects: list[MembershipEffect] = []
        for name in sorted(self._groups):
            g = self._groups[name]
            if all(d in moving for _, d in g.members):
                continue
            kept = [(m, d) for m, d in g.members if d in moving]
            self._transitional.add(name)
            effects.append(
                MembershipChanged(
                    name,
                    ViewId(g.counter, g.coordinator),
                    tuple(m for m, _ in kept),
                    Cause.TRANSITIONAL,
                    (),
                    tuple(d for _, d in kept),
                )
            )
        return effects

    def _view_changed(self, members: tuple[NodeId, ...]) -> list[MembershipEffect]:
        """The engine installed a view (after its flush delivered the old view's
        operations): a daemon that left takes its members with it, the same removals at
        every daemon, coordinated by the lowest daemon id of the new view."""
        self._view = members
        self._announced = {}
        self.engine.set_group_daemons(MEMBERSHIP_GROUP, members)
        coordinator = members[0]
        effects: list[MembershipEffect] = []
        transitional, self._transitional = self._transitional, set()
        for name in sorted(self._groups):
            g = self._groups[name]
            gone = tuple(m for m, d in g.members if d not in members)
            if gone:
                g.members = [(m, d) for m, d in g.members if d in members]
                effects.append(self._changed(name, g, coordinator, Cause.NETWORK, gone))
            elif name in transitional:
                # The departed daemons are back in the new view (a merge after a pause):
                # a regular view still ends the transitional one, unchanged (same id).
                effects.append(
                    MembershipChanged(
                        name,
                        ViewId(g.counter, g.coordinator),
                        tuple(m for m, _ in g.members),
                        Cause.NETWORK,
                        (),
                        tuple(d for _, d in g.members),
                    )
                )
        return effects

    def _apply(self, source: NodeId, payload: bytes) -> list[MembershipChanged]:
        try:
            decoded = decode_membership(payload)
        except DecodeError as exc:
            self._counters.malformed_dropped += 1
            log.debug("daemon %s: bad membership operation from %s: %s", self.local, source, exc)
            return []
        self._counters.operations_applied += 1
        if isinstance(decoded, State):
            return self._apply_state(source, decoded)
        return self._apply_op(source, decoded)

    def _apply_op(self, source: NodeId, op: MembershipOp) -> list[MembershipChanged]:
        member, join = op.member, op.kind == OpKind.JOIN
        out: list[MembershipChanged] = []
        announced = self._announced.get(source)
        for name in op.groups:
            if announced is not None:  # keep what `source` said it hosts up to date
                listed = [m for m in announced.get(name, ()) if m != member]
                announced[name] = (*listed, member) if join else tuple(listed)
            g = self._groups.get(name)
            present = g is not None and any(m == member for m, _ in g.members)
            if join and not present:
                g = self._groups.setdefault(name, _Group())
                g.members.append((member, source))
                out.append(self._changed(name, g, source, Cause.JOIN, (member,)))
            elif not join and present and g is not None:
                g.members = [(m, d) for m, d in g.members if m != member]
                out.append(self._changed(name, g, source, _OP_CAUSES[op.kind], (member,)))
        return out

    def _apply_state(self, source: NodeId, state: State) -> list[MembershipChanged]:
        out: list[MembershipChanged] = []
        view = set(self._view)
        # 1. Catch up: a group the sender has seen more changes of than we have (we just
        #    arrived, or missed operations in a view change) is taken over as it has it.
        #    Members of daemons whose STATE came earlier in this view stay as those
        #    announced: the sender's snapshot predates them (it was taken when it sent).
        own = dict(state.own)
        self._announced[source] = own
        for e in state.table:
            g = self._groups.get(e.group)
            if g is not None and g.counter >= e.counter:
                continue
            old = {m for m, _ in g.members} if g is not None else set()
            g = self._groups.setdefault(e.group, _Group())
            g.counter, g.coordinator = e.counter, e.coordinator
            g.members = [(m, NodeId(d)) for m, d in e.members if NodeId(d) in view]
            for daemon, groups in sorted(self._announced.items()):
                if daemon == source:
                    continue
                wanted = groups.get(e.group, ())
                kept = [(m, d) for m, d in g.members if d != daemon or m in wanted]
                present = {m for m, d in kept if d == daemon}
                g.members = kept + [(m, daemon) for m in wanted if m not in present]
            canonical(g)
            new = {m for m, _ in g.members}
            if old != new:
                who = tuple(sorted(old ^ new))
                hosts = tuple(d for _, d in g.members)
                self.engine.set_group_daemons(e.group, set(hosts))
                out.append(
                    MembershipChanged(
                        e.group,
                        ViewId(g.counter, g.coordinator),
                        tuple(m for m, _ in g.members),
                        Cause.NETWORK,
                        who,
                        hosts,
                    )
                )
            if not g.members:
                del self._groups[e.group]
        # 2. The sender's own members are what it says they are.
        for name in sorted(set(own) | set(self._groups)):
            wanted = own.get(name, ())
            g = self._groups.get(name)
            if g is None:
                if not wanted:
                    continue
                g = self._groups.setdefault(name, _Group())
            have = [m for m, d in g.members if d == source]
            if set(have) == set(wanted):
                if not g.members:
                    del self._groups[name]
                continue
            wanted_set = set(wanted)
            have_set = set(have)
            gone = tuple(m for m in have if m not in wanted_set)
            came = tuple(m for m in wanted if m not in have_set)
            g.members = [(m, d) for m, d in g.members if d != source or m in wanted_set]
            g.members.extend((m, source) for m in came)
            out.append(self._changed(name, g, source, Cause.NETWORK, gone + came))
        return out

    def _changed(
        self, name: str, g: _Group, coordinator: NodeId, cause: Cause, who: tuple[str, ...]
    ) -> MembershipChanged:
        canonical(g)
        g.counter += 1
        g.coordinator = int(coordinator)
        hosts = tuple(d for _, d in g.members)
        self.engine.set_group_daemons(name, set(hosts))
        event = MembershipChanged(
            name,
            ViewId(g.counter, g.coordinator),
            tuple(m for m, _ in g.members),
            cause,
            who,
            hosts,
        )
        if not g.members:
            del self._groups[name]
        self._counters.changes += 1
        return event


__all__ = [
    "MEMBERSHIP_GROUP",
    "Broadcast",
    "GroupMembership",
    "MembershipChanged",
    "MembershipEffect",
    "MembershipStats",
]
