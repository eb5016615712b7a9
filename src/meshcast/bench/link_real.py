"""Benchmark `real`: one Hop link between two OS processes over real loopback sockets.

Two `meshcast.runtime.peer_process` children, no impairment: one sends `messages`
messages of `size` bytes, the other receives and checks them (sequence numbers and
sizes: every message exactly once). Throughput runs from the sender's first `send` to
the receiver's last delivery; CPU is both processes' user+system time over the transfer
(`resource.getrusage` in each child), summed, per MB (10^6 bytes) delivered.

The link's pacer is set far above what two Python processes can move (4 Gbit/s, 1 MiB
burst), so the figure measures the runtime and the state machines, not a configured rate.
Everything else is `LinkConfig()`'s default, MTU 1400 included, as the C reference
implementation uses ~1.4 KB packets too. Theory and measured figures: docs/design/runtime.md.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
from pathlib import Path
from typing import Any

from meshcast.errors import MeshcastError
from meshcast.ids import NodeId
from meshcast.link.config import LinkConfig
from meshcast.runtime.keyfile import write_key_file
from meshcast.runtime.loop import run
from meshcast.runtime.peer_process import PeerProcess
from meshcast.wire.keys import ClusterKey

BENCH_LINK_RATE_BPS = 4e9  # bits/s: pacer out of the way on loopback
BENCH_BURST_BYTES = 1024 * 1024
_SENDER = NodeId(1)
_RECEIVER = NodeId(2)


class BenchmarkError(MeshcastError):
    """The benchmark run did not deliver every message intact."""


def measure_real(
    messages: int = 200_000,
    size: int = 1024,
    *,
    mtu: int = LinkConfig().mtu,
    transport: str = "udp",
    secure: bool = False,
    timeout: float = 600.0,
) -> dict[str, float]:
    """`{"msgs_per_s", "mbytes_per_s", "cpu_s_per_mb"}` of one link between two processes.

    `secure=True` seals the link as a daemon does (a fresh cluster key in a private
    temporary file). `transport="tcp"` measures a kernel TCP connection instead
    (`meshcast.runtime.tcp`), for comparison. Raises `BenchmarkError` if a message is
    lost, duplicated or corrupt.
    """
    with tempfile.TemporaryDirectory(prefix="mcbench") as scratch:
        key_args: list[str] = []
        if secure:
            key_file = Path(scratch) / "bench.key"
            write_key_file(key_file, ClusterKey(secrets.token_bytes(32)))
            key_args = ["--key-file", str(key_file)]
        sender, receiver = run(_measure(messages, size, mtu, transport, timeout, key_args))
    return summarise(sender, receiver, messages)


def summarise(sender: dict[str, Any], receiver: dict[str, Any], messages: int) -> dict[str, float]:
    """The `real` figures from the two children's "done" reports."""
    if (
        receiver["delivered"] != messages
        or receiver["duplicates"]
        or receiver["corrupt"]
        or receiver["last_delivery_at"] is None
    ):
        raise BenchmarkError(
            f"receiver got {receiver['delivered']} of {messages} messages "
            f"({receiver['duplicates']} duplicates, {receiver['corrupt']} corrupt)"
        )
    elapsed = float(receiver["last_delivery_at"]) - float(sender["first_send_at"])
    megabytes = receiver["bytes_delivered"] / 1e6
    cpu = float(sender["cpu_s"]) + float(receiver["cpu_s"])
    return {
        "msgs_per_s": messages / elapsed,
        "mbytes_per_s": megabytes / elapsed,
        "cpu_s_per_mb": cpu / megabytes,
    }


async def _measure(
    messages: int,
    size: int,
    mtu: int,
    transport: str,
    timeout: float,  # noqa: ASYNC109 - bounded wait is the API
    key_args: list[str],
) -> tuple[dict[str, Any], dict[str, Any]]:
    common = [
        *key_args,
        "--transport",
        transport,
        "--size",
        str(size),
        "--verify",
        "light",
        "--mtu",
        str(mtu),
        "--link-rate-bps",
        str(BENCH_LINK_RATE_BPS),
        "--burst-bytes",
        str(BENCH_BURST_BYTES),
        "--max-runtime",
        str(timeout),
    ]
    async with (
        await PeerProcess.start(_RECEIVER, "--expect", str(messages), *common) as receiver,
        await PeerProcess.start(_SENDER, "--send", str(messages), *common) as sender,
    ):
        receiver.connect(sender)
        sender.connect(receiver)
        async with asyncio.timeout(timeout):
            sent = await sender.wait_event("done", timeout)
            got = await receiver.wait_event("done", timeout)
    return sent["report"], got["report"]
