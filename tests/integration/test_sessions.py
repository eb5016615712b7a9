"""Client sessions on real sockets: three `meshcast daemon` processes on 127.0.0.1-3,
clients written here directly on `meshcast.wire.client` (not the client library).

Clients on every daemon join a group and multicast RELIABLE and AGREED messages: every
member gets every message, AGREED in one order everywhere; joins, leaves and
disconnects show up as MEMBERSHIP frames at every member; bad input gets typed ERROR
frames; a client that never reads is handled per its slow-receiver policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from meshcast.wire.client import (
    FROM_DAEMON,
    Cause,
    ErrorCode,
    ErrorReport,
    Frame,
    FrameDecoder,
    Goodbye,
    Hello,
    HelloFlag,
    Join,
    Leave,
    Membership,
    Message,
    Multicast,
    Ping,
    Pong,
    ServiceLevel,
    SlowReceiverPolicy,
    Welcome,
    encode,
)

from .daemon_helpers import DaemonProcess, ring, wait_agreed, write_cluster

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio]

VIEW_TIMEOUT = 15.0  # s: start-up of three interpreters included
WAIT = 10.0  # s: any one expected frame or event


class Client:
    """A minimal client: frames over a stream, decoded with `FrameDecoder`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder(accept=FROM_DAEMON)
        self.name = ""
        self.backlog: list[Frame] = []

    @classmethod
    async def connect(cls, address: Path | tuple[str, int]) -> Client:
        async with asyncio.timeout(WAIT):
            if isinstance(address, Path):
                reader, writer = await asyncio.open_unix_connection(str(address))
            else:
                reader, writer = await asyncio.open_connection(*address)
        return cls(reader, writer)

    async def send(self, *frames: Frame) -> None:
        self.writer.write(b"".join(encode(f) for f in frames))
        await self.writer.drain()

    async def recv(self) -> Frame | None:
        """The next frame, or None at EOF."""
        if self.backlog:
            return self.backlog.pop(0)
        async with asyncio.timeout(WAIT):
            while (frame := self.decoder.next_frame()) is None:
                data = await self.reader.read(65536)
                if not data:
                    return None
                self.decoder.feed(data)
        return frame

    async def expect(self, predicate: Callable[[Frame], bool]) -> Frame:
        """Read until a frame satisfies `predicate`; keep the others for later `recv`."""
        skipped: list[Frame] = []
        try:
            while True:
                frame = await self.recv()
                assert frame is not None, f"{self.name}: EOF; skipped {skipped}"
                if predicate(frame):
                    return frame
                skipped.append(frame)
        finally:
            self.backlog = skipped + self.backlog

    async def hello(self, name: str, flags: HelloFlag = HelloFlag.MEMBERSHIP) -> Welcome:
        await self.send(Hello(name, flags=flags))
        welcome = await self.recv()
        assert isinstance(welcome, Welcome), welcome
        self.name = welcome.private_name
        return welcome

    async def read_until(self, into: list[Frame], done: Callable[[list[Frame]], bool]) -> None:
        """Read every frame into `into` until `done(into)` (or EOF)."""
        while not done(into):
            data = await self.reader.read(65536)
            if not data:
                return
            self.decoder.feed(data)
            into.extend(self.decoder)

    async def close(self) -> None:
        self.writer.transport.abort()  # never wait on a peer that stopped reading
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@asynccontextmanager
async def cluster(
    tmp_path: Path,
) -> AsyncIterator[tuple[dict[str, DaemonProcess], list[Path | tuple[str, int]]]]:
    """d1, d2 (Unix sockets) and d3 (TCP on loopback) in a ring; everything stopped after."""
    config = write_cluster(tmp_path, 3, ring(3))
    sockets = Path(tempfile.mkdtemp(prefix="mcs", dir="/tmp"))  # short: AF_UNIX path limit
    daemons: dict[str, DaemonProcess] = {}
    try:
        starts = [
            DaemonProcess.start(config, "d1", "--client-socket", str(sockets / "d1.sock")),
            DaemonProcess.start(config, "d2", "--client-socket", str(sockets / "d2.sock")),
            DaemonProcess.start(config, "d3", "--no-client-socket", "--client-port", "0"),
        ]
        results = await asyncio.gather(*starts, return_exceptions=True)
        for r in results:
            if isinstance(r, DaemonProcess):
                daemons[r.name] = r
        for r in results:
            if isinstance(r, BaseException):
                raise r
        await wait_agreed(daemons.values(), {1, 2, 3}, VIEW_TIMEOUT, edges=3)
        listening = daemons["d3"].named("clients_listening")[0]
        assert listening["unix_path"] is None
        assert listening["tcp_host"] == "127.0.0.1"
        addresses: list[Path | tuple[str, int]] = [
            sockets / "d1.sock",
            sockets / "d2.sock",
            ("127.0.0.1", int(listening["tcp_port"])),
        ]
        assert (sockets / "d1.sock").stat().st_mode & 0o777 == 0o600
        yield daemons, addresses
    finally:
        await asyncio.gather(*(d.stop() for d in daemons.values()))
        shutil.rmtree(sockets, ignore_errors=True)


@asynccontextmanager
async def clients(*addresses: Path | tuple[str, int]) -> AsyncIterator[list[Client]]:
    opened: list[Client] = []
    try:
        for address in addresses:
            opened.append(await Client.connect(address))  # noqa: PERF401 - each may fail
        yield opened
    finally:
        for c in opened:
            await c.close()


def is_membership(group: str, size: int) -> Callable[[Frame], bool]:
    return lambda f: isinstance(f, Membership) and f.group == group and len(f.members) == size


async def test_group_messages_order_and_membership(tmp_path: Path) -> None:
    async with cluster(tmp_path) as (daemons, addresses), clients(*addresses) as (a, b, c):
        for client, name in ((a, "alice"), (b, "bob"), (c, "carol")):
            await client.hello(name)
        assert (a.name, b.name, c.name) == ("#alice#d1", "#bob#d2", "#carol#d3")
        confirms: list[Frame] = []
        for client in (a, b, c):
            await client.send(Join("g", request_id=1))
            confirm = await client.expect(lambda f: isinstance(f, Membership))
            confirms.append(confirm)
            assert isinstance(confirm, Membership)
            assert confirm.cause == Cause.JOIN
            assert confirm.who == (client.name,)
        views = []
        for x, confirm in zip((a, b, c), confirms, strict=True):
            full = is_membership("g", 3)
            views.append(confirm if full(confirm) else await x.expect(full))
        assert len({v.view_id for v in views if isinstance(v, Membership)}) == 1
        assert {v.members for v in views if isinstance(v, Membership)} == {(a.name, b.name, c.name)}
        for i in range(5):
            for client in (a, b, c):
                await client.send(
                    Multicast(("g",), f"r{client.name}{i}".encode(), ServiceLevel.RELIABLE),
                    Multicast(("g",), f"a{client.name}{i}".encode(), ServiceLevel.AGREED),
                )
        received: dict[str, list[Message]] = {}
        for client in (a, b, c):
            got: list[Message] = []
            while len(got) < 30:
                frame = await client.recv()
                assert frame is not None, f"{client.name}: EOF after {len(got)} messages"
                if isinstance(frame, Membership):
                    continue  # an earlier view still in the backlog
                assert isinstance(frame, Message), frame
                got.append(frame)
            received[client.name] = got
        payloads = [sorted(m.payload for m in got) for got in received.values()]
        assert payloads[0] == payloads[1] == payloads[2]
        assert len(set(payloads[0])) == 30
        agreed = [
            [m.payload for m in got if m.service == ServiceLevel.AGREED]
            for got in received.values()
        ]
        assert agreed[0] == agreed[1] == agreed[2]
        # leave: the leaver gets its confirmation, the others the new view
        await b.send(Leave("g", request_id=2))
        left = await b.expect(lambda f: isinstance(f, Membership))
        assert isinstance(left, Membership)
        assert (left.cause, left.who, left.members) == (Cause.LEAVE, (b.name,), (a.name, c.name))
        for x in (a, c):
            seen = await x.expect(lambda f: isinstance(f, Membership) and f.cause == Cause.LEAVE)
            assert isinstance(seen, Membership)
            assert seen.who == (b.name,)
        # a client that just goes away: cause disconnect at the others
        await c.close()
        gone = await a.expect(lambda f: isinstance(f, Membership) and f.cause == Cause.DISCONNECT)
        assert isinstance(gone, Membership)
        assert (gone.who, gone.members) == ((c.name,), (a.name,))
        # GOODBYE: answered with GOODBYE, then EOF
        await a.send(Goodbye())
        assert await a.expect(lambda f: isinstance(f, Goodbye)) == Goodbye()
        assert await a.recv() is None
        for d in daemons.values():
            await d.wait_event(
                "group_membership",
                lambda e: e["group"] == "g" and e["cause"] == "disconnect" and e["members"] == [],
                timeout=WAIT,
            )
        await daemons["d1"].wait_event(
            "client_connected", lambda e: e["client"] == "#alice#d1", timeout=WAIT
        )
        await daemons["d3"].wait_event(
            "client_disconnected",
            lambda e: e["client"] == "#carol#d3" and e["reason"] == "closed",
            timeout=WAIT,
        )


async def test_bad_input_gets_typed_errors(tmp_path: Path) -> None:
    async with (
        cluster(tmp_path) as (_daemons, addresses),
        clients(addresses[0], addresses[0], addresses[2], addresses[0]) as (x, y, z, w),
    ):
        # a request before HELLO
        await x.send(Join("g"))
        err = await x.recv()
        assert isinstance(err, ErrorReport)
        assert err.code == ErrorCode.UNEXPECTED_FRAME
        assert await x.recv() is None
        # a frame that does not decode: ERROR BAD_FRAME, then the session ends
        await y.hello("y")
        y.writer.write(b"\x00\x00\x00\x02\x02\xff")
        err = await y.recv()
        assert isinstance(err, ErrorReport)
        assert err.code == ErrorCode.BAD_FRAME
        assert await y.recv() is None
        # 2xx: the request is refused, the session goes on
        await z.hello("z")
        await z.send(Join("g" * 65, request_id=7))
        err = await z.recv()
        assert isinstance(err, ErrorReport)
        assert (err.code, err.request_id) == (ErrorCode.GROUP_NAME_TOO_LONG, 7)
        await z.send(Leave("nope", request_id=8))
        err = await z.recv()
        assert isinstance(err, ErrorReport)
        assert (err.code, err.request_id) == (ErrorCode.NOT_A_MEMBER, 8)
        await z.send(Join("ok", request_id=9))
        assert isinstance(await z.recv(), Membership)
        # the name is taken on d1 by nobody yet, then by w
        await w.hello("y")  # y's session ended: its name is free again
        async with clients(addresses[0]) as (v,):
            await v.send(Hello("y"))
            err = await v.recv()
            assert isinstance(err, ErrorReport)
            assert err.code == ErrorCode.NAME_IN_USE


async def test_slow_receivers_follow_their_policy(tmp_path: Path) -> None:
    chunk = b"x" * 60_000
    async with cluster(tmp_path) as (daemons, addresses):
        d1 = addresses[0]
        async with clients(d1, d1, d1, d1) as (sender, watcher, dropper, quitter):
            for client, name in ((sender, "s"), (watcher, "w"), (dropper, "dr"), (quitter, "q")):
                await client.hello(name)
            await dropper.send(Join("metrics", SlowReceiverPolicy.DROP_UNRELIABLE))
            await quitter.send(Join("control", SlowReceiverPolicy.DISCONNECT))
            await watcher.send(Join("control"))
            for client in (dropper, quitter):
                assert isinstance(
                    await client.expect(lambda f: isinstance(f, Membership)), Membership
                )
            full = is_membership("control", 2)
            if not full(await watcher.expect(lambda f: isinstance(f, Membership))):
                await watcher.expect(full)
            # the watcher reads all along (a `block` member that keeps up)
            seen: list[Frame] = []
            reading = asyncio.create_task(
                watcher.read_until(
                    seen, lambda got: sum(isinstance(f, Message) for f in got) >= 100
                )
            )
            try:
                # neither dropper nor quitter reads from now on: 6 MB each, far beyond
                # the socket buffers and the daemon's 1 MiB mark
                async with asyncio.timeout(WAIT * 3):
                    for _ in range(100):
                        await sender.send(
                            Multicast(("metrics",), chunk, ServiceLevel.UNRELIABLE),
                            Multicast(("control",), chunk, ServiceLevel.RELIABLE),
                        )
                    await reading
            finally:
                reading.cancel()
            (gone,) = [f for f in seen if isinstance(f, Membership)]
            assert isinstance(gone, Membership)
            assert gone.who == (quitter.name,)
            await daemons["d1"].wait_event(
                "client_disconnected",
                lambda e: e["client"] == quitter.name and e["reason"] == "slow receiver",
                timeout=WAIT,
            )
            # it learns why once it reads what was already in its socket: the daemon
            # wrote ERROR 106 after that, not into the void
            end = await quitter.expect(lambda f: isinstance(f, ErrorReport))
            assert isinstance(end, ErrorReport)
            assert end.code == ErrorCode.SLOW_RECEIVER
            quitter.backlog.clear()  # the deliveries read on the way
            assert await quitter.recv() is None  # then the daemon closed the connection
            # the dropper reads again: a bounded part arrived, then a MESSAGES_DROPPED notice
            report = await dropper.expect(
                lambda f: isinstance(f, ErrorReport) and f.code == ErrorCode.MESSAGES_DROPPED
            )
            assert isinstance(report, ErrorReport)
            assert "metrics" in report.text
            delivered = sum(isinstance(f, Message) for f in dropper.backlog)
            assert delivered < 100
        await daemons["d1"].stop()
        stats = daemons["d1"].named("daemon_stopped")[0]["stats"]["sessions"]
        assert stats["unreliable_dropped"] > 0
        assert stats["slow_disconnected"] == 1


FLOOD = 700


@pytest.mark.parametrize("where", ["same daemon", "other daemon"])
async def test_block_receiver_holds_senders_back(tmp_path: Path, where: str) -> None:
    """A `block` member that stops reading slows the senders down, on its own daemon
    (reading stops) and on the others (its daemon's group ACKs say BLOCKED)."""
    chunk = b"x" * 60_000
    async with cluster(tmp_path) as (daemons, addresses):
        d1 = addresses[0]
        stuck_at = d1 if where == "same daemon" else addresses[1]
        async with clients(d1, stuck_at) as (sender, stuck):
            await sender.hello("s")
            await stuck.hello("stuck")
            await stuck.send(Join("g"))  # policy block (the default); never reads again
            assert isinstance(await stuck.expect(lambda f: isinstance(f, Membership)), Membership)

            async def flood() -> None:
                # 42 MB: beyond what the daemons take in before the block reaches them
                # (the sending daemon's window, 16 MiB)
                for _ in range(FLOOD):
                    await sender.send(Multicast(("g",), chunk, ServiceLevel.RELIABLE))

            sending = asyncio.create_task(flood())
            try:
                # the daemon stops reading the sender: its writes back up, nothing is lost
                done, _ = await asyncio.wait({sending}, timeout=2.0)
                assert not done, f"the sender was not held back by a blocked member ({where})"
                await stuck.close()  # the blocked member goes away: the sender is released
                async with asyncio.timeout(WAIT * 3):
                    await sending
            finally:
                sending.cancel()
            await sender.send(Ping(42))  # answered once every earlier frame was taken
            assert await sender.expect(lambda f: isinstance(f, Pong)) == Pong(42)
        await daemons["d1"].stop()
        stopped = daemons["d1"].named("daemon_stopped")[0]["stats"]
        assert stopped["sessions"]["messages_submitted"] == FLOOD
        assert stopped["sessions"]["slow_disconnected"] == 0
        if where == "other daemon":  # held back by d2's word, not by its own session
            assert stopped["group"]["blocked_acks_received"] > 0


@pytest.mark.asyncio
async def test_client_library_end_to_end(tmp_path: Path) -> None:
    """`meshcast.connect` against real daemons: clients on three daemons, AGREED order."""
    import meshcast

    async with cluster(tmp_path) as (_, addresses):
        urls = [f"unix:{a}" if isinstance(a, Path) else f"tcp:{a[0]}:{a[1]}" for a in addresses]
        connected = [await meshcast.connect(url, name=f"c{i}") for i, url in enumerate(urls)]
        try:
            for client in connected:
                await client.join("e2e")
            for i, client in enumerate(connected):
                for n in range(5):
                    await client.multicast("e2e", f"{i}:{n}".encode(), service=meshcast.AGREED)
            orders = []
            for client in connected:
                got: list[bytes] = []
                async with asyncio.timeout(30):
                    while len(got) < 15:
                        event = await client.receive()
                        if isinstance(event, meshcast.Message):
                            got.append(event.payload)
                orders.append(got)
        finally:
            for client in connected:
                await client.close()
    assert all(order == orders[0] for order in orders)  # one total order everywhere
    assert sorted(orders[0]) == sorted(f"{i}:{n}".encode() for i in range(3) for n in range(5))


async def test_a_message_of_the_maximum_size_crosses_daemons(tmp_path: Path) -> None:
    """16 MiB of payload (the default limit) in AGREED order from d1 to a member on d2:
    the group and overlay headers on top must still fit what the links carry."""
    payload = bytes(range(256)) * (16 * 1024 * 1024 // 256)
    async with (
        cluster(tmp_path) as (_, addresses),
        clients(addresses[0], addresses[1]) as (sender, member),
    ):
        await sender.hello("big")
        await member.hello("m")
        await member.send(Join("g"))
        await member.expect(lambda f: isinstance(f, Membership))
        await sender.send(Multicast(("g",), payload, ServiceLevel.AGREED))
        got = await member.expect(lambda f: isinstance(f, Message))
        assert isinstance(got, Message)
        assert got.payload == payload
        await sender.send(Multicast(("g",), payload + b"x", ServiceLevel.AGREED))
        refused = await sender.expect(lambda f: isinstance(f, ErrorReport))
        assert isinstance(refused, ErrorReport)
        assert refused.code == ErrorCode.MESSAGE_TOO_LARGE
