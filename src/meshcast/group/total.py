"""Total order (AGREED) and stability (SAFE) from Lamport timestamps (SPEC-NOTES 4.4).

Each daemon's AGREED, SAFE and NULL messages form its *total-order stream*, numbered
from 1 and strictly increasing in Lamport timestamp. Streams are reassembled in order
(the overlay reorders), so a daemon that has the first k messages of member j's stream
has every message of j with a timestamp up to the k-th one's: `heard[j]`.

* AGREED: message m = (ts, source) is delivered once every member has been heard with a
  timestamp >= ts; nothing that sorts before m can still arrive. Delivery is in (ts,
  source) order, identical everywhere; causality is respected because a daemon's clock
  passes every timestamp it has received before it stamps a new message.
* ARU (all-received-up-to): min over members of heard (the local clock for ourselves);
  every member piggybacks its ARU on each stream message.
* SAFE: m is delivered once every member's ARU >= ts (every daemon has it). AGREED and
  SAFE share one order, so a SAFE message at the head holds back later AGREED ones.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from typing import Generic, TypeVar

from meshcast.ids import NodeId

T = TypeVar("T")


class TotalOrder(Generic[T]):
    """Total-order streams of one view, seen from `local`."""

    def __init__(self, local: NodeId, members: Sequence[NodeId]) -> None:
        self._local = local
        self._others = [m for m in members if m != local]
        self._next: dict[NodeId, int] = dict.fromkeys(self._others, 1)
        self._gaps: dict[NodeId, dict[int, tuple[int, int, T | None, bool]]] = {
            m: {} for m in self._others
        }
        self._gap_count = 0
        self.heard: dict[NodeId, int] = dict.fromkeys(self._others, 0)
        self.aru_of: dict[NodeId, int] = dict.fromkeys(self._others, 0)
        # heap by (ts, source); the counter keeps a peer's repeated timestamp comparable
        self._pending: list[tuple[int, NodeId, int, bool, T]] = []
        self._tiebreak = itertools.count()
        self._own_seq = 0

    @property
    def held(self) -> int:
        return self._gap_count + len(self._pending)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def next_own_seq(self) -> int:
        self._own_seq += 1
        return self._own_seq

    def aru(self, clock: int) -> int:
        """Every stream message with a timestamp up to this one is here."""
        return min([clock, *self.heard.values()])

    def stable(self, clock: int) -> int:
        """Every member has every stream message with a timestamp up to this one."""
        return min([self.aru(clock), *self.aru_of.values()])

    def add_own(self, ts: int, safe: bool, item: T) -> None:
        heapq.heappush(self._pending, (ts, self._local, next(self._tiebreak), safe, item))

    def next_expected(self, source: NodeId) -> int:
        return self._next[source]

    def is_duplicate(self, source: NodeId, seq: int) -> bool:
        return seq < self._next[source] or seq in self._gaps[source]

    def offer(
        self, source: NodeId, seq: int, ts: int, aru: int, item: T | None, safe: bool
    ) -> None:
        """A stream message from another member (item None: a NULL), not a duplicate."""
        gaps = self._gaps[source]
        gaps[seq] = (ts, aru, item, safe)
        self._gap_count += 1
        expected = self._next[source]
        while expected in gaps:
            ts_, aru_, item_, safe_ = gaps.pop(expected)
            self._gap_count -= 1
            self.heard[source] = max(self.heard[source], ts_)
            self.aru_of[source] = max(self.aru_of[source], aru_)
            if item_ is not None:
                heapq.heappush(self._pending, (ts_, source, next(self._tiebreak), safe_, item_))
            expected += 1
        self._next[source] = expected

    def ready(self, clock: int) -> list[T]:
        """Pop the messages deliverable now, in the total order."""
        out: list[T] = []
        aru = self.aru(clock)
        stable = self.stable(clock)
        while self._pending:
            ts, _, _, safe, item = self._pending[0]
            if ts > (stable if safe else aru):
                break
            heapq.heappop(self._pending)
            out.append(item)
        return out

    def drain(self) -> list[T]:
        items = [entry[4] for entry in sorted(self._pending, key=lambda e: e[:3])]
        for gaps in self._gaps.values():
            items.extend(item for _, (_, _, item, _) in sorted(gaps.items()) if item is not None)
            gaps.clear()
        self._pending.clear()
        self._gap_count = 0
        return items
