"""The event loop: timers, clock, scheduling, observers, strictness."""

from __future__ import annotations

import random
from functools import partial

import pytest

from meshcast.errors import UsageError
from meshcast.ids import NodeId
from meshcast.link.events import Delivered, Transmit
from meshcast.sim import LinkModel, NodeFactory, Simulator
from meshcast.sim.simulator import MAX_TIMER_FIRES_PER_INSTANT

A = NodeId(1)
B = NodeId(2)


class Clock:
    """A node whose deadline the test sets; records when on_timer ran."""

    def __init__(self, node_id: NodeId, now: float, rng: random.Random) -> None:
        self.deadline: float | None = None
        self.fired: list[float] = []
        self.deadline_reads = 0
        self.after_fire: float | None = None  # the deadline on_timer leaves behind

    def datagram_received(self, src: NodeId, datagram: bytes, now: float) -> list[object]:
        return [Delivered(src, datagram)]

    def on_timer(self, now: float) -> list[object]:
        self.fired.append(now)
        self.deadline = self.after_fire
        return []

    def next_deadline(self) -> float | None:
        self.deadline_reads += 1
        return self.deadline


def clock_sim() -> tuple[Simulator, Clock]:
    sim = Simulator(seed=1)
    sim.add_node(A, Clock)
    return sim, sim.node_as(A, Clock)


def set_deadline(sim: Simulator, at: float | None) -> None:
    def fn(node: Clock, now: float) -> list[object]:
        node.deadline = at
        return []

    sim.act(A, fn)


def test_timer_fires_at_the_deadline() -> None:
    sim, node = clock_sim()
    set_deadline(sim, 2.5)
    sim.run()
    assert node.fired == [2.5]
    assert sim.now == 2.5


def test_rearm_to_earlier_deadline_leaves_a_stale_entry_that_never_fires() -> None:
    sim, node = clock_sim()
    set_deadline(sim, 5.0)
    set_deadline(sim, 1.0)
    sim.run()
    assert node.fired == [1.0]
    assert sim.events_processed == 2  # the 1.0 fire and the stale 5.0 entry
    assert sim.now == 5.0


def test_rearm_to_later_deadline() -> None:
    sim, node = clock_sim()
    set_deadline(sim, 1.0)
    set_deadline(sim, 3.0)
    sim.run()
    assert node.fired == [3.0]


def test_no_deadline_cancels_the_timer() -> None:
    sim, node = clock_sim()
    set_deadline(sim, 1.0)
    set_deadline(sim, None)
    sim.run()
    assert node.fired == []


def test_unchanged_deadline_pushes_no_new_entry() -> None:
    sim, node = clock_sim()
    set_deadline(sim, 1.0)
    pending = sim.pending_events
    for _ in range(10):
        set_deadline(sim, 1.0)
    assert sim.pending_events == pending
    sim.run()
    assert node.fired == [1.0]


def test_deadline_in_the_past_fires_now() -> None:
    sim, node = clock_sim()
    sim.run(until=10.0)
    set_deadline(sim, 3.0)
    sim.run()
    assert node.fired == [10.0]


def test_deadline_is_reread_after_a_datagram_input() -> None:
    sim, node = clock_sim()
    sim.add_node(B, Clock)
    sim.add_pipe(B, A, LinkModel(delay=0.1))
    set_deadline(sim, 5.0)
    sim.act(B, lambda n, now: [Transmit(A, b"x")])
    reads = node.deadline_reads
    node.deadline = 0.5  # changed behind the simulator's back; seen at the next input
    sim.run(max_events=1)  # the arrival at 0.1
    assert node.deadline_reads == reads + 1
    sim.run()
    assert node.fired == [0.5]


def test_timer_livelock_is_reported() -> None:
    sim, node = clock_sim()
    set_deadline(sim, 1.0)
    node.after_fire = 0.5  # always in the past: a bug in the node
    with pytest.raises(RuntimeError, match="does not advance"):
        sim.run()
    assert len(node.fired) == MAX_TIMER_FIRES_PER_INSTANT


def test_crash_invalidates_the_pending_timer() -> None:
    sim, node = clock_sim()
    set_deadline(sim, 1.0)
    sim.crash(A)
    sim.run()
    assert node.fired == []


def test_run_until_advances_the_clock_and_runs_events_at_exactly_until() -> None:
    sim = Simulator()
    seen: list[float] = []
    sim.call_at(1.0, lambda: seen.append(sim.now))
    sim.call_at(2.0, lambda: seen.append(sim.now))
    sim.run(until=1.0)
    assert (seen, sim.now) == ([1.0], 1.0)
    sim.run(until=7.0)
    assert (seen, sim.now) == ([1.0, 2.0], 7.0)


def test_max_events_stops_without_advancing_to_until() -> None:
    sim = Simulator()
    for t in (1.0, 2.0, 3.0):
        sim.call_at(t, lambda: None)
    sim.run(until=10.0, max_events=2)
    assert (sim.now, sim.pending_events, sim.events_processed) == (2.0, 1, 2)
    sim.run(max_events=0)
    assert sim.events_processed == 2


def test_same_instant_callbacks_run_in_scheduling_order() -> None:
    sim = Simulator()
    order: list[int] = []
    for i in range(50):
        sim.call_at(1.0, partial(order.append, i))
    sim.call_later(0.5, lambda: order.append(-1))
    sim.run()
    assert order == [-1, *range(50)]


def test_call_later_from_a_callback_uses_the_virtual_clock() -> None:
    sim = Simulator()
    seen: list[float] = []
    sim.call_at(1.0, lambda: sim.call_later(0.25, lambda: seen.append(sim.now)))
    sim.run()
    assert seen == [1.25]


@pytest.mark.parametrize("at", [-1.0, float("nan"), float("inf")])
def test_call_at_rejects_bad_times(at: float) -> None:
    with pytest.raises(UsageError):
        Simulator().call_at(at, lambda: None)


def test_call_later_rejects_negative_delay_and_run_rejects_past_until() -> None:
    sim = Simulator()
    sim.run(until=5.0)
    with pytest.raises(UsageError):
        sim.call_later(-0.1, lambda: None)
    with pytest.raises(UsageError):
        sim.run(until=4.0)


def test_run_is_not_reentrant() -> None:
    sim = Simulator()
    sim.call_at(1.0, lambda: sim.run())
    with pytest.raises(UsageError):
        sim.run()


def test_observers_see_non_transmit_effects_with_node_and_time() -> None:
    sim, _ = clock_sim()
    sim.add_node(B, Clock)
    sim.add_link(A, B, LinkModel(delay=0.25))
    seen: list[tuple[NodeId, object, float]] = []
    sim.observe(lambda node_id, effect, now: seen.append((node_id, effect, now)))
    sim.act(A, lambda node, now: [Transmit(B, b"hi"), "anything else"])
    sim.run()
    assert seen == [(A, "anything else", 0.0), (B, Delivered(A, b"hi"), 0.25)]


def test_act_returns_the_effects_it_applied() -> None:
    sim, _ = clock_sim()
    assert sim.act(A, lambda node, now: ["e"]) == ["e"]


def test_exception_in_a_node_input_propagates() -> None:
    class Faulty(Clock):
        def datagram_received(self, src: NodeId, datagram: bytes, now: float) -> list[object]:
            raise ValueError("bug in the node")

    sim = Simulator()
    sim.add_node(A, Clock)
    sim.add_node(B, Faulty)
    sim.add_pipe(A, B, LinkModel(delay=0.1))
    sim.act(A, lambda node, now: [Transmit(B, b"x")])
    with pytest.raises(ValueError, match="bug in the node"):
        sim.run()
    assert sim.now == 0.1


def test_transmit_without_a_pipe_is_a_usage_error() -> None:
    sim, _ = clock_sim()
    sim.add_node(B, Clock)
    with pytest.raises(UsageError, match="no pipe"):
        sim.act(A, lambda node, now: [Transmit(B, b"x")])


def test_setup_misuse_raises_usage_error() -> None:
    sim, _ = clock_sim()
    with pytest.raises(UsageError):
        sim.add_node(A, Clock)
    with pytest.raises(UsageError):
        sim.add_pipe(A, NodeId(9), LinkModel())
    with pytest.raises(UsageError):
        sim.add_pipe(A, A, LinkModel())
    sim.add_node(B, Clock)
    sim.add_link(A, B, LinkModel())
    with pytest.raises(UsageError):
        sim.add_pipe(B, A, LinkModel())
    with pytest.raises(UsageError):
        sim.pipe_stats(A, NodeId(9))
    with pytest.raises(UsageError):
        sim.node_as(A, str)


def test_node_rngs_derive_from_seed_node_and_incarnation() -> None:
    draws: dict[tuple[int, NodeId], float] = {}

    def factory(seed: int) -> NodeFactory:
        def make(node_id: NodeId, now: float, rng: random.Random) -> Clock:
            draws[seed, node_id] = rng.random()
            return Clock(node_id, now, rng)

        return make

    results = []
    for seed in (1, 1, 2):
        sim = Simulator(seed=seed)
        sim.add_node(A, factory(seed))
        sim.add_node(B, factory(seed))
        results.append((draws[seed, A], draws[seed, B], sim.rng.random()))
    assert results[0] == results[1]
    assert results[0][0] != results[0][1]
    assert results[2][0] != results[0][0]
    assert results[2][2] != results[0][2]
