"""Secure bulk streams over real TCP: the asyncio driver of `meshcast.link.stream`.

Client side::

    stream = await open_secure_stream(host, port, local, peer, ring, timeout=10)
    async with stream:                      # leaves with an authenticated CLOSE
        await stream.send(data)             # waits while the kernel and our buffer are full
        reply = await stream.receive()      # bytes, or None once the peer closed cleanly

Server side::

    async with serve_secure_streams(host, 0, local, ring, {1, 2}, on_stream) as server:
        ...                                  # on_stream(stream) runs per authenticated stream

A connection must finish its handshake within `handshake_timeout`; at most `max_pending`
connections may be in their handshake at once, and a new one beyond that closes the oldest
(an attacker must then open `max_pending` connections within one round trip of a real
handshake to keep it out, rather than one connection a few seconds). Failures are
`StreamFailed` with a `cause` (`StreamTruncated` when the connection ended without the
peer's CLOSE); the server counts them by cause and keeps serving. docs/security.md,
"Bulk streams", has the record format and the bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import cast

from meshcast.errors import StreamFailed, StreamTruncated, UsageError
from meshcast.ids import NodeId
from meshcast.link.stream import (
    Closed,
    Established,
    Failed,
    FailureCause,
    Received,
    SecureStream,
    StreamEffect,
    StreamStats,
    Write,
)
from meshcast.runtime.logs import NodeLogAdapter, RateLimiter
from meshcast.wire.keys import KeyRing
from meshcast.wire.secure import RandomBytes
from meshcast.wire.stream import MAX_RECORD_PAYLOAD

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_MAX_PENDING",
    "SecureStreamConnection",
    "StreamServer",
    "StreamServerStats",
    "open_secure_stream",
    "serve_secure_streams",
]

DEFAULT_HANDSHAKE_TIMEOUT = 5.0  # s: connect + handshake, both sides
DEFAULT_MAX_PENDING = 64  # connections in their handshake at once, per server
DEFAULT_WRITE_BUFFER_BYTES = 1024 * 1024  # bytes queued in user space before `send` waits
DEFAULT_INBOX_BYTES = 1024 * 1024  # received bytes waiting for `receive` before reading pauses
_READ_BUFFER_BYTES = 256 * 1024  # one buffer per stream, reused by every read (no allocation)
_HANDSHAKE_READ_BYTES = 1024  # the read buffer of a connection before it authenticated
_CLOSE_TIMEOUT = 5.0  # s: flushing the CLOSE record and closing the socket

OnStream = Callable[["SecureStreamConnection"], Awaitable[None]]


def _error(failure: Failed) -> StreamFailed:
    if failure.cause is FailureCause.TRUNCATED:
        return StreamTruncated(failure.reason)
    return StreamFailed(f"{failure.cause}: {failure.reason}", str(failure.cause))


class SecureStreamConnection(asyncio.BufferedProtocol):
    """One secure stream on one TCP connection. `send` and `receive` may run in two tasks
    at once, but each in one task at a time.

    The asyncio protocol callbacks only pump bytes through the `SecureStream` core: the
    kernel reads into one reused buffer, the core decrypts from it, and reading pauses
    while `inbox_bytes` of received data wait for `receive`."""

    def __init__(
        self,
        core: SecureStream,
        *,
        write_buffer_bytes: int = DEFAULT_WRITE_BUFFER_BYTES,
        inbox_bytes: int = DEFAULT_INBOX_BYTES,
        on_connected: Callable[[SecureStreamConnection], None] | None = None,
    ) -> None:
        self._core = core
        self._write_buffer_bytes = write_buffer_bytes
        self._inbox_limit = inbox_bytes
        self._on_connected = on_connected
        self._transport: asyncio.Transport | None = None
        # Small until the peer authenticated: an idle or hostile connection costs ~1 KiB.
        self._read_buffer = memoryview(bytearray(_HANDSHAKE_READ_BYTES))
        self._inbox: deque[bytes] = deque()
        self._inbox_size = 0
        self._reading_paused = False
        self._changed = asyncio.Event()  # data, end, failure or established: receivers look
        self._writable = asyncio.Event()  # the transport's buffer is below its high mark
        self._writable.set()
        self._lost = asyncio.Event()  # connection_lost ran
        self._peer_closed = False
        self._failure: Failed | None = None
        self._closed = False
        self._eof_sent = False
        self._key_fingerprint = ""
        self._sending = False
        self._receiving = False

    @property
    def peer(self) -> NodeId:
        peer = self._core.peer
        assert peer is not None, "an established stream knows its peer"
        return peer

    @property
    def key_fingerprint(self) -> str:
        """Fingerprint of the cluster key the handshake used (safe to log)."""
        return self._key_fingerprint

    @property
    def peer_address(self) -> object:
        return self._transport.get_extra_info("peername") if self._transport else None

    def statistics(self) -> StreamStats:
        return self._core.statistics()

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send `data` (any size) in records; waits while the write buffer is full.

        Raises `StreamFailed` (or `StreamTruncated`) if the stream failed, `UsageError`
        after `send_eof`/`aclose` or while another `send` is running."""
        if self._sending:
            raise UsageError("another send is in progress on this stream")
        self._sending = True
        try:
            view = memoryview(data).cast("B")
            for start in range(0, len(view), MAX_RECORD_PAYLOAD):
                await self._wait_writable()
                if self._eof_sent:
                    raise UsageError("send after send_eof or aclose")
                self._apply(self._core.send(view[start : start + MAX_RECORD_PAYLOAD]))
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        """End our data with the authenticated CLOSE but keep receiving (half close)."""
        if self._sending:
            raise UsageError("send_eof while a send is in progress")
        await self._wait_writable()
        self._eof_sent = True
        self._apply(self._core.close())
        await self._wait_writable()

    async def receive(self) -> bytes | None:
        """The next bytes from the peer (record-sized pieces, never empty), or None once
        the peer's authenticated CLOSE arrived. Raises `StreamTruncated` if the connection
        ended without it, `StreamFailed` if the peer broke the protocol or a record was
        forged, replayed, reordered or lost."""
        return await self._receive(1)

    async def receive_all(self) -> bytes | None:
        """Like `receive`, but every byte received so far in one piece (one wake-up and
        one hand-over for what several records brought: less work per byte)."""
        return await self._receive(self._inbox_limit)

    async def _receive(self, limit: int) -> bytes | None:
        if self._receiving:
            raise UsageError("another receive is in progress on this stream")
        self._receiving = True
        try:
            while True:
                if self._inbox:
                    data = self._inbox.popleft()
                    if self._inbox and len(data) < limit:
                        pieces = [data]
                        size = len(data)
                        while self._inbox and size < limit:
                            piece = self._inbox.popleft()
                            pieces.append(piece)
                            size += len(piece)
                        data = b"".join(pieces)
                    self._inbox_size -= len(data)
                    if self._reading_paused and self._inbox_size < self._inbox_limit // 2:
                        self._reading_paused = False
                        assert self._transport is not None
                        self._transport.resume_reading()
                    return data
                if self._peer_closed:
                    return None
                self._raise_if_failed()
                if self._closed:
                    raise UsageError("receive after aclose")
                self._changed.clear()
                await self._changed.wait()
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        """End our data with an authenticated CLOSE (unless `send_eof` did) and close the
        connection. Unread data from the peer is discarded: for a two-way exchange, read
        `receive` to None first."""
        if self._closed:
            return
        self._eof_sent = True
        self._apply(self._core.close())
        self._closed = True
        if self._transport is None:
            return
        self._transport.close()  # flushes what is buffered (the CLOSE record), then closes
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self._lost.wait()
        except TimeoutError:
            self.abort()

    def abort(self) -> None:
        """Close the connection at once, without CLOSE: the peer sees a truncated stream."""
        self._closed = True
        if self._transport is not None:
            self._transport.abort()

    async def __aenter__(self) -> SecureStreamConnection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.aclose()
        else:
            self.abort()  # our data did not end as planned: do not let it look complete

    # -- asyncio protocol callbacks: pump only ---------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's is not an asyncio.Transport subclass)
        transport = cast("asyncio.Transport", transport)
        self._transport = transport
        transport.set_write_buffer_limits(high=self._write_buffer_bytes)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # CONFIRM and CLOSE are tiny records: never let Nagle hold them back.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._on_connected is not None:
            self._on_connected(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._apply(self._core.data_received(self._read_buffer[:nbytes]))
        if self._inbox_size >= self._inbox_limit and not self._reading_paused:
            self._reading_paused = True
            assert self._transport is not None
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        self._apply(self._core.eof_received())
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._apply(self._core.eof_received())  # nothing if CLOSE came or it failed
        self._lost.set()
        self._writable.set()
        self._changed.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- internals -------------------------------------------------------------------

    async def _handshake(self) -> None:
        """Run the handshake to `Established` (the caller bounds the time)."""
        self._apply(self._core.start())
        while not self._core.established:
            self._raise_if_failed()
            self._changed.clear()
            await self._changed.wait()

    async def _wait_writable(self) -> None:
        await self._writable.wait()
        self._raise_if_failed()
        if self._lost.is_set():
            # The connection ended under us (the peer's CLOSE may have come first).
            self._apply(self._core.abort(FailureCause.TRUNCATED, "connection lost while sending"))
            self._raise_if_failed()
            raise StreamTruncated("connection lost while sending")

    def _apply(self, effects: list[StreamEffect]) -> None:
        for effect in effects:
            match effect:
                case Write(data):
                    assert self._transport is not None
                    self._transport.write(data)
                case Received(data):
                    self._inbox.append(data)
                    self._inbox_size += len(data)
                case Established(_, fingerprint):
                    self._key_fingerprint = fingerprint
                    self._read_buffer = memoryview(bytearray(_READ_BUFFER_BYTES))
                case Closed():
                    self._peer_closed = True
                case Failed():
                    self._failure = effect
                    if self._transport is not None:
                        self._transport.abort()
        if effects:
            self._changed.set()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise _error(self._failure)


async def open_secure_stream(
    host: str,
    port: int,
    local: NodeId,
    peer: NodeId,
    ring: KeyRing,
    *,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,  # noqa: ASYNC109 - the connect+handshake bound is the API
    random_bytes: RandomBytes = os.urandom,
) -> SecureStreamConnection:
    """Connect to daemon `peer` at host:port and authenticate both ways within `timeout` s.

    Raises `StreamFailed` with cause "unreachable" (no connection), "timeout", or what the
    handshake found; `StreamTruncated` if the peer closed during the handshake (a server
    refuses a wrong key or an unknown daemon by closing: it tells a stranger nothing)."""
    core = SecureStream.initiator(local, peer, ring, random_bytes)
    stream: SecureStreamConnection | None = None
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            try:
                _, stream = await loop.create_connection(
                    lambda: SecureStreamConnection(core), host, port
                )
            except OSError as exc:
                raise StreamFailed(
                    f"cannot connect to daemon {peer} at {host}:{port}: {exc}", "unreachable"
                ) from exc
            await stream._handshake()
    except TimeoutError:
        if stream is not None:
            stream.abort()
        raise StreamFailed(
            f"no secure stream to daemon {peer} at {host}:{port} within {timeout} s", "timeout"
        ) from None
    except StreamTruncated:
        assert stream is not None
        stream.abort()
        raise StreamTruncated(
            f"daemon {peer} at {host}:{port} closed the connection during the handshake "
            "(a different cluster key, or it does not accept us)"
        ) from None
    except BaseException:
        if stream is not None:
            stream.abort()
        raise
    return stream


@dataclass(frozen=True, slots=True)
class StreamServerStats:
    """Counters of a stream server (a frozen snapshot)."""

    accepted: int  # TCP connections accepted
    established: int  # streams that authenticated and were handed to on_stream
    pending: int  # connections in their handshake now (at most max_pending)
    evicted: int  # pending handshakes closed to make room for a newer connection
    timed_out: int  # handshakes not finished within handshake_timeout
    # refused handshakes and failed streams, by cause (FailureCause values)
    failed: dict[str, int] = field(default_factory=dict)
    handler_errors: int = 0  # exceptions raised by on_stream (contained, logged)
    internal_errors: int = 0  # bugs contained by the per-connection bulkhead (logged)


@dataclass(slots=True)
class _Pending:
    stream: SecureStreamConnection
    evicted: bool = False


class StreamServer:
    """A listening socket handing authenticated streams to `on_stream` (see module doc)."""

    def __init__(
        self,
        local: NodeId,
        ring: KeyRing,
        allowed_peers: Collection[int] | Callable[[NodeId], bool],
        on_stream: OnStream,
        tasks: asyncio.TaskGroup,
        *,
        max_pending: int,
        handshake_timeout: float,
        random_bytes: RandomBytes,
    ) -> None:
        if max_pending < 1 or handshake_timeout <= 0:
            raise UsageError("max_pending must be >= 1 and handshake_timeout > 0")
        self._local = local
        self._ring = ring
        self._accept: Callable[[NodeId], bool] = (
            allowed_peers if callable(allowed_peers) else frozenset(allowed_peers).__contains__
        )
        self._on_stream = on_stream
        self._tasks = tasks
        self._max_pending = max_pending
        self._handshake_timeout = handshake_timeout
        self._random = random_bytes
        self._pending: dict[int, _Pending] = {}  # insertion order = age: the oldest first
        self._streams: set[SecureStreamConnection] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._next_id = 0
        self._accepted = 0
        self._established = 0
        self._evicted = 0
        self._timed_out = 0
        self._failed: Counter[str] = Counter()
        self._handler_errors = 0
        self._internal_errors = 0
        self._log = NodeLogAdapter(log, local)
        self._limiter = RateLimiter()
        self.address: tuple[str, int] = ("", 0)

    def set_ring(self, ring: KeyRing) -> None:
        """Use `ring` for the handshakes of new connections (key rotation, SIGHUP)."""
        self._ring = ring

    def statistics(self) -> StreamServerStats:
        return StreamServerStats(
            accepted=self._accepted,
            established=self._established,
            pending=len(self._pending),
            evicted=self._evicted,
            timed_out=self._timed_out,
            failed=dict(self._failed),
            handler_errors=self._handler_errors,
            internal_errors=self._internal_errors,
        )

    def _new_connection(self) -> SecureStreamConnection:
        core = SecureStream.responder(self._local, self._ring, self._accept, self._random)
        return SecureStreamConnection(core, on_connected=self._connected)

    def _connected(self, stream: SecureStreamConnection) -> None:
        self._accepted += 1
        if len(self._pending) >= self._max_pending:
            oldest = next(iter(self._pending))
            victim = self._pending.pop(oldest)
            victim.evicted = True
            victim.stream.abort()
            self._evicted += 1
        self._next_id += 1
        ticket = _Pending(stream)
        self._pending[self._next_id] = ticket
        task = self._tasks.create_task(self._serve(self._next_id, ticket))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _serve(self, conn_id: int, ticket: _Pending) -> None:
        stream = ticket.stream
        self._streams.add(stream)
        try:
            await self._handshake_then_handle(conn_id, ticket)
        except Exception:  # a bug: contained, so one connection never stops the server
            self._internal_errors += 1
            self._log.exception("secure stream connection failed unexpectedly")
        finally:
            stream.abort()  # no-op after aclose; otherwise the peer sees truncation
            self._streams.discard(stream)

    async def _handshake_then_handle(self, conn_id: int, ticket: _Pending) -> None:
        stream = ticket.stream
        try:
            async with asyncio.timeout(self._handshake_timeout):
                await stream._handshake()
        except TimeoutError:
            self._timed_out += 1
            return
        except StreamFailed as exc:
            if not ticket.evicted:
                self._count_failure(exc, stream)
            return
        finally:
            self._pending.pop(conn_id, None)
        self._established += 1
        self._log.debug("stream from daemon %s (key %s)", stream.peer, stream.key_fingerprint)
        try:
            await self._on_stream(stream)
        except StreamFailed as exc:
            self._count_failure(exc, stream)
        except Exception:
            self._handler_errors += 1
            self._log.exception("stream handler failed (stream from %s aborted)", stream.peer)
        else:
            await stream.aclose()

    def _count_failure(self, exc: StreamFailed, stream: SecureStreamConnection) -> None:
        self._failed[exc.cause] += 1
        if self._limiter.allows(self._failed[exc.cause]):
            self._log.info(
                "stream from %s refused or failed (%s; %d so far): %s",
                stream.peer_address,
                exc.cause,
                self._failed[exc.cause],
                exc,
            )

    def _abort_all(self) -> None:
        for stream in list(self._streams):
            stream.abort()
        for task in list(self._handlers):
            task.cancel()


@asynccontextmanager
async def serve_secure_streams(
    host: str,
    port: int,
    local: NodeId,
    ring: KeyRing,
    allowed_peers: Collection[int] | Callable[[NodeId], bool],
    on_stream: OnStream,
    *,
    max_pending: int = DEFAULT_MAX_PENDING,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    random_bytes: RandomBytes = os.urandom,
) -> AsyncIterator[StreamServer]:
    """Listen on host:port (0: any free port, see `.address`) for streams from daemons in
    `allowed_peers`; run `on_stream(stream)` for each authenticated one, then close it
    with CLOSE (or abort it if `on_stream` raised). Leaving the block closes everything."""
    async with asyncio.TaskGroup() as tasks:
        server = StreamServer(
            local,
            ring,
            allowed_peers,
            on_stream,
            tasks,
            max_pending=max_pending,
            handshake_timeout=handshake_timeout,
            random_bytes=random_bytes,
        )
        loop = asyncio.get_running_loop()
        listener = await loop.create_server(server._new_connection, host, port)
        sockname = listener.sockets[0].getsockname()
        server.address = (sockname[0], sockname[1])
        try:
            yield server
        finally:
            listener.close()
            server._abort_all()
            with contextlib.suppress(OSError):
                await listener.wait_closed()
