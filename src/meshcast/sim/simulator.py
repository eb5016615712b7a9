"""Deterministic discrete-event simulator: virtual clock, nodes, pipes, faults, trace.

(Theory of operation: docs/design/sim.md)
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from functools import partial
from typing import Any, TypeVar

from meshcast.errors import UsageError
from meshcast.ids import NodeId
from meshcast.link.events import Transmit
from meshcast.sim.network import (
    REASON_CRASHED,
    REASON_DOWN,
    Entry,
    Handler,
    LinkModel,
    Pipe,
    PipeStats,
    datagram_crc,
)
from meshcast.sim.node import NodeFactory, Observer, SimNode, StartHook
from meshcast.sim.trace import TraceLog

N = TypeVar("N")

MAX_TIMER_FIRES_PER_INSTANT = 10_000
"""A node whose timer fires this often at one instant is livelocked (a bug): raise."""


class _Slot:
    """A node id's place in the simulation: the live object (None while crashed) and timer."""

    __slots__ = (
        "factory",
        "fire",
        "fires_at_instant",
        "incarnation",
        "incoming",
        "instant",
        "node",
        "node_id",
        "out",
        "start",
        "timer_at",
        "timer_gen",
    )

    def __init__(self, node_id: NodeId, factory: NodeFactory, start: StartHook | None) -> None:
        self.node_id = node_id
        self.factory = factory
        self.start = start
        self.node: SimNode | None = None
        self.incarnation = 0
        self.timer_at: float | None = None  # deadline as returned by the node (unclamped)
        self.timer_gen = 0  # heap timer entries of another generation are stale
        self.fire: Callable[[bytes, int], None] = _unwired
        self.out: dict[NodeId, Pipe] = {}
        self.incoming: list[Pipe] = []
        self.instant = -math.inf  # livelock guard: last instant the timer fired
        self.fires_at_instant = 0


class Simulator:
    """Runs sans-I/O nodes over emulated pipes in virtual time; one seed, one trace.

    Strict: an exception raised by a node input, an observer or a scheduled callable
    propagates out of `run` (or `act`) at once. Misuse of the simulator's own API raises
    `UsageError`; an invalid `LinkModel` raises `ConfigError`.
    """

    def __init__(self, seed: int = 0, trace: bool = False) -> None:
        self._seed = seed
        self._rng = random.Random(seed)
        self._now = 0.0
        self._heap: list[Entry] = []
        self._counter = itertools.count()
        self._slots: dict[NodeId, _Slot] = {}
        self._pipes: dict[tuple[NodeId, NodeId], Pipe] = {}
        self._observers: list[Observer] = []
        self._trace = TraceLog(packets=trace)
        self._packet_trace = self._trace if trace else None
        self._running = False
        self._events = 0

    # ------------------------------------------------------------------ queries

    @property
    def now(self) -> float:
        """Virtual time in seconds."""
        return self._now

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def rng(self) -> random.Random:
        """The simulator's own seeded RNG (for scenarios: workloads, fault schedules)."""
        return self._rng

    @property
    def events_processed(self) -> int:
        """Heap entries popped so far (stale timer entries included)."""
        return self._events

    @property
    def pending_events(self) -> int:
        return len(self._heap)

    def node_ids(self) -> list[NodeId]:
        return list(self._slots)

    def node(self, node_id: NodeId) -> SimNode:
        """The live object of a running node. Raises `UsageError` if unknown or crashed."""
        node = self._slot(node_id).node
        if node is None:
            raise UsageError(f"node {node_id} is crashed")
        return node

    def node_as(self, node_id: NodeId, cls: type[N]) -> N:
        """`node`, checked to be an instance of `cls` (typed access to its own API)."""
        node = self.node(node_id)
        if not isinstance(node, cls):
            raise UsageError(f"node {node_id} is a {type(node).__name__}, not a {cls.__name__}")
        return node

    def is_alive(self, node_id: NodeId) -> bool:
        return self._slot(node_id).node is not None

    def incarnation(self, node_id: NodeId) -> int:
        """0 for the first object, +1 on every restart."""
        return self._slot(node_id).incarnation

    def pipe_stats(self, src: NodeId, dst: NodeId) -> PipeStats:
        return self._pipe(src, dst).statistics()

    def pipe_is_up(self, src: NodeId, dst: NodeId) -> bool:
        return self._pipe(src, dst).up

    def trace_lines(self) -> list[str]:
        """The trace: one JSON object per line, sorted keys, in event order."""
        return self._trace.lines()

    def trace_digest(self) -> str:
        """SHA-256 (hex) of the trace lines, each ending in a newline."""
        return self._trace.digest()

    # ------------------------------------------------------------------ set-up

    def add_node(
        self, node_id: NodeId, factory: NodeFactory, start: StartHook | None = None
    ) -> None:
        """Create a node now: ``factory(node_id, now, rng)``.

        `start`, if given, is the node's first input, ``start(node, now)``; it runs as an
        event at the current instant (after the factory, on `add_node` and every
        `restart`), so pipes added right after the node exist when it sends.
        """
        if node_id in self._slots:
            raise UsageError(f"node {node_id} already added")
        slot = _Slot(node_id, factory, start)
        slot.fire = partial(self._fire_timer, slot)
        self._slots[node_id] = slot
        self._boot(slot)

    def add_link(self, a: NodeId, b: NodeId, model: LinkModel) -> None:
        """Two pipes, a→b and b→a, with the same model (each with its own RNG and queue)."""
        self.add_pipe(a, b, model)
        self.add_pipe(b, a, model)

    def add_pipe(self, src: NodeId, dst: NodeId, model: LinkModel) -> None:
        """One direction, src→dst. Both nodes must have been added."""
        if src == dst:
            raise UsageError(f"a pipe needs two distinct nodes, got {src}→{dst}")
        src_slot = self._slot(src)
        dst_slot = self._slot(dst)
        if (src, dst) in self._pipes:
            raise UsageError(f"pipe {src}→{dst} already added")
        rng = random.Random(f"meshcast-sim/{self._seed}/pipe/{src}/{dst}")
        pipe = Pipe(src, dst, model, rng, self._heap, self._counter, self._packet_trace)
        pipe.arrive = partial(self._arrive, pipe, dst_slot)
        self._pipes[src, dst] = pipe
        src_slot.out[dst] = pipe
        dst_slot.incoming.append(pipe)
        fields = asdict(model)
        if model.bandwidth_bps is not None and math.isinf(model.bandwidth_bps):
            fields["bandwidth_bps"] = None
        self._trace.record(self._now, "pipe_added", src=src, dst=dst, **fields)

    def observe(self, observer: Observer) -> None:
        """Call ``observer(node_id, effect, now)`` for every effect that is not a Transmit."""
        self._observers.append(observer)

    # ------------------------------------------------------------------ inputs

    def act(
        self, node_id: NodeId, fn: Callable[[Any, float], Sequence[object]]
    ) -> Sequence[object]:
        """Run ``fn(node, now)`` on a live node now, apply its effects, re-arm its timer.

        Returns the effects (already applied). `fn` gets the node object as it is (Any),
        so its own API can be called; use `node_as` for a checked, typed reference.
        """
        slot = self._slot(node_id)
        node = slot.node
        if node is None:
            raise UsageError(f"node {node_id} is crashed")
        effects = fn(node, self._now)
        if effects:
            self._apply(slot, effects)
        self._rearm(slot)
        return effects

    def call_at(self, at: float, fn: Callable[[], object]) -> None:
        """Call ``fn()`` at virtual time `at` (>= now); its return value is ignored."""
        if not at >= self._now:  # NaN fails too
            raise UsageError(f"call_at({at!r}) is in the past (now={self._now!r})")
        if math.isinf(at):
            raise UsageError("call_at needs a finite time")
        heapq.heappush(self._heap, (at, next(self._counter), _callback(fn), b"", 0))

    def call_later(self, delay: float, fn: Callable[[], object]) -> None:
        """Call ``fn()`` after `delay` seconds (>= 0) of virtual time."""
        if not delay >= 0:
            raise UsageError(f"call_later needs a delay >= 0, got {delay!r}")
        self.call_at(self._now + delay, fn)

    def trace_event(self, kind: str, **fields: object) -> None:
        """Add a typed event to the trace (always recorded). Fields must be plain JSON."""
        if not kind:
            raise UsageError("trace event kind must be a non-empty string")
        self._trace.record(self._now, kind, **fields)

    # ------------------------------------------------------------------ faults

    def set_pipe_up(self, src: NodeId, dst: NodeId, up: bool) -> None:
        """Bring one direction down (packets queued and in flight are lost) or up."""
        pipe = self._pipe(src, dst)
        pipe.admin_up = up
        self._update_pipe(pipe)

    def set_link_up(self, a: NodeId, b: NodeId, up: bool) -> None:
        """`set_pipe_up` on a→b and b→a (each that exists; at least one must)."""
        pipes = [p for p in (self._pipes.get((a, b)), self._pipes.get((b, a))) if p is not None]
        if not pipes:
            raise UsageError(f"no link between {a} and {b}")
        for pipe in pipes:
            pipe.admin_up = up
            self._update_pipe(pipe)

    def partition(self, groups: Iterable[Iterable[NodeId]]) -> None:
        """Cut every pipe between different groups; replaces any earlier partition.

        A node listed in no group is alone in its own group. Pipes inside a group are
        not cut by the partition (one brought down by `set_link_up` stays down).
        """
        group_of: dict[NodeId, int] = {}
        listed: list[list[int]] = []
        for index, group in enumerate(groups):
            members = sorted(set(group))
            for node_id in members:
                self._slot(node_id)
                if node_id in group_of:
                    raise UsageError(f"node {node_id} is in two partition groups")
                group_of[node_id] = index
            listed.append([int(n) for n in members])
        self._trace.record(self._now, "partitioned", groups=listed)
        for pipe in self._pipes.values():
            g_src = group_of.get(pipe.src)
            pipe.partitioned = g_src is None or g_src != group_of.get(pipe.dst)
            self._update_pipe(pipe)

    def heal(self) -> None:
        """End the partition (pipes brought down by `set_link_up` stay down)."""
        self._trace.record(self._now, "healed")
        for pipe in self._pipes.values():
            pipe.partitioned = False
            self._update_pipe(pipe)

    def crash(self, node_id: NodeId) -> None:
        """Drop the node's object and timer, and every packet queued or in flight to it.

        Packets the node sent before the crash are owned by the network and still arrive.
        Packets sent to it while it is down are dropped on arrival (`dropped_crashed`).
        """
        slot = self._slot(node_id)
        if slot.node is None:
            raise UsageError(f"node {node_id} is already crashed")
        slot.node = None
        slot.timer_gen += 1
        slot.timer_at = None
        self._trace.record(self._now, "node_crashed", node=node_id, incarnation=slot.incarnation)
        for pipe in slot.incoming:
            lost = pipe.flush(self._now, REASON_CRASHED)
            self._trace.record(
                self._now,
                "pipe_flushed",
                src=pipe.src,
                dst=pipe.dst,
                reason=REASON_CRASHED,
                lost=lost,
            )

    def restart(self, node_id: NodeId) -> None:
        """Bring a crashed node back: a fresh object from its factory (new incarnation)."""
        slot = self._slot(node_id)
        if slot.node is not None:
            raise UsageError(f"node {node_id} is running; crash it first")
        slot.incarnation += 1
        self._boot(slot)

    # ------------------------------------------------------------------ event loop

    def run(self, until: float | None = None, max_events: int | None = None) -> None:
        """Process events in (time, seq) order until none is left, the next one is later
        than `until` (events at exactly `until` run), or `max_events` have run.

        With `until`, the clock then stands at `until` unless `max_events` stopped it
        earlier.
        """
        if self._running:
            raise UsageError("run() called from inside run()")
        if until is not None and not until >= self._now:
            raise UsageError(f"run(until={until!r}) is in the past (now={self._now!r})")
        if max_events is not None and max_events < 0:
            raise UsageError(f"max_events must be >= 0, got {max_events!r}")
        limit = math.inf if until is None else until
        budget = -1 if max_events is None else max_events
        heap = self._heap
        pop = heapq.heappop
        done = 0
        self._running = True
        try:
            while heap and done != budget:
                entry = heap[0]
                at = entry[0]
                if at > limit:
                    break
                pop(heap)
                self._now = at
                done += 1
                entry[2](entry[3], entry[4])
        finally:
            self._running = False
            self._events += done
        if until is not None and done != budget:
            self._now = until

    # ------------------------------------------------------------------ internals

    def _slot(self, node_id: NodeId) -> _Slot:
        try:
            return self._slots[node_id]
        except KeyError:
            raise UsageError(f"unknown node {node_id}") from None

    def _pipe(self, src: NodeId, dst: NodeId) -> Pipe:
        try:
            return self._pipes[src, dst]
        except KeyError:
            raise UsageError(f"no pipe {src}→{dst}") from None

    def _boot(self, slot: _Slot) -> None:
        now = self._now
        rng = random.Random(f"meshcast-sim/{self._seed}/node/{slot.node_id}/{slot.incarnation}")
        node = slot.factory(slot.node_id, now, rng)
        slot.node = node
        slot.timer_at = None
        slot.timer_gen += 1
        self._trace.record(now, "node_started", node=slot.node_id, incarnation=slot.incarnation)
        if slot.start is not None:  # as an event, so that pipes added after the node exist
            start: Handler = partial(self._start_node, slot)
            heapq.heappush(self._heap, (now, next(self._counter), start, b"", slot.incarnation))
        self._rearm(slot)

    def _start_node(self, slot: _Slot, _datagram: bytes, incarnation: int) -> None:
        node = slot.node
        if node is None or slot.incarnation != incarnation or slot.start is None:
            return  # crashed before it could start
        effects = slot.start(node, self._now)
        if effects:
            self._apply(slot, effects)
        self._rearm(slot)

    def _update_pipe(self, pipe: Pipe) -> None:
        up = pipe.admin_up and not pipe.partitioned
        if up == pipe.up:
            return
        pipe.up = up
        now = self._now
        self._trace.record(now, "pipe_up" if up else "pipe_down", src=pipe.src, dst=pipe.dst)
        if not up:
            lost = pipe.flush(now, REASON_DOWN)
            self._trace.record(
                now, "pipe_flushed", src=pipe.src, dst=pipe.dst, reason=REASON_DOWN, lost=lost
            )

    def _apply(self, slot: _Slot, effects: Sequence[object]) -> None:
        now = self._now
        node = slot.node
        for effect in effects:
            if isinstance(effect, Transmit):
                pipe = slot.out.get(effect.to)
                if pipe is None:
                    raise UsageError(f"node {slot.node_id} sent to {effect.to}: no pipe")
                pipe.send(effect.datagram, now)
            else:
                trace = self._packet_trace
                if trace is not None:
                    trace.record_node(now, "effect_emitted", slot.node_id, type(effect).__name__)
                for observer in self._observers:
                    observer(slot.node_id, effect, now)
                if slot.node is not node:  # an observer crashed or restarted this node
                    return

    def _rearm(self, slot: _Slot) -> None:
        node = slot.node
        if node is None:
            return
        at = node.next_deadline()
        if at == slot.timer_at:
            return  # the pending heap entry stays valid
        slot.timer_gen += 1
        slot.timer_at = at
        if at is not None:
            if not at >= self._now:  # in the past (or NaN): fire now
                if at != at:
                    raise ValueError(f"node {slot.node_id} returned a NaN deadline")
                at = self._now
            heapq.heappush(self._heap, (at, next(self._counter), slot.fire, b"", slot.timer_gen))

    def _fire_timer(self, slot: _Slot, _datagram: bytes, gen: int) -> None:
        if gen != slot.timer_gen:
            return  # stale: re-armed, cleared or crashed since
        node = slot.node
        assert node is not None  # crash bumps timer_gen
        now = self._now
        if now == slot.instant:
            slot.fires_at_instant += 1
            if slot.fires_at_instant > MAX_TIMER_FIRES_PER_INSTANT:
                raise RuntimeError(
                    f"node {slot.node_id}: timer fired {slot.fires_at_instant} times at "
                    f"t={now!r}; next_deadline() does not advance"
                )
        else:
            slot.instant = now
            slot.fires_at_instant = 1
        slot.timer_at = None
        trace = self._packet_trace
        if trace is not None:
            trace.record_node(now, "timer_fired", slot.node_id)
        effects = node.on_timer(now)
        if effects:
            self._apply(slot, effects)
        self._rearm(slot)

    def _arrive(self, pipe: Pipe, slot: _Slot, datagram: bytes, epoch: int) -> None:
        if epoch != pipe.epoch:
            return  # lost in a flush (already counted)
        pipe.in_flight -= 1
        node = slot.node
        trace = self._packet_trace
        if node is None:
            pipe.dropped_crashed += 1
            if trace is not None:
                trace.record_packet(
                    self._now,
                    "packet_dropped",
                    pipe.src,
                    pipe.dst,
                    len(datagram),
                    datagram_crc(datagram),
                    REASON_CRASHED,
                )
            return
        pipe.delivered += 1
        pipe.bytes_delivered += len(datagram)
        if trace is not None:
            trace.record_packet(
                self._now,
                "packet_delivered",
                pipe.src,
                pipe.dst,
                len(datagram),
                datagram_crc(datagram),
            )
        effects = node.datagram_received(pipe.src, datagram, self._now)
        if effects:
            self._apply(slot, effects)
        self._rearm(slot)


def _callback(fn: Callable[[], object]) -> Callable[[bytes, int], None]:
    def handler(_datagram: bytes, _number: int) -> None:
        fn()

    return handler


def _unwired(_datagram: bytes, _number: int) -> None:
    raise AssertionError("timer handler not wired")
