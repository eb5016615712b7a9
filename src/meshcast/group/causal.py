"""Causal hold-back with vector clocks over the daemons of a view.

Every daemon counts the causal messages it has processed from each member; a causal
message carries its sender's counts at send time, and is processed only after everything
those counts cover. Causality is daemon-level: a message a daemon sends after processing
another is after it, whichever clients were involved.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class CausalReceiver(Generic[T]):
    """Vector-clock reordering for a view of `size` members (indices 0..size-1)."""

    def __init__(self, size: int) -> None:
        self.processed = [0] * size  # causal messages processed, per member index
        self._held: dict[tuple[int, int], tuple[tuple[int, ...], T]] = {}

    @property
    def held(self) -> int:
        return len(self._held)

    def stamp(self, own: int) -> tuple[int, tuple[int, ...]]:
        """Number a local message: (seq, vector before it); it counts as processed."""
        vector = tuple(self.processed)
        self.processed[own] += 1
        return self.processed[own], vector

    def is_duplicate(self, sender: int, seq: int) -> bool:
        return seq <= self.processed[sender] or (sender, seq) in self._held

    def valid(self, sender: int, seq: int, vector: tuple[int, ...]) -> bool:
        """Is the stamp well formed for this view (its own entry is seq - 1)?"""
        return len(vector) == len(self.processed) and seq >= 1 and vector[sender] == seq - 1

    def deliverable(self, sender: int, seq: int, vector: tuple[int, ...]) -> bool:
        """Would this valid stamp be delivered at once (nothing before it is missing)?"""
        return seq == self.processed[sender] + 1 and self._satisfied(sender, vector)

    def offer(self, sender: int, seq: int, vector: tuple[int, ...], item: T) -> list[T]:
        """Add a valid, non-duplicate item; return the items now causally ready, in order."""
        self._held[sender, seq] = (vector, item)
        ready: list[T] = []
        progress = True
        while progress:
            progress = False
            for member in range(len(self.processed)):
                key = (member, self.processed[member] + 1)
                entry = self._held.get(key)
                if entry is not None and self._satisfied(member, entry[0]):
                    del self._held[key]
                    self.processed[member] += 1
                    ready.append(entry[1])
                    progress = True
        return ready

    def _satisfied(self, sender: int, vector: tuple[int, ...]) -> bool:
        return all(self.processed[k] >= count for k, count in enumerate(vector) if k != sender)

    def drain(self) -> list[T]:
        items = [item for _, (_, item) in sorted(self._held.items())]
        self._held.clear()
        return items
