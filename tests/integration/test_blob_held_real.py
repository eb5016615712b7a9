"""The agreed completion event between real `meshcast daemon` processes (issue 13, item 2).

Three daemons on loopback (`replication_cluster`), members of group G on each of them.
A client of d1 that is no member of G replicates a file to ``group:G`` while every member
sends AGREED and SAFE messages to G. When the replication ends, every member receives
exactly one `meshcast.BlobHeld`, the same at each, at the same place in its sequence of
G's messages (a SAFE message in G's total order). A replication that cannot complete
(one daemon's copy cannot be put in place) says who misses what, and `meshcast user`
prints the event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import meshcast
from meshcast.client.replication import ReplicationReport

from .daemon_helpers import run_command
from .test_replication_real import (
    NAME,
    SIZE,
    SRC,
    WAIT,
    Cluster,
    contents,
    final_report,
    payload,
    replication_cluster,
)

pytestmark = pytest.mark.timeout(240)

GROUP = "G"
SEND_EVERY = 0.02  # s between one member's messages
BLOB = "BLOB"  # the event's place in a member's sequence


@dataclass
class Member:
    """A client in G: sends AGREED and SAFE messages while `sending`, records what arrives."""

    name: str
    client: meshcast.Client
    seen: list[str] = field(default_factory=list)  # payloads of G's messages, and BLOB
    events: list[meshcast.BlobHeld] = field(default_factory=list)
    sent: int = 0
    news: asyncio.Event = field(default_factory=asyncio.Event)  # set on every arrival

    async def receive(self) -> None:
        async for event in self.client:
            if isinstance(event, meshcast.BlobHeld):
                self.events.append(event)
                self.seen.append(BLOB)
            elif isinstance(event, meshcast.Message) and GROUP in event.groups:
                self.seen.append(event.payload.decode())
            self.news.set()

    async def send(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            service = meshcast.SAFE if self.sent % 2 else meshcast.AGREED
            await self.client.multicast(GROUP, f"{self.name}:{self.sent}".encode(), service=service)
            self.sent += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SEND_EVERY)


@asynccontextmanager
async def members_of_g(cluster: Cluster, homes: dict[str, str]) -> AsyncIterator[list[Member]]:
    """One member of G per entry (name -> daemon), joined, receiving."""
    async with contextlib.AsyncExitStack() as stack:
        members = []
        for name, daemon in homes.items():
            client = await stack.enter_async_context(
                await meshcast.connect(cluster.address(daemon), name=name, timeout=WAIT)
            )
            await client.join(GROUP)
            members.append(Member(name, client))
        tasks = [asyncio.create_task(m.receive()) for m in members]
        try:
            yield members
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def wait_for_group(cluster: Cluster, size: int) -> None:
    """Until d1's replicated group table has G with `size` members (bounded)."""
    async with asyncio.timeout(WAIT):
        while True:
            groups = (await cluster.status("d1"))["groups"]
            if any(g["name"] == GROUP and g["size"] == size for g in groups):
                return
            await asyncio.sleep(0.05)


async def until(members: list[Member], condition: Callable[[], bool]) -> None:
    """Until `condition()` holds, checked after each arrival at a member (bounded)."""
    async with asyncio.timeout(WAIT):
        while True:
            for m in members:
                m.news.clear()
            if condition():
                return
            await asyncio.wait(
                [asyncio.create_task(m.news.wait()) for m in members],
                return_when=asyncio.FIRST_COMPLETED,
            )


def check_event(event: meshcast.BlobHeld, final: ReplicationReport) -> None:
    assert event.group == GROUP
    assert (event.rid, event.name, event.size, event.digest) == (
        final.rid,
        NAME,
        SIZE,
        final.digest,
    )
    assert event.origin == "d1"


@pytest.mark.asyncio
async def test_every_member_gets_one_event_at_the_same_place(tmp_path: Path) -> None:
    source, data = payload(tmp_path)
    async with replication_cluster(tmp_path, 3) as cluster:
        homes = {"m1": "d1", "m2a": "d2", "m2b": "d2", "m3": "d3"}
        async with members_of_g(cluster, homes) as members:
            await wait_for_group(cluster, len(homes))
            stop = asyncio.Event()
            senders = [asyncio.create_task(m.send(stop)) for m in members]
            async with cluster.client() as c:  # d1's replicating client is not in G
                handle = await c.replicate(source, f"group:{GROUP}", rate=4e6)
                final = await final_report(handle)
            assert final.ok, final
            assert sorted(r.daemon for r in final.recipients) == ["d2", "d3"]
            await until(members, lambda: all(m.events for m in members))
            await asyncio.sleep(0.3)  # messages go on around the event
            stop.set()
            await asyncio.gather(*senders)
            total = sum(m.sent for m in members)
            await until(members, lambda: all(len(m.seen) == total + 1 for m in members))

        for m in members:
            (event,) = m.events
            check_event(event, final)
            assert event.complete
            assert event.held_by == ("d1", "d2", "d3")
            assert event.missing == ()
            assert event == members[0].events[0]
        first = members[0].seen
        assert first.count(BLOB) == 1
        before = first.index(BLOB)
        assert 0 < before < total, "the event came before or after every message"
        for m in members[1:]:
            assert m.seen == first, m.name  # one order of G's messages, the event in it
        for r in final.recipients:
            assert contents(r.path) == data


@pytest.mark.asyncio
async def test_an_incomplete_replication_says_who_misses_what(tmp_path: Path) -> None:
    source, data = payload(tmp_path)
    async with replication_cluster(tmp_path, 3) as cluster:
        # d3 cannot put its copy in place: a directory holds the file's name (root too)
        blocker = cluster.replicas("d3") / NAME
        blocker.mkdir(parents=True)
        env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
        user = asyncio.create_task(
            run_command(
                sys.executable,
                "-m",
                "meshcast.cli",
                "user",
                "--connect",
                cluster.address("d2"),
                "--name",
                "cli",
                "--join",
                GROUP,
                "--recv",
                "1",
                "--json",
                "--timeout",
                str(2 * WAIT),
                env=env,
                timeout=3 * WAIT,
            )
        )
        try:
            homes = {"m1": "d1", "m2": "d2", "m3": "d3"}
            async with members_of_g(cluster, homes) as members:
                await wait_for_group(cluster, len(homes) + 1)  # `meshcast user` joined too
                async with cluster.client() as c:
                    final = await final_report(await c.replicate(source, f"group:{GROUP}"))
                assert final.state == "failed", final
                await until(members, lambda: all(m.events for m in members))
            code, out, err = await user
        finally:
            if not user.done():
                user.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await user

        (d3,) = final.missing
        assert d3.daemon == "d3"
        for m in members:
            (event,) = m.events
            check_event(event, final)
            assert not event.complete
            assert event.held_by == ("d1", "d2")
            (missing,) = event.missing
            assert missing.daemon == "d3"
            assert missing.held_bytes == d3.held_bytes
            assert missing.reason == d3.detail
            assert NAME in missing.reason
            assert event == members[0].events[0]
        (d2,) = [r for r in final.recipients if r.daemon == "d2"]
        assert contents(d2.path) == data

        # `meshcast user --recv 1 --json` printed it (a blob_held event counts as one)
        assert code == 0, err
        lines = [json.loads(line) for line in out.splitlines() if line.strip()]
        (printed,) = [line for line in lines if line["event"] == "blob_held"]
        assert printed["complete"] is False
        assert printed["rid"] == final.rid
        assert printed["held_by"] == ["d1", "d2"]
        assert printed["missing"] == [
            {"daemon": "d3", "held_bytes": d3.held_bytes, "reason": d3.detail}
        ]
