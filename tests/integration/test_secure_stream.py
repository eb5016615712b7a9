"""Secure bulk streams (meshcast.runtime.secure_stream) over real TCP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

import meshcast
from meshcast.errors import StreamFailed, StreamTruncated, UsageError
from meshcast.ids import NodeId
from meshcast.runtime.secure_stream import (
    SecureStreamConnection,
    StreamServer,
    StreamServerStats,
    open_secure_stream,
    serve_secure_streams,
)
from meshcast.wire.keys import ClusterKey, KeyRing

pytestmark = [pytest.mark.timeout(180), pytest.mark.asyncio]

A = NodeId(1)
B = NodeId(2)
CURRENT = ClusterKey(bytes(range(32)))
NEXT = ClusterKey(bytes(range(50, 82)))
RING = KeyRing.of(CURRENT)
MIB = 1024 * 1024
WAIT = 30.0  # s: bound of any one wait


async def wait_for_stats(
    server: StreamServer, check: Callable[[StreamServerStats], bool]
) -> StreamServerStats:
    """Poll the server's counters (a snapshot: there is no event to wait on), bounded."""
    async with asyncio.timeout(WAIT):
        while not check(stats := server.statistics()):  # noqa: ASYNC110 - polling a counter snapshot
            await asyncio.sleep(0.01)
    return stats


async def send_until_failure(stream: SecureStreamConnection) -> None:
    for _ in range(1024):  # 1 GiB: far more than the socket buffers hold
        await stream.send(bytes(MIB))


async def digest_then_reply(stream: SecureStreamConnection) -> None:
    """Server side of the transfer tests: hash everything, answer with the digest."""
    digest = hashlib.blake2b()
    while (data := await stream.receive()) is not None:
        digest.update(data)
    await stream.send(digest.digest())


@contextlib.asynccontextmanager
async def server(
    on_stream: Callable[[SecureStreamConnection], Awaitable[None]] = digest_then_reply,
    ring: KeyRing = RING,
    max_pending: int = 64,
    handshake_timeout: float = 5.0,
) -> AsyncIterator[StreamServer]:
    async with serve_secure_streams(
        "127.0.0.1",
        0,
        B,
        ring,
        {A},
        on_stream,
        max_pending=max_pending,
        handshake_timeout=handshake_timeout,
    ) as srv:
        yield srv


async def transfer(address: tuple[str, int], size: int, chunk: int, ring: KeyRing = RING) -> str:
    """Send `size` pseudo-random bytes, return the server's digest check result."""
    rng = random.Random(size)
    expected = hashlib.blake2b()
    async with await open_secure_stream(*address, A, B, ring, timeout=WAIT) as stream:
        sent = 0
        while sent < size:
            data = rng.randbytes(min(chunk, size - sent))
            expected.update(data)
            await stream.send(data)
            sent += len(data)
        await stream.send_eof()
        with pytest.raises(UsageError):
            await stream.send(b"after eof")
        reply = await stream.receive()
        assert await stream.receive() is None  # the server's CLOSE: a clean end
        assert stream.statistics().bytes_sent == size
    return "match" if reply == expected.digest() else "MISMATCH"


async def test_64_mib_arrive_intact_in_order() -> None:
    async with server() as srv:
        assert await transfer(srv.address, 64 * MIB, 3 * MIB + 17) == "match"
        stats = await wait_for_stats(srv, lambda s: s.established == 1)
        assert stats.failed == {}
        assert stats.pending == 0


async def test_receive_all_hands_over_what_arrived_in_one_piece_in_order() -> None:
    """`receive_all` joins the records waiting (a reader that fell behind gets them in one
    call); the bytes and their order are those sent, and the end is still None."""
    got: list[bytes] = []

    async def collect(stream: SecureStreamConnection) -> None:
        await asyncio.sleep(0.2)  # let several records queue up
        while (data := await stream.receive_all()) is not None:
            got.append(data)

    async with server(collect) as srv:
        rng = random.Random(5)
        sent = [rng.randbytes(rng.randrange(1, 100_000)) for _ in range(12)]
        async with await open_secure_stream(*srv.address, A, B, RING, timeout=WAIT) as stream:
            for piece in sent:
                await stream.send(piece)
        await wait_for_stats(srv, lambda s: s.established == 1)
        async with asyncio.timeout(WAIT):
            while b"".join(got) != b"".join(sent):  # noqa: ASYNC110 - the handler appends
                await asyncio.sleep(0.01)
    assert len(got) < sum(-(-len(p) // (64 * 1024)) for p in sent)  # some were joined


async def test_wrong_key_and_unknown_daemon_are_refused_and_the_server_keeps_serving() -> None:
    async with server() as srv:
        with pytest.raises(StreamTruncated, match="during the handshake"):
            await open_secure_stream(*srv.address, A, B, KeyRing.of(NEXT), timeout=WAIT)
        with pytest.raises(StreamTruncated):  # right key, but daemon 9 is not allowed
            await open_secure_stream(*srv.address, NodeId(9), B, RING, timeout=WAIT)
        with pytest.raises(StreamTruncated):  # right key, but it is not daemon 3 there
            await open_secure_stream(*srv.address, A, NodeId(3), RING, timeout=WAIT)
        assert await transfer(srv.address, MIB, 64 * 1024) == "match"
        stats = await wait_for_stats(srv, lambda s: s.established == 1)
        assert stats.failed == {"unknown_key": 1, "unexpected_peer": 2}


async def test_key_rotation_over_tcp() -> None:
    async with server(ring=KeyRing.of(CURRENT)) as srv:
        # A rolled the next key first: its offers name both, B answers under the current one
        stream = await open_secure_stream(*srv.address, A, B, KeyRing.of(CURRENT, NEXT))
        assert stream.key_fingerprint == CURRENT.fingerprint
        await stream.aclose()
        srv.set_ring(KeyRing.of(CURRENT, NEXT))  # B rolled (SIGHUP): new streams use NEXT
        stream = await open_secure_stream(*srv.address, A, B, KeyRing.of(CURRENT, NEXT))
        assert stream.key_fingerprint == NEXT.fingerprint
        await stream.aclose()
        assert await transfer(srv.address, MIB, MIB, KeyRing.of(NEXT)) == "match"


async def test_idle_connections_are_bounded_and_timed_out_while_good_streams_get_in() -> None:
    max_pending, timeout = 16, 2.0
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    async with server(max_pending=max_pending, handshake_timeout=timeout) as srv:
        try:
            idle += [await asyncio.open_connection(*srv.address) for _ in range(200)]
            stats = await wait_for_stats(srv, lambda s: s.accepted == 200)
            # At most max_pending wait; the others were closed to make room (or, on a very
            # slow machine, timed out already).
            assert stats.pending <= max_pending
            assert stats.evicted >= 200 - max_pending
            assert stats.evicted + stats.timed_out + stats.pending == 200
            # A real daemon gets in at once: it takes the oldest idle connection's place.
            assert await transfer(srv.address, MIB, MIB) == "match"
            # Every idle connection is closed by the server: evicted, or after the timeout.
            async with asyncio.timeout(WAIT):
                for reader, _ in idle:
                    with contextlib.suppress(ConnectionError):
                        assert await reader.read(100) == b""
            stats = await wait_for_stats(srv, lambda s: s.pending == 0)
            assert stats.accepted == 201
            assert stats.established == 1
            assert stats.timed_out >= 1  # the idle ones nobody evicted
            assert stats.evicted + stats.timed_out == 200
            assert stats.failed == {}
            assert await transfer(srv.address, MIB, MIB) == "match"
        finally:
            for _, writer in idle:
                writer.close()


async def test_garbage_is_refused_at_once() -> None:
    async with server(handshake_timeout=WAIT) as srv:
        reader, writer = await asyncio.open_connection(*srv.address)
        writer.write(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n" + bytes(MIB))
        async with asyncio.timeout(WAIT):  # long before the handshake timeout
            with contextlib.suppress(ConnectionError):
                assert await reader.read(100) == b""
        writer.close()
        stats = await wait_for_stats(srv, lambda s: sum(s.failed.values()) == 1)
        assert stats.failed == {"malformed": 1}
        assert stats.timed_out == 0


SENDER = """
import asyncio, sys
from meshcast.runtime.secure_stream import open_secure_stream
from meshcast.wire.keys import ClusterKey, KeyRing

async def main() -> None:
    ring = KeyRing.of(ClusterKey(bytes.fromhex(sys.argv[3])))
    stream = await open_secure_stream(sys.argv[1], int(sys.argv[2]), 1, 2, ring, timeout=30)
    chunk = bytes(1 << 20)
    while True:
        await stream.send(chunk)

asyncio.run(main())
"""


async def test_peer_killed_mid_transfer_is_truncation_not_a_clean_end() -> None:
    outcome: asyncio.Future[tuple[int, BaseException | None]] = (
        asyncio.get_running_loop().create_future()
    )
    enough = asyncio.Event()

    async def receive_all(stream: SecureStreamConnection) -> None:
        total = 0
        try:
            while (data := await stream.receive()) is not None:
                total += len(data)
                if total >= 8 * MIB:
                    enough.set()
        except StreamFailed as exc:
            outcome.set_result((total, exc))
        else:
            outcome.set_result((total, None))

    async with server(receive_all) as srv:
        env = dict(os.environ, PYTHONPATH=str(Path(meshcast.__file__).parent.parent))
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SENDER, *map(str, srv.address), CURRENT.secret.hex(), env=env
        )
        try:
            async with asyncio.timeout(WAIT):
                await enough.wait()
            child.send_signal(signal.SIGKILL)
            async with asyncio.timeout(WAIT):
                total, error = await outcome
        finally:
            if child.returncode is None:
                child.kill()
            await child.wait()
    assert total >= 8 * MIB
    assert isinstance(error, StreamTruncated)
    assert error.cause == "truncated"


async def test_receiver_gone_mid_transfer_fails_the_sender() -> None:
    async def read_a_little_then_vanish(stream: SecureStreamConnection) -> None:
        await stream.receive()
        stream.abort()

    async with server(read_a_little_then_vanish) as srv:
        stream = await open_secure_stream(*srv.address, A, B, RING, timeout=WAIT)
        with pytest.raises(StreamTruncated):
            await send_until_failure(stream)
        stream.abort()


async def test_tampering_on_the_path_is_detected() -> None:
    """A TCP proxy flips one bit in the middle of the data: the receiver fails the stream."""
    results: list[BaseException] = []

    async def receive_all(stream: SecureStreamConnection) -> None:
        try:
            while await stream.receive() is not None:
                pass
        except StreamFailed as exc:
            results.append(exc)
            raise

    async def pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flip_at: int | None
    ) -> None:
        offset = 0
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if flip_at is not None and offset <= flip_at < offset + len(data):
                    damaged = bytearray(data)
                    damaged[flip_at - offset] ^= 0x04
                    data = bytes(damaged)
                offset += len(data)
                writer.write(data)
                await writer.drain()
        writer.close()

    async with server(receive_all) as srv, asyncio.TaskGroup() as tasks:

        def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            async def run() -> None:
                up_reader, up_writer = await asyncio.open_connection(*srv.address)
                tasks.create_task(pipe(reader, up_writer, 300_000))
                tasks.create_task(pipe(up_reader, writer, None))

            tasks.create_task(run())

        proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
        try:
            port = proxy.sockets[0].getsockname()[1]
            stream = await open_secure_stream("127.0.0.1", port, A, B, RING, timeout=WAIT)
            with pytest.raises(StreamTruncated):
                await send_until_failure(stream)
            stream.abort()
            stats = await wait_for_stats(srv, lambda s: bool(s.failed))
        finally:
            proxy.close()
    assert stats.failed == {"forged": 1}
    assert isinstance(results[0], StreamFailed)
    assert results[0].cause == "forged"


async def test_connect_failures_are_typed() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, never answers
        writer.close()

    mute = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = mute.sockets[0].getsockname()[1]
    try:
        with pytest.raises(StreamFailed) as timed_out:
            await open_secure_stream("127.0.0.1", port, A, B, RING, timeout=0.5)
        assert timed_out.value.cause == "timeout"
    finally:
        mute.close()
        await mute.wait_closed()
    with pytest.raises(StreamFailed) as refused:
        await open_secure_stream("127.0.0.1", port, A, B, RING, timeout=WAIT)
    assert refused.value.cause == "unreachable"


async def test_a_slow_reader_holds_the_sender_back_with_bounded_buffers() -> None:
    release, finished = asyncio.Event(), asyncio.Event()
    digest = hashlib.blake2b()

    async def slow(stream: SecureStreamConnection) -> None:
        await release.wait()
        while (data := await stream.receive()) is not None:
            digest.update(data)
        finished.set()

    total = 128 * MIB
    chunk = random.Random(5).randbytes(MIB)
    async with server(slow) as srv:
        stream = await open_secure_stream(*srv.address, A, B, RING, timeout=WAIT)

        async def send_all() -> None:
            for _ in range(total // MIB):
                await stream.send(chunk)
            await stream.aclose()

        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(send_all())
            # Wait until the sender stalls: nothing reads, so buffers fill and `send` waits.
            previous = -1
            async with asyncio.timeout(WAIT):
                while (sent := stream.statistics().bytes_sent) != previous:
                    previous = sent
                    await asyncio.sleep(0.3)
            # Kernel socket buffers (a few MiB on loopback) + 1 MiB write buffer + 1 MiB
            # waiting for receive + one read buffer (about 6 MiB here): far below the
            # 128 MiB the sender offered.
            assert sent < 32 * MIB
            release.set()
        async with asyncio.timeout(WAIT):
            await finished.wait()
    expected = hashlib.blake2b()
    for _ in range(total // MIB):
        expected.update(chunk)
    assert digest.digest() == expected.digest()


async def test_a_failing_handler_aborts_its_stream_and_the_server_keeps_serving() -> None:
    calls = 0

    async def flaky(stream: SecureStreamConnection) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("handler bug")
        await digest_then_reply(stream)

    async with server(flaky) as srv:
        stream = await open_secure_stream(*srv.address, A, B, RING, timeout=WAIT)
        with pytest.raises(StreamTruncated):  # aborted: never mistaken for a clean end
            await stream.receive()
        stream.abort()
        assert await transfer(srv.address, MIB, MIB) == "match"
        stats = await wait_for_stats(srv, lambda s: s.established == 2)
        assert stats.handler_errors == 1
        assert stats.internal_errors == 0


async def test_throughput_script_reports_both_figures() -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(meshcast.__file__).parent.parent))
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshcast.bench.stream",
        "--mib",
        "4",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    async with asyncio.timeout(WAIT * 4):
        out, _ = await child.communicate()
    assert child.returncode == 0
    result = json.loads(out)
    assert result["bytes"] == 4 * MIB
    for mode in ("plain", "secure"):
        assert result[mode]["mbytes_per_s"] > 0
        assert result[mode]["receiver_cpu_s_per_gb"] >= 0
    assert "secure_cost_pct" in result
