"""Link cuts, partitions and heals; node crashes and restarts."""

from __future__ import annotations

import random

import pytest

from meshcast.errors import UsageError
from meshcast.ids import NodeId
from meshcast.link.events import Transmit
from meshcast.sim import LinkModel, Simulator

A, B, C, D, E = (NodeId(i) for i in range(1, 6))
MODEL = LinkModel(delay=0.1)


class Node:
    """Records datagrams; a timer every `period` s, counting firings."""

    period = 1.0

    def __init__(self, node_id: NodeId, now: float, rng: random.Random) -> None:
        self.node_id = node_id
        self.born_at = now
        self.first_draw = rng.random()
        self.received: list[tuple[float, NodeId, bytes]] = []
        self.fired: list[float] = []
        self._next_at = now + self.period

    def datagram_received(self, src: NodeId, datagram: bytes, now: float) -> list[object]:
        self.received.append((now, src, datagram))
        return []

    def on_timer(self, now: float) -> list[object]:
        self.fired.append(now)
        self._next_at = now + self.period
        return []

    def next_deadline(self) -> float | None:
        return self._next_at


def mesh(nodes: list[NodeId], seed: int = 1) -> Simulator:
    sim = Simulator(seed=seed)
    for n in nodes:
        sim.add_node(n, Node)
    for i, a in enumerate(nodes):
        for b in nodes[i + 1 :]:
            sim.add_link(a, b, MODEL)
    return sim


def send(sim: Simulator, src: NodeId, dst: NodeId, datagram: bytes = b"d") -> None:
    sim.act(src, lambda node, now: [Transmit(dst, datagram)])


def got(sim: Simulator, node_id: NodeId) -> list[bytes]:
    return [d for _, _, d in sim.node_as(node_id, Node).received]


def test_link_down_drops_new_and_in_flight_packets_in_both_directions() -> None:
    sim = mesh([A, B])
    send(sim, A, B, b"in-flight")
    send(sim, B, A, b"in-flight")
    sim.run(until=0.05)
    sim.set_link_up(A, B, False)
    assert not sim.pipe_is_up(A, B)
    assert not sim.pipe_is_up(B, A)
    send(sim, A, B, b"sent-while-down")
    sim.run(until=1.0)
    assert got(sim, B) == []
    assert got(sim, A) == []
    stats = sim.pipe_stats(A, B)
    assert (stats.sent, stats.dropped_down, stats.in_flight) == (2, 2, 0)
    sim.set_link_up(A, B, True)
    send(sim, A, B, b"after")
    sim.run(until=2.0)
    assert got(sim, B) == [b"after"]


def test_pipe_down_cuts_one_direction_only() -> None:
    sim = mesh([A, B])
    sim.set_pipe_up(A, B, False)
    send(sim, A, B)
    send(sim, B, A)
    sim.run(until=1.0)
    assert got(sim, B) == []
    assert got(sim, A) == [b"d"]


def test_queued_packets_are_lost_when_the_link_goes_down() -> None:
    sim = Simulator(seed=1)
    sim.add_node(A, Node)
    sim.add_node(B, Node)
    sim.add_link(A, B, LinkModel(delay=0.01, bandwidth_bps=8e3, queue_bytes=10_000))
    sim.act(A, lambda node, now: [Transmit(B, bytes(72))] * 5)  # 100 bytes, 0.1 s each
    sim.run(until=0.25)  # arrivals at 0.11 and 0.21; three still queued or in service
    sim.set_link_up(A, B, False)
    sim.set_link_up(A, B, True)
    send(sim, A, B, b"next")  # the transmitter is idle again: no wait behind lost packets
    sim.run(until=1.0)
    assert got(sim, B) == [bytes(72), bytes(72), b"next"]
    assert sim.node_as(B, Node).received[-1][0] == pytest.approx(0.25 + 32 * 8 / 8e3 + 0.01)
    assert sim.pipe_stats(A, B).dropped_down == 3


def test_partition_cuts_between_groups_and_heal_restores() -> None:
    sim = mesh([A, B, C, D, E])
    sim.partition([{A, B}, {C, D, E}])
    assert sim.pipe_is_up(A, B)
    assert sim.pipe_is_up(C, E)
    assert not sim.pipe_is_up(A, C)
    assert not sim.pipe_is_up(E, B)
    send(sim, A, B, b"inside")
    send(sim, A, C, b"across")
    sim.run(until=1.0)
    assert got(sim, B) == [b"inside"]
    assert got(sim, C) == []
    sim.heal()
    send(sim, A, C, b"healed")
    sim.run(until=2.0)
    assert got(sim, C) == [b"healed"]


def test_partition_isolates_unlisted_nodes_and_replaces_previous_one() -> None:
    sim = mesh([A, B, C])
    sim.partition([{A, B, C}])
    sim.partition([[A, B]])  # C is unlisted: alone
    assert sim.pipe_is_up(A, B)
    assert not sim.pipe_is_up(A, C)
    assert not sim.pipe_is_up(C, B)
    sim.partition([[A], [B, C]])
    assert not sim.pipe_is_up(A, B)
    assert sim.pipe_is_up(B, C)


def test_heal_keeps_administratively_downed_links_down() -> None:
    sim = mesh([A, B, C])
    sim.set_link_up(A, B, False)
    sim.partition([[A], [B, C]])
    sim.heal()
    assert not sim.pipe_is_up(A, B)
    assert sim.pipe_is_up(A, C)


def test_partition_rejects_a_node_in_two_groups_and_unknown_nodes() -> None:
    sim = mesh([A, B, C])
    with pytest.raises(UsageError):
        sim.partition([[A, B], [B, C]])
    with pytest.raises(UsageError):
        sim.partition([[A, NodeId(99)]])


def test_packets_in_flight_on_a_partition_cut_are_lost() -> None:
    sim = mesh([A, B, C])
    send(sim, A, C, b"doomed")
    sim.run(until=0.05)
    sim.partition([[A, B], [C]])
    sim.heal()
    sim.run(until=1.0)
    assert got(sim, C) == []
    assert sim.pipe_stats(A, C).dropped_down == 1


def test_crash_drops_object_timer_and_packets_addressed_to_it() -> None:
    sim = mesh([A, B])
    old = sim.node_as(B, Node)
    send(sim, A, B, b"in-flight")
    sim.run(until=0.05)
    sim.crash(B)
    assert not sim.is_alive(B)
    with pytest.raises(UsageError):
        sim.node(B)
    with pytest.raises(UsageError):
        send(sim, B, A)
    sim.run(until=0.5)
    send(sim, A, B, b"to-the-dead")
    sim.run(until=3.0)
    assert old.received == []
    assert old.fired == []  # its 1.0 s timer never fired
    stats = sim.pipe_stats(A, B)
    assert (stats.dropped_crashed, stats.delivered, stats.in_flight) == (2, 0, 0)
    assert sim.node_as(A, Node).fired == [1.0, 2.0, 3.0]


def test_packets_sent_before_a_crash_still_arrive() -> None:
    sim = mesh([A, B])
    send(sim, A, B, b"last words")
    sim.crash(A)
    sim.run(until=1.0)
    assert got(sim, B) == [b"last words"]


def test_restart_calls_the_factory_again_with_a_fresh_object() -> None:
    calls: list[tuple[NodeId, float]] = []

    def factory(node_id: NodeId, now: float, rng: random.Random) -> Node:
        calls.append((node_id, now))
        return Node(node_id, now, rng)

    sim = Simulator(seed=4)
    sim.add_node(A, factory)
    sim.add_node(B, Node)
    sim.add_link(A, B, MODEL)
    first = sim.node_as(A, Node)
    sim.run(until=1.5)
    sim.crash(A)
    sim.run(until=2.25)
    sim.restart(A)
    second = sim.node_as(A, Node)
    assert second is not first
    assert calls == [(A, 0.0), (A, 2.25)]
    assert sim.incarnation(A) == 1
    assert second.first_draw != first.first_draw  # rng derived from the incarnation
    send(sim, B, A, b"welcome back")
    sim.run(until=3.5)
    assert got(sim, A) == [b"welcome back"]
    assert first.fired == [1.0]
    assert second.fired == [3.25]  # re-armed from the new object's deadline


def test_start_hook_runs_after_every_factory_call() -> None:
    started: list[float] = []

    def start(node: Node, now: float) -> list[object]:
        started.append(now)
        return [Transmit(B, b"hello")]

    sim = Simulator(seed=1)
    sim.add_node(A, Node, start=start)
    sim.add_node(B, Node)
    sim.add_link(A, B, MODEL)  # start runs as an event: the pipe exists by then
    sim.run(until=1.0)
    sim.crash(A)
    sim.restart(A)
    sim.crash(A)  # crashed again before its start event: that start never runs
    sim.restart(A)
    sim.run(until=2.0)
    assert started == [0.0, 1.0]
    assert got(sim, B) == [b"hello", b"hello"]


def test_crash_and_restart_misuse_raises() -> None:
    sim = mesh([A, B])
    with pytest.raises(UsageError):
        sim.restart(A)
    sim.crash(A)
    with pytest.raises(UsageError):
        sim.crash(A)
    with pytest.raises(UsageError):
        sim.crash(NodeId(42))


def test_packet_sent_while_down_reaches_the_restarted_node() -> None:
    sim = mesh([A, B])
    sim.crash(B)
    send(sim, A, B, b"early")
    sim.run(until=0.05)
    sim.restart(B)
    sim.run(until=1.0)
    assert got(sim, B) == [b"early"]
    assert sim.pipe_stats(A, B).dropped_crashed == 0
