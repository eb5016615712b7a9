"""Pruned streams: per-(source, destination) numbers for RELIABLE and FIFO messages.

RELIABLE and FIFO messages go only to the daemons hosting their groups, so each source
numbers its messages per destination (a destination sees only its own numbers and can
spot gaps in them). RELIABLE ones are delivered on arrival and only occupy their number;
FIFO ones wait until every earlier number has arrived (the overlay reorders, SPEC-NOTES
pitfall 7). The contiguous prefix is what this daemon acknowledges (stability).
"""

from __future__ import annotations

from typing import Generic, TypeVar

from meshcast.ids import NodeId

T = TypeVar("T")


class FifoReceiver(Generic[T]):
    """Reorders each source's numbered items (numbers start at 1)."""

    def __init__(self) -> None:
        self._next: dict[NodeId, int] = {}
        # seq -> item still to deliver, or None: delivered on arrival (RELIABLE)
        self._held: dict[NodeId, dict[int, T | None]] = {}
        self._count = 0

    @property
    def held(self) -> int:
        return self._count

    def prefix(self, source: NodeId) -> int:
        """Every number of `source` up to this one has arrived."""
        return self._next.get(source, 1) - 1

    def is_duplicate(self, source: NodeId, seq: int) -> bool:
        return seq < self._next.get(source, 1) or seq in self._held.get(source, {})

    def offer(self, source: NodeId, seq: int, item: T, *, in_order: bool = True) -> list[T]:
        """Add an item that is not a duplicate; return the items to deliver now, in order.

        `in_order` False (RELIABLE): the item is delivered at once and only takes its
        number; later FIFO items no longer wait for it.
        """
        expected = self._next.get(source, 1)
        ready: list[T] = [] if in_order else [item]
        if seq != expected:
            self._held.setdefault(source, {})[seq] = item if in_order else None
            self._count += 1
            return ready
        if in_order:
            ready.append(item)
        held = self._held.get(source, {})
        expected += 1
        while expected in held:
            waiting = held.pop(expected)
            self._count -= 1
            if waiting is not None:
                ready.append(waiting)
            expected += 1
        self._next[source] = expected
        return ready

    def drain(self) -> list[T]:
        """Everything still held, per source in number order, skipping the gaps (a flush:
        the missing numbers are known to be lost everywhere); forget it."""
        items = [
            item
            for _, held in sorted(self._held.items())
            for _, item in sorted(held.items())
            if item is not None
        ]
        self._held.clear()
        self._count = 0
        return items
