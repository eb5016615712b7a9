"""LinkEndpoint: link state machines (anything with the Link interface) under the simulator."""

from __future__ import annotations

import random

import pytest

from meshcast.errors import UsageError
from meshcast.ids import NodeId
from meshcast.link import LinkEndpoint
from meshcast.link.events import Delivered, LinkEffect, LinkStats, Transmit
from meshcast.sim import LinkModel, Simulator

A, B, C = NodeId(1), NodeId(2), NodeId(3)


class StubLink:
    """A minimal Link: sends payloads as datagrams, delivers them, heartbeats on a timer."""

    def __init__(self, peer: NodeId, interval: float, now: float) -> None:
        self._peer = peer
        self._interval = interval
        self._next_at = now + interval
        self.beats: list[float] = []

    @property
    def peer(self) -> NodeId:
        return self._peer

    @property
    def established(self) -> bool:
        return True

    @property
    def failed(self) -> bool:
        return False

    def start(self, now: float) -> list[LinkEffect]:
        return [Transmit(self._peer, b"hello")]

    @property
    def queued_messages(self) -> int:
        return 0

    def can_send(self, size: int) -> bool:
        return True

    def send(self, payload: bytes, now: float, *, flush: bool = True) -> list[LinkEffect]:
        return [Transmit(self._peer, payload)]

    def datagram_received(self, datagram: bytes, now: float) -> list[LinkEffect]:
        return [Delivered(self._peer, datagram)]

    def on_timer(self, now: float) -> list[LinkEffect]:
        self.beats.append(now)
        self._next_at = now + self._interval
        return []

    def next_deadline(self) -> float | None:
        return self._next_at

    def statistics(self) -> LinkStats:
        return LinkStats()


def host_factory(node_id: NodeId, now: float, rng: random.Random) -> LinkEndpoint:
    peers = {A: [B, C], B: [A], C: [A]}[node_id]
    return LinkEndpoint(
        node_id, {p: StubLink(p, interval=0.3 if p == C else 0.5, now=now) for p in peers}
    )


def build() -> tuple[Simulator, list[tuple[NodeId, object, float]]]:
    sim = Simulator(seed=1)
    for n in (A, B, C):
        sim.add_node(n, host_factory, start=lambda host, now: host.start(now))
    sim.add_link(A, B, LinkModel(delay=0.1))
    sim.add_link(A, C, LinkModel(delay=0.2))
    seen: list[tuple[NodeId, object, float]] = []
    sim.observe(lambda node_id, effect, now: seen.append((node_id, effect, now)))
    return sim, seen


def test_links_start_send_and_deliver_by_source() -> None:
    sim, seen = build()
    sim.run(until=0.25)
    sim.act(A, lambda host, now: host.send(C, b"payload", now))
    sim.run(until=1.0)
    assert [(n, e) for n, e, _ in seen] == [
        (B, Delivered(A, b"hello")),
        (A, Delivered(B, b"hello")),
        (C, Delivered(A, b"hello")),
        (A, Delivered(C, b"hello")),
        (C, Delivered(A, b"payload")),
    ]
    assert seen[-1][2] == pytest.approx(0.45)


def test_each_link_timer_fires_at_its_own_deadline() -> None:
    sim, _ = build()
    sim.run(until=1.0)
    host = sim.node_as(A, LinkEndpoint)
    to_b = host.link(B)
    to_c = host.link(C)
    assert isinstance(to_b, StubLink)
    assert isinstance(to_c, StubLink)
    assert to_b.beats == [0.5, 1.0]
    assert to_c.beats == pytest.approx([0.3, 0.6, 0.9])
    assert host.next_deadline() == pytest.approx(1.2)


def test_unknown_source_is_counted_and_unknown_peer_is_a_usage_error() -> None:
    host = LinkEndpoint(B, {A: StubLink(A, 1.0, 0.0)})
    assert host.datagram_received(C, b"stray", 0.0) == []
    assert host.foreign_dropped == 1
    assert host.peers == [A]
    with pytest.raises(UsageError):
        host.link(C)
    assert LinkEndpoint(B).next_deadline() is None
