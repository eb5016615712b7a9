"""The daemon's replication work on real sockets and files: the driver half of
`meshcast.replicate.engine` (the node's `OpenStream`, `StreamSend`, `CloseStream`,
`HashFile` and `Finalize` effects).

* Streams are secure streams (`meshcast.runtime.secure_stream`): TCP to the peer daemon's
  configured host on the same port number as its UDP socket, authenticated with the
  cluster key, encrypted with per-stream keys. The daemon listens on its own host:port
  for the streams of the other daemons of the cluster (nobody else gets past the
  handshake).
* Each stream has a writer task (its sends in order; once its queue is empty the node is
  told the stream is drained) and a reader task feeding what arrives to the node.
* Hashing a file, opening a copy (a resume re-hashes it) and finalizing one read whole files: they run in worker threads, one
  at a time per daemon, so the loop never blocks on them.

Every failure becomes `stream_closed(stream, reason)` for the node: nothing here decides
what a failed transfer means.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from meshcast.daemon import DaemonEffect, DaemonNode
from meshcast.errors import ReplicationError, StreamFailed, UsageError
from meshcast.ids import NodeId
from meshcast.replicate.engine import (
    INBOUND_STREAM_BASE,
    BeginCopy,
    CloseStream,
    Finalize,
    HashFile,
    OpenStream,
    StreamSend,
)
from meshcast.replicate.manifest import Manifest
from meshcast.runtime.blob_store import DiskStore, hash_file
from meshcast.runtime.secure_stream import (
    SecureStreamConnection,
    StreamServer,
    open_secure_stream,
    serve_secure_streams,
)
from meshcast.wire.keys import KeyRing

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # s: TCP connect plus handshake of a replication stream

Effects = list[DaemonEffect]
# what the pump gives us: run one input of the node (name, input) and apply its effects
Feed = Callable[[str, Callable[[float], Effects]], None]
R = TypeVar("R")


@dataclass(slots=True)
class _Stream:
    id: int
    peer: NodeId
    conn: SecureStreamConnection | None = None
    queue: deque[bytes] = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    closing: bool = False
    abort: bool = False
    sent_since_drained: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    reported: bool = False  # the node was told it closed


class ReplicationIO:
    """Streams and file work of one daemon's replication engine (module docstring)."""

    def __init__(
        self,
        node: DaemonNode,
        store: DiskStore,
        addresses: Mapping[NodeId, tuple[str, int]],
        ring: Callable[[], KeyRing | None],
        feed: Feed,
    ) -> None:
        self.node = node
        self.local = node.local
        self.store = store
        self._addresses = dict(addresses)
        self._ring = ring
        self._feed = feed
        self._streams: dict[int, _Stream] = {}
        self._next_inbound = INBOUND_STREAM_BASE
        self._exits = AsyncExitStack()
        self._server: StreamServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        # file work: one thread (a daemon hashes or finalizes one file at a time)
        self._files = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshcast-files")
        self.stream_failures = 0

    # ------------------------------------------------------------ life cycle

    async def start(self, host: str, port: int) -> None:
        """Listen for the other daemons' streams on host:port (TCP)."""
        ring = self._ring()
        if ring is None:
            raise UsageError("replication streams need the cluster key")
        self._server = await self._exits.enter_async_context(
            serve_secure_streams(
                host, port, self.local, ring, set(self._addresses) - {self.local}, self._serve
            )
        )

    def set_ring(self, ring: KeyRing) -> None:
        if self._server is not None:
            self._server.set_ring(ring)

    async def aclose(self) -> None:
        self._closed = True
        for s in list(self._streams.values()):
            for task in s.tasks:
                task.cancel()
            if s.conn is not None:
                s.conn.abort()
        for task in list(self._tasks):
            task.cancel()
        await self._exits.aclose()
        self._files.shutdown(wait=False, cancel_futures=True)
        self.store.close_all()

    def status(self) -> dict[str, object]:
        server = self._server.statistics() if self._server is not None else None
        return {
            "streams_open": len(self._streams),
            "stream_failures": self.stream_failures,
            "address": None if self._server is None else "{}:{}".format(*self._server.address),
            "server": None
            if server is None
            else {
                "accepted": server.accepted,
                "established": server.established,
                "timed_out": server.timed_out,
                "failed": dict(server.failed),
            },
        }

    # ------------------------------------------------------------ the node's effects

    def apply(self, effect: object) -> bool:
        """Carry out `effect` if it is replication work; False if it is not."""
        if isinstance(effect, StreamSend):
            s = self._streams.get(effect.stream)
            if s is not None and not s.closing:
                data = effect.parts[0] if len(effect.parts) == 1 else b"".join(effect.parts)
                s.queue.append(bytes(data) if not isinstance(data, bytes) else data)
                s.wakeup.set()
        elif isinstance(effect, OpenStream):
            self._open(effect.stream, effect.peer)
        elif isinstance(effect, CloseStream):
            s = self._streams.get(effect.stream)
            if s is not None:
                s.closing = True
                s.abort = s.abort or effect.abort
                s.wakeup.set()
        elif isinstance(effect, HashFile):
            rid, path = effect.rid, effect.path

            def hashed(now: float, manifest: Manifest | None, error: str | None) -> Effects:
                return self.node.replication_hashed(rid, manifest, error, now)

            self._in_thread("replication_hashed", lambda: hash_file(path), hashed)
        elif isinstance(effect, BeginCopy):
            rid, manifest, dest = effect.rid, effect.manifest, effect.dest

            def begun(now: float, held: set[int] | None, error: str | None) -> Effects:
                return self.node.replication_begun(rid, held, error, now)

            self._in_thread("replication_begun", lambda: self.store.begin(manifest, dest), begun)
        elif isinstance(effect, Finalize):
            rid, digest = effect.rid, effect.digest

            def finalized(now: float, final: str | None, error: str | None) -> Effects:
                return self.node.replication_finalized(rid, final, error, now)

            self._in_thread("replication_finalized", lambda: self.store.finalize(digest), finalized)
        else:
            return False
        return True

    # ------------------------------------------------------------ streams

    def _open(self, stream: int, peer: NodeId) -> None:
        s = _Stream(stream, peer)
        self._streams[stream] = s
        s.tasks.append(asyncio.create_task(self._run_outbound(s)))

    async def _run_outbound(self, s: _Stream) -> None:
        error: str | None = None
        try:
            address = self._addresses.get(s.peer)
            ring = self._ring()
            if address is None or ring is None:
                raise StreamFailed(f"no address or key for daemon {s.peer}", "unreachable")
            s.conn = await open_secure_stream(
                address[0], address[1], self.local, s.peer, ring, timeout=CONNECT_TIMEOUT
            )
            reader = asyncio.create_task(self._read(s))
            s.tasks.append(reader)
            await self._write(s)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        except StreamFailed as exc:
            error = str(exc)
        except asyncio.CancelledError:
            error = "stopped"
            raise
        finally:
            self._finish(s, error)

    async def _serve(self, conn: SecureStreamConnection) -> None:
        """An authenticated stream from another daemon (the server's handler)."""
        if self._closed:
            return
        stream = self._next_inbound
        self._next_inbound += 1
        s = _Stream(stream, conn.peer, conn)
        self._streams[stream] = s
        peer = conn.peer
        self._feed(
            "replication_stream_accepted",
            lambda now: self.node.replication_stream_accepted(stream, peer, now),
        )
        writer = asyncio.create_task(self._write(s))
        s.tasks.append(writer)
        error: str | None = None
        try:
            await self._read(s)
        except StreamFailed as exc:
            error = str(exc)
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
            self._finish(s, error)

    async def _read(self, s: _Stream) -> None:
        conn = s.conn
        assert conn is not None
        stream = s.id
        while True:
            data = await conn.receive_all()
            if data is None:
                return
            self._feed("replication_stream_data", partial(self._data, stream, data))

    def _data(self, stream: int, data: bytes, now: float) -> Effects:
        return self.node.replication_stream_data(stream, data, now)

    async def _write(self, s: _Stream) -> None:
        conn = s.conn
        assert conn is not None
        stream = s.id
        while True:
            while s.queue:
                await conn.send(s.queue.popleft())
                s.sent_since_drained = True
            if s.closing:
                break
            if s.sent_since_drained:
                s.sent_since_drained = False
                self._feed(
                    "replication_stream_drained",
                    lambda now: self.node.replication_stream_drained(stream, now),
                )
                continue  # the node may have queued more
            s.wakeup.clear()
            await s.wakeup.wait()
        if s.abort:
            conn.abort()
        else:
            await conn.aclose()

    def _finish(self, s: _Stream, error: str | None) -> None:
        if s.reported:
            return
        s.reported = True
        self._streams.pop(s.id, None)
        if s.conn is not None and error is not None:
            s.conn.abort()
        if error is not None:
            self.stream_failures += 1
        if self._closed:
            return
        stream = s.id
        self._feed(
            "replication_stream_closed",
            lambda now: self.node.replication_stream_closed(stream, error, now),
        )

    # ------------------------------------------------------------ file work

    def _in_thread(
        self,
        name: str,
        work: Callable[[], R],
        done: Callable[[float, R | None, str | None], Effects],
    ) -> None:
        loop = asyncio.get_running_loop()

        async def run() -> None:
            result: R | None = None
            error: str | None = None
            try:
                result = await loop.run_in_executor(self._files, work)
            except (ReplicationError, OSError) as exc:
                error = str(exc)
            if not self._closed:
                self._feed(name, lambda now: done(now, result, error))

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
