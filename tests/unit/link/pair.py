"""A minimal two-endpoint datagram pump for link unit tests (no simulator, no sleeps)."""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from meshcast.ids import NodeId
from meshcast.link import Delivered, Link, LinkEffect, Transmit

A = NodeId(1)
B = NodeId(2)


@dataclass
class Pair:
    """Two links joined by a lossy, delaying, optionally reordering pipe in each direction."""

    a: Link
    b: Link
    delay: float = 0.01
    loss: float = 0.0
    duplicate: float = 0.0
    jitter: float = 0.0
    seed: int = 0
    now: float = 0.0
    cut: bool = False
    delivered: dict[NodeId, list[bytes]] = field(default_factory=lambda: {A: [], B: []})
    delivered_at: dict[NodeId, list[float]] = field(default_factory=lambda: {A: [], B: []})
    effects: list[tuple[float, NodeId, LinkEffect]] = field(default_factory=list)
    filter: Callable[[NodeId, bytes], bool] | None = None  # False drops a datagram

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._heap: list[tuple[float, int, NodeId, bytes]] = []
        self._count = 0
        self.sent = 0

    def link(self, node: NodeId) -> Link:
        return self.a if node == A else self.b

    def start(self) -> None:
        self.apply(A, self.a.start(self.now))
        self.apply(B, self.b.start(self.now))

    def apply(self, node: NodeId, effects: list[LinkEffect]) -> None:
        for effect in effects:
            self.effects.append((self.now, node, effect))
            if isinstance(effect, Transmit):
                self._transmit(node, effect.datagram)
            elif isinstance(effect, Delivered):
                self.delivered[node].append(effect.payload)
                self.delivered_at[node].append(self.now)

    def _transmit(self, src: NodeId, datagram: bytes) -> None:
        self.sent += 1
        dst = B if src == A else A
        if self.cut or self._rng.random() < self.loss:
            return
        if self.filter is not None and not self.filter(src, datagram):
            return
        copies = 2 if self._rng.random() < self.duplicate else 1
        for _ in range(copies):
            at = self.now + self.delay + self._rng.random() * self.jitter
            self._count += 1
            heapq.heappush(self._heap, (at, self._count, dst, datagram))

    def send(self, node: NodeId, payload: bytes) -> None:
        self.apply(node, self.link(node).send(payload, self.now))

    def inject(self, node: NodeId, datagram: bytes) -> None:
        self.apply(node, self.link(node).datagram_received(datagram, self.now))

    def run(self, until: float, max_steps: int = 2_000_000) -> None:
        for _ in range(max_steps):
            candidates: list[tuple[float, int]] = []
            if self._heap:
                candidates.append((self._heap[0][0], 0))
            for index, link in ((1, self.a), (2, self.b)):
                deadline = link.next_deadline()
                if deadline is not None:
                    candidates.append((max(deadline, self.now), index))
            if not candidates:
                self.now = until
                return
            at, which = min(candidates)
            if at > until:
                self.now = until
                return
            self.now = at
            if which == 0:
                _, _, dst, datagram = heapq.heappop(self._heap)
                self.apply(dst, self.link(dst).datagram_received(datagram, at))
            else:
                node = A if which == 1 else B
                self.apply(node, self.link(node).on_timer(at))
        raise AssertionError("pair did not settle within max_steps")

    def run_until(self, done: Callable[[], bool], limit: float, step: float = 0.05) -> None:
        while not done() and self.now < limit:
            self.run(self.now + step)
