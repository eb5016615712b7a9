"""A blocking wrapper around the asyncio client, for scripts.

`connect()` starts a private event loop in one background thread (a daemon thread named
``meshcast-client``) and opens an asyncio `Client` on it. Every method of
`BlockingClient` submits the matching coroutine to that loop and waits for its result,
so the reader keeps reading the socket (answering PINGs, queueing events) between calls.
`close()` ends the session and then stops and joins the thread. Each `BlockingClient`
has its own loop and thread; one instance may be shared by threads, calls are serialised
by the loop. Do not call it from inside that loop (e.g. from a callback of the client).

Errors are those of the asyncio client (`UsageError`, `ClientError`, `RequestRejected`);
`receive(timeout=...)` raises `TimeoutError` when nothing arrives in time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from meshcast.client.connection import (
    DEFAULT_QUEUE_SIZE,
    DEFAULT_TIMEOUT,
    Client,
    ClientStatistics,
    Event,
)
from meshcast.client.connection import connect as connect_async
from meshcast.client.replication import DEFAULT_MAX_CONNECTIONS, Replication, ReplicationReport
from meshcast.errors import UsageError
from meshcast.wire.client import DaemonLimits, Membership, ServiceLevel, SlowReceiverPolicy

T = TypeVar("T")

log = logging.getLogger(__name__)

_THREAD_JOIN_TIMEOUT = 10.0  # seconds to wait for the loop thread after close


class _LoopThread:
    """A private event loop running forever in one daemon thread."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="meshcast-client", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def call(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run the coroutine `make()` on the loop and wait for it; an interrupt cancels it."""
        if self.stopped:
            raise UsageError("the client is closed (its event loop has stopped)")
        future = asyncio.run_coroutine_threadsafe(make(), self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    @property
    def stopped(self) -> bool:
        return self._loop.is_closed() or not self._thread.is_alive()

    def stop(self) -> None:
        """Stop the loop, join the thread and close the loop (idempotent)."""
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(_THREAD_JOIN_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()


async def _within(seconds: float | None, coro: Coroutine[Any, Any, T]) -> T:
    async with asyncio.timeout(seconds):
        return await coro


class BlockingClient:
    """The blocking twin of `Client`; create it with `meshcast.client.blocking.connect`."""

    def __init__(self, runner: _LoopThread, client: Client) -> None:
        """Internal: use `connect()`."""
        self._runner = runner
        self._client = client

    @property
    def private_name(self) -> str:
        return self._client.private_name

    @property
    def name(self) -> str:
        return self._client.name

    @property
    def limits(self) -> DaemonLimits:
        return self._client.limits

    @property
    def version(self) -> int:
        return self._client.version

    @property
    def address(self) -> str:
        return self._client.address

    @property
    def groups(self) -> frozenset[str]:
        return self._client.groups

    @property
    def closed(self) -> bool:
        return self._client.closed

    def statistics(self) -> ClientStatistics:
        return self._client.statistics()

    def join(self, group: str, *, policy: SlowReceiverPolicy | str | None = None) -> Membership:
        return self._runner.call(lambda: self._client.join(group, policy=policy))

    def leave(self, group: str) -> Membership:
        return self._runner.call(lambda: self._client.leave(group))

    def multicast(
        self,
        groups: str | Sequence[str],
        payload: bytes | bytearray | memoryview,
        *,
        service: ServiceLevel | int | str = ServiceLevel.RELIABLE,
        msg_type: int = 0,
        confirm: bool = False,
        timeout: float | None = None,
    ) -> int:
        """See `Client.multicast`: with ``confirm=True``, returns once the daemon has
        delivered the message in its view, or raises within `timeout`."""
        return self._runner.call(
            lambda: self._client.multicast(
                groups,
                payload,
                service=service,
                msg_type=msg_type,
                confirm=confirm,
                timeout=timeout,
            )
        )

    def ping(self) -> float:
        return self._runner.call(lambda: self._client.ping())

    def replicate(
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
    ) -> BlockingReplication:
        """See `Client.replicate`; the handle's `wait` and iteration block."""
        handle = self._runner.call(
            lambda: self._client.replicate(
                path,
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
        )
        return BlockingReplication(self._runner, handle)

    def set_rate(self, rid: str | int, rate: float | None) -> None:
        """See `Client.set_rate`."""
        self._runner.call(lambda: self._client.set_rate(rid, rate))

    def status(self) -> dict[str, Any]:
        """The daemon's status report (see `Client.status`)."""
        return self._runner.call(lambda: self._client.status())

    def receive(self, timeout: float | None = None) -> Event:
        """The next event; `TimeoutError` if none arrives within `timeout` seconds."""
        return self._runner.call(lambda: _within(timeout, self._client.receive()))

    def receive_nowait(self) -> Event | None:
        return self._runner.call(self._receive_nowait)

    async def _receive_nowait(self) -> Event | None:
        return self._client.receive_nowait()

    def close(self) -> None:
        """GOODBYE handshake (bounded by the client's timeout), then stop the loop thread."""
        try:
            if not self._runner.stopped:
                self._runner.call(lambda: self._client.close())
        finally:
            self._runner.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as late:  # the exception on its way out wins
            log.warning("while closing %s after an error: %s", self.private_name, late)

    def __iter__(self) -> Iterator[Event]:
        """Events until the client is closed (a session ended by the daemon raises)."""
        while True:
            try:
                yield self.receive()
            except UsageError:
                if self._client.closed:
                    return
                raise

    def __repr__(self) -> str:
        return f"<BlockingClient {self._client!r}>"


class BlockingReplication:
    """The blocking twin of `Replication` (from `BlockingClient.replicate`)."""

    def __init__(self, runner: _LoopThread, handle: Replication) -> None:
        self._runner = runner
        self._handle = handle

    @property
    def token(self) -> int:
        return self._handle.token

    @property
    def latest(self) -> ReplicationReport | None:
        return self._handle.latest

    @property
    def done(self) -> bool:
        return self._handle.done

    @property
    def rid(self) -> str | None:
        return self._handle.rid

    def set_rate(self, rate: float | None) -> None:
        """See `Replication.set_rate`: bytes/s per sender, None for no cap."""
        self._runner.call(lambda: self._handle.set_rate(rate))

    def wait(self, timeout: float | None = None) -> ReplicationReport:
        """The final report (see `Replication.wait`); `TimeoutError` after `timeout` s."""
        return self._runner.call(lambda: _within(timeout, self._handle.wait()))

    def next_report(self, timeout: float | None = None) -> ReplicationReport | None:
        """The next report, None after the final one; `TimeoutError` after `timeout` s."""
        return self._runner.call(lambda: _within(timeout, self._handle.next_report()))

    def __iter__(self) -> Iterator[ReplicationReport]:
        """Reports up to and including the final one."""
        while (report := self.next_report()) is not None:
            yield report

    def __repr__(self) -> str:
        return f"<BlockingReplication {self._handle!r}>"


def connect(
    address: str,
    *,
    name: str = "",
    timeout: float = DEFAULT_TIMEOUT,
    policy: SlowReceiverPolicy | str = SlowReceiverPolicy.BLOCK,
    membership: bool = True,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    token: str | None = None,
) -> BlockingClient:
    """Blocking `meshcast.connect`: same arguments, same errors."""
    runner = _LoopThread()
    try:
        client = runner.call(
            lambda: connect_async(
                address,
                name=name,
                timeout=timeout,
                policy=policy,
                membership=membership,
                queue_size=queue_size,
                token=token,
            )
        )
    except BaseException:
        runner.stop()
        raise
    return BlockingClient(runner, client)


__all__ = ["BlockingClient", "BlockingReplication", "connect"]
