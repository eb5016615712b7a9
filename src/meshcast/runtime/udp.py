"""The UDP driver: link state machines (Hop by default) on one real datagram socket.

Theory of operation: docs/design/runtime.md. The driver stays tiny, as STYLE.md asks: it
feeds each input (a datagram, the timer, an application `send`) to a link, applies the
effects that came back, and re-arms one timer from `LinkEndpoint.next_deadline()`.

Hot-path choices (each measured, see the design note):

* routing reads only the header's magic, version and sender id (one slice compare, one
  `struct` unpack); the link's own decoder validates the rest and counts what it rejects;
* application sends are coalesced: most only join the link's queue (`flush=False`) and
  leave with the timer armed for "now", packed densely; every `send_batch`-th pumps at once;
* the timer is re-armed once per event-loop iteration (a `call_soon` "settle" step), not
  once per datagram, and only moved when the deadline gets earlier: an early firing just
  finds nothing due and re-arms;
* effects are dispatched on their exact type (`type(e) is Transmit`) before anything else;
* socket buffers are grown to 8 MiB (`SO_RCVBUFFORCE` when privileged), so the link's
  window, not the kernel, bounds what is in flight on loopback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import secrets
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from meshcast.errors import BufferFull, MeshcastError, MessageTooLarge, UsageError
from meshcast.ids import NodeId
from meshcast.link.config import LinkConfig
from meshcast.link.endpoint import LinkEndpoint
from meshcast.link.events import (
    Delivered,
    Link,
    LinkEffect,
    LinkEstablished,
    LinkFailed,
    PeerRestarted,
    Transmit,
)
from meshcast.link.hop import HopLink
from meshcast.link.secure import LinkSecurity, SecureLink
from meshcast.runtime.datagram import open_endpoint
from meshcast.runtime.impair import ImpairedSender, Impairment
from meshcast.runtime.inbox import Inbox, hand_up
from meshcast.runtime.logs import NodeLogAdapter, RateLimiter
from meshcast.runtime.stats import DriverStats
from meshcast.runtime.timer import DeadlineTimer
from meshcast.wire.keys import KeyRing
from meshcast.wire.packet import HEADER_SIZE, PREFIX, U32_MAX, PacketType

log = logging.getLogger(__name__)

Address = tuple[str, int]
DeliveryCallback = Callable[[NodeId, bytes], None]
EventCallback = Callable[[LinkEffect], None]
LinkFactory = Callable[[NodeId, NodeId, LinkConfig, int], Link]

DEFAULT_SOCKET_BUFFER_BYTES = 8 * 1024 * 1024
DEFAULT_INBOX_MESSAGES = 65_536
DEFAULT_SEND_BATCH = 32  # sends coalesced before one is pumped at once (1: no coalescing)
DEFAULT_SEND_TIMEOUT = 30.0  # s: how long `send` waits for room in the link's queue
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)  # Linux values; absent from `socket`
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_DATA = int(PacketType.DATA)
_PREFIX_SIZE = len(PREFIX)
_TYPE_OFFSET = 3  # byte offset of the packet type in the wire header
_SENDER = struct.Struct("!I")
_SENDER_OFFSET = 8  # byte offset of the sender node id in the wire header
_QUARANTINE_INTERVAL = 0.05  # s: timer back-off after a state machine raised in on_timer


def hop_link_factory(local: NodeId, peer: NodeId, config: LinkConfig, epoch: int) -> Link:
    return HopLink(local, peer, config, epoch=epoch)


def link_security(ring: KeyRing) -> LinkSecurity:
    """What the daemon's links encrypt with: its keys, the OS's randomness, and HELLO
    stamps on the wall clock (the event loop's clock is `time.monotonic`), so that they
    keep growing across restarts of the daemon (docs/security.md, "Handshake")."""
    offset_us = time.time_ns() // 1000 - int(time.monotonic() * 1_000_000)
    return LinkSecurity(ring, os.urandom, clock_offset_us=offset_us)


def secure_link_factory(security: LinkSecurity) -> LinkFactory:
    """Links sealed with `security` (docs/security.md), as a daemon's are."""

    def factory(local: NodeId, peer: NodeId, config: LinkConfig, epoch: int) -> Link:
        return SecureLink(local, peer, config, epoch=epoch, security=security)

    return factory


def new_epoch() -> int:
    """A fresh stream incarnation: random, so a restarted process is told apart."""
    return secrets.randbelow(U32_MAX) + 1


def parse_address(text: str) -> Address:
    """``"127.0.0.1:9000"`` or ``"[::1]:9000"`` → ``(host, port)``. Raises `UsageError`."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise UsageError(f"address {text!r} is not HOST:PORT")
    host = host.removeprefix("[").removesuffix("]")
    return normalise_address((host, int(port_text)))


def normalise_address(address: Address) -> Address:
    """Numeric host in the form the socket reports it, port checked. Raises `UsageError`."""
    host, port = address
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"host {host!r} is not a numeric IP address") from None
    if not 0 <= port <= 0xFFFF:
        raise UsageError(f"port {port} is out of range")
    return ip.compressed, port


def open_udp_socket(address: Address, buffer_bytes: int) -> socket.socket:
    """A non-blocking UDP socket bound to `address`, with socket buffers grown if allowed."""
    host, port = normalise_address(address)
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        _grow_buffer(sock, _SO_RCVBUFFORCE, socket.SO_RCVBUF, buffer_bytes)
        _grow_buffer(sock, _SO_SNDBUFFORCE, socket.SO_SNDBUF, buffer_bytes)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _grow_buffer(sock: socket.socket, forced: int, plain: int, size: int) -> None:
    # FORCE ignores net.core.[rw]mem_max but needs CAP_NET_ADMIN; the plain option is
    # silently capped by the sysctl. Either way a smaller buffer still works.
    try:
        sock.setsockopt(socket.SOL_SOCKET, forced, size)
    except OSError:
        try:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)
        except OSError as exc:
            log.debug("cannot set socket buffer option %d: %s", plain, exc)


@dataclass(slots=True)
class _Waiter:
    ready: Callable[[], bool]
    future: asyncio.Future[None]


class UdpLinkDriver:
    """Several links behind one UDP socket, driven on the running event loop.

    Create with `await UdpLinkDriver.open(...)` (or ``async with`` on the result), add
    neighbours with `add_peer`, then `send`; deliveries go to `on_delivered` when given,
    else to a bounded inbox read with `receive`. Datagrams are accepted only when their
    header decodes, names a configured peer, and come from that peer's address; anything
    else is dropped and counted (`statistics()`). A state machine that raises is contained:
    the exception is logged with its traceback and counted, and the driver keeps serving.
    """

    def __init__(
        self,
        local: NodeId,
        *,
        config: LinkConfig,
        on_delivered: DeliveryCallback | None,
        on_event: EventCallback | None,
        impairment: Impairment | None,
        inbox_messages: int,
        link_factory: LinkFactory,
        send_batch: int,
    ) -> None:
        """Use `open`: the driver is not usable before it has a transport."""
        self._local = local
        self._config = config
        self._log = NodeLogAdapter(log, local)
        self._loop = asyncio.get_running_loop()
        self._endpoint = LinkEndpoint(local)
        self._links: dict[NodeId, Link] = {}
        self._addresses: dict[NodeId, Address] = {}
        self._link_factory = link_factory
        self._on_delivered = on_delivered
        self._on_event = on_event
        self._inbox = Inbox(inbox_messages) if on_delivered is None else None
        self._impairment = impairment
        self._impaired: ImpairedSender | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._sendto: Callable[[bytes, Address], None] = self._not_open
        self._local_address: Address = ("", 0)
        self._closed = False
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self._clock = 0.0
        self._timer = DeadlineTimer(self._loop, self._on_timer)
        self._settle_scheduled = False
        self._waiters: list[_Waiter] = []
        self._send_batch = send_batch
        self._unflushed = 0
        self._limiter = RateLimiter()
        # counters (see DriverStats)
        self._datagrams_received = 0
        self._datagrams_sent = 0
        self._malformed_dropped = 0
        self._foreign_dropped = 0
        self._overflow_dropped = 0
        self._unroutable_dropped = 0
        self._socket_errors = 0
        self._internal_errors = 0
        self._callback_errors = 0

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def open(
        cls,
        local: NodeId,
        *,
        listen: Address = ("127.0.0.1", 0),
        config: LinkConfig | None = None,
        on_delivered: DeliveryCallback | None = None,
        on_event: EventCallback | None = None,
        impairment: Impairment | None = None,
        inbox_messages: int = DEFAULT_INBOX_MESSAGES,
        link_factory: LinkFactory = hop_link_factory,
        socket_buffer_bytes: int = DEFAULT_SOCKET_BUFFER_BYTES,
        send_batch: int = DEFAULT_SEND_BATCH,
    ) -> UdpLinkDriver:
        """Bind a UDP socket on `listen` (port 0: any free port) and return a running driver.

        Raises `UsageError` for a non-numeric host and `OSError` when binding fails.
        """
        if not 0 < local <= U32_MAX:
            raise UsageError(f"node id must be in 1..{U32_MAX}, got {local}")
        driver = cls(
            local,
            config=config if config is not None else LinkConfig(),
            on_delivered=on_delivered,
            on_event=on_event,
            impairment=impairment,
            inbox_messages=inbox_messages,
            link_factory=link_factory,
            send_batch=send_batch,
        )
        sock = open_udp_socket(listen, socket_buffer_bytes)
        transport, sockname = await open_endpoint(
            driver._loop,
            sock,
            driver._on_datagram,
            driver._on_socket_error,
            driver._on_connection_lost,
        )
        driver._attach(transport, sockname)
        return driver

    def _attach(self, transport: asyncio.DatagramTransport, sockname: tuple[str, int]) -> None:
        self._transport = transport
        self._local_address = (sockname[0], sockname[1])
        send: Callable[[bytes, Address], None] = transport.sendto
        if self._impairment is not None:
            self._impaired = ImpairedSender(self._impairment, send)
            send = self._impaired
        self._sendto = send
        self._log.debug("UDP driver bound to %s:%d", *self._local_address)

    async def __aenter__(self) -> UdpLinkDriver:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def close(self) -> None:
        """Stop at once: cancel the timer, close the socket, fail every waiter."""
        if self._closed:
            return
        self._closed = True
        self._timer.cancel()
        if self._impaired is not None:
            self._impaired.close()
        if self._transport is not None:
            self._transport.close()
        elif not self._lost.done():
            self._lost.set_result(None)
        if self._inbox is not None:
            self._inbox.close()
        for waiter in self._waiters:
            if not waiter.future.done():
                waiter.future.set_exception(UsageError("the driver is closed"))
        self._waiters.clear()

    async def aclose(self) -> None:
        """`close`, then wait until the transport has let go of the socket."""
        self.close()
        await asyncio.shield(self._lost)

    # ------------------------------------------------------------------ queries

    @property
    def local(self) -> NodeId:
        return self._local

    @property
    def local_address(self) -> Address:
        """The bound `(host, port)`; the port is the real one when 0 was asked for."""
        return self._local_address

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def peers(self) -> list[NodeId]:
        return list(self._links)

    def link(self, peer: NodeId) -> Link:
        """The state machine of the link to `peer` (read-only use: queries)."""
        return self._require(peer)

    def statistics(self) -> DriverStats:
        return DriverStats(
            links={peer: link.statistics() for peer, link in self._links.items()},
            datagrams_received=self._datagrams_received,
            datagrams_sent=self._datagrams_sent,
            malformed_dropped=self._malformed_dropped,
            foreign_dropped=self._foreign_dropped,
            overflow_dropped=self._overflow_dropped,
            unroutable_dropped=self._unroutable_dropped,
            socket_errors=self._socket_errors,
            internal_errors=self._internal_errors,
            callback_errors=self._callback_errors,
            impairment=None if self._impaired is None else self._impaired.statistics(),
        )

    # ------------------------------------------------------------------ peers

    def add_peer(self, peer: NodeId, address: Address, *, epoch: int | None = None) -> None:
        """Create the link to `peer` at `address` (numeric host) and start its handshake."""
        self._check_open()
        if peer in self._links:
            raise UsageError(f"peer {peer} is already configured")
        if peer == self._local or not 0 < peer <= U32_MAX:
            raise UsageError(f"invalid peer id {peer}")
        normalised = normalise_address(address)
        link = self._link_factory(
            self._local, peer, self._config, new_epoch() if epoch is None else epoch
        )
        self._links[peer] = link
        self._addresses[peer] = normalised
        self._run_input(peer, lambda: self._endpoint.add(link, self._now()))
        self._settle()

    def remove_peer(self, peer: NodeId) -> None:
        """Forget `peer`: its link stops at once, queued messages are dropped."""
        self._require(peer)
        self._endpoint.remove(peer)
        del self._links[peer]
        del self._addresses[peer]
        self._settle()

    # ------------------------------------------------------------------ application API

    async def send(
        self,
        peer: NodeId,
        payload: bytes,
        *,
        timeout: float | None = DEFAULT_SEND_TIMEOUT,  # noqa: ASYNC109 - bounded wait is the API
    ) -> None:
        """Queue one message for `peer`, waiting while the link's send queue is full.

        Raises `MessageTooLarge`; `BufferFull` when no room came within `timeout` seconds;
        `UsageError` for an unknown peer, a failed link or a closed driver.
        """
        link = self._require(peer)
        size = len(payload)
        if not link.can_send(size):
            if size > self._config.max_message_size:
                raise MessageTooLarge(
                    f"message of {size} bytes exceeds the limit of {self._config.max_message_size}"
                )
            await self._wait_for(
                lambda: link.failed or link.can_send(size), timeout, "room in the send queue"
            )
            if link.failed:
                raise UsageError(f"the link to {peer} has failed")
        self._send_now(link, payload)

    def send_nowait(self, peer: NodeId, payload: bytes) -> None:
        """Queue one message without waiting. Raises `BufferFull`, `MessageTooLarge`, `UsageError`."""
        link = self._require(peer)
        if link.failed:
            raise UsageError(f"the link to {peer} has failed")
        self._send_now(link, payload)

    async def receive(self) -> tuple[NodeId, bytes]:
        """The next delivered message (only without `on_delivered`). Raises `UsageError` once closed."""
        if self._inbox is None:
            raise UsageError("deliveries go to the on_delivered callback of this driver")
        return await self._inbox.get()

    def receive_nowait(self) -> tuple[NodeId, bytes] | None:
        if self._inbox is None:
            raise UsageError("deliveries go to the on_delivered callback of this driver")
        return self._inbox.get_nowait()

    async def wait_established(self, peer: NodeId, *, timeout: float | None = None) -> None:  # noqa: ASYNC109 - bounded wait is the API
        """Wait for the handshake. Raises `TimeoutError`, or `UsageError` if the link failed."""
        link = self._require(peer)
        await self._wait_for(lambda: link.established or link.failed, timeout, None)
        if link.failed:
            raise UsageError(f"the link to {peer} has failed")

    async def wait_flushed(self, peer: NodeId, *, timeout: float | None = None) -> None:  # noqa: ASYNC109 - bounded wait is the API
        """Wait until everything queued for `peer` has been sent and acknowledged.

        Raises `TimeoutError`, or `UsageError` if the link failed.
        """
        link = self._require(peer)

        def flushed() -> bool:
            stats = link.statistics()
            return link.failed or (stats.queued_messages == 0 and stats.unacked_packets == 0)

        await self._wait_for(flushed, timeout, None)
        if link.failed:
            raise UsageError(f"the link to {peer} has failed")

    # ------------------------------------------------------------------ inputs

    def _on_datagram(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._datagrams_received += 1
        # Only what routing needs: is this meshcast at all, and which node does it claim
        # to be? The link's own decoder checks the rest (and counts what it rejects).
        # A full `decode_header` here would build a Header and an enum per datagram:
        # ~20 % of the receive path (docs/design/runtime.md).
        if len(data) < HEADER_SIZE or data[:_PREFIX_SIZE] != PREFIX:
            self._malformed_dropped += 1
            if self._limiter.allows(self._malformed_dropped):
                self._log.debug("drop non-meshcast datagram of %d bytes from %s", len(data), addr)
            return
        (sender,) = _SENDER.unpack_from(data, _SENDER_OFFSET)
        link = self._links.get(sender)
        expected = self._addresses.get(sender)
        if link is None or expected is None or addr[0] != expected[0] or addr[1] != expected[1]:
            self._foreign_dropped += 1
            if self._limiter.allows(self._foreign_dropped):
                self._log.debug("drop datagram claiming node %d from %s", sender, addr)
            return
        inbox = self._inbox
        if inbox is not None and inbox.full and data[_TYPE_OFFSET] == _DATA:
            # The application is behind: let the link recover this packet later (NACK).
            self._overflow_dropped += 1
            return
        now = self._now()
        try:
            effects = link.datagram_received(data, now)
        except Exception:
            self._contain(sender, "datagram_received")
        else:
            if effects:
                self._apply(effects)
        if not self._settle_scheduled:
            self._settle_scheduled = True
            self._loop.call_soon(self._settle)

    def _on_timer(self) -> None:
        now = self._now(self._timer.fired_at())
        for link in self._endpoint:
            deadline = link.next_deadline()
            if deadline is None or deadline > now:
                continue
            try:
                effects = link.on_timer(now)
            except Exception:
                self._contain(link.peer, "on_timer")
                self._timer.quarantine_until = now + _QUARANTINE_INTERVAL
            else:
                if effects:
                    self._apply(effects)
        self._settle()

    def _send_now(self, link: Link, payload: bytes) -> None:
        # Sends are coalesced: most only queue (flush=False) and leave with the timer
        # that `_settle` arms at once for them, at the end of this loop iteration, packed
        # densely. Every `send_batch`-th send pumps right away, so an application that
        # sends without ever yielding to the loop still sees its messages leave.
        self._unflushed += 1
        flush = self._unflushed >= self._send_batch
        if flush:
            self._unflushed = 0
        try:
            effects = link.send(payload, self._now(), flush=flush)
        except MeshcastError:
            raise  # BufferFull, MessageTooLarge: the caller's to handle
        except Exception:
            self._contain(link.peer, "send")
            raise
        if effects:
            self._apply(effects)
        if not self._settle_scheduled:
            self._settle_scheduled = True
            self._loop.call_soon(self._settle)

    def _on_socket_error(self, exc: Exception) -> None:
        self._socket_errors += 1
        if self._limiter.allows(self._socket_errors):
            self._log.info("socket error: %s", exc)

    def _on_connection_lost(self, exc: Exception | None) -> None:
        if not self._closed:
            self._log.warning("UDP socket closed unexpectedly: %s", exc)
            self.close()
        if not self._lost.done():
            self._lost.set_result(None)

    # ------------------------------------------------------------------ effects

    def _apply(self, effects: list[LinkEffect]) -> None:
        send = self._sendto
        addresses = self._addresses
        for effect in effects:
            # Exact-type tests first: the common effects dispatch in a few bytecodes.
            if type(effect) is Transmit:
                address = addresses.get(effect.to)
                if address is None:
                    self._unroutable_dropped += 1
                    continue
                self._datagrams_sent += 1
                send(effect.datagram, address)
            elif type(effect) is Delivered:
                self._deliver(effect.peer, effect.payload)
            else:
                self._on_link_event(effect)

    def _deliver(self, peer: NodeId, payload: bytes) -> None:
        if not hand_up(self._on_delivered, self._inbox, peer, payload):
            self._callback_errors += 1
            if self._limiter.allows(self._callback_errors):
                self._log.exception("on_delivered callback raised (peer %d)", peer)

    def _on_link_event(self, effect: LinkEffect) -> None:
        match effect:
            case LinkEstablished(peer):
                self._log.info("link to %d established", peer)
            case LinkFailed(peer, reason):
                self._log.warning("link to %d failed: %s", peer, reason)
            case PeerRestarted(peer, discarded):
                self._log.warning("peer %d restarted; %d queued messages dropped", peer, discarded)
        if self._on_event is not None:
            try:
                self._on_event(effect)
            except Exception:
                self._callback_errors += 1
                if self._limiter.allows(self._callback_errors):
                    self._log.exception("on_event callback raised")

    # ------------------------------------------------------------------ timer and waiters

    def _settle(self) -> None:
        """After inputs: re-arm the one timer and wake the waiters whose condition holds."""
        self._settle_scheduled = False
        if self._closed:
            return
        try:
            deadline = self._endpoint.next_deadline()
        except Exception:
            self._contain(None, "next_deadline")
            deadline = self._now() + _QUARANTINE_INTERVAL
        self._timer.arm(deadline)
        if self._waiters:
            self._wake_waiters()

    def _wake_waiters(self) -> None:
        remaining: list[_Waiter] = []
        for waiter in self._waiters:
            if waiter.future.done():
                continue
            try:
                ready = waiter.ready()
            except Exception as exc:
                self._contain(None, "waiter condition")
                waiter.future.set_exception(exc)
                continue
            if ready:
                waiter.future.set_result(None)
            else:
                remaining.append(waiter)
        self._waiters = remaining

    async def _wait_for(
        self,
        ready: Callable[[], bool],
        timeout: float | None,  # noqa: ASYNC109 - bounded wait is the API
        buffer_of: str | None,
    ) -> None:
        """Wait until `ready()`, checked after every batch of inputs.

        On timeout raises `BufferFull` (when waiting for `buffer_of`) or `TimeoutError`.
        """
        self._check_open()
        if ready():
            return
        waiter = _Waiter(ready, self._loop.create_future())
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter.future
        except TimeoutError:
            if buffer_of is None:
                raise
            raise BufferFull(f"no {buffer_of} within {timeout} s") from None
        finally:
            if not waiter.future.done():
                waiter.future.cancel()

    # ------------------------------------------------------------------ helpers

    def _now(self, at_least: float = 0.0) -> float:
        """The loop clock, never going backwards (a timer may pass its deadline as now)."""
        now = self._loop.time()
        if at_least > now:
            now = at_least
        if now > self._clock:
            self._clock = now
        return self._clock

    def _require(self, peer: NodeId) -> Link:
        self._check_open()
        link = self._links.get(peer)
        if link is None:
            raise UsageError(f"no link to peer {peer}")
        return link

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("the driver is closed")

    def _run_input(self, peer: NodeId, feed: Callable[[], list[LinkEffect]]) -> None:
        try:
            effects = feed()
        except Exception:
            self._contain(peer, "start")
        else:
            self._apply(effects)

    def _contain(self, peer: NodeId | None, where: str) -> None:
        """The bulkhead: log a state machine's unexpected exception and keep going."""
        self._internal_errors += 1
        if self._limiter.allows(self._internal_errors):
            self._log.exception(
                "bug contained: link %s raised in %s (%d so far)",
                "?" if peer is None else peer,
                where,
                self._internal_errors,
            )

    def _not_open(self, datagram: bytes, address: Address) -> None:
        raise UsageError("the driver has no socket yet; create it with UdpLinkDriver.open()")
