"""Helpers of the attack tests (test_attacks*.py): a raw UDP neighbour that speaks the Hop
link protocol in the clear with no key (what anyone on the network can do), an on-path
relay that captures and injects between two daemons, clients exchanging AGREED traffic,
and the daemons' status and process figures.

Everything here is bound to 127.0.0.x addresses and closed by its context manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import meshcast
from meshcast.errors import DecodeError
from meshcast.wire.client import Membership, Message
from meshcast.wire.packet import (
    FLAG_AUTH,
    HEADER,
    HEADER_SIZE,
    Header,
    Heartbeat,
    HeartbeatKind,
    Hello,
    LinkState,
    Packet,
    PacketType,
    WholeMessage,
    decode,
    encode,
)

from .daemon_helpers import run_command

Address = tuple[str, int]
WAIT = 20.0  # s: any one condition a test waits for
STATUS_COMMAND = (sys.executable, "-m", "meshcast", "status")
FORGER_MTU = 1200  # what the raw neighbour announces in its HELLOs


@dataclass(frozen=True, slots=True)
class Seen:
    """The cleartext header fields of a datagram (sealed or not: the header is never
    encrypted, so an eavesdropper reads these too)."""

    ptype: int
    flags: int
    key_id: int
    sender: int
    epoch: int
    seq: int


def header_of(datagram: bytes) -> Seen | None:
    if len(datagram) < HEADER_SIZE:
        return None
    _, _, ptype, flags, key_id, _, sender, epoch, seq = HEADER.unpack_from(datagram)
    return Seen(ptype, flags, key_id, sender, epoch, seq)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, Address], None]) -> None:
        self._on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._on_datagram(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable: ignore
        pass


async def bind_udp(
    address: Address, on_datagram: Callable[[bytes, Address], None]
) -> asyncio.DatagramTransport:
    """A socket bound at `address`. A socket closed just before on the same address is
    released on a later turn of the event loop: retry for a second."""
    loop = asyncio.get_running_loop()
    for attempt in range(20):
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(on_datagram), local_addr=address
            )
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or attempt == 19:
                raise
            await asyncio.sleep(0.05)
        else:
            return transport
    raise AssertionError("unreachable")


@dataclass
class RawNeighbour:
    """A UDP socket on a configured daemon's address that speaks the Hop protocol in the
    clear, with no key, built with `meshcast.wire`'s encoders.

    With `answer` on, it plays the link handshake the way a Hop link without encryption
    does: every HELLO a daemon sends is answered with a HELLO that has seen the daemon's
    epoch, every heartbeat request with a reply, every DATA with a cumulative ACK. Against
    a daemon without link encryption that establishes a link; against an encrypted one
    nothing it sends gets past the link (each datagram dropped as cleartext)."""

    local: int  # the node id it poses as
    epoch: int  # its made-up link epoch
    transport: asyncio.DatagramTransport
    answer: bool = True
    received: list[tuple[Address, bytes]] = field(default_factory=list)
    peer_epochs: dict[Address, int] = field(default_factory=dict)
    key_ids: dict[Address, int] = field(default_factory=dict)  # of their sealed HELLOs
    _acks: dict[Address, int] = field(default_factory=dict)
    _sent_seq: dict[Address, int] = field(default_factory=dict)
    _hello_task: asyncio.Task[None] | None = None

    @classmethod
    @asynccontextmanager
    async def bound(
        cls, local: int, address: Address, *, epoch: int = 0x5EED, answer: bool = True
    ) -> AsyncIterator[RawNeighbour]:
        box: list[RawNeighbour] = []
        transport = await bind_udp(address, lambda data, addr: box[0]._received(data, addr))
        neighbour = cls(local, epoch, transport, answer)
        box.append(neighbour)
        neighbour._hello_task = asyncio.create_task(neighbour._hello_loop())
        try:
            yield neighbour
        finally:
            neighbour._hello_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await neighbour._hello_task
            transport.close()

    def send(self, datagram: bytes, to: Address) -> None:
        self.transport.sendto(datagram, to)

    def hello(self, to: Address, *, epoch: int | None = None) -> bytes:
        """A cleartext HELLO that has seen `to`'s epoch (as far as we heard it)."""
        return encode(
            Packet(
                Header(PacketType.HELLO, self.local, self.epoch if epoch is None else epoch),
                body=Hello(self.peer_epochs.get(to, 0), FORGER_MTU, established=True),
            )
        )

    def data(self, to: Address, messages: Sequence[bytes]) -> bytes:
        """A cleartext DATA datagram carrying `messages` as whole link messages, next in
        our stream towards `to`, acknowledging what we received."""
        seq = self._sent_seq.get(to, 0) + 1
        self._sent_seq[to] = seq
        return encode(
            Packet(
                Header(PacketType.DATA, self.local, self.epoch, seq),
                state=self._state(to),
                body=tuple(WholeMessage(m) for m in messages),
            )
        )

    def _state(self, to: Address) -> LinkState:
        return LinkState(
            self.peer_epochs.get(to, 0), self._acks.get(to, 0), self._sent_seq.get(to, 0)
        )

    def _received(self, data: bytes, addr: Address) -> None:
        self.received.append((addr, data))
        seen = header_of(data)
        if seen is None:
            return
        if seen.ptype == PacketType.HELLO:
            self.peer_epochs[addr] = seen.epoch
            if seen.flags & FLAG_AUTH:
                self.key_ids[addr] = seen.key_id
        if not self.answer:
            return
        if seen.ptype == PacketType.HELLO:
            self.send(self.hello(addr), addr)
            return
        try:
            packet = decode(data)
        except DecodeError:
            return  # sealed: nothing to answer
        if packet.header.ptype is PacketType.DATA:
            self._acks[addr] = max(self._acks.get(addr, 0), packet.header.seq)
        if packet.header.ptype is PacketType.DATA or packet.state is not None:
            ack = Packet(Header(PacketType.STATE, self.local, self.epoch), state=self._state(addr))
            self.send(encode(ack), addr)
        if isinstance(packet.body, Heartbeat) and packet.body.kind is HeartbeatKind.REQUEST:
            reply = Heartbeat(HeartbeatKind.REPLY, packet.body.stamp)
            self.send(
                encode(Packet(Header(PacketType.HEARTBEAT, self.local, self.epoch), body=reply)),
                addr,
            )

    async def _hello_loop(self) -> None:
        """Keep the links it answered alive: a HELLO to each every 100 ms."""
        while True:
            await asyncio.sleep(0.1)
            if self.answer:
                for addr in list(self.peer_epochs):
                    self.send(self.hello(addr), addr)


@dataclass
class Relay:
    """An on-path attacker between daemons a and b: a owns address `a_side` for b (where a
    sends b's datagrams), and b owns `b_side` for a. Every datagram is captured, then
    forwarded, unless `forwarding` is off; `to_a` / `to_b` inject datagrams that arrive
    from the address the daemon knows as its peer."""

    a_real: Address
    b_real: Address
    towards_b: asyncio.DatagramTransport  # bound at a's view of b; a's datagrams arrive here
    towards_a: asyncio.DatagramTransport  # bound at b's view of a; b's datagrams arrive here
    from_a: list[bytes] = field(default_factory=list)
    from_b: list[bytes] = field(default_factory=list)
    forwarding: bool = True
    # Called with each datagram of a: what it returns (if anything) goes to b first.
    tamper_a: Callable[[bytes], bytes | None] | None = None

    @classmethod
    @asynccontextmanager
    async def bound(
        cls, *, a_real: Address, b_real: Address, b_as_seen_by_a: Address, a_as_seen_by_b: Address
    ) -> AsyncIterator[Relay]:
        box: list[Relay] = []
        one = await bind_udp(b_as_seen_by_a, lambda d, addr: box[0]._from_a(d, addr))
        try:
            two = await bind_udp(a_as_seen_by_b, lambda d, addr: box[0]._from_b(d, addr))
        except BaseException:
            one.close()
            raise
        relay = cls(a_real, b_real, one, two)
        box.append(relay)
        try:
            yield relay
        finally:
            one.close()
            two.close()

    def _from_a(self, data: bytes, addr: Address) -> None:
        if addr != self.a_real:
            return
        self.from_a.append(data)
        if self.tamper_a is not None:
            altered = self.tamper_a(data)
            if altered is not None:
                self.towards_a.sendto(altered, self.b_real)
        if self.forwarding:
            self.towards_a.sendto(data, self.b_real)

    def _from_b(self, data: bytes, addr: Address) -> None:
        if addr != self.b_real:
            return
        self.from_b.append(data)
        if self.forwarding:
            self.towards_b.sendto(data, self.a_real)

    def to_a(self, datagram: bytes) -> None:
        """Inject a datagram that a receives from (what it knows as) b's address."""
        self.towards_b.sendto(datagram, self.a_real)

    def to_b(self, datagram: bytes) -> None:
        self.towards_a.sendto(datagram, self.b_real)


# ---------------------------------------------------------------- status and processes


async def status(sock: str) -> dict[str, Any]:
    """The daemon's status report over its client socket (what `meshcast status --json`
    prints)."""
    async with await meshcast.connect(sock, timeout=WAIT) as client:
        report: dict[str, Any] = await client.status()
        return report


async def status_cli(sock: str) -> dict[str, Any]:
    """``meshcast status --json`` run as a command."""
    code, out, err = await run_command(*STATUS_COMMAND, "--socket", f"unix:{sock}", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert isinstance(report, dict)
    return report


def link_report(report: dict[str, Any], name: str) -> dict[str, Any]:
    (link,) = [link for link in report["links"] if link["name"] == name]
    assert isinstance(link, dict)
    return link


async def until_report(
    sock: str,
    done: Callable[[dict[str, Any]], bool],
    *,
    timeout: float = WAIT,  # noqa: ASYNC109
) -> dict[str, Any]:
    """Poll the status report until `done(report)`; AssertionError with the last one."""
    report: dict[str, Any] = {}
    try:
        async with asyncio.timeout(timeout):
            while True:
                report = await status(sock)
                if done(report):
                    return report
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(
            f"status never satisfied the test within {timeout} s: {report}"
        ) from None


async def until(condition: Callable[[], bool], *, timeout: float = WAIT) -> None:  # noqa: ASYNC109
    """Poll `condition` every 20 ms; `TimeoutError` after `timeout`."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - state changed by callbacks: nothing to wait on
            await asyncio.sleep(0.02)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


# ---------------------------------------------------------------- group traffic


async def wait_members(client: Any, group: str, count: int) -> None:
    """Read events until a MEMBERSHIP of `group` with `count` members (bounded by WAIT)."""
    async with asyncio.timeout(WAIT):
        while True:
            event = await client.receive()
            if (
                isinstance(event, Membership)
                and event.group == group
                and len(event.members) == count
            ):
                return


@dataclass
class Traffic:
    """AGREED messages from one sender, read by receivers; what each receiver got."""

    group: str
    sent: list[bytes] = field(default_factory=list)
    got: dict[str, list[bytes]] = field(default_factory=dict)
    foreign: list[Message] = field(default_factory=list)  # from anyone but the sender


@asynccontextmanager
async def agreed_traffic(
    sender_sock: str,
    receiver_socks: dict[str, str],
    *,
    group: str = "g",
    interval: float = 0.02,
) -> AsyncIterator[tuple[Traffic, Callable[[], Any]]]:
    """A client on `sender_sock` multicasts AGREED messages to `group` every `interval`
    while the body runs; clients on each receiver socket read them. Yields the record
    and `finish`, an async function that stops sending and waits until every receiver
    has every message sent (bounded): then `Traffic.got` is complete."""
    traffic = Traffic(group)
    stop = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        receivers = {
            name: await stack.enter_async_context(
                await meshcast.connect(sock, name=f"r{name}", timeout=WAIT)
            )
            for name, sock in receiver_socks.items()
        }
        sender = await stack.enter_async_context(
            await meshcast.connect(sender_sock, name="sender", timeout=WAIT)
        )
        for client in receivers.values():
            await client.join(group)
        await sender.join(group)
        for client in receivers.values():
            await wait_members(client, group, len(receivers) + 1)

        async def read(name: str, client: Any) -> None:
            got = traffic.got.setdefault(name, [])
            while True:
                event = await client.receive()
                if isinstance(event, Message):
                    if event.payload.startswith(b"agreed-"):
                        got.append(event.payload)
                    else:
                        traffic.foreign.append(event)

        async def send() -> None:
            i = 0
            while not stop.is_set():
                payload = b"agreed-%06d" % i
                await sender.multicast(group, payload, service="agreed")
                traffic.sent.append(payload)
                i += 1
                await asyncio.sleep(interval)

        readers = [asyncio.create_task(read(n, c)) for n, c in receivers.items()]
        sending = asyncio.create_task(send())

        async def finish() -> None:
            stop.set()
            await sending
            with contextlib.suppress(TimeoutError):  # the caller's assertions say what is missing
                await until(
                    lambda: all(len(traffic.got.get(n, [])) >= len(traffic.sent) for n in receivers)
                )
            await asyncio.sleep(0.3)  # a duplicate would arrive now

        try:
            yield traffic, finish
        finally:
            stop.set()
            for task in [*readers, sending]:
                task.cancel()
            for task in [*readers, sending]:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


def assert_all_once_in_order(traffic: Traffic) -> None:
    assert traffic.sent, "nothing was sent"
    for name, got in traffic.got.items():
        assert got == traffic.sent, (
            f"{name}: got {len(got)} of {len(traffic.sent)} (first differences: "
            f"{[g for g in got if got.count(g) > 1][:3]} duplicated, "
            f"{[s for s in traffic.sent if s not in set(got)][:3]} missing)"
        )
    assert not traffic.foreign, traffic.foreign[:3]
