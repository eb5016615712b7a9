"""Helpers of the runtime integration tests: pairs of in-process drivers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from meshcast.ids import NodeId
from meshcast.link import LinkConfig
from meshcast.runtime.impair import Impairment
from meshcast.runtime.udp import LinkFactory, UdpLinkDriver, hop_link_factory

A = NodeId(1)
B = NodeId(2)
LOOPBACK = ("127.0.0.1", 0)


@dataclass
class Received:
    """Deliveries of one driver, with a way to wait for a count."""

    messages: list[tuple[NodeId, bytes]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, peer: NodeId, payload: bytes) -> None:
        self.messages.append((peer, payload))
        self.changed.set()

    async def wait_count(self, count: int, timeout: float) -> None:  # noqa: ASYNC109 - bounded wait is the API
        async with asyncio.timeout(timeout):
            while len(self.messages) < count:
                self.changed.clear()
                await self.changed.wait()

    def payloads(self) -> list[bytes]:
        return [payload for _, payload in self.messages]


@asynccontextmanager
async def driver_pair(
    *,
    config: LinkConfig | None = None,
    impair_a: Impairment | None = None,
    impair_b: Impairment | None = None,
    factory_a: LinkFactory = hop_link_factory,
    on_a: Callable[[NodeId, bytes], None] | None = None,
) -> AsyncIterator[tuple[UdpLinkDriver, UdpLinkDriver, Received]]:
    """Drivers A and B linked to each other; B's deliveries are recorded."""
    received = Received()
    a = await UdpLinkDriver.open(
        A, config=config, impairment=impair_a, link_factory=factory_a, on_delivered=on_a
    )
    try:
        b = await UdpLinkDriver.open(B, config=config, impairment=impair_b, on_delivered=received)
        try:
            a.add_peer(B, b.local_address)
            b.add_peer(A, a.local_address)
            await a.wait_established(B, timeout=10)
            await b.wait_established(A, timeout=10)
            yield a, b, received
        finally:
            await b.aclose()
    finally:
        await a.aclose()
