"""Bulk replication in the simulator: `Replicator`s on a network of capped uplinks.

The model is the one the bound of issue 12 assumes: every node has an upload capacity (a
FIFO egress serialising its bytes at that rate) and optionally a download capacity (a FIFO
ingress), with a fixed one-way latency between any two nodes; the core of the network is
never the bottleneck. Streams are ordered and lossless (TCP's service); a stream is drained
when its bytes have left the sender's egress. Control messages arrive after the latency.
Each node's engine shapes its upload to the node's capacity, as a daemon configured with
its uplink rate does, so its write order is the order on the wire.

Failures: `crash(i, at)` stops node i as SIGKILL would (its streams break at once at their
other ends; what it had in flight is lost) and, `detect` seconds later, every live node
gets a view without it (the overlay's failure detector); `restart(i, at)` starts a fresh
engine on the same store (the chunks it had written and verified) and puts it back in the
view.

The files are synthetic (`SyntheticFile`): chunk i's bytes are a function of (seed, i),
hashed for real, so every chunk is verified as over real sockets while no node stores a
copy. One seed gives one run.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import blake3

from meshcast.errors import IntegrityError, ReplicationError
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
from meshcast.replicate.manifest import Manifest, chunk_digest

__all__ = ["ReplicationSim", "SimOutcome", "SyntheticFile", "SyntheticStore"]


class SyntheticFile:
    """A file whose chunk i is `seed-and-i` bytes repeated: distinct per chunk, cheap to
    make again, hashed for real."""

    def __init__(self, name: str, size: int, chunk_size: int, seed: int = 0) -> None:
        self.name = name
        self.size = size
        self.chunk_size = chunk_size
        self.seed = seed
        count = max(1, -(-size // chunk_size))
        whole = blake3.blake3()
        hashes = []
        for i in range(count):
            data = self.chunk(i)
            hashes.append(chunk_digest(data))
            whole.update(data)
        self.manifest = Manifest(name, size, chunk_size, tuple(hashes), whole.digest())

    def chunk(self, index: int) -> bytes:
        length = max(0, min(self.chunk_size, self.size - index * self.chunk_size))
        pattern = self.seed.to_bytes(8, "big") + index.to_bytes(8, "big")
        return (pattern * (length // 16 + 1))[:length]


class SyntheticStore:
    """A `ChunkStore` for one simulated node: it keeps which chunks it holds, not bytes
    (a held chunk reads back as the synthetic file's chunk, which is what was verified)."""

    def __init__(self, files: Mapping[bytes, SyntheticFile]) -> None:
        self._files = files
        self._held: dict[bytes, set[int]] = {}
        self.finalized: dict[bytes, str] = {}
        self.corrupt: set[bytes] = set()  # digests whose copy must fail the final check
        # with a clock: (time, bytes held) after every new chunk, for progress plots
        self.clock: Callable[[], float] | None = None
        self.progress: list[tuple[float, int]] = []
        self._held_bytes: dict[bytes, int] = {}

    def open_source(self, manifest: Manifest, path: str) -> None:
        self._held[manifest.digest] = set(range(manifest.chunk_count))

    def begin(self, manifest: Manifest, dest: str | None) -> set[int]:
        return set(self._held.setdefault(manifest.digest, set()))

    def read(self, digest: bytes, index: int) -> bytes:
        if index not in self._held.get(digest, ()):
            raise IntegrityError(f"chunk {index} is not held")
        return self._files[digest].chunk(index)

    def write(self, digest: bytes, index: int, data: bytes | memoryview) -> None:
        held = self._held.setdefault(digest, set())
        if self.clock is not None and index not in held:
            total = self._held_bytes.get(digest, 0) + len(data)
            self._held_bytes[digest] = total
            self.progress.append((self.clock(), total))
        held.add(index)

    def finalize(self, digest: bytes) -> str:
        f = self._files[digest]
        if digest in self.corrupt or len(self._held.get(digest, ())) != f.manifest.chunk_count:
            raise IntegrityError(f"{f.name}: the copy does not match its digest")
        path = f"sim:{f.name}"
        self.finalized[digest] = path
        return path

    def close(self, digest: bytes) -> None:
        pass

    def memory(self) -> int:
        return 0


@dataclass(slots=True)
class _Stream:
    a: int  # sender node index
    b: int  # receiver node index
    a_id: int  # the id at the sender
    b_id: int  # the id at the receiver
    queued: dict[int, int] = field(default_factory=dict)  # node -> sends in its egress
    closed: bool = False
    dead: bool = False  # broken by a crash: what was in flight is lost


@dataclass(frozen=True, slots=True)
class SimOutcome:
    """`completed[node]`: virtual time its copy was complete and verified."""

    report: ReplicationReport | None
    completed: Mapping[NodeId, float]
    started: float
    bytes_sent: Mapping[NodeId, int]
    events: int

    @property
    def last(self) -> float:
        return max(self.completed.values()) - self.started if self.completed else float("inf")


class ReplicationSim:
    """Nodes 0..n: node 0 is the origin. `uploads`/`downloads` in bits/s. With
    `record_progress`, each store's `progress` lists (time, bytes held) after every chunk."""

    def __init__(
        self,
        uploads: Sequence[float],
        *,
        downloads: Sequence[float | None] | None = None,
        latency: float = 0.0005,
        seed: int = 1,
        config: ReplicatorConfig | None = None,
        shape: bool = True,
        record_progress: bool = False,
        detect: float = 1.0,
    ) -> None:
        self.n = len(uploads)
        self.ids = [NodeId(i + 1) for i in range(self.n)]
        self._index = {node: i for i, node in enumerate(self.ids)}
        self.uploads = [u / 8 for u in uploads]  # bytes/s
        self.downloads = [None if d is None else d / 8 for d in (downloads or [None] * self.n)]
        self.latency = latency
        self.now = 0.0
        self.files: dict[bytes, SyntheticFile] = {}
        self.stores = [SyntheticStore(self.files) for _ in range(self.n)]
        if record_progress:
            for store in self.stores:
                store.clock = self._clock
        base = config or ReplicatorConfig()
        capacities = {node: uploads[i] for i, node in enumerate(self.ids)}
        self._configs = []
        for i in range(self.n):
            cfg = base
            if shape:
                cfg = ReplicatorConfig(
                    rate=self.uploads[i],
                    window_chunks=base.window_chunks,
                    progress_interval=base.progress_interval,
                    give_up_after=base.give_up_after,
                    max_transfers=base.max_transfers,
                    max_streams=base.max_streams,
                    burst_seconds=base.burst_seconds,
                )
            self._configs.append(cfg)
        self._capacities = capacities
        self._rng = random.Random(seed)
        self.engines = [self._engine(i) for i in range(self.n)]
        self.detect = detect
        self.alive = [True] * self.n
        self._epoch = [0] * self.n  # bumped by a crash: events of an earlier life are void
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._egress_free = [0.0] * self.n
        self._ingress_free = [0.0] * self.n
        self._streams: dict[tuple[int, int], _Stream] = {}  # (node, id at node) -> stream
        self._inbound_ids = [itertools.count(INBOUND_STREAM_BASE) for _ in range(self.n)]
        self._timers: list[float | None] = [None] * self.n
        self.completed: dict[NodeId, float] = {}
        self.reports: dict[int, ReplicationReport] = {}
        self.finished: set[int] = set()
        self.events = 0
        self.log: list[ReplicationEvent] = []
        self._paths: dict[str, SyntheticFile] = {}

    def _clock(self) -> float:
        return self.now

    def _engine(self, i: int) -> Replicator:
        return Replicator(
            self.ids[i],
            self.stores[i],
            self._configs[i],
            rng=random.Random(self._rng.getrandbits(64)),
            capacities=self._capacities,
        )

    # ------------------------------------------------------------ failures

    def crash(self, i: int, at: float) -> None:
        """Node i dies at `at` (as by SIGKILL); the others' view loses it `detect` later."""
        self._at(at, partial(self._crash, i))

    def restart(self, i: int, at: float) -> None:
        """Node i starts again at `at` with a fresh engine on its store (what it wrote)."""
        self._at(at, partial(self._restart, i))

    def _crash(self, i: int) -> None:
        if not self.alive[i]:
            return
        self.alive[i] = False
        self._epoch[i] += 1
        self._timers[i] = None
        for key, s in list(self._streams.items()):
            if key[0] != i:
                continue
            s.dead = s.closed = True
            j, other = (s.b, s.b_id) if s.a == i else (s.a, s.a_id)
            self._streams.pop(key, None)
            self._streams.pop((j, other), None)
            self._at(self.now + self.latency, partial(self._reset, j, other, self._epoch[j]))
        # the detector saw this crash: its view leaves the node out even if it restarted
        # in between (the restart's own view, later, brings it back)
        self._at(self.now + self.detect, partial(self._view, self._members()))

    def _reset(self, j: int, stream: int, epoch: int) -> None:
        self._input(j, lambda e: e.stream_closed(stream, "reset", self.now), epoch)

    def _restart(self, i: int) -> None:
        if self.alive[i]:
            return
        self.alive[i] = True
        self._epoch[i] += 1
        self.engines[i] = self._engine(i)
        self._at(self.now + self.detect, partial(self._view, self._members()))

    def _members(self) -> frozenset[NodeId]:
        return frozenset(node for node, up in zip(self.ids, self.alive, strict=True) if up)

    def _view(self, members: frozenset[NodeId]) -> None:
        for i in range(self.n):
            self._input(i, lambda e: e.view_changed(members, self.now))

    def holds_copy(self, i: int, digest: bytes) -> bool:
        """Did node i finalize a copy of `digest` (every chunk verified, the whole file
        checked)?"""
        return digest in self.stores[i].finalized

    # ------------------------------------------------------------ set-up

    def add_file(self, path: str, size: int, chunk_size: int, seed: int = 0) -> SyntheticFile:
        f = SyntheticFile(path, size, chunk_size, seed)
        self.files[f.manifest.digest] = f
        self._paths[path] = f
        return f

    def replicate(self, request: ReplicationRequest, origin: int = 0) -> int:
        rid, effects = self.engines[origin].request(request, self.now)
        self._apply(origin, effects)
        return rid

    # ------------------------------------------------------------ running

    def run(self, until: float = 1e9, max_events: int = 50_000_000) -> None:
        while self._heap and self.events < max_events:
            at, _, action = self._heap[0]
            if at > until:
                self.now = max(self.now, until)  # nothing due before: time passes
                break
            heapq.heappop(self._heap)
            self.now = max(self.now, at)
            self.events += 1
            action()

    def run_replication(
        self, request: ReplicationRequest, origin: int = 0, until: float = 1e9
    ) -> SimOutcome:
        started = self.now
        rid = self.replicate(request, origin)
        while rid not in self.finished and self._heap and self.now <= until:
            self.run(until=min(until, self.now + 10.0))
        return SimOutcome(
            self.reports.get(rid),
            dict(self.completed),
            started,
            {n: e.statistics().bytes_sent for n, e in zip(self.ids, self.engines, strict=True)},
            self.events,
        )

    def _at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), action))

    def _input(
        self,
        i: int,
        feed: Callable[[Replicator], list[ReplicationEffect]],
        epoch: int | None = None,
    ) -> None:
        """Feed node i (dropped while it is down, or if `epoch` is of an earlier life)."""
        if self.alive[i] and (epoch is None or epoch == self._epoch[i]):
            self._apply(i, feed(self.engines[i]))

    def _apply(self, i: int, effects: list[ReplicationEffect]) -> None:
        engine = self.engines[i]
        epoch = self._epoch[i]
        for effect in effects:
            match effect:
                case StreamSend(stream, parts):
                    self._send(i, stream, b"".join(parts))
                case OpenStream(stream, peer):
                    self._open(i, stream, self._index[peer])
                case CloseStream(stream, abort):
                    self._close(i, stream, abort)
                case SendControl(dest, payload):
                    j = self._index[dest]
                    self._at(
                        self.now + self.latency,
                        partial(self._control, j, self.ids[i], payload, self._epoch[j]),
                    )
                case Finalize(rid, digest):

                    def finish(
                        i: int = i, rid: int = rid, digest: bytes = digest, life: int = epoch
                    ) -> None:
                        if not self.alive[i] or life != self._epoch[i]:
                            return  # it died verifying: the copy stays partial
                        try:
                            path: str | None = self.stores[i].finalize(digest)
                            error = None
                        except IntegrityError as exc:
                            path, error = None, str(exc)
                        if path is not None:
                            self.completed[self.ids[i]] = self.now
                        self._input(i, lambda e: e.finalized(rid, path, error, self.now))

                    self._at(self.now, finish)
                case BeginCopy(rid, manifest, dest):
                    self._at(self.now, partial(self._begin, i, rid, manifest, dest, epoch))
                case HashFile(rid, path):
                    self._at(self.now, partial(self._hashed, i, rid, path, epoch))
                case ReplicationUpdate(rid, report, final):
                    self.reports[rid] = report
                    if final:
                        self.finished.add(rid)
                case ReplicationEvent():
                    self.log.append(effect)
                case _:
                    raise AssertionError(f"unknown replication effect {effect!r}")
        deadline = engine.next_deadline()
        if deadline is not None and deadline != self._timers[i]:
            self._timers[i] = deadline
            self._at(max(deadline, self.now), partial(self._timer, i, deadline))

    def _control(self, j: int, source: NodeId, payload: bytes, epoch: int) -> None:
        self._input(j, lambda e: e.control_received(source, payload, self.now), epoch)

    def _begin(self, i: int, rid: int, manifest: Manifest, dest: str | None, epoch: int) -> None:
        if not self.alive[i] or epoch != self._epoch[i]:
            return
        try:
            held: set[int] | None = self.stores[i].begin(manifest, dest)
            error = None
        except ReplicationError as exc:
            held, error = None, str(exc)
        self._input(i, lambda e: e.begun(rid, held, error, self.now))

    def _hashed(self, i: int, rid: int, path: str, epoch: int) -> None:
        f = self._paths.get(path)
        manifest = f.manifest if f else None
        error = None if f else f"{path}: no such file"
        self._input(i, lambda e: e.hashed(rid, manifest, error, self.now), epoch)

    def _timer(self, i: int, deadline: float) -> None:
        if self._timers[i] != deadline:
            return  # re-armed since
        self._timers[i] = None
        self._input(i, lambda e: e.on_timer(self.now))

    # ------------------------------------------------------------ streams

    def _open(self, i: int, stream: int, j: int) -> None:
        if not self.alive[j]:  # connection refused
            refused = partial(
                self._input, i, lambda e: e.stream_closed(stream, "refused", self.now)
            )
            self._at(self.now + 2 * self.latency, partial(refused, self._epoch[i]))
            return
        b_id = next(self._inbound_ids[j])
        s = _Stream(i, j, stream, b_id)
        self._streams[(i, stream)] = s
        self._streams[(j, b_id)] = s
        peer = self.ids[i]
        life = self._epoch[j]
        self._at(
            self.now + self.latency,
            lambda: (
                self._input(j, lambda e: e.stream_accepted(b_id, peer, self.now), life)
                if not s.dead
                else None
            ),
        )

    def _ends(self, i: int, stream: int) -> tuple[_Stream, int, int, int] | None:
        s = self._streams.get((i, stream))
        if s is None:
            return None
        if i == s.a and stream == s.a_id:
            return s, s.b, s.b_id, s.a_id
        return s, s.a, s.a_id, s.b_id

    def _send(self, i: int, stream: int, data: bytes) -> None:
        ends = self._ends(i, stream)
        if ends is None or ends[0].closed:
            return
        s, j, peer_id, own_id = ends
        start = max(self.now, self._egress_free[i])
        done = start + len(data) / self.uploads[i]
        self._egress_free[i] = done
        s.queued[i] = s.queued.get(i, 0) + 1

        def left() -> None:
            s.queued[i] -= 1
            if not s.dead and not s.queued[i] and (i, own_id) in self._streams:
                self._input(i, lambda e: e.stream_drained(own_id, self.now))

        self._at(done, left)
        arrive = done + self.latency
        down = self.downloads[j]
        if down is not None:
            arrive = max(arrive, self._ingress_free[j]) + len(data) / down
            self._ingress_free[j] = arrive
        self._at(
            arrive,
            lambda: (
                None if s.dead else self._input(j, lambda e: e.stream_data(peer_id, data, self.now))
            ),
        )

    def _close(self, i: int, stream: int, abort: bool) -> None:
        ends = self._ends(i, stream)
        if ends is None:
            return
        s, j, peer_id, own_id = ends
        if s.closed:
            return
        s.closed = True
        # after the last byte queued (a close follows the data on a stream)
        when = self.now if abort else max(self.now, self._egress_free[i]) + self.latency
        if self.downloads[j] is not None and not abort:
            when = max(when, self._ingress_free[j])

        def closed() -> None:
            if s.dead:
                return
            self._streams.pop((i, own_id), None)
            self._streams.pop((j, peer_id), None)
            self._input(
                j, lambda e: e.stream_closed(peer_id, "aborted" if abort else None, self.now)
            )
            self._input(i, lambda e: e.stream_closed(own_id, None, self.now))

        self._at(when + (self.latency if abort else 0.0), closed)
