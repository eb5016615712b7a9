"""A small driver for replication unit tests: `Replicator`s joined by ideal streams.

Every stream write arrives `latency` later, in order, and the sender's stream drains at
the same time; control messages take `latency` too. No bandwidth model (the simulator,
`meshcast.sim.replication`, has one): these tests are about what the engines do, not how
fast. Tests watch and tamper with the traffic through `tamper`, `mute` and `sent`.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from meshcast.errors import IntegrityError, ReplicationError, UsageError
from meshcast.ids import NodeId
from meshcast.replicate.engine import (
    INBOUND_STREAM_BASE,
    BeginCopy,
    CloseStream,
    Finalize,
    HashFile,
    OpenStream,
    ReplicationEffect,
    ReplicationEvent,
    ReplicationReport,
    ReplicationRequest,
    ReplicationUpdate,
    Replicator,
    ReplicatorConfig,
    SendControl,
    StreamSend,
)
from meshcast.replicate.manifest import Manifest
from meshcast.sim.replication import SyntheticFile, SyntheticStore

CHUNK = 3  # the CHUNK message type


def chunk_index(data: bytes) -> int | None:
    """The index of the CHUNK message `data` (one whole StreamSend), None if not a CHUNK."""
    if len(data) >= 9 and data[4] == CHUNK:
        return int.from_bytes(data[5:9], "big")
    return None


@dataclass(frozen=True, slots=True)
class Sent:
    at: float
    sender: int
    receiver: int
    data: bytes


class Net:
    """Nodes 0..n-1 (`ids[i]` = NodeId(i + 1)); node 0 is usually the origin."""

    def __init__(
        self,
        n: int,
        config: ReplicatorConfig | None = None,
        *,
        latency: float = 0.001,
        seed: int = 1,
        store: Callable[[dict[bytes, SyntheticFile]], SyntheticStore] = SyntheticStore,
    ) -> None:
        """`store` makes each node's store from the net's files."""
        self.ids = [NodeId(i + 1) for i in range(n)]
        self.index = {node: i for i, node in enumerate(self.ids)}
        self.files: dict[bytes, SyntheticFile] = {}
        self.paths: dict[str, SyntheticFile] = {}
        self.stores = [store(self.files) for _ in range(n)]
        self.engines = [
            Replicator(node, self.stores[i], config, rng=random.Random(seed * 1000 + i))
            for i, node in enumerate(self.ids)
        ]
        self.latency = latency
        self.now = 0.0
        self.events = 0
        self.sent: list[Sent] = []
        self.effects: list[tuple[float, int, ReplicationEffect]] = []
        self.updates: dict[int, list[ReplicationUpdate]] = {}
        # (sender, receiver, bytes) -> the bytes delivered instead
        self.tamper: Callable[[int, int, bytes], bytes] | None = None
        self.mute: set[int] = set()  # nodes whose stream writes and controls never arrive
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._links: dict[tuple[int, int], tuple[int, int]] = {}  # (node, id) -> peer's
        self._inbound = [itertools.count(INBOUND_STREAM_BASE) for _ in range(n)]
        self._timers: list[float | None] = [None] * n

    # ------------------------------------------------------------ set-up and queries

    def add_file(self, path: str, size: int, chunk_size: int, seed: int = 0) -> SyntheticFile:
        f = SyntheticFile(path, size, chunk_size, seed)
        self.files[f.manifest.digest] = f
        self.paths[path] = f
        return f

    def replicate(self, request: ReplicationRequest, origin: int = 0) -> int:
        rid, effects = self.engines[origin].request(request, self.now)
        self.apply(origin, effects)
        return rid

    def final(self, rid: int) -> ReplicationReport | None:
        updates = self.updates.get(rid, [])
        finals = [u for u in updates if u.final]
        assert len(finals) <= 1, "a replication ends once"
        return finals[0].report if finals else None

    def chunks_sent(self, sender: int, receiver: int | None = None) -> list[int]:
        return [
            c
            for s in self.sent
            if s.sender == sender
            and (receiver is None or s.receiver == receiver)
            and (c := chunk_index(s.data)) is not None
        ]

    def events_named(self, name: str, node: int | None = None) -> list[ReplicationEvent]:
        return [
            e
            for _, i, e in self.effects
            if isinstance(e, ReplicationEvent) and e.name == name and node in (None, i)
        ]

    # ------------------------------------------------------------ running

    def run(self, until: float = 1e9, max_events: int = 1_000_000) -> None:
        while self._heap and self._heap[0][0] <= until:
            assert self.events < max_events, "no end in sight (a busy loop?)"
            at, _, action = heapq.heappop(self._heap)
            self.now = max(self.now, at)
            self.events += 1
            action()

    def run_until_final(self, rid: int, until: float = 1e9) -> ReplicationReport:
        while self.final(rid) is None and self._heap and self._heap[0][0] <= until:
            self.run(until=self._heap[0][0])
        report = self.final(rid)
        assert report is not None, "the replication did not end"
        return report

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), action))

    def input(self, i: int, feed: Callable[[Replicator], list[ReplicationEffect]]) -> None:
        self.apply(i, feed(self.engines[i]))

    def open_from_outside(self, i: int, peer: NodeId) -> int:
        """A stream from a peer outside the net (its writes go nowhere): its id at node i."""
        stream = next(self._inbound[i])
        self.input(i, lambda e: e.stream_accepted(stream, peer, self.now))
        return stream

    def apply(self, i: int, effects: list[ReplicationEffect]) -> None:
        for effect in effects:
            self.effects.append((self.now, i, effect))
            match effect:
                case OpenStream(stream, peer):
                    self._open(i, stream, self.index[peer])
                case StreamSend(stream, parts):
                    self._send(i, stream, b"".join(parts))
                case CloseStream(stream, abort):
                    self._close(i, stream, abort)
                case SendControl(dest, payload):
                    if i in self.mute:
                        continue
                    j, source = self.index[dest], self.ids[i]
                    self.at(
                        self.now + self.latency,
                        partial(
                            self.input, j, partial(self._control, source=source, payload=payload)
                        ),
                    )
                case Finalize(rid, digest):
                    self.at(self.now, partial(self._finalize, i, rid, digest))
                case HashFile(rid, path):
                    self.at(self.now, partial(self._hashed, i, rid, path))
                case BeginCopy(rid, manifest, dest):
                    self.at(self.now, partial(self._begin, i, rid, manifest, dest))
                case ReplicationUpdate(rid):
                    self.updates.setdefault(rid, []).append(effect)
                case ReplicationEvent():
                    pass
        deadline = self.engines[i].next_deadline()
        if deadline is not None and deadline != self._timers[i]:
            self._timers[i] = deadline
            self.at(max(deadline, self.now), partial(self._timer, i, deadline))

    def _control(self, e: Replicator, *, source: NodeId, payload: bytes) -> list[ReplicationEffect]:
        return e.control_received(source, payload, self.now)

    def _hashed(self, i: int, rid: int, path: str) -> None:
        f = self.paths.get(path)
        error = None if f else f"{path}: no such file"
        manifest = f.manifest if f else None
        self.input(i, lambda e: e.hashed(rid, manifest, error, self.now))

    def _begin(self, i: int, rid: int, manifest: Manifest, dest: str | None) -> None:
        try:
            held: set[int] | None = self.stores[i].begin(manifest, dest)
            error = None
        except (ReplicationError, UsageError) as exc:
            held, error = None, str(exc)
        self.input(i, lambda e: e.begun(rid, held, error, self.now))

    def _finalize(self, i: int, rid: int, digest: bytes) -> None:
        try:
            path: str | None = self.stores[i].finalize(digest)
            error = None
        except IntegrityError as exc:
            path, error = None, str(exc)
        self.input(i, lambda e: e.finalized(rid, path, error, self.now))

    def _timer(self, i: int, deadline: float) -> None:
        if self._timers[i] != deadline:
            return
        self._timers[i] = None
        self.input(i, lambda e: e.on_timer(self.now))

    def _open(self, i: int, stream: int, j: int) -> None:
        peer_stream = next(self._inbound[j])
        self._links[(i, stream)] = (j, peer_stream)
        self._links[(j, peer_stream)] = (i, stream)
        peer = self.ids[i]
        self.at(
            self.now + self.latency,
            partial(self.input, j, lambda e: e.stream_accepted(peer_stream, peer, self.now)),
        )

    def _send(self, i: int, stream: int, data: bytes) -> None:
        link = self._links.get((i, stream))
        if link is None:
            return
        j, peer_stream = link
        self.sent.append(Sent(self.now, i, j, data))
        if i in self.mute:
            return
        if self.tamper is not None:
            data = self.tamper(i, j, data)
        arrive = self.now + self.latency
        self.at(
            arrive, partial(self.input, j, lambda e: e.stream_data(peer_stream, data, self.now))
        )
        self.at(arrive, partial(self._drained, i, stream))

    def _drained(self, i: int, stream: int) -> None:
        if (i, stream) in self._links:
            self.input(i, lambda e: e.stream_drained(stream, self.now))

    def _close(self, i: int, stream: int, abort: bool) -> None:
        link = self._links.pop((i, stream), None)
        if link is None:
            return
        j, peer_stream = link
        self._links.pop((j, peer_stream), None)
        reason = "aborted" if abort else None

        def closed() -> None:
            self.input(j, lambda e: e.stream_closed(peer_stream, reason, self.now))
            self.input(i, lambda e: e.stream_closed(stream, None, self.now))

        self.at(self.now + self.latency, closed)
