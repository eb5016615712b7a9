"""The socket side of a UDP driver: an `asyncio.DatagramProtocol` that only forwards.

STYLE.md keeps logic out of protocol subclasses: this one hands each socket event to a
callback of its driver (`UdpLinkDriver`, `OverlayDaemon`) and does nothing else.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

DatagramCallback = Callable[[bytes, tuple[str | int, ...]], None]
ErrorCallback = Callable[[Exception], None]
LostCallback = Callable[[Exception | None], None]


class DatagramForwarder(asyncio.DatagramProtocol):
    """Hands socket events to the driver's callbacks; deliberately no logic here."""

    def __init__(
        self, on_datagram: DatagramCallback, on_error: ErrorCallback, on_lost: LostCallback
    ) -> None:
        self._on_datagram = on_datagram
        self._on_error = on_error
        self._on_lost = on_lost

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        self._on_error(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost(exc)


async def open_endpoint(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    on_datagram: DatagramCallback,
    on_error: ErrorCallback,
    on_lost: LostCallback,
) -> tuple[asyncio.DatagramTransport, tuple[str, int]]:
    """Wrap a bound UDP socket in a transport whose events go to the callbacks.

    Returns the transport and the bound address; closes the socket if that fails.
    """
    try:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: DatagramForwarder(on_datagram, on_error, on_lost), sock=sock
        )
    except BaseException:
        sock.close()
        raise
    sockname = sock.getsockname()
    return transport, (sockname[0], sockname[1])
