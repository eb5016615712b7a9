"""FIFO hold-back: per-source sequence numbers, delivered once gaps fill.

The overlay delivers every message exactly once within a view but in any order
(non-blocking forwarding, SPEC-NOTES pitfall 7), so each source's messages are numbered
and a later one waits here until every earlier one arrived.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from meshcast.ids import NodeId

T = TypeVar("T")


class FifoReceiver(Generic[T]):
    """Reorders each source's numbered items (numbers start at 1)."""

    def __init__(self) -> None:
        self._next: dict[NodeId, int] = {}
        self._held: dict[NodeId, dict[int, T]] = {}
        self._count = 0

    @property
    def held(self) -> int:
        return self._count

    def is_duplicate(self, source: NodeId, seq: int) -> bool:
        return seq < self._next.get(source, 1) or seq in self._held.get(source, {})

    def offer(self, source: NodeId, seq: int, item: T) -> list[T]:
        """Add an item that is not a duplicate; return the items now in order."""
        expected = self._next.get(source, 1)
        if seq != expected:
            self._held.setdefault(source, {})[seq] = item
            self._count += 1
            return []
        ready = [item]
        held = self._held.get(source, {})
        expected += 1
        while expected in held:
            ready.append(held.pop(expected))
            self._count -= 1
            expected += 1
        self._next[source] = expected
        return ready

    def drain(self) -> list[T]:
        """Everything held, which can no longer be delivered in order; forget it."""
        items = [item for held in self._held.values() for _, item in sorted(held.items())]
        self._held.clear()
        self._count = 0
        return items
