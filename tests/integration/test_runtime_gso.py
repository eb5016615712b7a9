"""UDP GSO (`runtime/gso.py`) on real loopback sockets, under asyncio and uvloop.

A run of datagrams sent with one `sendmsg` and ``UDP_SEGMENT`` must reach a plain UDP
socket as the separate datagrams it was made of, in order, byte for byte; whatever GSO
cannot carry (one datagram, unequal sizes, GSO off or refused, the transport holding
datagrams of its own) goes through the transport's `sendto`, in the same order.
"""

from __future__ import annotations

import asyncio
import importlib.util
import socket
from collections.abc import Awaitable, Callable, Iterator

import pytest

from meshcast.runtime.gso import (
    MAX_PAYLOAD,
    MAX_SEGMENTS,
    SegmentingSender,
    gso_supported,
    gso_wanted,
    run_end,
)
from meshcast.runtime.udp import open_udp_socket

pytestmark = pytest.mark.timeout(60)

LOOPS = ["asyncio"] + (["uvloop"] if importlib.util.find_spec("uvloop") else [])
_SO_NO_CHECK = 11  # <asm-generic/socket.h>: no UDP checksums, which GSO refuses (EINVAL)
RECEIVE_TIMEOUT = 5.0  # s: loopback delivers at once; this only bounds a failing test


def _gso_available() -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        return gso_supported(probe)


needs_gso = pytest.mark.skipif(not _gso_available(), reason="the kernel offers no UDP GSO")


def run_on(loop_name: str, main: Callable[[], Awaitable[None]]) -> None:
    if loop_name == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())  # type: ignore[arg-type]
    else:
        with asyncio.Runner() as runner:
            runner.run(main())  # type: ignore[arg-type]


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(RECEIVE_TIMEOUT)
    yield sock
    sock.close()


def receive(sock: socket.socket, count: int) -> list[bytes]:
    return [sock.recv(70_000) for _ in range(count)]


def datagrams(*sizes: int) -> list[bytes]:
    """Distinct contents, so a reordering or a merge shows."""
    return [bytes([index % 251]) * size for index, size in enumerate(sizes)]


async def send_through(
    batch: list[bytes],
    address: tuple[str, int],
    *,
    enabled: bool = True,
    no_checksums: bool = False,
    transport_holds: bool = False,
) -> SegmentingSender:
    """Send `batch` to `address` from a socket wrapped in a transport, as the daemon does."""
    loop = asyncio.get_running_loop()
    sock = open_udp_socket(("127.0.0.1", 0), 1024 * 1024)
    if no_checksums:
        sock.setsockopt(socket.SOL_SOCKET, _SO_NO_CHECK, 1)
    transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=sock)
    try:
        target: object = _Holding(transport) if transport_holds else transport
        sender = SegmentingSender(sock, target, enabled=enabled)  # type: ignore[arg-type]
        sender.send(batch, address)
        for _ in range(100):  # bounded: the transport sends what it queued
            if transport.get_write_buffer_size() == 0:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.01)
        return sender
    finally:
        transport.close()


class _Holding:
    """A transport that says it still holds datagrams: a run must queue behind them."""

    def __init__(self, transport: asyncio.DatagramTransport) -> None:
        self._transport = transport

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self._transport.sendto(data, addr)

    def get_write_buffer_size(self) -> int:
        return 1


# ---------------------------------------------------------------------- runs


def test_a_run_is_datagrams_of_one_size_and_may_end_shorter() -> None:
    sizes = [1400, 1400, 1400, 900, 1400, 30]
    batch = datagrams(*sizes)
    assert run_end(batch, 0) == 4  # the shorter 900 ends the first run
    assert run_end(batch, 4) == 6
    assert run_end(datagrams(30, 1400, 1400), 0) == 1  # a larger one cannot follow
    assert run_end(datagrams(1400, 1400, 2000), 0) == 2


def test_a_run_stays_within_the_kernels_limits() -> None:
    assert run_end(datagrams(*[100] * (MAX_SEGMENTS + 5)), 0) == MAX_SEGMENTS
    per_run = MAX_PAYLOAD // 30_000
    assert run_end(datagrams(30_000, 30_000, 30_000), 0) == per_run == 2
    assert run_end(datagrams(MAX_PAYLOAD, MAX_PAYLOAD), 0) == 1
    assert run_end(datagrams(0, 0), 0) == 1  # size 0 would mean "no segmentation"


def test_gso_can_be_turned_off_from_the_environment() -> None:
    assert gso_wanted({})
    assert gso_wanted({"MESHCAST_UDP_GSO": "1"})
    for off in ("0", "off", "no", "false", "OFF"):
        assert not gso_wanted({"MESHCAST_UDP_GSO": off})


# ---------------------------------------------------------------------- real sockets


@needs_gso
@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_run_arrives_as_separate_datagrams_in_order(
    loop_name: str, receiver: socket.socket
) -> None:
    batch = datagrams(*[1400] * 9, 700)

    async def main() -> None:
        sender = await send_through(batch, receiver.getsockname())
        assert (sender.gso_sends, sender.gso_datagrams) == (1, len(batch))

    run_on(loop_name, main)
    assert receive(receiver, len(batch)) == batch


@needs_gso
@pytest.mark.parametrize("loop_name", LOOPS)
def test_runs_longer_than_the_kernel_takes_are_split(
    loop_name: str, receiver: socket.socket
) -> None:
    batch = datagrams(*[1400] * (MAX_SEGMENTS + 6)) + datagrams(30_000, 30_000, 30_000)

    async def main() -> None:
        sender = await send_through(batch, receiver.getsockname())
        # 64 + 6 of 1,400 bytes; two of 30,000 (65,507 at most), the third alone
        assert (sender.gso_sends, sender.gso_datagrams) == (3, MAX_SEGMENTS + 6 + 2)

    run_on(loop_name, main)
    assert receive(receiver, len(batch)) == batch


@needs_gso
@pytest.mark.parametrize("loop_name", LOOPS)
def test_unequal_sizes_mix_runs_and_single_sends_in_order(
    loop_name: str, receiver: socket.socket
) -> None:
    batch = datagrams(100, 200, 200, 50, 30, 1400, 1400)

    async def main() -> None:
        sender = await send_through(batch, receiver.getsockname())
        assert (sender.gso_sends, sender.gso_datagrams) == (2, 5)  # 200, 200, 50; 1400, 1400

    run_on(loop_name, main)
    assert receive(receiver, len(batch)) == batch


@pytest.mark.parametrize("loop_name", LOOPS)
def test_with_gso_off_every_datagram_goes_through_the_transport(
    loop_name: str, receiver: socket.socket
) -> None:
    batch = datagrams(*[1400] * 10)

    async def main() -> None:
        sender = await send_through(batch, receiver.getsockname(), enabled=False)
        assert sender.gso_sends == 0

    run_on(loop_name, main)
    assert receive(receiver, len(batch)) == batch


@needs_gso
@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_refused_gso_send_falls_back_and_is_not_tried_again(
    loop_name: str, receiver: socket.socket
) -> None:
    # without UDP checksums the kernel refuses GSO (EINVAL) but sends plain datagrams
    batch = datagrams(*[1400] * 5) + datagrams(*[1000] * 5)

    async def main() -> None:
        sender = await send_through(batch, receiver.getsockname(), no_checksums=True)
        assert sender.gso_sends == 0

    run_on(loop_name, main)
    assert receive(receiver, len(batch)) == batch


@needs_gso
@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_run_queues_behind_what_the_transport_holds(
    loop_name: str, receiver: socket.socket
) -> None:
    batch = datagrams(*[1400] * 10)

    async def main() -> None:
        sender = await send_through(batch, receiver.getsockname(), transport_holds=True)
        assert sender.gso_sends == 0

    run_on(loop_name, main)
    assert receive(receiver, len(batch)) == batch


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
            return gso_supported(probe)
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback with UDP GSO")
@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_run_over_ipv6(loop_name: str) -> None:
    batch = datagrams(*[1400] * 6, 10)
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("::1", 0))
        receiver.settimeout(RECEIVE_TIMEOUT)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            sock = open_udp_socket(("::1", 0), 1024 * 1024)
            transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=sock)
            try:
                sender = SegmentingSender(sock, transport, enabled=True)
                sender.send(batch, receiver.getsockname()[:2])
                assert (sender.gso_sends, sender.gso_datagrams) == (1, len(batch))
            finally:
                transport.close()

        run_on(loop_name, main)
        assert receive(receiver, len(batch)) == batch
