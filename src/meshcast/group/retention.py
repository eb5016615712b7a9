"""Copies of a view's messages, kept until every destination has them (stability).

A daemon that fails takes with it the messages only it had passed on to some members. So
every daemon keeps a copy of each RELIABLE, FIFO, CAUSAL, AGREED and SAFE message of the
current view that it sent or received, until the ACKs of all its destinations show they
hold it; at a view change the copies that are left travel in the flush
(docs/design/group.md, "Virtual synchrony"). UNRELIABLE messages are never kept.

Streams, as numbered by the source: "total" (AGREED/SAFE/NULL stream seq), "causal"
(causal seq), "pruned" (per-destination numbers, one per destination).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from meshcast.ids import NodeId

Numbers = tuple[tuple[int, int], ...]  # (destination, number): pruned; ((0, seq),) otherwise


@dataclass(slots=True)
class Copy:
    source: NodeId
    stream: str
    numbers: Numbers
    encoded: bytes
    sent_at: float  # kept, or last sent again (a repair)

    def __init__(
        self, source: NodeId, stream: str, numbers: Numbers, encoded: bytes, sent_at: float
    ) -> None:
        self.source = source
        self.stream = stream
        self.numbers = numbers
        self.encoded = encoded
        self.sent_at = sent_at


class Retention:
    def __init__(self) -> None:
        self._streams: dict[tuple[NodeId, str], deque[Copy]] = {}
        self.count = 0
        self._by_source: dict[NodeId, list[int]] = {}  # source -> [copies, bytes]

    @property
    def size(self) -> int:
        """Bytes of every copy kept."""
        return sum(counts[1] for counts in self._by_source.values())

    def of(self, source: NodeId) -> tuple[int, int]:
        """(copies, bytes) of `source`'s messages (for our own: what bounds sending)."""
        counts = self._by_source.get(source)
        return (counts[0], counts[1]) if counts else (0, 0)

    def keep(
        self, source: NodeId, stream: str, numbers: Numbers, encoded: bytes, now: float
    ) -> None:
        # once per message kept: no default deque or list built for setdefault to discard
        key = (source, stream)
        copies = self._streams.get(key)
        if copies is None:
            copies = self._streams[key] = deque()
        copies.append(Copy(source, stream, numbers, encoded, now))
        self.count += 1
        counts = self._by_source.get(source)
        if counts is None:
            counts = self._by_source[source] = [0, 0]
        counts[0] += 1
        counts[1] += len(encoded)

    def collect(self, stable: Callable[[NodeId, str, Numbers], bool]) -> int:
        """Forget the copies every destination holds, oldest first per stream (a copy
        still needed keeps later ones of its stream for now: they go at the next ACK)."""
        forgotten = 0
        for (source, stream), copies in self._streams.items():
            while copies and stable(source, stream, copies[0].numbers):
                copy = copies.popleft()
                self.count -= 1
                counts = self._by_source[source]
                counts[0] -= 1
                counts[1] -= len(copy.encoded)
                forgotten += 1
        return forgotten

    def copies(self, source: NodeId | None = None) -> Iterator[Copy]:
        """Every copy (or `source`'s), per stream in the order kept."""
        for (s, _), copies in sorted(self._streams.items()):
            if source is None or s == source:
                yield from copies
