"""Replication through failures, between real `meshcast daemon` processes (issue 13).

FastReplica (not the fanout: each recipient relays a subfile to the others, so a dead one
leaves a hole the others cannot fill from it) on loopback clusters of
`test_replication_real.replication_cluster`, the request's rate cap stretching a 6 MiB
file to several seconds so a daemon can be SIGKILLed in the middle:

(a) a recipient killed: every other recipient completes with the source's bytes, and the
    final report names the killed one as missing;
(b) the origin's buddy killed, and a recipient with it: the survivors complete;
(c) a recipient killed and restarted while the transfer runs: it resumes from the chunks
    it verified (`bytes_skipped`) and ends with the identical file;
(d) the origin killed: every recipient holds the whole verified file or a clean
    incomplete state (its `.meshcast-partial` and no final file), and `meshcast
    replicate` of the same file from the restarted origin completes, sending nothing a
    recipient holds.

Generous bounds on every wait; no timing is asserted. Every daemon is stopped on the way
out (`replication_cluster`), whatever happens.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from .daemon_helpers import marks, run_command, wait_agreed
from .test_replication_real import (
    CHUNK,
    NAME,
    SIZE,
    SRC,
    WAIT,
    Cluster,
    contents,
    final_report,
    held,
    partial_files,
    payload,
    replication_cluster,
    report_where,
)

pytestmark = pytest.mark.timeout(300)

RATE = 1e6  # bytes/s per sender: a 6 MiB FastReplica run lasts several seconds
SLOW_RATE = 0.4e6  # bytes/s: long enough for a killed daemon to start again in the middle


async def kill(cluster: Cluster, name: str) -> None:
    cluster.daemons[name].send_signal(signal.SIGKILL)
    assert await cluster.daemons[name].wait_exit(WAIT) == -signal.SIGKILL


def held_chunks(copy: Path, data: bytes) -> int:
    """Bytes of the chunks of a partial file that equal the source's: what a resume
    finds verified (it hashes each chunk again)."""
    written = copy.read_bytes()
    total = 0
    for offset in range(0, SIZE, CHUNK):
        chunk = data[offset : offset + CHUNK]
        if written[offset : offset + len(chunk)] == chunk:
            total += len(chunk)
    return total


async def copies_ended(
    cluster: Cluster, names: list[str], before: dict[str, dict[str, int]]
) -> None:
    """Until each recipient's copy of this run completed or failed (bounded)."""
    async with asyncio.timeout(WAIT):
        pending = list(names)
        while pending:
            await asyncio.sleep(0.2)
            still = []
            for name in pending:
                now = await cluster.counters(name)
                ended = sum(now[k] - before[name][k] for k in ("copies_completed", "copies_failed"))
                if ended < 1:
                    still.append(name)
            pending = still


def assert_identical(cluster: Cluster, names: list[str], data: bytes) -> None:
    for name in names:
        replicas = cluster.replicas(name)
        assert contents(replicas / NAME) == data, name
        assert partial_files(replicas) == [], name


# ---------------------------------------------------------------- (a)


@pytest.mark.asyncio
async def test_a_killed_recipient_is_named_and_every_other_completes(tmp_path: Path) -> None:
    source, data = payload(tmp_path)
    async with replication_cluster(tmp_path, 5) as cluster:
        async with cluster.client() as c:
            handle = await c.replicate(source, "all", rate=RATE, strategy="fastreplica")
            await report_where(handle, lambda r: CHUNK <= held(r, "d3") < SIZE // 2)
            await kill(cluster, "d3")
            final = await final_report(handle)
            await c.ping()  # the session goes on
        assert final.final
        assert final.state == "failed"
        assert [r.daemon for r in final.missing] == ["d3"]
        survivors = ["d2", "d4", "d5"]
        for r in final.recipients:
            if r.daemon != "d3":
                assert r.complete, r
                assert r.path == str(cluster.replicas(r.daemon) / NAME)
        assert_identical(cluster, survivors, data)
        for name in ("d1", *survivors):
            status = await cluster.status(name)
            assert status["counters"]["daemon"]["internal_errors"] == 0, name


# ---------------------------------------------------------------- (b)


@pytest.mark.asyncio
async def test_the_buddy_and_a_recipient_killed_the_survivors_complete(tmp_path: Path) -> None:
    source, data = payload(tmp_path)
    async with replication_cluster(tmp_path, 5) as cluster:
        # d5 is the origin's buddy: it holds the same file, at the same path (one host).
        async with cluster.client() as c:
            handle = await c.replicate(
                source, ["d2", "d3", "d4"], rate=RATE, strategy="fastreplica", buddy="d5"
            )
            await report_where(handle, lambda r: CHUNK <= held(r, "d3") < SIZE // 2)
            await kill(cluster, "d5")
            await kill(cluster, "d3")
            final = await final_report(handle)
        assert final.final
        assert final.state == "failed"
        assert [r.daemon for r in final.missing] == ["d3"]
        assert sorted(r.daemon for r in final.recipients) == ["d2", "d3", "d4"]
        assert_identical(cluster, ["d2", "d4"], data)


# ---------------------------------------------------------------- (c)


@pytest.mark.asyncio
async def test_a_recipient_restarted_mid_transfer_resumes_and_completes(tmp_path: Path) -> None:
    source, data = payload(tmp_path)
    async with replication_cluster(tmp_path, 4) as cluster:
        replicas = cluster.replicas("d3")
        async with cluster.client() as c:
            handle = await c.replicate(source, "all", rate=SLOW_RATE, strategy="fastreplica")
            await report_where(handle, lambda r: 2 * CHUNK <= held(r, "d3") < SIZE // 2)
            await kill(cluster, "d3")
            (partial,) = partial_files(replicas)
            verified = held_chunks(partial, data)
            assert verified >= 2 * CHUNK  # what it reported held is on its disk
            others = marks(d for n, d in cluster.daemons.items() if n != "d3")
            await cluster.start("d3")  # while the others still replicate
            await wait_agreed(
                cluster.daemons.values(), {1, 2, 3, 4}, WAIT, edges=6, after={**others, "d3": 0}
            )
            final = await final_report(handle)
        assert final.ok, final
        assert_identical(cluster, ["d2", "d3", "d4"], data)
        counters = await cluster.counters("d3")  # the new process's: since its restart
        assert counters["bytes_skipped"] >= verified > 0
        assert counters["copies_completed"] == 1


# ---------------------------------------------------------------- (d)


@pytest.mark.asyncio
async def test_a_killed_origin_leaves_whole_or_clean_partial_copies_and_a_rerun_completes(
    tmp_path: Path,
) -> None:
    source, data = payload(tmp_path)
    recipients = ["d2", "d3", "d4"]
    async with replication_cluster(tmp_path, 4) as cluster:
        before = {n: await cluster.counters(n) for n in recipients}
        async with cluster.client() as c:
            handle = await c.replicate(source, "all", rate=RATE, strategy="fastreplica")
            await report_where(
                handle,
                lambda r: (
                    all(x.held_bytes >= CHUNK for x in r.recipients)
                    and r.held_bytes < 3 * SIZE * 2 // 3
                ),
            )
            await kill(cluster, "d1")
        await copies_ended(cluster, recipients, before)

        held_before: dict[str, int] = {}
        for name in recipients:
            replicas = cluster.replicas(name)
            partial = partial_files(replicas)
            if (replicas / NAME).exists():  # the whole file, verified, and nothing else
                assert contents(replicas / NAME) == data, name
                assert partial == [], name
                held_before[name] = SIZE
            else:  # a clean incomplete state: the partial file only
                assert len(partial) == 1, (name, partial)
                held_before[name] = held_chunks(partial[0], data)
        assert any(h < SIZE for h in held_before.values()), held_before  # it was killed mid-way
        assert all(h > 0 for h in held_before.values()), held_before
        middle = {n: await cluster.counters(n) for n in recipients}

        others = marks(d for n, d in cluster.daemons.items() if n != "d1")
        await cluster.start("d1")
        await wait_agreed(
            cluster.daemons.values(), {1, 2, 3, 4}, WAIT, edges=6, after={**others, "d1": 0}
        )
        env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
        code, out, err = await run_command(
            sys.executable,
            "-m",
            "meshcast.cli",
            "replicate",
            str(source),
            "--socket",
            cluster.address("d1"),
            env=env,
            timeout=WAIT,
        )
        assert code == 0, (out, err)
        assert_identical(cluster, recipients, data)
        for name in recipients:
            after = await cluster.counters(name)
            delta: dict[str, Any] = {k: after[k] - middle[name][k] for k in after}
            # what it held was not sent again; the rest was
            assert delta["bytes_skipped"] >= held_before[name], (name, delta)
            assert delta["bytes_received"] <= SIZE - held_before[name], (name, delta)
            assert delta["bytes_skipped"] + delta["bytes_received"] >= SIZE, (name, delta)
        assert (await cluster.counters("d1"))["completed"] == 1  # the new origin's run
