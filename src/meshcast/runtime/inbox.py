"""A bounded queue of delivered messages for applications that pull instead of using a callback."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from meshcast.errors import UsageError
from meshcast.ids import NodeId


class Inbox:
    """FIFO of `(peer, payload)` with a soft bound: producers check `full` before reading more.

    `put` never refuses: what one input produced (the messages of one datagram, one read)
    must not be lost once the link has counted it delivered, so the bound can be overshot
    by at most one input's worth. Cheaper than `asyncio.Queue` on the hot path: no
    per-item future unless a reader waits.
    """

    __slots__ = ("_capacity", "_closed", "_items", "_readers", "_spaces")

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self._capacity = capacity
        self._items: deque[tuple[NodeId, bytes]] = deque()
        self._readers: deque[asyncio.Future[None]] = deque()
        self._spaces: deque[asyncio.Future[None]] = deque()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def full(self) -> bool:
        return len(self._items) >= self._capacity

    def put(self, peer: NodeId, payload: bytes) -> None:
        """Append one message (even past the bound: see the class docstring)."""
        self._items.append((peer, payload))
        if self._readers:
            _wake_one(self._readers)

    def get_nowait(self) -> tuple[NodeId, bytes] | None:
        if not self._items:
            return None
        item = self._items.popleft()
        if self._spaces:
            _wake_one(self._spaces)
        return item

    async def get(self) -> tuple[NodeId, bytes]:
        """Wait for the next message. Raises `UsageError` once closed and empty."""
        while not self._items:
            if self._closed:
                raise UsageError("the driver is closed")
            await _wait(self._readers)
        return self._items.popleft() if not self._spaces else self._pop_and_wake()

    async def wait_space(self) -> None:
        """Wait until at least one more message fits."""
        while len(self._items) >= self._capacity and not self._closed:
            await _wait(self._spaces)

    def close(self) -> None:
        """Wake every waiter; later `get` calls drain what is left, then raise."""
        self._closed = True
        for waiters in (self._readers, self._spaces):
            while waiters:
                _wake_one(waiters)

    def _pop_and_wake(self) -> tuple[NodeId, bytes]:
        item = self._items.popleft()
        _wake_one(self._spaces)
        return item


def _wake_one(waiters: deque[asyncio.Future[None]]) -> None:
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            return


async def _wait(waiters: deque[asyncio.Future[None]]) -> None:
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiters.append(waiter)
    try:
        await waiter
    except asyncio.CancelledError:
        if waiter.done() and not waiter.cancelled():
            _wake_one(waiters)  # we were woken but will not act: pass the wake-up on
        raise
    finally:
        if not waiter.done():
            waiter.cancel()


def hand_up(
    on_delivered: Callable[[NodeId, bytes], None] | None,
    inbox: Inbox | None,
    peer: NodeId,
    payload: bytes,
) -> bool:
    """Give one message to the application: its callback if it has one, else the inbox.

    False when the callback raised; the driver counts and logs that (its bulkhead).
    """
    if on_delivered is None:
        assert inbox is not None
        inbox.put(peer, payload)
        return True
    try:
        on_delivered(peer, payload)
    except Exception:
        return False
    return True
