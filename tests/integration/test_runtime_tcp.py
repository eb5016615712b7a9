"""The real TCP link (meshcast.runtime.tcp) on loopback."""

from __future__ import annotations

import asyncio
import struct

import pytest

from meshcast.errors import DecodeError, UsageError
from meshcast.ids import NodeId
from meshcast.link import LinkEffect, LinkEstablished, LinkFailed
from meshcast.runtime.tcp import FrameDecoder, TcpLinkDriver, encode_frame

from .runtime_helpers import A, B, Received

C = NodeId(3)


def test_frame_decoder_reassembles_frames_split_anywhere() -> None:
    frames = [b"", b"a", bytes(range(256)) * 40]
    stream = b"".join(encode_frame(frame) for frame in frames)
    decoder = FrameDecoder(1 << 20)
    out: list[bytes] = []
    for i in range(0, len(stream), 7):
        out.extend(decoder.feed(stream[i : i + 7]))
    assert out == frames
    assert decoder.buffered_bytes == 0
    with pytest.raises(DecodeError):
        FrameDecoder(10).feed(struct.pack("!I", 11))


@pytest.mark.asyncio
async def test_two_tcp_drivers_exchange_messages_both_ways() -> None:
    got_a, got_b = Received(), Received()
    events: list[LinkEffect] = []
    async with (
        TcpLinkDriver.open(A, on_delivered=got_a, on_event=events.append) as a,
        TcpLinkDriver.open(B, on_delivered=got_b) as b,
    ):
        a.add_peer(B, b.local_address)
        b.add_peer(A, a.local_address)
        await a.wait_established(B, timeout=10)
        to_b = [i.to_bytes(3, "big") * (i % 500) for i in range(3000)]
        for payload in to_b:
            await a.send(B, payload)
        await b.send(A, b"reply")
        await got_b.wait_count(len(to_b), timeout=30)
        await got_a.wait_count(1, timeout=10)
        assert got_b.payloads() == to_b
        assert got_a.payloads() == [b"reply"]
        stats = a.statistics()
        assert stats.links[B].messages_sent == len(to_b)
        assert b.statistics().links[A].messages_delivered == len(to_b)
    assert events[0] == LinkEstablished(B)
    assert isinstance(events[-1], LinkFailed)


@pytest.mark.asyncio
async def test_tcp_driver_refuses_strangers_and_keeps_serving() -> None:
    got = Received()
    async with TcpLinkDriver.open(B, on_delivered=got) as b, TcpLinkDriver.open(A) as a:
        b.add_peer(A, a.local_address)
        a.add_peer(B, b.local_address)
        host, port = b.local_address
        strangers = [
            encode_frame(b"HTTP/1.1"),  # bad hello
            encode_frame(b"MCT1" + struct.pack("!I", 99)),  # unknown node
            struct.pack("!I", 1 << 30),  # absurd frame length
        ]
        for greeting in strangers:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(greeting)
            await writer.drain()
            async with asyncio.timeout(10):
                await reader.read()  # the driver hangs up
            writer.close()
            await writer.wait_closed()
        await a.send(B, b"hello")
        await got.wait_count(1, timeout=10)
        stats = b.statistics()
        assert stats.malformed_dropped == 2
        assert stats.foreign_dropped == 1
        assert stats.internal_errors == 0
        with pytest.raises(UsageError):
            await a.send(C, b"nobody")
