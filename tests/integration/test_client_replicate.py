"""`Client.replicate` (client protocol version 5) against the fake daemon over real sockets."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Iterator

import pytest

import meshcast
from meshcast.client import blocking
from meshcast.client.replication import MAX_QUEUED_REPORTS
from meshcast.wire.client import Replicate

from .fake_daemon import FakeDaemon, report

pytestmark = pytest.mark.timeout(60)
RELATIVE_AS_SENT = os.path.abspath("rel/file.bin")  # the working directory of the tests


@pytest.fixture
def sock_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="mc-") as path:
        yield path


def progress_then_complete(frame: Replicate) -> list[dict[str, object]]:
    names = frame.targets.split(",")
    return [
        report("hashing", dict.fromkeys(names, ("waiting", 0))),
        report("running", dict.fromkeys(names, ("receiving", 400))),
        report("complete", dict.fromkeys(names, ("complete", 1000))),
    ]


def test_the_api_is_exported_from_the_package() -> None:
    assert issubclass(meshcast.ReplicationFailed, meshcast.ClientError)
    assert meshcast.ReplicationReport is meshcast.client.ReplicationReport
    assert meshcast.Replication is meshcast.client.Replication
    assert meshcast.RecipientProgress is meshcast.client.RecipientProgress


@pytest.mark.asyncio
async def test_progress_then_the_final_report(sock_dir: str) -> None:
    fake = FakeDaemon(replicate=progress_then_complete)
    async with (
        fake.serve_unix(os.path.join(sock_dir, "d.sock")),
        await meshcast.connect(fake.address, name="rep") as c,
    ):
        handle = await c.replicate(
            "rel/file.bin",
            ["D2", "D3"],
            rate=1.25e6,
            dest="/srv/copies",
            strategy="alm_tree",
            variant="k+2",
            tree="balanced",
            max_connections=4,
            capacity_aware=True,
        )
        async with asyncio.timeout(10):
            states = [r.state async for r in handle]
            final = await handle.wait()
        assert states == ["hashing", "running", "complete"]
        assert final.ok
        assert final.final
        assert handle.done
        assert [(r.daemon, r.held_bytes, r.path) for r in final.recipients] == [
            ("D2", 1000, "/data/D2/file.bin"),
            ("D3", 1000, "/data/D3/file.bin"),
        ]
        assert final.held_bytes == 2000
        assert not final.missing
        assert final.to_json()["recipients"][0]["daemon"] == "D2"  # type: ignore[index]
        assert c.replications == ()
    sent = fake.replicates
    # the path is made absolute here (the daemon's working directory is not ours)
    assert sent == [
        Replicate(
            RELATIVE_AS_SENT,
            "D2,D3",
            handle.token,
            "/srv/copies",
            1.25e6,
            strategy=2,
            variant=2,
            tree=1,
            max_connections=4,
            capacity_aware=True,
            buddy="",  # (a version-6 session: the field is there, empty)
        )
    ]


@pytest.mark.asyncio
async def test_several_replications_on_one_connection(sock_dir: str) -> None:
    def script(frame: Replicate) -> list[dict[str, object]]:
        rid = "00000000000000" + ("01" if frame.targets == "D2" else "02")
        return [
            report("running", {frame.targets: ("receiving", 10)}, rid=rid),
            report("running", {frame.targets: ("receiving", 20)}, rid=rid),
            report("complete", {frame.targets: ("complete", 1000)}, rid=rid),
        ]

    fake = FakeDaemon(replicate=script)
    async with (
        fake.serve_unix(os.path.join(sock_dir, "d.sock")),
        await meshcast.connect(fake.address) as c,
    ):
        first = await c.replicate("/a", "D2")
        second = await c.replicate("/b", "D3", strategy="fanout")
        assert first.token != second.token
        assert len(c.replications) == 2
        async with asyncio.timeout(10):
            one, two = await asyncio.gather(first.wait(), second.wait())
        assert (one.rid, two.rid) == ("0000000000000001", "0000000000000002")
        assert [r.daemon for r in one.recipients] == ["D2"]
        assert [r.daemon for r in two.recipients] == ["D3"]


@pytest.mark.asyncio
async def test_a_refused_request_is_a_failed_final_report(sock_dir: str) -> None:
    fake = FakeDaemon()  # no script: every REPLICATE is refused
    async with (
        fake.serve_unix(os.path.join(sock_dir, "d.sock")),
        await meshcast.connect(fake.address) as c,
    ):
        handle = await c.replicate("/srv/none.bin", "all")
        async with asyncio.timeout(10):
            with pytest.raises(meshcast.ReplicationFailed, match="replication not offered"):
                await handle.wait()
            reports = [r async for r in handle]  # the final report is still iterated
        assert [r.state for r in reports] == ["failed"]
        assert handle.final is not None
        assert not handle.final.ok
        await c.ping()  # the session goes on


@pytest.mark.asyncio
async def test_a_failed_recipient_is_named(sock_dir: str) -> None:
    def script(frame: Replicate) -> list[dict[str, object]]:
        return [
            report(
                "failed",
                {"D2": ("complete", 1000), "D3": ("failed", 100)},
                detail="1 of 2 copies failed",
            )
        ]

    fake = FakeDaemon(replicate=script)
    async with (
        fake.serve_unix(os.path.join(sock_dir, "d.sock")),
        await meshcast.connect(fake.address) as c,
    ):
        handle = await c.replicate("/f", "group:ops")
        async with asyncio.timeout(10):
            with pytest.raises(meshcast.ReplicationFailed) as info:
                await handle.wait()
    assert "D3 (failed: disk full)" in str(info.value)
    assert "D2" not in str(info.value).split("missing:")[1]
    assert [r.daemon for r in info.value.report.missing] == ["D3"]


@pytest.mark.asyncio
async def test_unread_progress_is_bounded_and_the_final_report_kept(sock_dir: str) -> None:
    count = MAX_QUEUED_REPORTS + 40

    def script(frame: Replicate) -> list[dict[str, object]]:
        steps = [report("running", {"D2": ("receiving", i)}) for i in range(count)]
        return [*steps, report("complete", {"D2": ("complete", 1000)})]

    fake = FakeDaemon(replicate=script, report_interval=0.0)
    async with (
        fake.serve_unix(os.path.join(sock_dir, "d.sock")),
        await meshcast.connect(fake.address) as c,
    ):
        handle = await c.replicate("/f", "D2")
        async with asyncio.timeout(10):
            await handle.wait()
            reports = [r async for r in handle]
    assert handle.reports_dropped == count - MAX_QUEUED_REPORTS
    assert len(reports) == MAX_QUEUED_REPORTS + 1
    assert reports[-1].final
    assert reports[0].held_bytes == count - MAX_QUEUED_REPORTS


@pytest.mark.asyncio
async def test_a_session_ending_first_fails_the_handle(sock_dir: str) -> None:
    def script(frame: Replicate) -> list[dict[str, object]]:
        return [report("running", {"D2": ("receiving", 1)}), report("complete", {})]

    fake = FakeDaemon(replicate=script, report_interval=30.0)
    c = None
    async with fake.serve_unix(os.path.join(sock_dir, "d.sock")):
        c = await meshcast.connect(fake.address)
        handle = await c.replicate("/f", "D2")
        async with asyncio.timeout(10):
            first = await handle.next_report()
    assert first is not None
    assert first.state == "running"
    async with asyncio.timeout(10):
        with pytest.raises(meshcast.ClientError, match="no final report of the replication"):
            await handle.wait()
    await c.close()


@pytest.mark.asyncio
async def test_arguments_and_old_daemons_are_usage_errors(sock_dir: str) -> None:
    fake = FakeDaemon(versions=(1, 4))
    async with (
        fake.serve_unix(os.path.join(sock_dir, "d.sock")),
        await meshcast.connect(fake.address) as old,
    ):
        with pytest.raises(meshcast.UsageError, match="needs protocol version 5"):
            await old.replicate("/f")
    fake = FakeDaemon()
    async with (
        fake.serve_unix(os.path.join(sock_dir, "e.sock")),
        await meshcast.connect(fake.address) as c,
    ):
        bad: list[tuple[dict[str, object], str]] = [
            ({"to": []}, "to must be"),
            ({"to": "D2,,D3"}, "daemon name in targets is empty"),
            ({"to": ["all"]}, "as a string"),
            ({"rate": 0}, "rate must be a positive number"),
            ({"rate": float("nan")}, "rate must be"),
            ({"strategy": "torrent"}, "unknown strategy 'torrent'"),
            ({"variant": "k+3"}, "unknown variant"),
            ({"tree": "star"}, "unknown tree"),
            ({"max_connections": 0}, "max_connections must be"),
            ({"capacity_aware": 1}, "capacity_aware must be"),
            ({"path": ""}, "path must be a non-empty str"),
            ({"buddy": ""}, "buddy must be a daemon name"),
            ({"buddy": "D2,D3"}, "buddy must be one daemon's name"),
            ({"buddy": "group:g"}, "buddy must be one daemon's name"),
        ]
        for kwargs, message in bad:
            path = kwargs.pop("path", "/f")
            with pytest.raises(meshcast.UsageError, match=message):
                await c.replicate(path, **kwargs)  # type: ignore[arg-type]
        for rid, rate, message in [
            ("xyz", 1e6, "a replication id is 16 hex digits"),
            ("00000000000000ff", 0, "rate must be a positive number"),
            ("00000000000000ff", float("inf"), "rate must be a positive number"),
        ]:
            with pytest.raises(meshcast.UsageError, match=message):
                await c.set_rate(rid, rate)
        await c.ping()
        assert fake.replicates == []  # refused before anything was sent


@pytest.mark.asyncio
async def test_a_version_5_daemon_gets_the_version_5_replicate(sock_dir: str) -> None:
    fake = FakeDaemon(versions=(1, 5), replicate=progress_then_complete)
    async with (
        fake.serve_unix(os.path.join(sock_dir, "d.sock")),
        await meshcast.connect(fake.address) as c,
    ):
        assert c.version == 5
        with pytest.raises(meshcast.UsageError, match="a buddy needs protocol version 6"):
            await c.replicate("/f", "D2", buddy="D3")
        with pytest.raises(meshcast.UsageError, match="set_rate needs protocol version 6"):
            await c.set_rate("00000000000000ff", 1e6)
        handle = await c.replicate("/f", "D2")
        async with asyncio.timeout(10):
            await handle.wait()
        with pytest.raises(meshcast.UsageError, match="is over"):
            await handle.set_rate(1e6)
    assert [frame.buddy for frame in fake.replicates] == [None]  # no buddy field at all


def test_the_blocking_client_replicates(sock_dir: str) -> None:
    fake = FakeDaemon(replicate=progress_then_complete)
    path = os.path.join(sock_dir, "d.sock")

    async def serve(started: asyncio.Event, stop: asyncio.Event) -> None:
        async with fake.serve_unix(path):
            started.set()
            await stop.wait()

    loop = asyncio.new_event_loop()
    started, stop = asyncio.Event(), asyncio.Event()
    server = loop.create_task(serve(started, stop))
    loop.run_until_complete(asyncio.wait_for(started.wait(), 10))
    import threading

    thread = threading.Thread(target=loop.run_until_complete, args=(server,))
    thread.start()
    try:
        with blocking.connect(fake.address) as c:
            handle = c.replicate("/f", "D2")
            states = [r.state for r in handle]
            final = handle.wait(timeout=10)
        assert states == ["hashing", "running", "complete"]
        assert final.ok
        assert handle.done
        assert handle.latest == final
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
