"""The floor under `meshcast bench group`'s round trips (`rtt_floor_ms`): the same chain
of processes and sockets, with daemons that only forward bytes.

A round trip of `rtt_ms` crosses five processes: the pinging client (the bench process),
daemon 1, daemon 2, the echoing client, then daemons 2 and 1 again. Here each daemon is a
*relay*: a process on the daemons' event loop with a Unix socket for its client and a UDP
socket on 127.0.0.x, which sends each chunk its client writes as one datagram to every
other relay (as a daemon sends an AGREED message to every daemon of its view) and writes
each datagram it receives to its client, if it has one. The echo process writes back
what it reads, on the clients' loop. No framing, ordering, links, encryption or client
library: what `rtt_ms` takes above this floor is meshcast's own work, and the floor is
what Python processes and the kernel cost on this machine before any of it.

Each child is a `JsonChild` (``python -m meshcast.bench.rtt_floor relay|echo ...``): it
reports "ready" once it serves, a relay "client" once its client is connected, and it
exits at the end of its stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import cast

from meshcast.errors import MeshcastError
from meshcast.runtime.json_child import JsonChild, emit, stdin_reader
from meshcast.runtime.loop import run as run_loop

READY_TIMEOUT = 20.0  # s: a child up and serving, a client accepted
ROUND_TRIP_TIMEOUT = 5.0  # s: one echo back (a lost loopback datagram ends the run)
READ_SIZE = 65536  # bytes: one read of a relay's client, sent as one datagram
MAX_CLIENT_BACKLOG = 1 << 20  # bytes a relay lets its client's socket buffer hold


class FloorError(MeshcastError):
    """The floor measurement could not run (a child failed or an echo never came)."""


class _Child(JsonChild):
    error = FloorError


# ---------------------------------------------------------------------- child side


class _Relay(asyncio.DatagramProtocol):
    """One relay: the other relays' datagrams to its client, its client's bytes to them."""

    def __init__(self, peers: Sequence[tuple[str, int]]) -> None:
        self.peers = peers
        self.udp: asyncio.DatagramTransport | None = None
        self.client: asyncio.Transport | None = None

    def from_client(self, data: bytes) -> None:
        udp = self.udp
        if udp is not None:
            for peer in self.peers:
                udp.sendto(data, peer)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        client = self.client
        if client is not None and client.get_write_buffer_size() < MAX_CLIENT_BACKLOG:
            client.write(data)


async def _until_stdin_ends() -> None:
    async with stdin_reader() as reader:
        while await reader.readline():
            pass


async def relay_main(unix_path: str, udp_fd: int, peers: Sequence[tuple[str, int]]) -> None:
    loop = asyncio.get_running_loop()
    relay = _Relay(peers)
    client_seen = asyncio.Event()

    def accept() -> asyncio.Protocol:
        return _ClientSide(relay, client_seen)

    udp, _ = await loop.create_datagram_endpoint(lambda: relay, sock=socket.socket(fileno=udp_fd))
    relay.udp = udp
    server = await loop.create_unix_server(accept, unix_path)
    emit({"event": "ready"})
    waiting = asyncio.ensure_future(client_seen.wait())
    stdin = asyncio.ensure_future(_until_stdin_ends())
    try:
        done, _ = await asyncio.wait({waiting, stdin}, return_when=asyncio.FIRST_COMPLETED)
        if waiting in done:
            emit({"event": "client"})
            await stdin
    finally:
        waiting.cancel()
        stdin.cancel()
        server.close()
        udp.close()


class _ClientSide(asyncio.Protocol):
    def __init__(self, relay: _Relay, seen: asyncio.Event) -> None:
        self._relay = relay
        self._seen = seen

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._relay.client = cast("asyncio.Transport", transport)  # uvloop's is no subclass
        self._seen.set()

    def data_received(self, data: bytes) -> None:
        self._relay.from_client(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay.client = None


class _Echo(asyncio.Protocol):
    def __init__(self, lost: asyncio.Future[None]) -> None:
        self._lost = lost
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._lost.done():
            self._lost.set_result(None)


async def echo_main(unix_path: str) -> None:
    loop = asyncio.get_running_loop()
    lost: asyncio.Future[None] = loop.create_future()
    transport, _ = await loop.create_unix_connection(lambda: _Echo(lost), unix_path)
    emit({"event": "ready"})
    stdin = asyncio.ensure_future(_until_stdin_ends())
    try:
        await asyncio.wait({lost, stdin}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stdin.cancel()
        transport.close()


# ---------------------------------------------------------------------- parent side


async def _start(
    label: str, *args: str, pass_fds: Sequence[int] = (), env: Mapping[str, str] | None = None
) -> _Child:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshcast.bench.rtt_floor",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        pass_fds=pass_fds,
        env=None if env is None else {**os.environ, **env},
    )
    child = _Child(process, label)
    try:
        await child.wait_event("ready", READY_TIMEOUT)
    except BaseException:
        await child.stop()
        raise
    return child


@contextlib.asynccontextmanager
async def _relays(
    count: int, directory: Path, env: Mapping[str, str]
) -> AsyncIterator[list[_Child]]:
    """`count` relays on 127.0.0.1, .2, ... (`env` added to their environment); all
    stopped on the way out."""
    sockets = []
    children: list[_Child] = []
    try:
        for index in range(1, count + 1):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sockets.append(sock)
            sock.bind((f"127.0.0.{index}", 0))
        addresses = [sock.getsockname() for sock in sockets]
        for index, sock in enumerate(sockets, 1):
            others = addresses[: index - 1] + addresses[index:]
            peers = ",".join(f"{host}:{port}" for host, port in others)
            children.append(
                await _start(
                    f"relay {index}",
                    "relay",
                    str(directory / f"relay{index}.sock"),
                    str(sock.fileno()),
                    peers,
                    pass_fds=(sock.fileno(),),
                    env=env,
                )
            )
            sock.close()  # the child has its own copy
        yield children
    finally:
        for sock in sockets:
            sock.close()
        await asyncio.gather(*(child.stop() for child in children))


async def measure_floor(
    relays: int, round_trips: int, warmup: int, size: int, relay_env: Mapping[str, str]
) -> list[float]:
    """Round-trip times (s) of `size`-byte chunks from this process through relay 1 to an
    echo on relay 2 and back, with `relays` relays (the others idle; `relay_env` added to
    their environment, as `Tuning.environment` to the daemons')."""
    with tempfile.TemporaryDirectory(prefix="meshcast-floor-") as name:
        directory = Path(name)
        async with _relays(relays, directory, relay_env) as children:
            echo = await _start("echo", "echo", str(directory / "relay2.sock"))
            async with echo:
                await children[1].wait_event("client", READY_TIMEOUT)
                reader, writer = await asyncio.open_unix_connection(directory / "relay1.sock")
                try:
                    await children[0].wait_event("client", READY_TIMEOUT)
                    return await _ping(reader, writer, round_trips, warmup, size)
                finally:
                    writer.close()


async def _ping(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    round_trips: int,
    warmup: int,
    size: int,
) -> list[float]:
    chunk = bytes(size)
    samples: list[float] = []
    for number in range(warmup + round_trips):
        sent_at = time.monotonic()
        writer.write(chunk)
        try:
            async with asyncio.timeout(ROUND_TRIP_TIMEOUT):
                await reader.readexactly(size)
        except (TimeoutError, asyncio.IncompleteReadError):
            raise FloorError(
                f"round trip {number}: no echo within {ROUND_TRIP_TIMEOUT} s"
            ) from None
        if number >= warmup:
            samples.append(time.monotonic() - sent_at)
    return samples


def _peer(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meshcast.bench.rtt_floor",
        description="A relay or the echo of `meshcast bench group`'s round-trip floor.",
    )
    roles = parser.add_subparsers(dest="role", required=True)
    relay = roles.add_parser("relay")
    relay.add_argument("unix_path")
    relay.add_argument("udp_fd", type=int)
    relay.add_argument("peers", help="host:port of the other relays, comma-separated")
    echo = roles.add_parser("echo")
    echo.add_argument("unix_path")
    args = parser.parse_args(argv)
    if args.role == "relay":
        peers = [_peer(p) for p in args.peers.split(",") if p]
        run_loop(relay_main(args.unix_path, args.udp_fd, peers))  # the daemons' loop
    else:
        run_loop(echo_main(args.unix_path))  # the bench workers' loop
    return 0


if __name__ == "__main__":
    sys.exit(main())
