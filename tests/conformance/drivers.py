"""Two drivers of the same daemon logic for the conformance suite: `SimDriver` runs
`DaemonNode`s in the simulator with simulated clients; `RealDriver` runs the asyncio
daemon (`OverlayDaemon`, the pump around the same `DaemonNode`) on real UDP and Unix
sockets with clients that speak frames over them. A test gets a driver and uses only
this interface, so one test function checks both (as trio's stream conformance tests
check every stream)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from meshcast.config import load_config
from meshcast.ids import NodeId
from meshcast.runtime.daemon import OverlayDaemon
from meshcast.runtime.endpoints import ClientListen
from meshcast.sim.daemon import DaemonSim, GroupLink, SimClient, build_daemon_sim
from meshcast.sim.network import LinkModel
from meshcast.wire.client import ClientFrame, Frame, FrameDecoder, Hello, encode

from ..integration.daemon_helpers import ring, write_cluster

WAIT = 20.0  # s (real) or virtual s (sim): every wait is bounded


class Client(Protocol):
    name: str

    @property
    def received(self) -> list[Frame]: ...
    async def send(self, frame: ClientFrame) -> None: ...
    async def send_raw(self, data: bytes) -> None: ...
    async def crash(self) -> None: ...


class Driver(Protocol):
    async def connect(self, daemon: int, name: str, *, reading: bool = True) -> Client: ...
    async def wait_for(self, condition: Callable[[], bool], what: str) -> None: ...
    async def pause(self, seconds: float) -> None: ...


# ---------------------------------------------------------------------- the simulator


class _SimClientAdapter:
    def __init__(self, driver: SimDriver, client: SimClient) -> None:
        self._driver = driver
        self._client = client
        self.name = client.name

    @property
    def received(self) -> list[Frame]:
        return self._client.received

    async def send(self, frame: ClientFrame) -> None:
        self._client.send(frame)

    async def send_raw(self, data: bytes) -> None:
        self._client.send_raw(data)

    async def crash(self) -> None:
        self._client.crash()


class SimDriver:
    def __init__(self, daemons: int, seed: int = 1) -> None:
        links = [GroupLink(a, b, LinkModel(delay=0.002)) for a, b in ring(daemons)]
        self.dsim: DaemonSim = build_daemon_sim(links, seed=seed, high_water=256 * 1024)
        self.dsim.sim.run(until=1.5)  # views agreed

    async def connect(self, daemon: int, name: str, *, reading: bool = True) -> Client:
        client = self.dsim.connect(NodeId(daemon), name, reading=reading)
        return _SimClientAdapter(self, client)

    async def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        sim = self.dsim.sim
        deadline = sim.now + WAIT
        while not condition():
            if sim.now >= deadline:
                raise AssertionError(f"simulator: {what} not within {WAIT} virtual s")
            sim.run(until=sim.now + 0.01)

    async def pause(self, seconds: float) -> None:
        self.dsim.sim.run(until=self.dsim.sim.now + seconds)


# ---------------------------------------------------------------------- real sockets


class _RealClient:
    def __init__(
        self,
        name: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        reading: bool,
    ) -> None:
        self.name = name
        self._reader = reader
        self._writer = writer
        self._frames: list[Frame] = []
        self._task = asyncio.create_task(self._read()) if reading else None

    @property
    def received(self) -> list[Frame]:
        return self._frames

    async def send(self, frame: ClientFrame) -> None:
        await self.send_raw(encode(frame))

    async def send_raw(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def crash(self) -> None:
        self._writer.transport.abort()
        await self.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._writer.close()

    async def _read(self) -> None:
        decoder = FrameDecoder()
        while data := await self._reader.read(65536):
            decoder.feed(data)
            self._frames.extend(decoder)


class RealDriver:
    def __init__(self, directory: Path, daemons: int) -> None:
        self._directory = directory
        self._count = daemons
        self._daemons: list[OverlayDaemon] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._clients: list[_RealClient] = []

    async def __aenter__(self) -> RealDriver:
        config = load_config(write_cluster(self._directory, self._count, ring(self._count)))
        for i in range(1, self._count + 1):
            listen = ClientListen(unix_path=str(self._directory / f"d{i}.sock"))
            daemon = await OverlayDaemon.open(config, f"d{i}", clients=listen)
            self._daemons.append(daemon)
            self._tasks.append(asyncio.create_task(daemon.serve(self._stop)))
        everyone = set(range(1, self._count + 1))
        await self.wait_for(
            lambda: all(
                d.node.agreed
                and d.node.overlay.view is not None
                and {int(m) for m in d.node.overlay.view.members} == everyone
                for d in self._daemons
            ),
            "every daemon agreeing on a view of all",
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self._clients:
            await client.close()
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for daemon in self._daemons:
            await daemon.aclose()

    async def connect(self, daemon: int, name: str, *, reading: bool = True) -> Client:
        reader, writer = await asyncio.open_unix_connection(
            str(self._directory / f"d{daemon}.sock")
        )
        client = _RealClient(name, reader, writer, reading=reading)
        self._clients.append(client)
        await client.send(Hello(name))
        return client

    async def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        async with asyncio.timeout(WAIT):
            while not condition():  # noqa: ASYNC110 - state of another object, no event to wait on
                await asyncio.sleep(0.01)

    async def pause(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
