"""The UDP driver on real loopback sockets, in one process (meshcast.runtime.udp)."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct

import pytest

from meshcast.errors import BufferFull, MessageTooLarge, UsageError
from meshcast.ids import NodeId
from meshcast.link import HopLink, Link, LinkConfig, LinkEffect, LinkStats
from meshcast.runtime.udp import UdpLinkDriver, parse_address
from meshcast.wire.packet import HEADER, MAGIC, VERSION, PacketType

from .runtime_helpers import LOOPBACK, A, B, Received, driver_pair

C = NodeId(3)


def _header(sender: int, ptype: PacketType = PacketType.DATA, seq: int = 1) -> bytes:
    return HEADER.pack(MAGIC, VERSION, int(ptype), 0, 0, 0, sender, 1234, seq)


@pytest.mark.asyncio
async def test_messages_cross_in_both_directions_in_order_and_intact() -> None:
    from_b: list[bytes] = []
    async with driver_pair(on_a=lambda _peer, payload: from_b.append(payload)) as (a, b, got):
        sent = [i.to_bytes(4, "big") * (1 + i % 700) for i in range(2000)]
        for payload in sent:
            await a.send(B, payload)
        await b.send(A, b"back")
        await got.wait_count(len(sent), timeout=30)
        await a.wait_flushed(B, timeout=30)
        assert got.payloads() == sent  # lossless loopback: even the order holds
        assert {peer for peer, _ in got.messages} == {A}
        stats = a.statistics()
        assert stats.links[B].messages_sent == len(sent)
        assert stats.internal_errors == 0
        for _ in range(100):
            if from_b:
                break
            await asyncio.sleep(0.01)
        assert from_b == [b"back"]


@pytest.mark.asyncio
async def test_receive_pulls_from_the_inbox_when_no_callback_is_given() -> None:
    a = await UdpLinkDriver.open(A)
    b = await UdpLinkDriver.open(B)
    try:
        a.add_peer(B, b.local_address)
        b.add_peer(A, a.local_address)
        await a.send(B, b"one")
        await a.send(B, b"two")
        async with asyncio.timeout(10):
            assert await b.receive() == (A, b"one")
            assert await b.receive() == (A, b"two")
        assert b.receive_nowait() is None
        with pytest.raises(UsageError):
            await a.wait_flushed(C)
    finally:
        await a.aclose()
        await b.aclose()
    with pytest.raises(UsageError):
        await b.receive()


@pytest.mark.asyncio
async def test_garbage_and_foreign_datagrams_are_counted_and_do_not_hurt() -> None:
    async with driver_pair() as (a, b, got):
        intruder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            intruder.bind(LOOPBACK)
            target = b.local_address
            malformed = [b"", b"x", bytes(23), b"GET / HTTP/1.1\r\n\r\n" * 3]
            for datagram in malformed:
                intruder.sendto(datagram, target)
            intruder.sendto(_header(99) + b"\x00\x00\x01z", target)  # unknown node
            intruder.sendto(_header(A) + b"\x00\x00\x01z", target)  # node A, wrong address
            rng = random.Random(7)
            for _ in range(500):
                intruder.sendto(rng.randbytes(rng.randrange(0, 1500)), target)
            await a.send(B, b"still alive")
            await got.wait_count(1, timeout=10)
        finally:
            intruder.close()
        stats = b.statistics()
        assert stats.malformed_dropped >= len(malformed) + 490
        assert stats.foreign_dropped >= 2
        assert stats.internal_errors == 0
        assert got.payloads() == [b"still alive"]


@pytest.mark.asyncio
async def test_malformed_datagrams_from_the_peers_own_address_are_counted_by_its_link() -> None:
    peer_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    driver = await UdpLinkDriver.open(B)
    try:
        peer_socket.bind(LOOPBACK)
        driver.add_peer(A, peer_socket.getsockname())
        rng = random.Random(11)
        bad = [
            _header(A, PacketType.DATA, seq=0),  # seq 0 is invalid for data
            _header(A) + b"\x07garbage",  # unknown fragment kind
            _header(A) + b"\x00\xff\xffshort",  # fragment runs past the end
            HEADER.pack(MAGIC, VERSION, 99, 0, 0, 0, A, 1, 1),  # unknown packet type
        ]
        bad += [_header(A) + rng.randbytes(rng.randrange(0, 200)) for _ in range(300)]
        for datagram in bad:
            peer_socket.sendto(datagram, driver.local_address)
        for _ in range(1000):
            if driver.statistics().datagrams_received >= len(bad):
                break
            await asyncio.sleep(0.01)
        stats = driver.statistics()
        link: LinkStats = stats.links[A]
        assert link.malformed_dropped >= 4
        assert link.messages_delivered == 0
        assert stats.internal_errors == 0
    finally:
        peer_socket.close()
        await driver.aclose()


class _ExplodingLink:
    """A Hop link that raises on every 3rd datagram: a stand-in for a state-machine bug."""

    def __init__(self, inner: HopLink) -> None:
        self._inner = inner
        self._count = 0
        self.peer = inner.peer

    @property
    def established(self) -> bool:
        return self._inner.established

    @property
    def failed(self) -> bool:
        return self._inner.failed

    def start(self, now: float) -> list[LinkEffect]:
        return self._inner.start(now)

    @property
    def queued_messages(self) -> int:
        return self._inner.queued_messages

    def can_send(self, size: int) -> bool:
        return self._inner.can_send(size)

    def send(self, payload: bytes, now: float, *, flush: bool = True) -> list[LinkEffect]:
        return self._inner.send(payload, now, flush=flush)

    def datagram_received(self, datagram: bytes, now: float) -> list[LinkEffect]:
        self._count += 1
        if self._count % 3 == 0:
            raise RuntimeError("simulated bug in a state machine")
        return self._inner.datagram_received(datagram, now)

    def on_timer(self, now: float) -> list[LinkEffect]:
        return self._inner.on_timer(now)

    def next_deadline(self) -> float | None:
        return self._inner.next_deadline()

    def statistics(self) -> LinkStats:
        return self._inner.statistics()


def _exploding(local: NodeId, peer: NodeId, config: LinkConfig, epoch: int) -> Link:
    return _ExplodingLink(HopLink(local, peer, config, epoch=epoch))


@pytest.mark.asyncio
async def test_a_raising_state_machine_is_contained_and_the_driver_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="meshcast.runtime.udp")
    from_b = Received()
    async with driver_pair(factory_a=_exploding, on_a=from_b) as (
        a,
        b,
        got,
    ):
        for i in range(300):
            await b.send(A, i.to_bytes(2, "big"))
            await a.send(B, i.to_bytes(2, "big"))
        await got.wait_count(300, timeout=30)
        await from_b.wait_count(300, timeout=30)
        assert a.statistics().internal_errors > 0
    assert sorted(from_b.payloads()) == sorted(i.to_bytes(2, "big") for i in range(300))
    assert "simulated bug in a state machine" in caplog.text  # logged with its traceback


@pytest.mark.asyncio
async def test_send_waits_for_room_and_gives_up_with_buffer_full() -> None:
    config = LinkConfig(max_message_size=2048, max_send_queue_bytes=4096)
    driver = await UdpLinkDriver.open(A, config=config)
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        silent.bind(LOOPBACK)
        driver.add_peer(B, silent.getsockname())  # never answers: nothing drains
        driver.send_nowait(B, bytes(2048))
        driver.send_nowait(B, bytes(2048))
        with pytest.raises(BufferFull):
            driver.send_nowait(B, bytes(1))
        with pytest.raises(BufferFull):
            await driver.send(B, bytes(1), timeout=0.2)
        with pytest.raises(MessageTooLarge):
            await driver.send(B, bytes(4096))
        with pytest.raises(UsageError):
            await driver.send(C, b"unknown peer")
    finally:
        silent.close()
        await driver.aclose()


@pytest.mark.asyncio
async def test_a_blocked_send_resumes_when_the_peer_drains_the_queue() -> None:
    config = LinkConfig(max_message_size=2048, max_send_queue_bytes=4096)
    async with driver_pair(config=config) as (a, _b, got):
        payloads = [bytes([i]) * 2048 for i in range(40)]  # 20x the queue
        for payload in payloads:
            await a.send(B, payload, timeout=10)
        await got.wait_count(len(payloads), timeout=20)
        assert got.payloads() == payloads


@pytest.mark.asyncio
async def test_driver_closes_cleanly_and_refuses_work_afterwards() -> None:
    driver = await UdpLinkDriver.open(A)
    other = await UdpLinkDriver.open(B)
    address = driver.local_address
    assert address[1] != 0
    driver.add_peer(B, other.local_address)  # B never adds A: no handshake completes
    waiting = asyncio.create_task(driver.wait_established(B))
    await asyncio.sleep(0.05)
    await driver.aclose()
    await other.aclose()
    with pytest.raises(UsageError):
        await waiting
    assert driver.closed
    with pytest.raises(UsageError):
        await driver.send(B, b"late")
    with pytest.raises(UsageError):
        driver.add_peer(C, address)
    assert driver.statistics().links[B].messages_sent == 0
    await driver.aclose()  # idempotent
    # The port is free again: the socket really is closed.
    again = await UdpLinkDriver.open(A, listen=address)
    await again.aclose()


def test_addresses_must_be_numeric_host_and_port() -> None:
    assert parse_address("127.0.0.1:9000") == ("127.0.0.1", 9000)
    assert parse_address("[::1]:53") == ("::1", 53)
    for text in ("localhost:9000", "127.0.0.1", "127.0.0.1:x", "1.2.3.4:70000"):
        with pytest.raises(UsageError):
            parse_address(text)


def test_header_prefix_used_for_routing_matches_the_wire_format() -> None:
    header = _header(0x01020304)
    assert header[:3] == struct.pack("!HB", MAGIC, VERSION)
    assert struct.unpack_from("!I", header, 8) == (0x01020304,)
