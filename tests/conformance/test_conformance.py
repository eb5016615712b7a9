"""One conformance suite, two drivers: each test runs against `DaemonNode` in the
simulator and against the asyncio daemon on real sockets (tests/conformance/drivers.py).
What passes in one and fails in the other is a driver bug: the daemon logic is the same
object in both."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from meshcast.wire.client import (
    Cause,
    Confirmed,
    ErrorCode,
    ErrorReport,
    Join,
    Membership,
    Message,
    Multicast,
    ServiceLevel,
    SlowReceiverPolicy,
    StatusReply,
    StatusRequest,
    Welcome,
)

from .drivers import Client, Driver, RealDriver, SimDriver

DAEMONS = 3


@pytest_asyncio.fixture(params=["sim", "real"])
async def driver(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Driver]:
    if request.param == "sim":
        yield SimDriver(DAEMONS)
        return
    async with RealDriver(tmp_path, DAEMONS) as real:
        yield real


def messages(client: Client) -> list[Message]:
    return [f for f in client.received if isinstance(f, Message)]


def member_count(client: Client, group: str) -> int:
    views = [f for f in client.received if isinstance(f, Membership) and f.group == group]
    return len(views[-1].members) if views else 0


async def joined(driver: Driver, clients: list[Client], group: str, **join: object) -> None:
    for client in clients:
        await driver.wait_for(
            lambda c=client: any(isinstance(f, Welcome) for f in c.received), "WELCOME"
        )
        await client.send(Join(group, **join))  # type: ignore[arg-type]
    await driver.wait_for(
        lambda: all(member_count(c, group) == len(clients) for c in clients),
        f"{len(clients)} members of {group} seen by each",
    )


@pytest.mark.asyncio
async def test_agreed_messages_reach_every_member_in_one_order(driver: Driver) -> None:
    clients = [await driver.connect(d, f"c{d}") for d in range(1, DAEMONS + 1)]
    await joined(driver, clients, "g")
    for i in range(10):
        for sender in clients[:2]:
            await sender.send(Multicast(("g",), f"{sender.name}-{i}".encode(), ServiceLevel.AGREED))
    await driver.wait_for(
        lambda: all(len(messages(c)) == 20 for c in clients), "20 messages at every client"
    )
    orders = [[m.payload for m in messages(c)] for c in clients]
    assert orders[0] == orders[1] == orders[2]
    for sender in ("c1", "c2"):
        mine = [p for p in orders[0] if p.startswith(sender.encode())]
        assert mine == [f"{sender}-{i}".encode() for i in range(10)]


@pytest.mark.asyncio
async def test_a_member_too_slow_to_read_is_cut_off_and_the_others_get_everything(
    driver: Driver,
) -> None:
    reader = await driver.connect(1, "reader")
    slow = await driver.connect(1, "slow", reading=False)
    sender = await driver.connect(2, "sender")
    await joined(driver, [reader, sender], "g")
    await slow.send(Join("g", SlowReceiverPolicy.DISCONNECT))
    await driver.wait_for(lambda: member_count(reader, "g") == 3, "the slow member joined")
    chunk = bytes(32 * 1024)
    count = 160  # 5 MiB: past any socket buffer and high-water mark
    for i in range(count):
        await sender.send(Multicast(("g",), i.to_bytes(4, "big") + chunk, ServiceLevel.RELIABLE))
    await driver.wait_for(lambda: len(messages(reader)) == count, "every message at the reader")
    await driver.wait_for(
        lambda: member_count(reader, "g") == 2, "the slow member gone from the group"
    )
    got = [int.from_bytes(m.payload[:4], "big") for m in messages(reader)]
    assert got == list(range(count))
    view = [f for f in reader.received if isinstance(f, Membership)][-1]
    assert view.cause == Cause.DISCONNECT


@pytest.mark.asyncio
async def test_a_client_that_crashes_leaves_its_groups_as_a_disconnect(driver: Driver) -> None:
    a = await driver.connect(1, "a")
    b = await driver.connect(2, "b")
    await joined(driver, [a, b], "g")
    await a.crash()
    await driver.wait_for(lambda: member_count(b, "g") == 1, "a gone from b's view of g")
    view = [f for f in b.received if isinstance(f, Membership)][-1]
    assert view.cause == Cause.DISCONNECT
    assert view.who == ("#a#d1",)
    await b.send(Multicast(("g",), b"still here", ServiceLevel.SAFE))
    await driver.wait_for(lambda: len(messages(b)) == 1, "b's own message")
    assert not [f for f in b.received if isinstance(f, ErrorReport)]


@pytest.mark.asyncio
async def test_a_safe_message_sent_with_confirm_is_confirmed_after_delivery(
    driver: Driver,
) -> None:
    a = await driver.connect(1, "a")
    b = await driver.connect(3, "b")
    await joined(driver, [a, b], "g")
    await a.send(Multicast(("g",), b"safe", ServiceLevel.SAFE, request_id=7, confirm=True))
    await driver.wait_for(
        lambda: any(isinstance(f, Confirmed) for f in a.received), "CONFIRMED at the sender"
    )
    assert [f for f in a.received if isinstance(f, Confirmed)] == [Confirmed(7)]
    await driver.wait_for(lambda: len(messages(b)) == 1, "the message at the other member")


@pytest.mark.asyncio
async def test_a_status_request_reports_the_daemons_view(driver: Driver) -> None:
    client = await driver.connect(2, "watcher")
    await driver.wait_for(lambda: any(isinstance(f, Welcome) for f in client.received), "WELCOME")
    await client.send(StatusRequest(request_id=3))
    await driver.wait_for(
        lambda: any(isinstance(f, StatusReply) for f in client.received), "STATUS_REPLY"
    )
    (reply,) = [f for f in client.received if isinstance(f, StatusReply)]
    report = json.loads(reply.report)
    assert reply.request_id == 3
    assert report["daemon"]["name"] == "d2"
    assert [m["node"] for m in report["view"]["members"]] == [1, 2, 3]
    assert report["view"]["agreed"] is True
    assert report["counters"]["daemon"]["internal_errors"] == 0


@pytest.mark.asyncio
async def test_bytes_that_are_no_frame_end_the_session_with_bad_frame(driver: Driver) -> None:
    client = await driver.connect(1, "garbled")
    await driver.wait_for(lambda: any(isinstance(f, Welcome) for f in client.received), "WELCOME")
    await client.send_raw(b"\x00\x00\x00\x03\xee\xee\xee")
    await driver.wait_for(lambda: any(isinstance(f, ErrorReport) for f in client.received), "ERROR")
    (error,) = [f for f in client.received if isinstance(f, ErrorReport)]
    assert error.code == ErrorCode.BAD_FRAME
