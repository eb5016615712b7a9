"""The asyncio client: one session with one daemon over the client protocol.

`connect()` opens the stream (Unix socket or TCP), does the HELLO/WELCOME handshake and
returns a `Client`. The client owns exactly one task, the reader, which decodes the
daemon's frames, answers PINGs, settles pending requests and queues events for
`receive()`. The reference with examples is docs/client-api.md; the frames are in
docs/client-protocol.md.

Error contract:

* `UsageError` (its subclass `MessageTooLarge` for payloads): the caller's input breaks
  the protocol or the daemon's limits (checked before anything is sent), or a call on a
  closed client.
* `ClientError` (`.code` is the daemon's `ErrorCode`, or 0): the daemon cannot be reached,
  refused the handshake, ended the session, or broke the protocol.
* `Unauthenticated` (a `ClientError`): the daemon refused the handshake's token (none
  given where one is needed, or an unknown one).
* `RequestRejected` (a `ClientError`, with `.request_id`): the daemon refused one request;
  its subclasses `AccessDenied` when the daemon's access rules forbid it, `Busy` when the
  daemon cannot take it now (retry later, with back-off).
  `join()` and `leave()` wait for their outcome and raise it themselves. A MULTICAST has
  no success reply, so a rejected one is raised by the next call of `multicast`, `join`,
  `leave`, `receive`, `receive_nowait` or `close`, once, before that call does anything
  — except with ``confirm=True``, where `multicast` itself waits for the outcome.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import os
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

from meshcast.client.replication import (
    DEFAULT_MAX_CONNECTIONS,
    Replication,
    absolute_path,
    parse_report,
    rate_value,
    replicate_options,
    rid_value,
)
from meshcast.errors import ClientError, DecodeError, MessageTooLarge, UsageError
from meshcast.wire.client import (
    FROM_DAEMON,
    MAX_DEST_GROUPS,
    MAX_UNCONFIRMED,
    MIN_VERSION,
    REPLICATE_VERSION,
    SET_RATE_VERSION,
    U16_MAX,
    U32_MAX,
    VERSION,
    BlobHeld,
    Cause,
    Confirmed,
    DaemonLimits,
    ErrorCode,
    ErrorReport,
    Frame,
    FrameDecoder,
    Goodbye,
    Hello,
    HelloFlag,
    Join,
    Leave,
    Membership,
    Message,
    Multicast,
    Ping,
    Pong,
    Replicate,
    ServiceLevel,
    SetRate,
    SlowReceiverPolicy,
    StatusReply,
    StatusRequest,
    Welcome,
    check_client_name,
    check_group_name,
    check_token,
    encode,
    split_private_name,
)
from meshcast.wire.client import Replication as ReplicationFrame

log = logging.getLogger(__name__)

# what receive() and `async for` yield; BlobHeld (v6): a replication to a group ended
Event = Message | Membership | BlobHeld

DEFAULT_TIMEOUT = 5.0  # seconds: connecting, the handshake, each join/leave/ping, close
DEFAULT_QUEUE_SIZE = 1024  # events received but not yet taken by receive()
READ_CHUNK = 256 * 1024  # bytes asked of the socket per read
MAX_DEFERRED_ERRORS = 256  # rejected MULTICASTs kept until a call reports them
MAX_REMEMBERED_REQUESTS = 1024  # MULTICAST descriptions kept to name a rejected one


class RequestRejected(ClientError):
    """The daemon refused one request (ERROR 2xx). `.code` says why; the session goes on."""

    def __init__(self, message: str, code: int, request_id: int) -> None:
        super().__init__(message, code)
        self.request_id = request_id  # the id `multicast()` returned, or the JOIN/LEAVE's


class AccessDenied(RequestRejected):
    """The daemon's access rules forbid this JOIN or MULTICAST (ERROR 209 ACCESS_DENIED).

    The message names the operation and the group; the session goes on."""


class Busy(RequestRejected):
    """The daemon cannot take this request now (ERROR 210 BUSY, protocol version 4): a
    bounded buffer of the daemon is full. Nothing was done; retry later, with back-off.
    The session goes on."""


class Unauthenticated(ClientError):
    """The daemon refused the handshake (ERROR 109 UNAUTHENTICATED): its client port
    needs a token and none was given, or the token given is unknown."""


_REJECTIONS: dict[ErrorCode, type[RequestRejected]] = {
    ErrorCode.ACCESS_DENIED: AccessDenied,
    ErrorCode.BUSY: Busy,
}


def _rejection(message: str, code: ErrorCode, request_id: int) -> RequestRejected:
    return _REJECTIONS.get(code, RequestRejected)(message, code, request_id)


# ---------------------------------------------------------------- addresses


@dataclass(frozen=True, slots=True)
class Address:
    """Where a daemon listens for clients: ``unix:/path`` or ``tcp:host:port``."""

    transport: Literal["unix", "tcp"]
    path: str = ""  # unix only
    host: str = ""  # tcp only
    port: int = 0  # tcp only, 1..65535

    def __str__(self) -> str:
        if self.transport == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_address(text: str) -> Address:
    """``unix:/path``, ``tcp:host:port`` (``tcp:[::1]:port`` for IPv6) or a bare path.

    Raises `UsageError` naming what is wrong.
    """
    if not isinstance(text, str) or not text:
        raise UsageError(f"daemon address must be a non-empty str, got {text!r}")
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise UsageError(f"daemon address {text!r}: the Unix socket path is empty")
        return Address("unix", path=path)
    if text.startswith("tcp:"):
        host, sep, port_text = text[len("tcp:") :].rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host:
            raise UsageError(f"daemon address {text!r}: expected tcp:HOST:PORT")
        try:
            port = int(port_text)
        except ValueError:
            port = 0
        if not 1 <= port <= U16_MAX:
            raise UsageError(f"daemon address {text!r}: port must be 1..65535, got {port_text!r}")
        return Address("tcp", host=host, port=port)
    return Address("unix", path=text)


# ---------------------------------------------------------------- argument checks


def _check_timeout(timeout: float, what: str = "timeout") -> float:
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not (math.isfinite(timeout) and timeout > 0)
    ):
        raise UsageError(f"{what} must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def _policy(policy: SlowReceiverPolicy | str) -> SlowReceiverPolicy:
    try:
        return SlowReceiverPolicy(policy)
    except ValueError:
        known = ", ".join(p.value for p in SlowReceiverPolicy)
        raise UsageError(f"unknown slow-receiver policy {policy!r} (known: {known})") from None


def service_level(service: ServiceLevel | int | str) -> ServiceLevel:
    """A `ServiceLevel` from itself, its value or its name (any case); else `UsageError`."""
    if isinstance(service, str):
        level = ServiceLevel.__members__.get(service.upper())
        if level is not None:
            return level
    elif isinstance(service, int) and not isinstance(service, bool):
        try:
            return ServiceLevel(service)
        except ValueError:
            pass
    known = ", ".join(s.name.lower() for s in ServiceLevel)
    raise UsageError(f"unknown service level {service!r} (known: {known})")


def _group(name: str, limits: DaemonLimits) -> str:
    try:
        check_group_name(name, limits.max_group_name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None  # names the daemon's limit
    return name


def _groups(groups: str | Sequence[str], limits: DaemonLimits) -> tuple[str, ...]:
    names = (groups,) if isinstance(groups, str) else tuple(groups)
    if not names:
        raise UsageError("multicast needs at least one group")
    if len(names) > MAX_DEST_GROUPS:
        raise UsageError(f"multicast names {len(names)} groups; at most {MAX_DEST_GROUPS}")
    for name in names:
        _group(name, limits)
    if len(set(names)) != len(names):
        twice = next(n for i, n in enumerate(names) if n in names[:i])
        raise UsageError(f"multicast names group {twice!r} twice")
    return names


def _payload(payload: bytes | bytearray | memoryview, limits: DaemonLimits) -> bytes:
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise UsageError(f"payload must be bytes, not {type(payload).__name__}")
    data = bytes(payload)
    if len(data) > limits.max_message_size:
        raise MessageTooLarge(
            f"payload of {len(data)} bytes is larger than the daemon's "
            f"max_message_size of {limits.max_message_size} bytes"
        )
    return data


def _msg_type(msg_type: int) -> int:
    if isinstance(msg_type, bool) or not isinstance(msg_type, int) or not 0 <= msg_type <= U16_MAX:
        raise UsageError(f"msg_type must be an int within 0..{U16_MAX}, got {msg_type!r}")
    return msg_type


# ---------------------------------------------------------------- the client


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    """Counters of one client session."""

    multicasts_sent: int  # MULTICAST frames written
    payload_bytes_sent: int  # bytes of their payloads
    messages_received: int  # MESSAGE frames received
    memberships_received: int  # MEMBERSHIP frames received
    blob_events_received: int  # BLOB_HELD frames received
    requests_rejected: int  # ERROR 2xx received
    notices: int  # ERROR 3xx received (e.g. MESSAGES_DROPPED)
    events_discarded: int  # events still queued, or arriving, when close() began
    deferred_errors_lost: int  # rejected MULTICASTs beyond MAX_DEFERRED_ERRORS not reported
    queued: int  # events waiting for receive() now


@dataclass(slots=True)
class _Counters:
    """The counters of `ClientStatistics`, bumped in place (`+= 1`, checked by mypy)."""

    multicasts_sent: int = 0
    payload_bytes_sent: int = 0
    messages_received: int = 0
    memberships_received: int = 0
    blob_events_received: int = 0
    requests_rejected: int = 0
    notices: int = 0
    events_discarded: int = 0
    deferred_errors_lost: int = 0


@dataclass(slots=True)
class _Waiter:
    kind: Literal["join", "leave"]
    group: str
    future: asyncio.Future[Membership]


class Client:
    """A session with one daemon. Create it with `connect()`; see the module docstring.

    Events (`Message`, `Membership`, `BlobHeld`) are queued, at most `queue_size` of them. When the
    queue is full the client stops reading its socket, so the daemon applies the
    slow-receiver policy of the groups (back-pressure by default). Not thread-safe: use
    it from the event loop it was created in (see `meshcast.client.blocking` for scripts).
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        welcome: Welcome,
        decoder: FrameDecoder,
        address: Address,
        *,
        timeout: float,
        policy: SlowReceiverPolicy,
        queue_size: int,
    ) -> None:
        """Internal: use `connect()`."""
        self._reader = reader
        self._writer = writer
        self._welcome = welcome
        self._decoder = decoder
        self._address = address
        self._timeout = timeout
        self._policy = policy
        self._queue_size = queue_size
        self._events: deque[Event] = deque()
        self._readable = asyncio.Event()  # an event is queued or the session ended
        self._room = asyncio.Event()  # the queue has room (or the client is closing)
        self._room.set()
        self._ended = asyncio.Event()  # the reader stopped: GOODBYE, end of stream, error
        self._failure: ClientError | None = None  # why the session ended, unless by close()
        self._closed = False
        self._deferred: deque[RequestRejected] = deque()
        self._waiters: dict[int, _Waiter] = {}
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._reports: dict[int, asyncio.Future[StatusReply]] = {}  # STATUS by request id
        # CONFIRM MULTICASTs by request id; at most MAX_UNCONFIRMED at once (the daemon's bound)
        self._confirms: dict[int, asyncio.Future[None]] = {}
        self._confirm_slots = asyncio.Semaphore(MAX_UNCONFIRMED)
        self._replications: dict[int, Replication] = {}  # REPLICATEs not yet final, by token
        self._described: OrderedDict[int, str] = OrderedDict()
        self._groups: set[str] = set()
        self._ids = itertools.count(1)
        self._nonces = itertools.count(1)
        self._counters = _Counters()
        self._reader_task = asyncio.get_running_loop().create_task(
            self._read_loop(), name=f"meshcast-client-reader {welcome.private_name}"
        )

    # ------------------------------------------------------------ queries

    @property
    def private_name(self) -> str:
        """This session's unique name, ``#client#daemon``, as other members see it."""
        return self._welcome.private_name

    @property
    def name(self) -> str:
        """The client part of the private name (the one asked for, or the daemon's pick)."""
        return split_private_name(self._welcome.private_name)[0]

    @property
    def daemon_name(self) -> str:
        return split_private_name(self._welcome.private_name)[1]

    @property
    def limits(self) -> DaemonLimits:
        """The daemon's limits from WELCOME; requests are checked against them early."""
        return self._welcome.limits

    @property
    def version(self) -> int:
        """The protocol version agreed in the handshake."""
        return self._welcome.version

    @property
    def address(self) -> str:
        return str(self._address)

    @property
    def groups(self) -> frozenset[str]:
        """Groups this client is a member of (as confirmed by the daemon)."""
        return frozenset(self._groups)

    @property
    def closed(self) -> bool:
        """True once `close()` has been called."""
        return self._closed

    def statistics(self) -> ClientStatistics:
        c = self._counters
        return ClientStatistics(
            multicasts_sent=c.multicasts_sent,
            payload_bytes_sent=c.payload_bytes_sent,
            messages_received=c.messages_received,
            memberships_received=c.memberships_received,
            blob_events_received=c.blob_events_received,
            requests_rejected=c.requests_rejected,
            notices=c.notices,
            events_discarded=c.events_discarded,
            deferred_errors_lost=c.deferred_errors_lost,
            queued=len(self._events),
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "ended" if self._failure else "open"
        return f"<Client {self.private_name} at {self._address} {state}>"

    # ------------------------------------------------------------ requests

    async def join(
        self, group: str, *, policy: SlowReceiverPolicy | str | None = None
    ) -> Membership:
        """Join `group` and wait for the daemon's answer; return the new view.

        `policy` is the slow-receiver policy for this group (default: the one given to
        `connect`). The confirming MEMBERSHIP is also queued as an event, in its place.
        Raises `UsageError` (bad name, already a member, too many groups),
        `RequestRejected`, or `ClientError` (session over, no answer within the timeout).
        """
        self._check_usable()
        _group(group, self.limits)
        chosen = self._policy if policy is None else _policy(policy)
        joining = {w.group for w in self._waiters.values() if w.kind == "join"}
        if group in self._groups or group in joining:
            raise UsageError(f"already a member of group {group!r} (or joining it)")
        if len(self._groups | joining) >= self.limits.max_groups_per_client:
            raise UsageError(
                f"cannot join {group!r}: the daemon allows "
                f"{self.limits.max_groups_per_client} groups per client"
            )
        request_id = self._next_request_id()
        return await self._request(Join(group, chosen, request_id), "join", group)

    async def leave(self, group: str) -> Membership:
        """Leave `group` and wait for the daemon's answer; return the view without us.

        No MESSAGE of `group` follows the returned MEMBERSHIP (which is also queued as an
        event), unless it also named a group this client is still in. Raises
        `UsageError` (not a member), `RequestRejected` or `ClientError`.
        """
        self._check_usable()
        _group(group, self.limits)
        if group not in self._groups:
            raise UsageError(f"not a member of group {group!r}")
        if any(w.group == group and w.kind == "leave" for w in self._waiters.values()):
            raise UsageError(f"already leaving group {group!r}")
        request_id = self._next_request_id()
        return await self._request(Leave(group, request_id), "leave", group)

    async def multicast(
        self,
        groups: str | Sequence[str],
        payload: bytes | bytearray | memoryview,
        *,
        service: ServiceLevel | int | str = ServiceLevel.RELIABLE,
        msg_type: int = 0,
        confirm: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - bounds the wait for the confirmation
    ) -> int:
        """Send `payload` to every member of `groups` (one name or several); return its id.

        The sender need not be a member. Without `confirm`, returns once the frame is
        handed to the socket (waiting while the socket's buffer is full): if the daemon
        then dies, the message may have reached nobody. With ``confirm=True`` (protocol
        version 2), returns only once the daemon has delivered the message in its view —
        ordered there (AGREED), and for SAFE held by every daemon of the view, so that it
        survives this daemon's failure — and raises `ClientError` if the session ends
        first or no confirmation comes within `timeout` (default: the client's timeout):
        then the message's fate is unknown. At most MAX_UNCONFIRMED confirmations are
        awaited at once (more calls wait for a slot).

        Checked first, raising `UsageError`: the group names (characters, the daemon's
        `max_group_name`, 1..256 distinct), `service`, `msg_type` (u16), the payload size
        against the daemon's `max_message_size` (`MessageTooLarge`), `confirm` with a
        version-1 daemon. A rejection by the daemon is raised as `RequestRejected` (with
        this id): by this call with `confirm`, else by a later call.
        """
        self._check_usable()
        names = _groups(groups, self.limits)
        data = _payload(payload, self.limits)
        level = service_level(service)
        tag = _msg_type(msg_type)
        if not isinstance(confirm, bool):
            raise UsageError(f"confirm must be True or False, got {confirm!r}")
        if not confirm:
            request_id = self._describe(names, data)
            await self._write(Multicast(names, data, level, tag, request_id))
            self._count_sent(data)
            return request_id
        if self.version < 2:
            raise UsageError(
                f"confirm=True needs protocol version 2; the daemon at {self._address} "
                f"speaks version {self.version}"
            )
        limit = self._timeout if timeout is None else _check_timeout(timeout)
        async with self._confirm_slots:
            request_id = self._describe(names, data)
            confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._confirms[request_id] = confirmed
            try:
                await self._write(Multicast(names, data, level, tag, request_id, confirm=True))
                self._count_sent(data)
                async with asyncio.timeout(limit):
                    await confirmed
            except TimeoutError:
                raise ClientError(
                    f"MULTICAST {request_id} not confirmed by the daemon at {self._address} "
                    f"within {limit} s: it may or may not be delivered"
                ) from None
            finally:
                self._confirms.pop(request_id, None)
        return request_id

    def _describe(self, names: tuple[str, ...], data: bytes) -> int:
        """A new request id for a MULTICAST, remembered to name it if it is rejected."""
        request_id = self._next_request_id()
        self._described[request_id] = (
            f"MULTICAST {request_id} of {len(data)} bytes to {', '.join(map(repr, names))}"
        )
        while len(self._described) > MAX_REMEMBERED_REQUESTS:
            self._described.popitem(last=False)
        return request_id

    def _count_sent(self, data: bytes) -> None:
        self._counters.multicasts_sent += 1
        self._counters.payload_bytes_sent += len(data)

    async def replicate(
        self,
        path: str | os.PathLike[str],
        to: str | Sequence[str] = "all",
        *,
        rate: float | None = None,
        dest: str | None = None,
        strategy: str = "fastreplica",
        variant: str = "k+1",
        tree: str = "chain",
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        capacity_aware: bool = False,
        buddy: str | None = None,
    ) -> Replication:
        """Replicate the file at `path` on the daemon's host to other daemons (protocol
        version 5); return its `Replication` handle once the request is sent.

        `path` is resolved against this process's working directory (the client and its
        daemon share the machine). `to`: ``"all"`` (every other daemon of the view),
        ``"group:G"`` (the daemons hosting members of group G), daemon names as a list or
        ``"D2,D3"``. `rate`: bytes/s each sender may use (None: the daemons' own caps).
        `dest`: the directory of the copies on every recipient (None: its default, under
        its data directory). `strategy`: ``fastreplica``, ``fanout`` or ``alm_tree``;
        `variant`: ``k``, ``k+1`` or ``k+2``; `tree`: ``chain`` or ``balanced``;
        `max_connections`: the concurrency k is planned from (1..255); `capacity_aware`:
        size subfiles to the senders' upload capacities. `buddy` (protocol version 6): the
        name of a daemon of the view holding the same file, which repairs failures in the
        origin's place; it is left out of ``"all"`` and ``"group:G"``, and may not be named
        among the recipients. `handle.set_rate(r)` changes `rate` while it runs.

        Raises `UsageError` for bad arguments or a daemon older than version 5, and
        `ClientError` if the session is over. Any number may run at once on one client;
        the daemon refusing one is its final report (state ``failed``), raised by
        `Replication.wait` as `ReplicationFailed`.
        """
        self._check_usable()
        if self.version < REPLICATE_VERSION:
            raise UsageError(
                f"replicate needs protocol version {REPLICATE_VERSION}; the daemon at "
                f"{self._address} speaks version {self.version}"
            )
        absolute = absolute_path(path)
        options = replicate_options(
            to,
            rate=rate,
            dest=dest,
            strategy=strategy,
            variant=variant,
            tree=tree,
            max_connections=max_connections,
            capacity_aware=capacity_aware,
            buddy=buddy,
        )
        if buddy is not None and self.version < SET_RATE_VERSION:
            raise UsageError(
                f"a buddy needs protocol version {SET_RATE_VERSION}; the daemon at "
                f"{self._address} speaks version {self.version}"
            )
        token = self._next_request_id()
        while token in self._replications:  # after a wrap-around: skip the live ones
            token = self._next_request_id()
        frame = Replicate(
            absolute,
            options.targets,
            token,
            options.dest,
            options.rate,
            options.strategy,
            options.variant,
            options.tree,
            options.max_connections,
            options.capacity_aware,
            options.buddy if self.version >= SET_RATE_VERSION else None,
        )
        handle = Replication(token, absolute, options.targets, self.set_rate, self._timeout)
        self._replications[token] = handle
        try:
            await self._write(frame)
        except BaseException:
            self._replications.pop(token, None)
            raise
        return handle

    async def set_rate(self, rid: str | int, rate: float | None) -> None:
        """Change the upload cap of replication `rid` (16 hex digits, as reports and
        `meshcast status` give it), which this client's daemon originates — any client
        of it may — to `rate` bytes/s per sender (None: no cap beyond the daemons' own).
        SET_RATE, protocol version 6; returns once the daemon applied it and sent it to
        every recipient. Raises `UsageError` (bad arguments, an older daemon),
        `RequestRejected` with `.code` UNKNOWN_REPLICATION (none runs here: over, or
        never), NOT_THE_ORIGIN (this daemon only receives it) or BAD_RATE, and
        `ClientError` (no answer within the timeout, session over)."""
        self._check_usable()
        number = rid_value(rid)
        value = rate_value(rate)
        if self.version < SET_RATE_VERSION:
            raise UsageError(
                f"set_rate needs protocol version {SET_RATE_VERSION}; the daemon at "
                f"{self._address} speaks version {self.version}"
            )
        request_id = self._next_request_id()
        self._described[request_id] = f"SET_RATE of replication {number:016x}"
        answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirms[request_id] = answered
        try:
            await self._write(SetRate(number, value, request_id))
            async with asyncio.timeout(self._timeout):
                await answered
        except TimeoutError:
            raise ClientError(
                f"no answer from daemon at {self._address} to SET_RATE within {self._timeout} s"
            ) from None
        finally:
            self._confirms.pop(request_id, None)
            self._described.pop(request_id, None)

    @property
    def replications(self) -> tuple[Replication, ...]:
        """The replications started by this client that have no final report yet."""
        return tuple(self._replications.values())

    async def ping(self) -> float:
        """Round-trip time to the daemon in seconds (PING/PONG). `ClientError` on timeout."""
        self._check_usable()
        loop = asyncio.get_running_loop()
        nonce = next(self._nonces)
        pong: asyncio.Future[None] = loop.create_future()
        self._pings[nonce] = pong
        start = loop.time()
        try:
            await self._write(Ping(nonce))
            async with asyncio.timeout(self._timeout):
                await pong
        except TimeoutError:
            raise ClientError(
                f"no PONG from daemon at {self._address} within {self._timeout} s"
            ) from None
        finally:
            self._pings.pop(nonce, None)
        return loop.time() - start

    async def status(self) -> dict[str, Any]:
        """The daemon's status report (STATUS / STATUS_REPLY), parsed from its JSON.

        A dict with the daemon's identity and uptime, its overlay view (agreed or not),
        its links, the tree of its own source, the groups of the replicated membership
        table with their members (bounded; ``truncated`` says when lists were cut), the
        session count and counters; the keys are in docs/client-protocol.md, "Status reports".
        Raises `RequestRejected` (INTERNAL_ERROR) or `ClientError` (session over, no
        answer within the timeout, a daemon that does not know STATUS).
        """
        self._check_usable()
        request_id = self._next_request_id()
        reply: asyncio.Future[StatusReply] = asyncio.get_running_loop().create_future()
        self._reports[request_id] = reply
        try:
            await self._write(StatusRequest(request_id))
            async with asyncio.timeout(self._timeout):
                report = await reply
        except TimeoutError:
            raise ClientError(
                f"no answer from daemon at {self._address} to STATUS within {self._timeout} s"
            ) from None
        finally:
            self._reports.pop(request_id, None)
        parsed = json.loads(report.report)  # the decoder checked: one JSON object
        assert isinstance(parsed, dict)
        return parsed

    # ------------------------------------------------------------ events

    async def receive(self) -> Event:
        """The next event, waiting for one.

        Raises `UsageError` once the client is closed, `RequestRejected` for a rejected
        MULTICAST, and `ClientError` once the session ended (after every event queued
        before the end has been received).
        """
        while True:
            event = self.receive_nowait()
            if event is not None:
                return event
            self._readable.clear()
            await self._readable.wait()

    def receive_nowait(self) -> Event | None:
        """The next queued event, or None if there is none yet (same errors as `receive`)."""
        if self._closed:
            raise UsageError(f"client {self.private_name} is closed")
        self._raise_deferred()
        if self._events:
            event = self._events.popleft()
            self._room.set()
            return event
        if self._failure is not None:
            raise ClientError(str(self._failure), self._failure.code)
        return None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        """Events until `close()` is called; a session ended by the daemon raises."""
        if self._closed:
            raise StopAsyncIteration
        try:
            return await self.receive()
        except UsageError:
            if self._closed:  # closed while waiting
                raise StopAsyncIteration from None
            raise

    # ------------------------------------------------------------ closing

    async def close(self) -> None:
        """End the session: GOODBYE, then wait (at most the timeout) for the daemon's.

        Events not yet received are discarded. After the daemon's GOODBYE each request
        either took effect or was rejected: an unreported rejection is raised here as
        `RequestRejected`, after the connection is closed. Calling it again does nothing.
        """
        if self._closed:
            return
        self._closed = True
        self._counters.events_discarded += len(self._events)
        self._events.clear()
        self._room.set()  # a reader blocked on a full queue goes on (and discards)
        self._readable.set()
        try:
            if not self._ended.is_set():
                async with asyncio.timeout(self._timeout):
                    await self._write_raw(encode(Goodbye()))
                    await self._ended.wait()
        except TimeoutError:
            log.warning(
                "no GOODBYE from daemon at %s within %s s; closing anyway",
                self._address,
                self._timeout,
            )
        except ClientError as exc:
            log.debug("closing %s: %s", self.private_name, exc)
        finally:
            await self._shutdown()
        self._raise_deferred()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.close()
            return
        try:  # an exception is on its way out: it wins over a late rejection
            await self.close()
        except ClientError as late:
            log.warning("while closing %s after an error: %s", self.private_name, late)

    async def _shutdown(self) -> None:
        """Stop the reader, close the socket and fail whatever still waits."""
        self._reader_task.cancel()
        await asyncio.wait([self._reader_task])
        self._writer.close()
        try:
            async with asyncio.timeout(self._timeout):
                await self._writer.wait_closed()
        except (OSError, TimeoutError) as exc:
            log.debug("closing the socket to %s: %r", self._address, exc)
        self._fail_waiters(UsageError(f"client {self.private_name} is closed"))

    # ------------------------------------------------------------ internals

    def _next_request_id(self) -> int:
        request_id = next(self._ids)
        if request_id > U32_MAX:  # wrap around; 0 means "not tracked"
            self._ids = itertools.count(2)
            request_id = 1
        return request_id

    def _check_usable(self) -> None:
        """Raise what a request must raise before it does anything."""
        if self._closed:
            raise UsageError(f"client {self.private_name} is closed")
        self._raise_deferred()
        if self._failure is not None:
            raise ClientError(str(self._failure), self._failure.code)

    def _raise_deferred(self) -> None:
        if self._deferred:
            raise self._deferred.popleft()

    async def _request(
        self, frame: Join | Leave, kind: Literal["join", "leave"], group: str
    ) -> Membership:
        future: asyncio.Future[Membership] = asyncio.get_running_loop().create_future()
        self._waiters[frame.request_id] = _Waiter(kind, group, future)
        try:
            await self._write(frame)
            async with asyncio.timeout(self._timeout):
                return await future
        except TimeoutError:
            hint = (
                f"; the receive queue is full ({len(self._events)} events unread)"
                if len(self._events) >= self._queue_size
                else ""
            )
            raise ClientError(
                f"no answer from daemon at {self._address} to {kind.upper()} {group!r} "
                f"within {self._timeout} s{hint}"
            ) from None
        finally:
            self._waiters.pop(frame.request_id, None)

    async def _write(self, frame: Frame) -> None:
        try:
            data = encode(frame)
        except ValueError as exc:  # the checks above should have caught it
            raise UsageError(str(exc)) from None
        self._check_usable()
        await self._write_raw(data)

    async def _write_raw(self, data: bytes) -> None:
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (OSError, RuntimeError) as exc:  # RuntimeError: transport already closed
            failure = ClientError(f"connection to daemon at {self._address} lost: {exc}")
            self._end(failure)
            raise ClientError(str(failure)) from exc

    def _end(self, failure: ClientError | None) -> None:
        """The session is over (`failure` None: by the GOODBYE handshake)."""
        if failure is not None and self._failure is None and not self._closed:
            self._failure = failure
        self._ended.set()
        self._readable.set()
        self._fail_waiters(failure or ClientError(f"daemon at {self._address} said GOODBYE"))

    def _fail_waiters(self, error: Exception) -> None:
        for waiter in self._waiters.values():
            if not waiter.future.done():
                waiter.future.set_exception(error)
        for pong in self._pings.values():
            if not pong.done():
                pong.set_exception(error)
        for reply in self._reports.values():
            if not reply.done():
                reply.set_exception(error)
        for replication in self._replications.values():
            replication._fail(
                ClientError(
                    f"{error} (no final report of the replication of {replication.path!r}: "
                    "the daemons may still be copying it)",
                    getattr(error, "code", 0),
                )
            )
        self._replications.clear()
        for confirmed in self._confirms.values():
            if not confirmed.done():
                confirmed.set_exception(
                    ClientError(
                        f"{error} (a message sent with confirm=True was not confirmed: "
                        "it may or may not be delivered)",
                        getattr(error, "code", 0),
                    )
                )

    async def _read_loop(self) -> None:
        try:
            while await self._take_frames():
                chunk = await self._reader.read(READ_CHUNK)
                if not chunk:
                    self._decoder.end_of_stream()
                    self._end(ClientError(f"daemon at {self._address} closed the connection"))
                    return
                self._decoder.feed(chunk)
        except DecodeError as exc:
            self._end(
                ClientError(
                    f"malformed frame from daemon at {self._address}: {exc}",
                    ErrorCode.BAD_FRAME,
                )
            )
        except OSError as exc:
            self._end(ClientError(f"connection to daemon at {self._address} lost: {exc}"))
        finally:
            if self._failure is not None:
                self._writer.close()
            self._ended.set()

    async def _take_frames(self) -> bool:
        """Handle the frames decoded so far; False once the session is over."""
        events, queue_size = self._events, self._queue_size
        queued = False  # messages queued without `_enqueue`: wake `receive` once for all
        for frame in self._decoder:
            if isinstance(frame, Message):  # most frames: queued at once while there is room
                self._counters.messages_received += 1
                if len(events) < queue_size and not self._closed:
                    events.append(frame)
                    queued = True
                    continue
                self._readable.set()  # full: the reader must drain it before we go on
                await self._enqueue(frame)
                continue
            match frame:
                case Membership():
                    self._counters.memberships_received += 1
                    self._on_membership(frame)
                    await self._enqueue(frame)
                case BlobHeld():
                    self._counters.blob_events_received += 1
                    await self._enqueue(frame)
                case ErrorReport():
                    if not self._on_error(frame):
                        return False
                case StatusReply(request_id=request_id):
                    reply = self._reports.get(request_id)
                    if reply is not None and not reply.done():
                        reply.set_result(frame)
                case Confirmed(request_id=request_id):
                    confirmed = self._confirms.get(request_id)
                    if confirmed is not None and not confirmed.done():
                        confirmed.set_result(None)
                case ReplicationFrame():
                    self._on_replication(frame)
                case Ping(nonce):
                    self._writer.write(encode(Pong(nonce)))
                case Pong(nonce):
                    pong = self._pings.get(nonce)
                    if pong is not None and not pong.done():
                        pong.set_result(None)
                case Goodbye():
                    self._end(
                        None
                        if self._closed
                        else ClientError(f"daemon at {self._address} sent GOODBYE unasked")
                    )
                    return False
                case _:
                    raise DecodeError(f"unexpected {type(frame).__name__} after the handshake")
        if queued:
            self._readable.set()
        return True

    def _on_replication(self, frame: ReplicationFrame) -> None:
        handle = self._replications.get(frame.token)
        if handle is None:  # a late frame of a replication this client gave up on
            log.debug("REPLICATION for unknown token %d from %s", frame.token, self._address)
            return
        try:
            report = parse_report(frame.report, frame.final)
        except ValueError as exc:  # the decoder checked it: cannot happen
            raise DecodeError(f"REPLICATION frame: {exc}") from None
        if frame.final:
            del self._replications[frame.token]
        handle._report(report)

    def _on_membership(self, view: Membership) -> None:
        if view.who != (self.private_name,) or view.cause not in (Cause.JOIN, Cause.LEAVE):
            return
        kind: Literal["join", "leave"] = "join" if view.cause == Cause.JOIN else "leave"
        if kind == "join":
            self._groups.add(view.group)
        else:
            self._groups.discard(view.group)
        for waiter in self._waiters.values():
            if waiter.kind == kind and waiter.group == view.group and not waiter.future.done():
                waiter.future.set_result(view)
                break

    def _on_error(self, report: ErrorReport) -> bool:
        """Route an ERROR; False if it ends the session."""
        code = report.code
        if code.ends_session:
            self._end(
                ClientError(
                    f"daemon at {self._address} ended the session: "
                    f"{code.name} ({code.value}): {report.text}",
                    code,
                )
            )
            return False
        if code >= 300:
            self._counters.notices += 1
            log.warning("daemon at %s: %s: %s", self._address, code.name, report.text)
            return True
        self._counters.requests_rejected += 1
        waiter = self._waiters.get(report.request_id)
        status = self._reports.get(report.request_id)
        confirmed = self._confirms.get(report.request_id)
        # a daemon answers a REPLICATE with REPLICATION frames only; an ERROR about one
        # (e.g. BUSY) still settles it, so no handle waits forever
        replication = self._replications.pop(report.request_id, None)
        what = (
            f"{waiter.kind.upper()} {waiter.group!r}"
            if waiter is not None
            else "STATUS"
            if status is not None
            else f"REPLICATE of {replication.path!r}"
            if replication is not None
            else self._described.pop(report.request_id, f"request {report.request_id}")
        )
        error = _rejection(
            f"daemon at {self._address} rejected {what}: {code.name} ({code.value}): {report.text}",
            code,
            report.request_id,
        )
        if waiter is not None and not waiter.future.done():
            waiter.future.set_exception(error)
        elif status is not None and not status.done():
            status.set_exception(error)
        elif confirmed is not None and not confirmed.done():
            confirmed.set_exception(error)
        elif replication is not None:
            replication._fail(error)
        elif len(self._deferred) < MAX_DEFERRED_ERRORS:
            self._deferred.append(error)
            self._readable.set()  # a `receive` already waiting raises it now
        else:
            self._counters.deferred_errors_lost += 1
            log.warning("%s (not reported: too many unreported rejections)", error)
        return True

    async def _enqueue(self, event: Event) -> None:
        while len(self._events) >= self._queue_size and not self._closed:
            self._room.clear()
            await self._room.wait()
        if self._closed:
            self._counters.events_discarded += 1
            return
        self._events.append(event)
        self._readable.set()


# ---------------------------------------------------------------- connecting


async def connect(
    address: str,
    *,
    name: str = "",
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - also bounds later requests and close
    policy: SlowReceiverPolicy | str = SlowReceiverPolicy.BLOCK,
    membership: bool = True,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    token: str | None = None,
) -> Client:
    """Connect to the daemon at `address` and do the handshake.

    `address`: ``unix:/path``, ``tcp:host:port`` or a bare path (Unix socket). `name`:
    the client name wanted (1..32 bytes, no '#', whitespace or control characters), or
    "" to let the daemon pick. `timeout` bounds connecting plus the handshake, and later
    each join, leave, ping and close. `policy` is the default slow-receiver policy of
    joins. `membership`: deliver every MEMBERSHIP of our groups (else only those that
    answer our own JOIN and LEAVE). `queue_size` bounds the events not yet received.
    `token`: the access token (the SECRET of a token file line) to present in HELLO
    (protocol version 3); needed on a TCP port open beyond loopback. It travels in clear
    text: outside one machine, use it over a trusted network or a tunnel.

    Raises `UsageError` for bad arguments, `ClientError` if the daemon cannot be reached
    or does not answer in time (the message names the address), `Unauthenticated` if
    the daemon refuses the token (or needs one), and `ClientError` with the daemon's
    `.code` if it refuses otherwise (e.g. NAME_IN_USE, UNSUPPORTED_VERSION).
    """
    where = parse_address(address)
    try:
        check_client_name(name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if token is not None:
        try:
            check_token(token)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    limit = _check_timeout(timeout)
    chosen = _policy(policy)
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
        raise UsageError(f"queue_size must be a positive int, got {queue_size!r}")
    try:
        async with asyncio.timeout(limit):
            if where.transport == "unix":
                reader, writer = await asyncio.open_unix_connection(where.path)
            else:
                reader, writer = await asyncio.open_connection(where.host, where.port)
    except TimeoutError:
        raise ClientError(
            f"cannot reach daemon at {where}: no connection within {limit} s"
        ) from None
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ClientError(f"cannot reach daemon at {where}: {reason}") from None
    flags = HelloFlag.MEMBERSHIP if membership else HelloFlag(0)
    try:
        async with asyncio.timeout(limit):
            hello = Hello(name, flags=flags, token=token)
            welcome, decoder = await _handshake(reader, writer, hello, where)
    except TimeoutError:
        writer.close()
        raise ClientError(f"daemon at {where} did not answer HELLO within {limit} s") from None
    except BaseException:
        writer.close()
        raise
    return Client(
        reader, writer, welcome, decoder, where, timeout=limit, policy=chosen, queue_size=queue_size
    )


async def _handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hello: Hello, where: Address
) -> tuple[Welcome, FrameDecoder]:
    """Send HELLO, wait for WELCOME. Frames after the WELCOME stay in the decoder."""
    decoder = FrameDecoder(accept=FROM_DAEMON)
    try:
        writer.write(encode(hello))
        await writer.drain()
        while True:
            try:
                frame = decoder.next_frame()
            except DecodeError as exc:
                raise ClientError(
                    f"malformed handshake reply from daemon at {where}: {exc}",
                    ErrorCode.BAD_FRAME,
                ) from None
            if frame is not None:
                break
            chunk = await reader.read(READ_CHUNK)
            if not chunk:
                raise ClientError(f"daemon at {where} closed the connection during the handshake")
            decoder.feed(chunk)
    except OSError as exc:
        raise ClientError(f"connection to daemon at {where} lost in the handshake: {exc}") from None
    match frame:
        case Welcome(version=version) if MIN_VERSION <= version <= VERSION:
            decoder.max_frame_size = frame.limits.max_frame_size
            return frame, decoder
        case Welcome(version=version):
            raise ClientError(
                f"daemon at {where} chose protocol version {version}, "
                f"outside this client's {MIN_VERSION}..{VERSION}",
                ErrorCode.UNSUPPORTED_VERSION,
            )
        case ErrorReport(code=code, text=text):
            kind = Unauthenticated if code == ErrorCode.UNAUTHENTICATED else ClientError
            raise kind(
                f"daemon at {where} refused the connection: {code.name} ({code.value}): {text}",
                code,
            )
    raise ClientError(
        f"daemon at {where} answered HELLO with {type(frame).__name__}",
        ErrorCode.UNEXPECTED_FRAME,
    )
