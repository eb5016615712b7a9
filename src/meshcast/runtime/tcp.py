"""A real TCP link (kernel TCP over asyncio streams), with the UDP driver's application API.

This is the comparison the Spread paper makes (Amir et al., section on Hop vs TCP): the
same messages between the same neighbours, but over one TCP connection per neighbour, so
a lost segment holds back everything behind it. `meshcast.sim.tcp` models that
behaviour sans-I/O for the simulator; this module is the real thing on real sockets.

Wire use, per connection::

    frame := length u32 (network order) | payload            (length <= max_frame_bytes)
    first frame each way: b"MCT1" | node id u32                (hello)

The node with the smaller id connects; the other accepts, and admits a connection only
when its hello names a configured peer whose host matches the connection's source.
Anything else is closed and counted (`foreign_dropped`; bad framing: `malformed_dropped`).
TCP_NODELAY is set, as on a Hop link every message leaves at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

from meshcast.errors import BufferFull, DecodeError, MessageTooLarge, UsageError
from meshcast.ids import NodeId
from meshcast.link.events import LinkEffect, LinkEstablished, LinkFailed, LinkStats
from meshcast.runtime.inbox import Inbox, hand_up
from meshcast.runtime.logs import NodeLogAdapter, RateLimiter
from meshcast.runtime.stats import DriverStats
from meshcast.runtime.udp import (
    DEFAULT_INBOX_MESSAGES,
    DEFAULT_SEND_TIMEOUT,
    Address,
    DeliveryCallback,
    EventCallback,
    normalise_address,
)
from meshcast.wire.packet import U32_MAX

log = logging.getLogger(__name__)

FRAME_HEAD = struct.Struct("!I")
HELLO = struct.Struct("!4sI")
HELLO_MAGIC = b"MCT1"
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
DEFAULT_WRITE_BUFFER_BYTES = 1024 * 1024  # bytes buffered in user space before `send` waits
_READ_CHUNK = 256 * 1024
_CONNECT_RETRY_INTERVAL = 0.05  # s: first retry; doubles up to _CONNECT_RETRY_MAX
_CONNECT_RETRY_MAX = 1.0
_HELLO_TIMEOUT = 5.0  # s: an accepted connection must introduce itself within this


class FrameDecoder:
    """Splits a byte stream into length-prefixed frames. Sans-I/O; raises only `DecodeError`."""

    __slots__ = ("_buffer", "_max_frame")

    def __init__(self, max_frame_bytes: int) -> None:
        self._max_frame = max_frame_bytes
        self._buffer = bytearray()

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer
        buffer += data
        frames: list[bytes] = []
        pos = 0
        end = len(buffer)
        head = FRAME_HEAD.size
        while end - pos >= head:
            (length,) = FRAME_HEAD.unpack_from(buffer, pos)
            if length > self._max_frame:
                raise DecodeError(f"frame of {length} bytes exceeds {self._max_frame}")
            if end - pos - head < length:
                break
            frames.append(bytes(buffer[pos + head : pos + head + length]))
            pos += head + length
        if pos:
            del buffer[:pos]
        return frames


def encode_frame(payload: bytes) -> bytes:
    return FRAME_HEAD.pack(len(payload)) + payload


@dataclass(slots=True)
class _Peer:
    address: Address
    writer: asyncio.StreamWriter | None = None
    established: asyncio.Event | None = None
    failed: str | None = None
    messages_sent: int = 0
    messages_delivered: int = 0
    bytes_delivered: int = 0


class TcpLinkDriver:
    """One TCP connection per peer; `send`, deliveries and `statistics` as `UdpLinkDriver`.

    Use as ``async with TcpLinkDriver.open(local, listen=...) as driver:``. The driver owns
    a TaskGroup for its connection tasks; leaving the block closes every connection.
    """

    def __init__(
        self,
        local: NodeId,
        tasks: asyncio.TaskGroup,
        *,
        on_delivered: DeliveryCallback | None,
        on_event: EventCallback | None,
        inbox_messages: int,
        max_frame_bytes: int,
        write_buffer_bytes: int,
    ) -> None:
        """Use `open`."""
        self._local = local
        self._tasks = tasks
        self._log = NodeLogAdapter(log, local)
        self._on_delivered = on_delivered
        self._on_event = on_event
        self._inbox = Inbox(inbox_messages) if on_delivered is None else None
        self._max_frame = max_frame_bytes
        self._write_buffer = write_buffer_bytes
        self._peers: dict[NodeId, _Peer] = {}
        self._owned: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._local_address: Address = ("", 0)
        self._closed = False
        self._stopping = asyncio.Event()
        self._limiter = RateLimiter()
        self._datagrams_received = 0
        self._datagrams_sent = 0
        self._malformed_dropped = 0
        self._foreign_dropped = 0
        self._socket_errors = 0
        self._internal_errors = 0
        self._callback_errors = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        local: NodeId,
        *,
        listen: Address = ("127.0.0.1", 0),
        on_delivered: DeliveryCallback | None = None,
        on_event: EventCallback | None = None,
        inbox_messages: int = DEFAULT_INBOX_MESSAGES,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        write_buffer_bytes: int = DEFAULT_WRITE_BUFFER_BYTES,
    ) -> AsyncIterator[TcpLinkDriver]:
        """Listen on `listen` (port 0: any free port) and yield a running driver."""
        if not 0 < local <= U32_MAX:
            raise UsageError(f"node id must be in 1..{U32_MAX}, got {local}")
        host, port = normalise_address(listen)
        async with asyncio.TaskGroup() as tasks:
            driver = cls(
                local,
                tasks,
                on_delivered=on_delivered,
                on_event=on_event,
                inbox_messages=inbox_messages,
                max_frame_bytes=max_frame_bytes,
                write_buffer_bytes=write_buffer_bytes,
            )
            driver._server = await asyncio.start_server(driver._on_accept, host, port)
            sockname = driver._server.sockets[0].getsockname()
            driver._local_address = (sockname[0], sockname[1])
            try:
                yield driver
            finally:
                await driver.aclose()

    async def aclose(self) -> None:
        """Close the listener and every connection; connection tasks end by themselves."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if self._inbox is not None:
            self._inbox.close()
        writers = [p.writer for p in self._peers.values() if p.writer is not None]
        for writer in writers:
            writer.close()
        for task in list(self._owned):
            task.cancel()  # the TaskGroup of `open` awaits them
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in writers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    # ------------------------------------------------------------------ queries

    @property
    def local(self) -> NodeId:
        return self._local

    @property
    def local_address(self) -> Address:
        return self._local_address

    @property
    def peers(self) -> list[NodeId]:
        return list(self._peers)

    def statistics(self) -> DriverStats:
        links = {
            peer: LinkStats(
                messages_sent=p.messages_sent,
                messages_delivered=p.messages_delivered,
                bytes_delivered=p.bytes_delivered,
                queued_bytes=0 if p.writer is None else p.writer.transport.get_write_buffer_size(),
            )
            for peer, p in self._peers.items()
        }
        return DriverStats(
            links=links,
            datagrams_received=self._datagrams_received,
            datagrams_sent=self._datagrams_sent,
            malformed_dropped=self._malformed_dropped,
            foreign_dropped=self._foreign_dropped,
            socket_errors=self._socket_errors,
            internal_errors=self._internal_errors,
            callback_errors=self._callback_errors,
        )

    # ------------------------------------------------------------------ peers

    def add_peer(self, peer: NodeId, address: Address) -> None:
        """Configure `peer`; the node with the smaller id connects, the other accepts."""
        if self._closed:
            raise UsageError("the driver is closed")
        if peer in self._peers or peer == self._local or not 0 < peer <= U32_MAX:
            raise UsageError(f"invalid or duplicate peer id {peer}")
        state = _Peer(normalise_address(address), established=asyncio.Event())
        self._peers[peer] = state
        if self._local < peer:
            self._spawn(self._connect(peer, state))

    # ------------------------------------------------------------------ application API

    async def send(
        self,
        peer: NodeId,
        payload: bytes,
        *,
        timeout: float | None = DEFAULT_SEND_TIMEOUT,  # noqa: ASYNC109 - bounded wait is the API
    ) -> None:
        """Write one message; waits for the connection and while the write buffer is full.

        Raises `MessageTooLarge`, `BufferFull` on timeout, `UsageError` (unknown peer,
        failed connection, closed driver).
        """
        state = self._require(peer)
        if len(payload) > self._max_frame:
            raise MessageTooLarge(f"message of {len(payload)} bytes exceeds {self._max_frame}")
        writer = state.writer
        if writer is None:
            await self.wait_established(peer, timeout=timeout)
            writer = state.writer
            assert writer is not None
        writer.write(FRAME_HEAD.pack(len(payload)) + payload)
        state.messages_sent += 1
        self._datagrams_sent += 1
        if writer.transport.get_write_buffer_size() > self._write_buffer:
            try:
                async with asyncio.timeout(timeout):
                    await writer.drain()
            except TimeoutError:
                raise BufferFull(
                    f"TCP write buffer to {peer} did not drain in {timeout} s"
                ) from None
            except ConnectionError as exc:
                raise UsageError(f"the connection to {peer} failed: {exc}") from None

    async def receive(self) -> tuple[NodeId, bytes]:
        if self._inbox is None:
            raise UsageError("deliveries go to the on_delivered callback of this driver")
        return await self._inbox.get()

    async def wait_established(self, peer: NodeId, *, timeout: float | None = None) -> None:  # noqa: ASYNC109 - bounded wait is the API
        """Wait for the connection and hello exchange. Raises `TimeoutError`, `UsageError`."""
        state = self._require(peer)
        assert state.established is not None
        async with asyncio.timeout(timeout):
            await state.established.wait()
        if state.failed is not None or state.writer is None:
            raise UsageError(f"the connection to {peer} failed: {state.failed}")

    async def wait_flushed(self, peer: NodeId, *, timeout: float | None = None) -> None:  # noqa: ASYNC109 - bounded wait is the API
        """Wait until everything sent to `peer` is handed to the kernel (TCP has no app ACK)."""
        state = self._require(peer)
        async with asyncio.timeout(timeout):
            while state.writer is not None and state.writer.transport.get_write_buffer_size():
                await state.writer.drain()
                await asyncio.sleep(0.001)

    # ------------------------------------------------------------------ connections

    async def _connect(self, peer: NodeId, state: _Peer) -> None:
        retry = _CONNECT_RETRY_INTERVAL
        while not self._closed and state.writer is None and state.failed is None:
            try:
                reader, writer = await asyncio.open_connection(*state.address)
            except OSError as exc:
                self._log.debug(
                    "connect to %d at %s failed: %s; retrying", peer, state.address, exc
                )
                await asyncio.sleep(retry)
                retry = min(retry * 2, _CONNECT_RETRY_MAX)
                continue
            await self._serve(reader, writer, expected=peer)

    def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed:
            writer.close()
            return
        self._spawn(self._serve(reader, writer, expected=None))

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, expected: NodeId | None
    ) -> None:
        """Run one connection: hello exchange, then frames until EOF, error or close."""
        peer: NodeId | None = None
        try:
            _set_nodelay(writer)
            writer.write(encode_frame(HELLO.pack(HELLO_MAGIC, self._local)))
            decoder = FrameDecoder(self._max_frame)
            async with asyncio.timeout(_HELLO_TIMEOUT):
                first: list[bytes] = []
                while not first:
                    data = await reader.read(_READ_CHUNK)
                    if not data:
                        return
                    first = decoder.feed(data)
            peer = self._admit(first[0], writer, expected)
            if peer is None:
                return
            state = self._peers[peer]
            self._deliver_frames(peer, state, first[1:])
            await self._read_frames(peer, state, reader, decoder)
        except DecodeError as exc:
            self._malformed_dropped += 1
            if self._limiter.allows(self._malformed_dropped):
                self._log.info("closing connection from %s: %s", _peername(writer), exc)
        except (OSError, TimeoutError) as exc:
            self._socket_errors += 1
            if self._limiter.allows(self._socket_errors):
                self._log.info("connection to %s ended: %s", _peername(writer), exc)
        except Exception:
            self._internal_errors += 1
            self._log.exception("bug contained in TCP connection handler")
        finally:
            writer.close()
            if peer is not None:
                self._on_closed(peer)

    def _admit(
        self, hello: bytes, writer: asyncio.StreamWriter, expected: NodeId | None
    ) -> NodeId | None:
        if len(hello) != HELLO.size:
            raise DecodeError(f"hello of {len(hello)} bytes")
        magic, sender = HELLO.unpack(hello)
        if magic != HELLO_MAGIC:
            raise DecodeError(f"bad hello magic {magic!r}")
        peer = NodeId(sender)
        state = self._peers.get(peer)
        source = _peername(writer)
        if (
            state is None
            or (expected is not None and peer != expected)
            or state.writer is not None
            or (expected is None and source[0] != state.address[0])
        ):
            self._foreign_dropped += 1
            if self._limiter.allows(self._foreign_dropped):
                self._log.info("refusing connection from %s claiming node %d", source, peer)
            return None
        state.writer = writer
        assert state.established is not None
        state.established.set()
        self._log.info("TCP link to %d established", peer)
        self._emit(LinkEstablished(peer))
        return peer

    async def _read_frames(
        self, peer: NodeId, state: _Peer, reader: asyncio.StreamReader, decoder: FrameDecoder
    ) -> None:
        inbox = self._inbox
        while True:
            if inbox is not None and inbox.full:
                await inbox.wait_space()  # TCP's own flow control then slows the sender
            data = await reader.read(_READ_CHUNK)
            if not data:
                return
            self._deliver_frames(peer, state, decoder.feed(data))

    def _deliver_frames(self, peer: NodeId, state: _Peer, frames: list[bytes]) -> None:
        self._datagrams_received += len(frames)
        state.messages_delivered += len(frames)
        for frame in frames:
            state.bytes_delivered += len(frame)
            if not hand_up(self._on_delivered, self._inbox, peer, frame):
                self._callback_errors += 1
                if self._limiter.allows(self._callback_errors):
                    self._log.exception("on_delivered callback raised (peer %d)", peer)

    def _on_closed(self, peer: NodeId) -> None:
        state = self._peers[peer]
        state.writer = None
        reason = "driver closed" if self._closed else "connection closed by peer"
        state.failed = reason
        assert state.established is not None
        state.established.set()  # wakes waiters, who find the link failed
        if not self._closed:
            self._log.warning("TCP link to %d failed: %s", peer, reason)
        self._emit(LinkFailed(peer, reason))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._tasks.create_task(coro)
        self._owned.add(task)
        task.add_done_callback(self._owned.discard)

    def _emit(self, effect: LinkEffect) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(effect)
        except Exception:
            self._callback_errors += 1
            self._log.exception("on_event callback raised")

    def _require(self, peer: NodeId) -> _Peer:
        if self._closed:
            raise UsageError("the driver is closed")
        state = self._peers.get(peer)
        if state is None:
            raise UsageError(f"no link to peer {peer}")
        if state.failed is not None:
            raise UsageError(f"the connection to {peer} failed: {state.failed}")
        return state


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _peername(writer: asyncio.StreamWriter) -> Address:
    name = writer.get_extra_info("peername")
    if isinstance(name, tuple) and len(name) >= 2:
        return str(name[0]), int(name[1])
    return ("?", 0)
