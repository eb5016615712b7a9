"""Harness and invariant checkers for seeded overlay simulations.

`OverlayHarness` wraps a simulator built by `meshcast.sim.overlay.build_overlay` (or, with
`tap=True`, an equivalent build whose daemons are wrapped in a `Tap` that records every
overlay DATA message put on a link). It drives faults through the simulator while keeping a
timeline of the network's state, sends numbered messages, and records every delivery with
the receiving daemon's incarnation. The `check_*` functions state the invariants of
docs/design/overlay-tests.md; each failure names the seed and ends with the trace tail.
"""

from __future__ import annotations

import itertools
import math
import random
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import NoReturn, cast

from meshcast import wire
from meshcast.errors import DecodeError
from meshcast.ids import NodeId
from meshcast.link import LinkConfig, Transmit
from meshcast.overlay.node import Neighbour, OverlayConfig, OverlayDelivered, OverlayNode
from meshcast.overlay.view import View
from meshcast.sim.network import LinkModel
from meshcast.sim.overlay import OverlayEdge, OverlayRecorder, build_overlay
from meshcast.sim.simulator import Simulator
from meshcast.wire.overlay import KIND_DATA, Data, decode_overlay

Edge = tuple[NodeId, NodeId]  # (a, b) with a < b

MESSAGE_ID = struct.Struct("!Q")

# Timing of the default harness link (heartbeat 0.1 s, 5 failure rounds, retry 1 s).
DETECT_TIME = 1.0  # s: a cut link or crashed daemon is out of every view by then
CONVERGE_TIME = 2.5  # s: a restored link or restarted daemon is in every view by then
LIFE_TIME = 1.5  # s: a message that can arrive has arrived by then


def edge(a: int, b: int) -> Edge:
    return (NodeId(min(a, b)), NodeId(max(a, b)))


# ---------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class SentMessage:
    msg_id: int
    source: NodeId
    incarnation: int  # the source's simulator incarnation
    dests: frozenset[NodeId]
    sent_at: float
    depth: Mapping[NodeId, int]  # dest -> its depth in the source's tree at send time
    path: Mapping[NodeId, tuple[NodeId, ...]]  # dest -> tree path at send time, source first


@dataclass(frozen=True, slots=True)
class Delivery:
    node: NodeId
    incarnation: int  # the receiver's simulator incarnation
    source: NodeId
    msg_id: int
    hops: int
    at: float


@dataclass(frozen=True, slots=True)
class NetworkState:
    """The network from `since` until the next state begins."""

    since: float
    down: frozenset[Edge]  # links cut with `cut`
    crashed: frozenset[NodeId]
    groups: tuple[frozenset[NodeId], ...] | None  # current partition, if any


@dataclass(frozen=True, slots=True)
class DownEvent:
    at: float
    nodes: frozenset[NodeId]  # daemons that crashed
    edges: frozenset[Edge]  # links that went down (cut, or across a new partition)


@dataclass(slots=True)
class DataLog:
    """Overlay DATA messages daemons put on links (every transmission, retransmissions too)."""

    # (from, to) -> (harness message id, destination list), one per DATA message, in order
    sent: dict[tuple[NodeId, NodeId], list[tuple[int, tuple[int, ...]]]] = field(
        default_factory=dict
    )

    def messages(self, src: NodeId, dst: NodeId) -> list[tuple[int, ...]]:
        """Destination lists of the DATA messages sent on src->dst."""
        return [dests for _, dests in self.sent.get((src, dst), [])]

    def total_messages(self) -> int:
        return sum(len(v) for v in self.sent.values())


def data_messages(datagram: bytes) -> list[Data]:
    """The whole overlay DATA messages inside one Hop datagram (none for control packets)."""
    try:
        header = wire.decode_header(datagram)
        if header.ptype is not wire.PacketType.DATA:
            return []
        _, fragments = wire.decode_data(datagram, header)
        found: list[Data] = []
        for fragment in fragments:
            if isinstance(fragment, bytes) and fragment[:1] == bytes((KIND_DATA,)):
                message = decode_overlay(fragment)
                assert isinstance(message, Data)
                found.append(message)
        return found
    except DecodeError as exc:  # our own daemons never send malformed datagrams
        raise AssertionError(f"undecodable datagram from a daemon: {exc}") from exc


class Tap:
    """A `SimNode` around an `OverlayNode` that logs the DATA messages it transmits."""

    def __init__(self, inner: OverlayNode, log: DataLog) -> None:
        self.inner = inner
        self._log = log

    def _record(self, effects: Sequence[object]) -> Sequence[object]:
        local = self.inner.local
        for effect in effects:
            if isinstance(effect, Transmit):
                found = data_messages(effect.datagram)
                if found:
                    self._log.sent.setdefault((local, effect.to), []).extend(
                        (MESSAGE_ID.unpack_from(d.payload)[0], d.dests) for d in found
                    )
        return effects

    def start(self, now: float) -> Sequence[object]:
        return self._record(self.inner.start(now))

    def datagram_received(self, src: NodeId, datagram: bytes, now: float) -> Sequence[object]:
        return self._record(self.inner.datagram_received(src, datagram, now))

    def on_timer(self, now: float) -> Sequence[object]:
        return self._record(self.inner.on_timer(now))

    def next_deadline(self) -> float | None:
        return self.inner.next_deadline()

    def multicast(self, dests: Sequence[NodeId], payload: bytes, now: float) -> Sequence[object]:
        return self._record(self.inner.multicast(dests, payload, now))


def build_tapped_overlay(
    edges: Iterable[OverlayEdge],
    *,
    seed: int,
    log: DataLog,
    physical: Mapping[Edge, LinkModel] | None = None,
    **options: object,
) -> tuple[Simulator, OverlayRecorder]:
    """`build_overlay` (same options), with every daemon wrapped in a `Tap`.

    `physical` replaces the emulated model of some links (the daemons still advertise the
    edge's `bandwidth_bps`): a link slower than its daemons believe.
    """
    policy = options.pop("policy", "shortest-path")
    assert isinstance(policy, str)
    upload_bps = cast("Mapping[int, float] | None", options.pop("upload_bps", None))
    edges = list(edges)
    nodes = sorted({n for e in edges for n in (e.a, e.b)})
    neighbours: dict[int, dict[NodeId, Neighbour]] = {n: {} for n in nodes}
    for e in edges:
        neighbours[e.a][NodeId(e.b)] = Neighbour(e.weight, e.bandwidth_bps)
        neighbours[e.b][NodeId(e.a)] = Neighbour(e.weight, e.bandwidth_bps)
    uploads = {NodeId(n): float((upload_bps or {}).get(n, math.inf)) for n in nodes}
    sim = Simulator(seed=seed)
    recorder = OverlayRecorder()
    sim.observe(recorder)

    def factory(node_id: NodeId, now: float, rng: random.Random) -> Tap:
        config = OverlayConfig(
            neighbours=neighbours[node_id],
            upload_bps=uploads,
            link=LinkConfig(heartbeat_interval=0.1, failure_rounds=5),
            policy=policy,
            **options,  # type: ignore[arg-type]
        )
        inner = OverlayNode(node_id, config, incarnation=sim.incarnation(node_id) + 1, rng=rng)
        return Tap(inner, log)

    for n in nodes:
        sim.add_node(NodeId(n), factory, start=lambda node, now: node.start(now))
    for e in edges:
        model = (physical or {}).get(edge(e.a, e.b)) or LinkModel(
            delay=e.delay, bandwidth_bps=e.bandwidth_bps, loss=e.loss
        )
        sim.add_link(NodeId(e.a), NodeId(e.b), model)
    return sim, recorder


# ---------------------------------------------------------------------- harness


class OverlayHarness:
    """One seeded overlay simulation: faults with a timeline, numbered messages, deliveries."""

    def __init__(
        self,
        edges: Iterable[OverlayEdge],
        *,
        seed: int,
        tap: bool = False,
        physical: Mapping[Edge, LinkModel] | None = None,
        **options: object,
    ) -> None:
        self.edges_spec = list(edges)
        self.seed = seed
        self.log = DataLog()
        if tap or physical:
            self.sim, self.recorder = build_tapped_overlay(
                self.edges_spec, seed=seed, log=self.log, physical=physical, **options
            )
        else:
            self.sim, self.recorder = build_overlay(self.edges_spec, seed=seed, **options)  # type: ignore[arg-type]
        self.nodes = sorted({NodeId(n) for e in self.edges_spec for n in (e.a, e.b)})
        self.edges = sorted({edge(e.a, e.b) for e in self.edges_spec})
        self.sent: dict[int, SentMessage] = {}
        self.deliveries: list[Delivery] = []
        self.history: list[NetworkState] = [NetworkState(0.0, frozenset(), frozenset(), None)]
        self.down_events: list[DownEvent] = []
        self._next_id = 1
        self._components: dict[NetworkState, list[frozenset[NodeId]]] = {}
        self.sim.observe(self._observe)

    # ---------------------------------------------------------------- access

    @property
    def now(self) -> float:
        return self.sim.now

    def overlay(self, node: NodeId) -> OverlayNode:
        obj = self.sim.node(node)
        if isinstance(obj, Tap):
            return obj.inner
        assert isinstance(obj, OverlayNode)
        return obj

    def alive(self) -> list[NodeId]:
        return [n for n in self.nodes if self.sim.is_alive(n)]

    def run(self, until: float) -> None:
        self.sim.run(until=until)

    def fail(self, message: str) -> NoReturn:
        tail = "\n".join(self.sim.trace_lines()[-15:])
        raise AssertionError(
            f"seed={self.seed} t={self.now:.3f}: {message}\n--- trace tail ---\n{tail}"
        )

    # ---------------------------------------------------------------- faults

    @property
    def state(self) -> NetworkState:
        return self.history[-1]

    def _push(self, state: NetworkState, went_down: DownEvent | None) -> None:
        if state.since == self.history[-1].since:
            self.history[-1] = state
        else:
            self.history.append(state)
        if went_down is not None and (went_down.nodes or went_down.edges):
            self.down_events.append(went_down)

    def cut(self, a: NodeId, b: NodeId) -> None:
        e = edge(a, b)
        self.sim.set_link_up(a, b, False)
        s = self.state
        self._push(
            NetworkState(self.now, s.down | {e}, s.crashed, s.groups),
            DownEvent(self.now, frozenset(), frozenset({e})),
        )

    def restore(self, a: NodeId, b: NodeId) -> None:
        self.sim.set_link_up(a, b, True)
        s = self.state
        self._push(NetworkState(self.now, s.down - {edge(a, b)}, s.crashed, s.groups), None)

    def crash(self, node: NodeId) -> None:
        self.sim.crash(node)
        s = self.state
        self._push(
            NetworkState(self.now, s.down, s.crashed | {node}, s.groups),
            DownEvent(self.now, frozenset({node}), frozenset()),
        )

    def restart(self, node: NodeId) -> None:
        self.sim.restart(node)
        s = self.state
        self._push(NetworkState(self.now, s.down, s.crashed - {node}, s.groups), None)

    def partition(self, groups: Sequence[Iterable[NodeId]]) -> None:
        frozen = tuple(frozenset(g) for g in groups)
        self.sim.partition(frozen)
        s = self.state
        before = self._usable_edges(s)
        after = self._usable_edges(NetworkState(self.now, s.down, s.crashed, frozen))
        self._push(
            NetworkState(self.now, s.down, s.crashed, frozen),
            DownEvent(self.now, frozenset(), frozenset(before - after)),
        )

    def heal(self) -> None:
        self.sim.heal()
        s = self.state
        self._push(NetworkState(self.now, s.down, s.crashed, None), None)

    def _usable_edges(self, state: NetworkState) -> set[Edge]:
        group_of: dict[NodeId, int] = {}
        if state.groups is not None:
            for i, g in enumerate(state.groups):
                for n in g:
                    group_of[n] = i
        usable = set()
        for a, b in self.edges:
            if (a, b) in state.down or a in state.crashed or b in state.crashed:
                continue
            if state.groups is not None and (
                a not in group_of or b not in group_of or group_of[a] != group_of[b]
            ):
                continue
            usable.add((a, b))
        return usable

    def components(self, state: NetworkState | None = None) -> list[frozenset[NodeId]]:
        """Connected components of live daemons over usable links."""
        state = state or self.state
        cached = self._components.get(state)
        if cached is None:
            cached = self._components[state] = self._compute_components(state)
        return cached

    def _compute_components(self, state: NetworkState) -> list[frozenset[NodeId]]:
        adjacency: dict[NodeId, list[NodeId]] = {n: [] for n in self.nodes}
        for a, b in self._usable_edges(state):
            adjacency[a].append(b)
            adjacency[b].append(a)
        seen: set[NodeId] = set()
        found = []
        for start in self.nodes:
            if start in seen or start in state.crashed:
                continue
            comp = {start}
            stack = [start]
            while stack:
                for v in adjacency[stack.pop()]:
                    if v not in comp:
                        comp.add(v)
                        stack.append(v)
            seen |= comp
            found.append(frozenset(comp))
        return found

    def states_during(self, t0: float, t1: float) -> list[NetworkState]:
        states = []
        for i, s in enumerate(self.history):
            end = self.history[i + 1].since if i + 1 < len(self.history) else math.inf
            if s.since <= t1 and end > t0:
                states.append(s)
        return states

    def connected_throughout(self, a: NodeId, b: NodeId, t0: float, t1: float) -> bool:
        for state in self.states_during(t0, t1):
            if not any(a in c and b in c for c in self.components(state)):
                return False
        return True

    # ---------------------------------------------------------------- workload

    def multicast(
        self, source: NodeId, dests: Iterable[NodeId], size: int = 64
    ) -> SentMessage | None:
        """Send one numbered message now; None if the source is down or its outbox full."""
        if not self.sim.is_alive(source):
            return None
        node = self.overlay(source)
        if not node.can_multicast():
            return None
        dest_set = frozenset(dests)
        msg_id = self._next_id
        self._next_id += 1
        payload = MESSAGE_ID.pack(msg_id) + bytes(max(size - MESSAGE_ID.size, 0))
        tree = node.routing.tree(source)
        depth: dict[NodeId, int] = {}
        path: dict[NodeId, tuple[NodeId, ...]] = {}
        if tree is not None:
            for d in dest_set:
                if d == source or d in tree.parent:
                    chain = [d]
                    while chain[-1] != source:
                        chain.append(tree.parent[chain[-1]])
                    path[d] = tuple(reversed(chain))
                    depth[d] = len(chain) - 1
        self.sent[msg_id] = SentMessage(
            msg_id,
            source,
            self.sim.incarnation(source),
            dest_set,
            self.now,
            depth,
            path,
        )
        self.sim.act(source, lambda n, now: n.multicast(sorted(dest_set), payload, now))
        return self.sent[msg_id]

    def stream(
        self,
        sources: Sequence[NodeId],
        start: float,
        stop: float,
        interval: float,
        dests: Sequence[NodeId] | None = None,
        size: int = 64,
    ) -> None:
        """Every `interval` in [start, stop), each source multicasts to `dests` (all daemons)."""
        targets = list(dests) if dests is not None else list(self.nodes)
        t = start
        while t < stop:
            for source in sources:
                self.sim.call_at(t, partial(self.multicast, source, targets, size))
            t += interval

    def _observe(self, node: NodeId, effect: object, now: float) -> None:
        if isinstance(effect, OverlayDelivered):
            (msg_id,) = MESSAGE_ID.unpack_from(effect.payload)
            self.deliveries.append(
                Delivery(node, self.sim.incarnation(node), effect.source, msg_id, effect.hops, now)
            )

    # ---------------------------------------------------------------- expectations

    def view_change_times(self) -> list[float]:
        return sorted(t for history in self.recorder.views.values() for t, _ in history)

    def required(self, msg: SentMessage, dest: NodeId) -> bool:
        """Must `dest` deliver `msg`? (docs/design/overlay-tests.md, "exactly once")

        Yes when the source and `dest` were alive and connected from CONVERGE_TIME before
        the send until LIFE_TIME after it, and no daemon or link on the message's tree path
        went down from DETECT_TIME before the send until LIFE_TIME after it.
        """
        if dest not in msg.dests:
            return False
        t0, t1 = msg.sent_at - CONVERGE_TIME, msg.sent_at + LIFE_TIME
        if not self.connected_throughout(msg.source, dest, t0, t1):
            return False
        path = msg.path.get(dest)
        if path is None:
            return True  # connected long enough: the source must have known a route
        path_nodes = set(path)
        path_edges = {edge(a, b) for a, b in itertools.pairwise(path)}
        for event in self.down_events:
            if msg.sent_at - DETECT_TIME <= event.at <= t1 and (
                event.nodes & path_nodes or event.edges & path_edges
            ):
                return False
        return True


# ---------------------------------------------------------------------- checks


def check_views_converged(h: OverlayHarness) -> None:
    """Each connected component of live daemons has installed one view: the component,
    with the same digest at every member, and every member has seen it agreed."""
    for comp in h.components():
        digests: dict[bytes, list[NodeId]] = {}
        for n in sorted(comp):
            view = h.overlay(n).view
            if view is None:
                h.fail(f"daemon {n} has no view")
            if set(view.members) != comp:
                h.fail(f"daemon {n} view {sorted(view.members)} != its component {sorted(comp)}")
            digests.setdefault(view.digest, []).append(n)
            agreed = h.recorder.agreed.get(n)
            if not agreed or agreed[-1][1].digest != view.digest:
                h.fail(f"daemon {n}: ViewAgreed not reported for its view {view.digest.hex()}")
        if len(digests) != 1:
            h.fail(f"component {sorted(comp)} holds {len(digests)} views: {digests}")


def check_identical_trees(h: OverlayHarness, sources: Iterable[NodeId] | None = None) -> None:
    """Within each component every daemon computes the same tree (and rate) for every
    source (or for each of `sources`)."""
    chosen = set(h.nodes if sources is None else sources)
    for comp in h.components():
        members = sorted(comp)
        for source in sorted(comp & chosen):
            reference = h.overlay(members[0]).routing.tree(source)
            if reference is None:
                h.fail(f"daemon {members[0]} has no tree for source {source}")
            if set(reference.parent) | {source} != comp:
                h.fail(f"tree of {source} spans {sorted(reference.parent)}, not {members}")
            for n in members[1:]:
                tree = h.overlay(n).routing.tree(source)
                if tree is None or dict(tree.parent) != dict(reference.parent):
                    h.fail(f"daemons {members[0]} and {n} disagree on the tree of {source}")
                if tree.rate_bps != reference.rate_bps:
                    h.fail(f"daemons {members[0]} and {n} disagree on the rate of {source}")


def check_at_most_once(h: OverlayHarness) -> None:
    """No daemon incarnation delivers a message twice, and only destinations deliver."""
    seen: set[tuple[NodeId, int, int]] = set()
    for d in h.deliveries:
        key = (d.node, d.incarnation, d.msg_id)
        if key in seen:
            h.fail(f"daemon {d.node} delivered message {d.msg_id} twice")
        seen.add(key)
        msg = h.sent.get(d.msg_id)
        if msg is None:
            h.fail(f"daemon {d.node} delivered unknown message {d.msg_id}")
        if d.source != msg.source:
            h.fail(f"message {d.msg_id} delivered as from {d.source}, sent by {msg.source}")
        if d.node not in msg.dests:
            h.fail(f"daemon {d.node} is no destination of message {d.msg_id} but delivered it")


def check_required_delivered(h: OverlayHarness, *, min_required: int = 1) -> int:
    """Every required (message, destination) pair was delivered; returns how many."""
    delivered = {(d.node, d.msg_id) for d in h.deliveries}
    required = 0
    missing: list[tuple[int, NodeId, float]] = []
    for msg in h.sent.values():
        if msg.sent_at + LIFE_TIME > h.now:
            continue  # too recent to judge
        for dest in sorted(msg.dests):
            if h.required(msg, dest):
                required += 1
                if (dest, msg.msg_id) not in delivered:
                    missing.append((msg.msg_id, dest, msg.sent_at))
    if missing:
        shown = ", ".join(
            f"msg {m} from {h.sent[m].source} to {d} at t={t:.3f}" for m, d, t in missing[:8]
        )
        h.fail(f"{len(missing)} of {required} required deliveries missing: {shown}")
    if required < min_required:
        h.fail(f"only {required} required deliveries (< {min_required}): the test is vacuous")
    return required


def check_exactly_once(h: OverlayHarness, *, min_required: int = 1) -> int:
    check_at_most_once(h)
    return check_required_delivered(h, min_required=min_required)


def check_hops_within_tree(h: OverlayHarness, *, min_checked: int = 1) -> int:
    """A message delivered while no view changed anywhere crossed exactly as many links as
    the destination's depth in the source's tree (so never more). Returns how many."""
    changes = h.view_change_times()
    checked = 0
    for d in h.deliveries:
        msg = h.sent[d.msg_id]
        if d.node == msg.source:
            if d.hops != 0:
                h.fail(f"self-delivery of message {d.msg_id} counted {d.hops} hops")
            continue
        if any(msg.sent_at - 0.1 <= t <= d.at for t in changes):
            continue  # views changed meanwhile: the packet may have been re-routed
        depth = msg.depth.get(d.node)
        if depth is None:
            h.fail(f"message {d.msg_id} reached {d.node}, which was not in the source's tree")
        if d.hops > depth:
            h.fail(f"message {d.msg_id} crossed {d.hops} links to {d.node}; tree depth {depth}")
        if d.hops != depth:
            h.fail(f"message {d.msg_id} crossed {d.hops} links to {d.node}, not depth {depth}")
        checked += 1
    if checked < min_checked:
        h.fail(f"only {checked} deliveries during stable views (< {min_checked})")
    return checked


def views_of(h: OverlayHarness, nodes: Iterable[NodeId]) -> dict[bytes, View]:
    found: dict[bytes, View] = {}
    for n in nodes:
        view = h.overlay(n).view
        if view is not None:
            found[view.digest] = view
    return found
