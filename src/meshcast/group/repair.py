"""Repair: a daemon sends its own messages again to the destinations whose ACKs still
lack them (the end-to-end retransmission of JGroups' NAKACK2, driven by the source).

The overlay loses what a failing Hop link held, and a link can fail and come back without
a view change, so no flush would ever fill such a gap. A copy of ours that some destination
has not acknowledged `repair_after` after it was sent goes again to that destination — only
to one whose ACKs of our messages stopped advancing (one still taking them in is merely
slow), and whose path holds nothing of ours any more (`backlogged`: a message queued or in
flight on a reliable link arrives; sending it again would only queue a duplicate behind it).
The copies and ACKs are the stability protocol's (`meshcast.group.stability`).

A destination repaired once is *recovering* until a look finds nothing it lacks: while its
ACKs show that our repairs arrive, it gets the next `max_repairs_per_look` copies at the
next look, every `repair_after / RECOVERY_LOOKS_PER_REPAIR`, instead of waiting to look
stuck again (a link that lost thousands of messages is repaired at ACK pace, not 256 a
stall).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from meshcast.group.config import RepairConfig
from meshcast.group.events import Broadcast, GroupEffect
from meshcast.group.stability import AckVector, Stability
from meshcast.group.view import GroupView
from meshcast.ids import NodeId

RECOVERY_LOOKS_PER_REPAIR = 10  # looks per repair_after while a destination recovers


@dataclass(frozen=True, slots=True)
class RepairStats:
    """Counters of the repair protocol (a frozen snapshot)."""

    repairs_sent: int = 0  # own copies sent again to destinations lacking them
    looks: int = 0  # times the copies were searched for what some destination lacks


@dataclass(slots=True)
class _Counters:
    repairs_sent: int = 0
    looks: int = 0


class Repair:
    """Retransmission of one daemon's own messages within a view. Sans-I/O."""

    def __init__(
        self,
        local: NodeId,
        config: RepairConfig,
        stability: Stability,
        backlogged: Callable[[NodeId], bool],
    ) -> None:
        self.local = local
        self.config = config
        self._stability = stability
        self._backlogged = backlogged
        self._others: tuple[NodeId, ...] = ()
        self._repair_at = 0.0  # next look for own copies some destination still lacks
        # destinations recovering (see the module docstring): when we last repaired each
        self._recovering: dict[NodeId, float] = {}
        self._counters = _Counters()

    def reset(self, view: GroupView) -> None:
        """A new view (its copies start afresh in `Stability.reset`)."""
        self._others = tuple(m for m in view.members if m != self.local)
        self._repair_at = 0.0
        self._recovering.clear()

    def statistics(self) -> RepairStats:
        return RepairStats(repairs_sent=self._counters.repairs_sent, looks=self._counters.looks)

    def deadline(self) -> float | None:
        """When to look next (None: no copy kept, nothing can need a repair)."""
        if self._others and self._stability.retained:
            return self._repair_at
        return None

    def due(self, now: float) -> bool:
        return bool(self._others) and bool(self._stability.retained) and now >= self._repair_at

    def look(self, holding: AckVector, now: float, effects: list[GroupEffect]) -> None:
        """Send our own copies again to the destinations whose ACKs still lack them after
        `repair_after`, at most `max_repairs_per_look` of them. `holding`: what we hold
        (`Ordering.ack_vector`)."""
        self._counters.looks += 1
        self._repair_at = now + self.config.repair_after / 2
        due = now - self.config.repair_after
        acked = self._stability.acked_by(holding)
        # Only to a destination whose ACKs of our messages stopped advancing: one that
        # still takes them in is being fed (our outbox or window is merely slow) — unless
        # what it takes in is our repairs (recovering).
        # ...and whose path holds nothing of ours any more: a message queued or in flight
        # on a reliable link arrives; sending it again only adds a duplicate to the queue
        recovering = self._recovering
        stuck = [
            m
            for m in self._others
            if not due < self._stability.progress_at(m) <= recovering.get(m, now)
            and not self._backlogged(m)
        ]
        if not stuck:
            return
        stuck_set = set(stuck)
        lacked: set[NodeId] = set()  # stuck members an old copy was sent again to
        budget = self.config.max_repairs_per_look
        for copy in self._stability.copies(self.local):
            if copy.sent_at > due:
                continue  # sent (or repaired) lately: it may still be on its way
            stream, numbers = copy.stream, copy.numbers
            if stream == "pruned":
                lacking = [
                    NodeId(d)
                    for d, n in numbers
                    if NodeId(d) in stuck_set and acked(NodeId(d), self.local)[0] < n
                ]
            else:
                k = 1 if stream == "causal" else 2
                lacking = [m for m in stuck if acked(m, self.local)[k] < numbers[0][1]]
            if not lacking:
                continue
            copy.sent_at = now
            effects.append(Broadcast(tuple(lacking), copy.encoded))
            lacked.update(lacking)
            self._counters.repairs_sent += 1
            budget -= 1
            if budget == 0:
                break
        for m in stuck:
            if m in lacked:
                recovering[m] = now
            elif budget:  # every old copy looked at: what it lacks is on its way
                recovering.pop(m, None)
        if recovering:
            step = self.config.repair_after / RECOVERY_LOOKS_PER_REPAIR
            self._repair_at = min(self._repair_at, now + step)
