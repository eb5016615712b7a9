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
from collections.abc import Collection, Mapping, Sequence
from typing import Generic, TypeVar

from meshcast.ids import NodeId

T = TypeVar("T")
_NO_BOUND = 2**64  # above every timestamp (u64)


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
        # min(heard), kept by `offer` (asked for every message stamped or delivered);
        # with nobody else, no bound below the local clock
        self._heard_floor = 0 if self._others else _NO_BOUND
        self.aru_of: dict[NodeId, int] = dict.fromkeys(self._others, 0)
        # heap by (ts, source); the counter keeps a peer's repeated timestamp comparable;
        # last: the message's place in its source's stream (for a flush)
        self._pending: list[tuple[int, NodeId, int, bool, T, int]] = []
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
        floor = self._heard_floor
        return clock if clock < floor else floor

    def stable(self, clock: int) -> int:
        """Every member has every stream message with a timestamp up to this one."""
        return min([self.aru(clock), *self.aru_of.values()])

    def add_own(self, ts: int, safe: bool, item: T) -> None:
        entry = (ts, self._local, next(self._tiebreak), safe, item, self._own_seq)
        heapq.heappush(self._pending, entry)

    def next_expected(self, source: NodeId) -> int:
        return self._next[source]

    def prefix(self, source: NodeId) -> int:
        """Every stream message of `source` up to this number is here (own: all sent)."""
        return self._own_seq if source == self._local else self._next[source] - 1

    def is_duplicate(self, source: NodeId, seq: int) -> bool:
        return seq < self._next[source] or seq in self._gaps[source]

    def offer(
        self, source: NodeId, seq: int, ts: int, aru: int, item: T | None, safe: bool
    ) -> None:
        """A stream message from another member (item None: a NULL), not a duplicate."""
        gaps = self._gaps[source]
        if not gaps and seq == self._next[source]:  # in order, none held: most messages
            heard = self.heard
            was_floor = heard[source] == self._heard_floor
            if ts > heard[source]:
                heard[source] = ts
            if aru > self.aru_of[source]:
                self.aru_of[source] = aru
            if item is not None:
                heapq.heappush(self._pending, (ts, source, next(self._tiebreak), safe, item, seq))
            self._next[source] = seq + 1
            if was_floor:
                self._heard_floor = min(heard.values())
            return
        gaps[seq] = (ts, aru, item, safe)
        self._gap_count += 1
        expected = self._next[source]
        if expected not in gaps:
            return
        was_floor = self.heard[source] == self._heard_floor
        while expected in gaps:
            ts_, aru_, item_, safe_ = gaps.pop(expected)
            self._gap_count -= 1
            self.heard[source] = max(self.heard[source], ts_)
            self.aru_of[source] = max(self.aru_of[source], aru_)
            if item_ is not None:
                entry = (ts_, source, next(self._tiebreak), safe_, item_, expected)
                heapq.heappush(self._pending, entry)
            expected += 1
        self._next[source] = expected
        if was_floor:
            self._heard_floor = min(self.heard.values())

    def ready(self, clock: int) -> list[T]:
        """Pop the messages deliverable now, in the total order."""
        out: list[T] = []
        pending = self._pending
        if not pending:
            return out
        aru = self.aru(clock)
        stable: int | None = None  # `stable(clock)`, worked out only for a SAFE message
        while pending:
            ts, _, _, safe, item, _ = pending[0]
            if safe:
                if stable is None:
                    stable = min([aru, *self.aru_of.values()])
                if ts > stable:
                    break
            elif ts > aru:
                break
            heapq.heappop(pending)
            out.append(item)
        return out

    def finish_split(
        self, ends: Mapping[NodeId, int], departed: Collection[NodeId]
    ) -> tuple[list[T], list[T], list[T]]:
        """`finish`, with the kept messages split at the end of what the old view's own
        rules deliver given everything held now: (regular, transitional, discarded).

        A kept message is *regular* if nothing of a `departed` member's stream (cut at its
        end) could still sort before it — its timestamp is at most the last one of every
        departed stream — and, when SAFE, every departed member's last ARU covers it;
        regular messages are a prefix of the order. The survivors hold the same copies
        after a flush, so all compute the same split, and whatever one of them delivered
        before the flush is regular (it knew less). The rest is delivered in the
        transitional configuration: ordered, but only the survivors are known to hold it.
        """
        last_ts = {j: self.heard.get(j, 0) for j in departed}
        last_aru = {j: self.aru_of.get(j, 0) for j in departed}
        for j in departed:
            for seq, (ts_, aru_, _, _) in self._gaps.get(j, {}).items():
                if seq <= ends.get(j, 0):
                    last_ts[j] = max(last_ts[j], ts_)
                    last_aru[j] = max(last_aru[j], aru_)
        heard = min(last_ts.values(), default=None)
        aru = min(last_aru.values(), default=None)
        safe = {id(e[4]): e[3] for e in self._pending}
        for gaps in self._gaps.values():
            safe.update((id(item), s) for _, _, item, s in gaps.values() if item is not None)
        kept, dropped = self._finish_entries(ends)
        split = len(kept)
        if heard is not None and aru is not None:
            for i, (ts, item) in enumerate(kept):
                if ts > heard or (safe[id(item)] and ts > aru):
                    split = i
                    break
        items = [item for _, item in kept]
        return items[:split], items[split:], dropped

    def _finish_entries(self, ends: Mapping[NodeId, int]) -> tuple[list[tuple[int, T]], list[T]]:
        entries = [(e[0], e[1], e[2], e[4], e[5]) for e in self._pending]
        for source, gaps in self._gaps.items():
            for seq, (ts, _, item, _) in gaps.items():
                if item is not None:
                    entries.append((ts, source, next(self._tiebreak), item, seq))
        self._pending.clear()
        for gaps in self._gaps.values():
            gaps.clear()
        self._gap_count = 0
        entries.sort(key=lambda e: e[:3])
        kept = [(e[0], e[3]) for e in entries if e[4] <= ends.get(e[1], 0)]
        dropped = [e[3] for e in entries if e[4] > ends.get(e[1], 0)]
        return kept, dropped

    def finish(self, ends: Mapping[NodeId, int]) -> tuple[list[T], list[T]]:
        """End of a view (a flush): every held message numbered up to its source's end,
        in the total order, and the rest (discarded). Empties this object.

        The ends come from the flush: the longest stream prefix any survivor held. A
        message beyond it was delivered by nobody (delivery needs the prefix), so
        discarding it everywhere keeps the survivors' delivered sets equal; one up to it
        is held by every survivor after the flush, so all deliver it, in (ts, source)
        order, which extends every order delivered so far.
        """
        kept, dropped = self._finish_entries(ends)
        return [item for _, item in kept], dropped
