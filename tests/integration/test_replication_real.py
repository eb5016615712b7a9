"""Bulk replication between real `meshcast daemon` processes on loopback (issue 12).

Each test starts its own cluster (daemons d1..dN on 127.0.0.1..N, fully meshed, a cluster
key, each with its own --data-dir and client socket), asks d1 to replicate a file of
random bytes through the client library (or `meshcast replicate`), and checks the copies
byte for byte where the final report says they are, and the daemons' status counters.
Every process is stopped on the way out (`running_daemons`), whatever happens.

What is not asserted: how fast anything goes. A rate cap (the request's `rate`) only
stretches a transfer so a test can look at it (status) or kill a daemon in the middle.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import meshcast
from meshcast.client.replication import Replication, ReplicationReport
from meshcast.replicate.manifest import chunk_size_for

from .daemon_helpers import (
    DaemonProcess,
    cluster_toml,
    host_of,
    marks,
    run_command,
    running_daemons,
    wait_agreed,
    write_key,
)
from .test_replicate_local import processes_mentioning

pytestmark = pytest.mark.timeout(240)

SRC = str(Path(__file__).resolve().parents[2] / "src")
WAIT = 60.0  # s: generous bound on every wait (a loaded 2-core machine is slow)
GIVE_UP_AFTER = 3.0  # s: [replicate] give_up_after, so a stalled replication ends soon
SIZE = 6 * 1024 * 1024 + 12_345  # several chunks, the last one short
CHUNK = chunk_size_for(SIZE)
NAME = "payload.bin"


def test_the_file_is_several_chunks_with_a_short_last_one() -> None:
    assert SIZE // CHUNK >= 6
    assert SIZE % CHUNK != 0


@dataclass
class Cluster:
    """Daemons d1..d<count> of one cluster file, each with a data directory and socket."""

    config: Path
    workdir: Path
    sockets: Path
    daemons: dict[str, DaemonProcess]

    def data_dir(self, name: str) -> Path:
        return self.workdir / f"data-{name}"

    def replicas(self, name: str) -> Path:
        return self.data_dir(name) / "replicas"

    def address(self, name: str) -> str:
        return f"unix:{self.sockets / f'{name}.sock'}"

    async def start(self, name: str) -> DaemonProcess:
        """Start (or start again) daemon `name`: same config, data directory and socket."""
        daemon = await DaemonProcess.start(
            self.config,
            name,
            "--data-dir",
            str(self.data_dir(name)),
            "--client-socket",
            str(self.sockets / f"{name}.sock"),
        )
        self.daemons[name] = daemon  # `running_daemons` stops it on the way out
        await daemon.wait_event("clients_listening", timeout=WAIT)
        return daemon

    @asynccontextmanager
    async def client(self, name: str = "d1") -> AsyncIterator[meshcast.Client]:
        async with await meshcast.connect(
            self.address(name), name="realtest", membership=False, timeout=WAIT
        ) as c:
            yield c

    async def status(self, name: str) -> dict[str, Any]:
        async with self.client(name) as c:
            return await c.status()

    async def counters(self, name: str) -> dict[str, int]:
        counters: dict[str, int] = (await self.status(name))["replication"]["counters"]
        return counters


@asynccontextmanager
async def replication_cluster(workdir: Path, count: int) -> AsyncIterator[Cluster]:
    """`count` fully meshed daemons, up and agreed on a view of all of them."""
    from meshcast.runtime.local_cluster import free_udp_ports

    edges = [(a, b) for a in range(1, count + 1) for b in range(a + 1, count + 1)]
    ports = free_udp_ports([host_of(i) for i in range(1, count + 1)])
    write_key(workdir)
    config = workdir / "cluster.toml"
    text = cluster_toml(count, edges, ports)
    text += f"\n[replicate]\ngive_up_after = {GIVE_UP_AFTER}\n"
    config.write_text(text, encoding="utf-8")
    # Unix socket paths are short (108 bytes): not under pytest's long tmp_path
    with tempfile.TemporaryDirectory(prefix="mcrr-") as sockets:
        async with running_daemons(config, []) as daemons:
            cluster = Cluster(config, workdir, Path(sockets), daemons)
            await asyncio.gather(*(cluster.start(f"d{i}") for i in range(1, count + 1)))
            await wait_agreed(daemons.values(), set(range(1, count + 1)), WAIT, edges=len(edges))
            yield cluster
            for daemon in daemons.values():  # no daemon died of a bug along the way
                assert not any("Traceback" in line for line in daemon.other_lines), daemon.tail()
    assert processes_mentioning(str(config)) == []  # every daemon started here is gone


def payload(directory: Path, size: int = SIZE) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = directory / NAME
    path.write_bytes(data)
    return path, data


async def final_report(handle: Replication) -> ReplicationReport:
    """The final report, whether it is a success or not (bounded)."""
    async with asyncio.timeout(WAIT):
        try:
            return await handle.wait()
        except meshcast.ReplicationFailed as failed:
            return failed.report


async def report_where(
    handle: Replication, condition: Callable[[ReplicationReport], bool]
) -> ReplicationReport:
    """The first report satisfying `condition` (AssertionError if the final one comes first)."""
    async with asyncio.timeout(WAIT):
        async for report in handle:
            if condition(report):
                return report
            assert not report.final, f"final report before the awaited state: {report}"
    raise AssertionError("no final report")


def held(report: ReplicationReport, daemon: str) -> int:
    return next(r.held_bytes for r in report.recipients if r.daemon == daemon)


def contents(path: str | Path | None) -> bytes:
    """A copy's bytes (a sync helper: the tests compare whole files of a few MiB)."""
    assert path is not None
    return Path(path).read_bytes()


def exists(path: Path) -> bool:
    return path.exists()


def partial_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(f".{NAME}.*.meshcast-partial")) if directory.exists() else []


# ---------------------------------------------------------------- 1 and 2


@pytest.mark.asyncio
async def test_copies_are_identical_and_a_second_run_moves_nothing(tmp_path: Path) -> None:
    source, data = payload(tmp_path)
    async with replication_cluster(tmp_path, 4) as cluster:
        recipients = ["d2", "d3", "d4"]
        async with cluster.client() as c:
            # a rate cap (bytes/s per sender) stretches the run so status sees it going
            handle = await c.replicate(source, "all", rate=4e6)
            seen: list[dict[str, Any]] = []
            async with asyncio.timeout(WAIT):
                while not handle.done:
                    replication = (await c.status())["replication"]
                    seen += [r for r in replication["replications"] if r["state"] == "running"]
                    await asyncio.sleep(0.05)
            final = await handle.wait()
        assert final.ok, final
        assert final.final
        assert final.state == "complete"
        assert final.size == SIZE
        assert sorted(r.daemon for r in final.recipients) == recipients
        assert all(r.complete and r.held_bytes == SIZE for r in final.recipients)
        for r in final.recipients:
            assert r.path == str(cluster.replicas(r.daemon) / NAME)
            assert contents(r.path) == data
            assert partial_files(cluster.replicas(r.daemon)) == []
        # the origin's status showed the replication while it ran ...
        assert seen, "no status report showed the replication running"
        assert {s["rid"] for s in seen} == {final.rid}
        assert all(s["size"] == SIZE and len(s["recipients"]) == 3 for s in seen)
        # ... and `meshcast status --json` has the section and its counters after it
        env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
        code, out, err = await run_command(
            sys.executable,
            "-m",
            "meshcast.cli",
            "status",
            "--json",
            "--socket",
            cluster.address("d1"),
            env=env,
        )
        assert code == 0, err
        section = json.loads(out)["replication"]
        assert section["data_dir"] == str(cluster.replicas("d1"))
        assert section["replications"] == []  # finished: not running any more
        first = section["counters"]
        assert (first["started"], first["completed"], first["failed"]) == (1, 1, 0)
        assert first["bytes_sent"] >= SIZE  # FastReplica: every chunk leaves d1 once at least
        before = {n: await cluster.counters(n) for n in recipients}
        for name in recipients:
            assert before[name]["copies_completed"] == 1
            assert before[name]["bytes_received"] >= SIZE
            assert before[name]["chunks_bad"] == 0
        files = {n: os.stat(cluster.replicas(n) / NAME) for n in recipients}

        # 2. the same file again: every recipient holds it, nothing moves
        async with cluster.client() as c:
            again = await (await c.replicate(source, "all")).wait()
        assert again.ok, again
        assert again.rid != final.rid
        assert [r.path for r in again.recipients] == [r.path for r in final.recipients]
        origin = await cluster.counters("d1")
        assert origin["bytes_sent"] == first["bytes_sent"]
        assert origin["completed"] == 2
        for name in recipients:
            after = await cluster.counters(name)
            assert after["bytes_received"] == before[name]["bytes_received"], name
            assert after["bytes_sent"] == before[name]["bytes_sent"], name
            assert after["bytes_skipped"] - before[name]["bytes_skipped"] == SIZE, name
            # one copy more, not one per late OFFER (a done copy used to join again)
            assert after["copies_completed"] == 2, name
            copy = cluster.replicas(name) / NAME
            now = os.stat(copy)
            assert (now.st_ino, now.st_mtime_ns) == (files[name].st_ino, files[name].st_mtime_ns)
            assert contents(copy) == data


# ---------------------------------------------------------------- 3


@pytest.mark.asyncio
async def test_a_restarted_recipient_resumes_from_its_verified_chunks(tmp_path: Path) -> None:
    source, data = payload(tmp_path)
    async with replication_cluster(tmp_path, 3) as cluster:
        replicas = cluster.replicas("d3")
        async with cluster.client() as c:
            handle = await c.replicate(source, "all", rate=1e6)
            # a few chunks in: its partial file is there and partly written
            going = await report_where(handle, lambda r: 2 * CHUNK <= held(r, "d3") < SIZE // 2)
            partial = partial_files(replicas)
            assert [p.name for p in partial] == [f".{NAME}.{going.digest[:16]}.meshcast-partial"]
            cluster.daemons["d3"].send_signal(signal.SIGKILL)
            assert await cluster.daemons["d3"].wait_exit(WAIT) == -signal.SIGKILL
            first = await final_report(handle)  # after give_up_after: d2 stalls without d3
        assert first.state == "failed"
        assert "d3" in [r.daemon for r in first.missing]
        assert not exists(replicas / NAME)
        assert partial_files(replicas) == partial  # the partial file survives the crash

        others = marks(d for n, d in cluster.daemons.items() if n != "d3")
        await cluster.start("d3")
        await wait_agreed(
            cluster.daemons.values(), {1, 2, 3}, WAIT, edges=3, after={**others, "d3": 0}
        )
        async with cluster.client() as c:
            second = await (await c.replicate(source, "d3")).wait()
        assert second.ok, second
        (copy,) = second.recipients
        assert (copy.daemon, copy.path) == ("d3", str(replicas / NAME))
        assert contents(replicas / NAME) == data
        assert partial_files(replicas) == []
        counters = await cluster.counters("d3")  # a new process: counts the second run only
        assert counters["copies_completed"] == 1
        assert counters["bytes_skipped"] >= 2 * CHUNK  # what it held, verified, was not sent
        assert counters["bytes_received"] <= SIZE - 2 * CHUNK
        assert counters["bytes_received"] + counters["bytes_skipped"] >= SIZE


# ---------------------------------------------------------------- 4


@pytest.mark.asyncio
async def test_bad_requests_fail_with_a_reason_and_the_daemons_keep_serving(
    tmp_path: Path,
) -> None:
    source, data = payload(tmp_path, 3 * 1024 * 1024 + 1)
    missing = tmp_path / "no-such-file.bin"
    async with replication_cluster(tmp_path, 3) as cluster:
        async with cluster.client() as c:
            with pytest.raises(meshcast.ReplicationFailed) as info:
                await asyncio.wait_for((await c.replicate(missing, "all")).wait(), WAIT)
            report = info.value.report
            assert report.state == "failed"
            assert report.final
            assert str(missing) in report.detail
            assert "no such file" in report.detail.lower()

            with pytest.raises(meshcast.ReplicationFailed, match="unknown daemon 'd9'"):
                await asyncio.wait_for((await c.replicate(source, "d2,d9")).wait(), WAIT)

            with pytest.raises(meshcast.ReplicationFailed) as info:
                await asyncio.wait_for((await c.replicate(source, "all", dest="/etc")).wait(), WAIT)
            report = info.value.report
            assert report.state == "failed"
            assert sorted(r.daemon for r in report.missing) == ["d2", "d3"]
            for r in report.recipients:
                assert r.state == "failed"
                assert "/etc" in r.detail, r.detail
            assert not exists(Path("/etc", NAME))

        # `meshcast replicate` of a missing file: non-zero, and says why
        env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
        code, out, err = await run_command(
            sys.executable,
            "-m",
            "meshcast.cli",
            "replicate",
            str(missing),
            "--socket",
            cluster.address("d1"),
            env=env,
            timeout=WAIT,
        )
        assert code != 0, out
        assert f"meshcast replicate: no copy was made: {missing}: no such file" in err, err

        # every daemon is still up and serving: a good replication works
        async with cluster.client() as c:
            good = await asyncio.wait_for((await c.replicate(source, "all")).wait(), WAIT)
        assert good.ok
        for r in good.recipients:
            assert r.path is not None
            assert contents(r.path) == data
        for name, daemon in cluster.daemons.items():
            assert daemon.process.returncode is None, name
            counters = await cluster.counters(name)
            if name != "d1":
                assert counters["copies_failed"] == 1, name


# ---------------------------------------------------------------- 5


@pytest.mark.asyncio
async def test_a_killed_recipient_is_named_and_the_others_complete(tmp_path: Path) -> None:
    source, data = payload(tmp_path)
    async with replication_cluster(tmp_path, 4) as cluster:
        async with cluster.client() as c:
            # fanout: d1 feeds every recipient itself. (With FastReplica the others would
            # need d4's subfile: repairing around a failed node is the next issue's.)
            handle = await c.replicate(source, "all", rate=6e6, strategy="fanout")
            await report_where(handle, lambda r: CHUNK <= held(r, "d4") < SIZE // 2)
            cluster.daemons["d4"].send_signal(signal.SIGKILL)
            assert await cluster.daemons["d4"].wait_exit(WAIT) == -signal.SIGKILL
            with pytest.raises(meshcast.ReplicationFailed) as info:
                await asyncio.wait_for(handle.wait(), WAIT)
            final = info.value.report
            assert final.final
            assert final.state == "failed"
            assert [r.daemon for r in final.missing] == ["d4"]
            assert "d4" in str(info.value)
            for r in final.recipients:
                if r.daemon != "d4":
                    assert r.complete
                    assert r.path == str(cluster.replicas(r.daemon) / NAME)
                    assert contents(r.path) == data
            await c.ping()  # the session goes on
        for name in ("d1", "d2", "d3"):
            assert cluster.daemons[name].process.returncode is None, name
            status = await cluster.status(name)
            assert status["counters"]["daemon"]["internal_errors"] == 0, name
        origin = (await cluster.status("d1"))["replication"]["counters"]
        assert (origin["started"], origin["completed"], origin["failed"]) == (1, 0, 1)
