"""Throughput of a secure bulk stream against plain TCP, over loopback, side by side.

    python -m meshcast.bench.stream [--mib 256] [--chunk-kib 1024] [--json]

For each mode a child process receives on 127.0.0.1 (`--receive MODE`, an internal mode),
the parent sends `--mib` MiB in `--chunk-kib` pieces, ends its data (CLOSE for the secure
stream, a TCP FIN for plain) and waits for the child's count of bytes received. The time
runs from the first byte sent (after the handshake) to that answer, so both ends' work is
in it: each end runs in its own process, as two daemons would. Plain TCP reads the same
way (one reused 256 KiB buffer) and writes with the same buffer limit, so the difference
is the records and the AEAD. Not part of `meshcast bench` yet; the figures go into docs/security.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any, cast

from meshcast.ids import NodeId
from meshcast.runtime.secure_stream import (
    SecureStreamConnection,
    open_secure_stream,
    serve_secure_streams,
)
from meshcast.wire.keys import ClusterKey, KeyRing

_SENDER = NodeId(1)
_RECEIVER = NodeId(2)
_READ_CHUNK = 256 * 1024  # as the secure stream's driver reads
_WRITE_BUFFER_BYTES = 1024 * 1024  # as the secure stream's driver buffers
_TIMEOUT = 600.0  # s: the whole run of one mode


def _answer(total: int, cpu_seconds: float) -> bytes:
    """The receiver's reply: bytes received, and its CPU time receiving them (µs)."""
    return total.to_bytes(8, "big") + int(cpu_seconds * 1e6).to_bytes(8, "big")


class _PlainReceiver(asyncio.BufferedProtocol):
    """Counts bytes as the secure stream's driver reads them: one reused 256 KiB buffer."""

    def __init__(self, done: asyncio.Event) -> None:
        self._buffer = memoryview(bytearray(_READ_CHUNK))
        self._done = done
        self._total = 0
        self._cpu = 0.0
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's is not an asyncio.Transport subclass)
        transport = cast("asyncio.Transport", transport)
        self._transport = transport
        self._cpu = time.process_time()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._total += nbytes

    def eof_received(self) -> bool:
        assert self._transport is not None
        self._transport.write(_answer(self._total, time.process_time() - self._cpu))
        self._transport.close()
        self._done.set()
        return True


async def _receive_plain() -> None:
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _PlainReceiver(done), "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with asyncio.timeout(_TIMEOUT):
        await done.wait()
    server.close()


async def _receive_secure(ring: KeyRing) -> None:
    done = asyncio.Event()

    async def serve(stream: SecureStreamConnection) -> None:
        total = 0
        cpu = time.process_time()
        while (data := await stream.receive()) is not None:
            total += len(data)
        await stream.send(_answer(total, time.process_time() - cpu))
        done.set()

    async with serve_secure_streams("127.0.0.1", 0, _RECEIVER, ring, {_SENDER}, serve) as srv:
        print(srv.address[1], flush=True)
        async with asyncio.timeout(_TIMEOUT):
            await done.wait()


async def _send(mode: str, total: int, chunk: bytes, ring: KeyRing) -> dict[str, float]:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshcast.bench.stream",
        "--receive",
        mode,
        "--key",
        ring.newest.secret.hex(),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        async with asyncio.timeout(_TIMEOUT):
            port = int(await child.stdout.readline())
            if mode == "secure":
                stream = await open_secure_stream("127.0.0.1", port, _SENDER, _RECEIVER, ring)
                started, cpu = time.perf_counter(), time.process_time()
                for _ in range(total // len(chunk)):
                    await stream.send(chunk)
                await stream.send_eof()
                answer = await stream.receive()
                await stream.aclose()
            else:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.transport.set_write_buffer_limits(high=_WRITE_BUFFER_BYTES)
                started, cpu = time.perf_counter(), time.process_time()
                for _ in range(total // len(chunk)):
                    writer.write(chunk)
                    await writer.drain()
                writer.write_eof()
                answer = await reader.readexactly(16)
                writer.close()
            elapsed = time.perf_counter() - started
            sender_cpu = time.process_time() - cpu
            await child.wait()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    answer = answer or bytes(16)
    received = int.from_bytes(answer[:8], "big")
    receiver_cpu = int.from_bytes(answer[8:16], "big") / 1e6
    if received != total:
        raise RuntimeError(f"{mode}: {received} bytes arrived of {total}")
    gigabytes = total / 1e9
    return {
        "seconds": elapsed,
        "mbytes_per_s": total / elapsed / 1e6,
        "sender_cpu_s_per_gb": sender_cpu / gigabytes,
        "receiver_cpu_s_per_gb": receiver_cpu / gigabytes,
    }


def measure(mib: int = 256, chunk_kib: int = 1024) -> dict[str, Any]:
    """Plain TCP and secure stream figures of one run, and the throughput lost (%)."""
    ring = KeyRing.of(ClusterKey(os.urandom(32)))
    chunk = os.urandom(chunk_kib * 1024)
    total = (mib * 1024 * 1024 // len(chunk)) * len(chunk)
    plain = asyncio.run(_send("plain", total, chunk, ring))
    secure = asyncio.run(_send("secure", total, chunk, ring))
    return {
        "bytes": total,
        "chunk_bytes": len(chunk),
        "plain": plain,
        "secure": secure,
        "secure_cost_pct": 100.0 * (1 - secure["mbytes_per_s"] / plain["mbytes_per_s"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshcast.bench.stream", description=__doc__)
    parser.add_argument("--mib", type=int, default=256, help="MiB to send in each mode")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="KiB per send call")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--receive", choices=["plain", "secure"], help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.receive == "plain":
        asyncio.run(_receive_plain())
        return 0
    if args.receive == "secure":
        asyncio.run(_receive_secure(KeyRing.of(ClusterKey(bytes.fromhex(args.key)))))
        return 0
    result = measure(args.mib, args.chunk_kib)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['bytes'] / 2**20:.0f} MiB over loopback in "
            f"{result['chunk_bytes'] // 1024} KiB sends (CPU s per GB: sender / receiver)"
        )
        for mode, label in (("plain", "plain TCP    "), ("secure", "secure stream")):
            figures = result[mode]
            print(
                f"  {label} {figures['mbytes_per_s']:8.1f} MB/s"
                f"   CPU {figures['sender_cpu_s_per_gb']:.2f} / {figures['receiver_cpu_s_per_gb']:.2f}"
            )
        print(f"  throughput lost to encryption: {result['secure_cost_pct']:.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
