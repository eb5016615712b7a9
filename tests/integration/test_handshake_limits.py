"""Client connections before HELLO cost a real daemon little, and not for long.

One ``meshcast daemon`` process with its client Unix socket. 40 connections each send the
header of a 16 MiB frame and then up to 4 MiB of its body before any HELLO: the daemon
answers each with ERROR 101 and closes it, and its resident memory (VmRSS in
/proc/<pid>/status) stays near where it was. Connections that never finish their HELLO
(slowloris) are closed with ERROR 108 after `handshake_timeout`; past
`max_pending_handshakes` a new connection is refused at once with ERROR 105; a real client
connects meanwhile. The status report counts every case. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import meshcast
from meshcast.wire.client import (
    FROM_DAEMON,
    ErrorCode,
    ErrorReport,
    FrameDecoder,
    FrameType,
    Hello,
    Join,
    Membership,
    Multicast,
    ServiceLevel,
    Welcome,
    encode,
)

from .daemon_helpers import DaemonProcess, write_cluster

pytestmark = [pytest.mark.timeout(180), pytest.mark.asyncio]

HANDSHAKE_TIMEOUT = 2.0  # s, configured for the test (default 5 s)
MAX_PENDING = 64  # the default max_pending_handshakes
BIG_CONNECTIONS = 40
BIG_FRAME = 16 * 1024 * 1024  # the length announced: the default frame cap allows it
BODY_SENT = 4 * 1024 * 1024  # bytes of its body each connection tries to send
CHUNK = 256 * 1024
RSS_GROWTH_LIMIT_KIB = 40 * 1024  # 40 x 4 MiB buffered would be 160 MiB
WAIT = 30.0  # s: any one reply or close


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line")


async def read_until_closed(sock: socket.socket) -> list[object]:
    """Every frame the daemon sends until it closes the connection (bounded wait).

    A raw socket: what the daemon wrote before closing stays readable after a reset."""
    loop = asyncio.get_running_loop()
    decoder = FrameDecoder(accept=FROM_DAEMON)
    received: list[object] = []
    async with asyncio.timeout(WAIT):
        while True:
            try:
                data = await loop.sock_recv(sock, 65536)
            except ConnectionError:
                break
            if not data:
                break
            decoder.feed(data)
            received.extend(decoder)
    return received


async def open_raw(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, path)
    return sock


def codes(frames: list[object]) -> list[ErrorCode]:
    return [f.code for f in frames if isinstance(f, ErrorReport)]


@contextlib.asynccontextmanager
async def daemon(tmp_path: Path) -> AsyncIterator[tuple[DaemonProcess, str]]:
    config = write_cluster(tmp_path, 1, [])
    with config.open("a", encoding="utf-8") as f:
        f.write(f'\n[limits]\nhandshake_timeout = "{HANDSHAKE_TIMEOUT}s"\n')
    with tempfile.TemporaryDirectory(prefix="mchs", dir="/tmp") as sockets:
        path = str(Path(sockets) / "d1.sock")
        process = await DaemonProcess.start(config, "d1", "--client-socket", path)
        try:
            yield process, path
        finally:
            await process.stop()


async def big_frame_before_hello(path: str) -> list[object]:
    """Announce a 16 MiB frame, send up to 4 MiB of it; what the daemon answered."""
    loop = asyncio.get_running_loop()
    with await open_raw(path) as sock:
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(WAIT):
                await loop.sock_sendall(sock, struct.pack("!IB", BIG_FRAME, FrameType.HELLO))
                for _ in range(BODY_SENT // CHUNK):
                    await loop.sock_sendall(sock, bytes(CHUNK))
        return await read_until_closed(sock)


async def status(path: str) -> dict[str, object]:
    async with await meshcast.connect(path, timeout=WAIT) as client:
        return await client.status()


def session_counters(report: dict[str, object]) -> dict[str, int]:
    counters = report["counters"]
    assert isinstance(counters, dict)
    sessions = counters["sessions"]
    assert isinstance(sessions, dict)
    return sessions


async def test_oversized_frames_before_hello_are_refused_without_buffering(
    tmp_path: Path,
) -> None:
    async with daemon(tmp_path) as (process, path):
        await status(path)  # the client path warmed up before the baseline
        before = rss_kib(process.process.pid)
        answers = await asyncio.gather(*(big_frame_before_hello(path) for _ in range(40)))
        after = rss_kib(process.process.pid)
        assert after - before < RSS_GROWTH_LIMIT_KIB, (before, after)
        assert [codes(a) for a in answers] == [[ErrorCode.BAD_FRAME]] * BIG_CONNECTIONS
        report = await status(path)
        counters = session_counters(report)
        assert counters["handshake_bad_frames"] == BIG_CONNECTIONS
        assert counters["sessions_opened"] == 2  # the two status clients only
        assert report["sessions"] == {"open": 1, "max_clients": 1000, "handshaking": 0}


async def test_silent_connections_time_out_and_are_bounded_while_clients_connect(
    tmp_path: Path,
) -> None:
    async with daemon(tmp_path) as (_process, path):
        silent: list[socket.socket] = []
        try:
            for _ in range(MAX_PENDING - 1):
                sock = await open_raw(path)
                sock.send(b"\x00\x00")  # half a frame length, then nothing
                silent.append(sock)
            report = await status(path)  # a real client gets in meanwhile (the 64th slot)
            assert report["sessions"] == {
                "open": 1,
                "max_clients": 1000,
                "handshaking": MAX_PENDING - 1,
            }
            silent.append(await open_raw(path))  # the 64th waiting
            with await open_raw(path) as refused:  # one too many
                assert codes(await read_until_closed(refused)) == [ErrorCode.DAEMON_FULL]
            answers = await asyncio.gather(*(read_until_closed(s) for s in silent))
            assert [codes(a) for a in answers] == [[ErrorCode.HANDSHAKE_TIMEOUT]] * MAX_PENDING
            counters = session_counters(await status(path))
            assert counters["handshake_timeouts"] == MAX_PENDING
            assert counters["pending_refused"] == 1
            assert counters["handshake_bad_frames"] == 0
        finally:
            for sock in silent:
                sock.close()


async def test_a_handshake_completes_while_a_block_member_holds_senders_back(
    tmp_path: Path,
) -> None:
    """Holding local senders back (a `block` member stopped reading) must not hold a
    HELLO: the new client gets its WELCOME, not a HANDSHAKE_TIMEOUT."""
    loop = asyncio.get_running_loop()
    async with daemon(tmp_path) as (_process, path):
        sender, stuck = await open_raw(path), await open_raw(path)
        try:
            await loop.sock_sendall(sender, encode(Hello("s")))
            await loop.sock_sendall(stuck, encode(Hello("stuck")) + encode(Join("g")))
            for sock in (sender, stuck):
                assert isinstance(await next_frame(sock), Welcome)
            assert isinstance(await next_frame(stuck), Membership)  # then never reads again

            async def flood() -> None:
                chunk = encode(Multicast(("g",), bytes(60_000), ServiceLevel.RELIABLE))
                for _ in range(700):  # 42 MB, far past what the stuck member's buffers hold
                    await loop.sock_sendall(sender, chunk)

            sending = asyncio.create_task(flood())
            try:
                done, _ = await asyncio.wait({sending}, timeout=2.0)
                assert not done, "the sender was not held back"
                with await open_raw(path) as newcomer:
                    await loop.sock_sendall(newcomer, encode(Hello("newcomer")))
                    welcome = await next_frame(newcomer)
                    assert isinstance(welcome, Welcome), welcome
                assert not sending.done()  # the hold was on all along
            finally:
                sending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sending
        finally:
            sender.close()
            stuck.close()


async def next_frame(sock: socket.socket) -> object:
    """The next frame the daemon sends on `sock` (bounded wait); None at EOF."""
    loop = asyncio.get_running_loop()
    decoder = FrameDecoder(accept=FROM_DAEMON)
    async with asyncio.timeout(WAIT):
        while (frame := decoder.next_frame()) is None:
            data = await loop.sock_recv(sock, 1)  # byte by byte: leave later frames unread
            if not data:
                return None
            decoder.feed(data)
    return frame
