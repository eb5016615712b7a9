"""Values of the cluster file's [sessions] and [membership] sections take effect in real
`meshcast daemon` processes: two daemons on 127.0.0.1-2, ``meshcast status --json``
shows a STATUS report cut at ``sessions.status_max_groups`` and the LSA refreshes that
``membership.lsa_refresh_interval`` asks for. Every process is stopped, every wait bounded.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import meshcast

from .daemon_helpers import running_daemons, wait_agreed, write_cluster

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio]

VIEW_TIMEOUT = 15.0  # s: start-up of two interpreters included
WAIT = 15.0  # s: a report showing what the test waits for
Report = dict[str, Any]


async def status(socket: Path) -> Report:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshcast",
        "status",
        "--socket",
        f"unix:{socket}",
        "--json",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(WAIT):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err
    report: Report = json.loads(out)
    return report


async def report_until(socket: Path, wanted: Callable[[Report], bool]) -> Report:
    report: Report = {}
    try:
        async with asyncio.timeout(WAIT):
            while True:
                report = await status(socket)
                if wanted(report):
                    return report
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"no wanted report within {WAIT} s; last: {report}") from None


async def test_sessions_and_membership_values_from_the_file_take_effect(tmp_path: Path) -> None:
    config = write_cluster(tmp_path, 2, [(1, 2)])
    text = config.read_text(encoding="utf-8")
    text = text.replace("[membership]\n", '[membership]\nlsa_refresh_interval = "200ms"\n', 1)
    text += '\n[sessions]\nstatus_max_groups = 1\nmax_backlog = "1MiB"\n'
    text += '\n[group]\nidle_ts_interval = "5ms"\n'
    config.write_text(text, encoding="utf-8")
    socket = tmp_path / "d1.sock"
    async with (
        running_daemons(config, ["d1"], "--client-socket", str(socket)) as daemons,
        running_daemons(config, ["d2"], "--no-client-socket") as more,
    ):
        await wait_agreed([daemons["d1"], more["d2"]], {1, 2}, VIEW_TIMEOUT, edges=1)
        alice = await meshcast.connect(f"unix:{socket}", name="alice")
        try:
            await alice.join("one")
            await alice.join("two")
            report = await report_until(socket, lambda r: r.get("groups_total") == 2)
            # [sessions] status_max_groups = 1: one group listed, the report says so
            assert [g["name"] for g in report["groups"]] == ["one"]
            assert report["truncated"] is True
            # [membership] lsa_refresh_interval = 200ms (default 10 s): refreshes count
            first = report["counters"]["overlay"]["lsa_refreshes"]
            later = await report_until(
                socket, lambda r: r["counters"]["overlay"]["lsa_refreshes"] >= first + 3
            )
            assert later["view"]["agreed"] is True  # refreshes install no new view
        finally:
            await alice.close()
