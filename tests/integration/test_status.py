"""`meshcast status` against real daemons: three `meshcast daemon` processes on 127.0.0.1-3.

d1 listens on a Unix socket given on its command line, d2 on its default socket (found by
``meshcast status --config FILE --name d2``), d3 on loopback TCP. Clients on d1 and d3
join a group; the status command, run as a subprocess, reports each daemon's view, links,
the group and its members, as JSON and as a table. An unreachable daemon gives exit 1
and one line on stderr. Every process is stopped and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import meshcast
from meshcast.runtime.compiled import compiled
from meshcast.runtime.gso import gso_supported, gso_wanted

from .daemon_helpers import DaemonProcess, ring, run_command, wait_agreed, write_cluster

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio]

STATUS_COMMAND = (sys.executable, "-m", "meshcast", "status")
VIEW_TIMEOUT = 15.0  # s: start-up of three interpreters included
WAIT = 15.0  # s: a report showing what the test waits for

Report = dict[str, Any]


async def run_status(*args: str) -> tuple[int, str, str]:
    """Run ``python -m meshcast status ARGS``: (exit status, stdout, stderr)."""
    return await run_command(*STATUS_COMMAND, *args)


async def report_until(address: list[str], wanted: Callable[[Report], bool]) -> Report:
    """Run ``meshcast status --json`` until its report satisfies `wanted` (bounded)."""
    report: Report = {}
    try:
        async with asyncio.timeout(WAIT):
            while True:
                code, out, err = await run_status(*address, "--json")
                assert code == 0, err
                assert err == ""
                report = json.loads(out)
                if wanted(report):
                    return report
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"no wanted report within {WAIT} s; last: {report}") from None


def group(report: Report, name: str) -> Report | None:
    return next((g for g in report["groups"] if g["name"] == name), None)


def chat_members(report: Report) -> list[tuple[str, str, int]]:
    chat = group(report, "chat")
    if chat is None:
        return []
    return [(m["name"], m["daemon"], m["node"]) for m in chat["members"]]


CHAT = [("#alice#d1", "d1", 1), ("#carol#d3", "d3", 3)]


@asynccontextmanager
async def cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[dict[str, DaemonProcess], Path, Path, int]]:
    """d1 (Unix socket), d2 (default socket), d3 (TCP) in a ring; all stopped after.

    Yields the daemons, the cluster file, d1's socket and d3's TCP port.
    """
    sockets = Path(tempfile.mkdtemp(prefix="mcst", dir="/tmp"))  # short: AF_UNIX path limit
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(sockets))  # d2's and the command's default
    config = write_cluster(tmp_path, 3, ring(3))
    daemons: dict[str, DaemonProcess] = {}
    try:
        starts = [
            DaemonProcess.start(config, "d1", "--client-socket", str(sockets / "d1.sock")),
            DaemonProcess.start(config, "d2"),
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
        assert daemons["d2"].named("clients_listening")[0]["unix_path"] == str(
            sockets / "meshcast" / "d2@test.sock"
        )
        port = int(daemons["d3"].named("clients_listening")[0]["tcp_port"])
        yield daemons, config, sockets / "d1.sock", port
    finally:
        await asyncio.gather(*(d.stop() for d in daemons.values()))
        shutil.rmtree(sockets, ignore_errors=True)


async def test_status_shows_view_links_groups_and_members(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with cluster(tmp_path, monkeypatch) as (daemons, config, d1_socket, d3_port):
        alice = await meshcast.connect(f"unix:{d1_socket}", name="alice")
        carol = await meshcast.connect(f"tcp:127.0.0.1:{d3_port}", name="carol")
        try:
            await alice.join("chat")
            await carol.join("chat")

            # d1 by its socket, as JSON: the view, both links, the group and its members
            at_d1 = ["--socket", f"unix:{d1_socket}"]
            report = await report_until(
                at_d1, lambda r: chat_members(r) == CHAT and r["view"]["agreed"]
            )
            assert report["format"] == 1
            assert (report["daemon"]["name"], report["daemon"]["node"]) == ("d1", 1)
            assert report["daemon"]["cluster"] == "test"
            assert report["daemon"]["incarnation"] >= 1
            assert report["daemon"]["uptime_seconds"] > 0
            # a daemon process runs on uvloop whenever it is installed (a dependency)
            uvloop = importlib.util.find_spec("uvloop") is not None
            assert report["daemon"]["event_loop"] == ("uvloop" if uvloop else "asyncio")
            # runs of datagrams leave with UDP GSO wherever the kernel offers it
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                gso = gso_supported(probe) and gso_wanted(os.environ)
            assert report["daemon"]["udp_gso"] is gso
            # the daemon runs the modules this process imports: the same build
            assert report["daemon"]["compiled"] is compiled()
            assert [m["name"] for m in report["view"]["members"]] == ["d1", "d2", "d3"]
            assert report["view"]["links"] == 3
            links = {link["name"]: link for link in report["links"]}
            assert set(links) == {"d2", "d3"}  # d1's neighbours in the ring
            for link in links.values():
                assert link["up"] is True
                assert link["srtt_ms"] is not None
                assert link["srtt_ms"] >= 0
                assert link["bandwidth_bps"] > 0
                # loopback's route carries the largest UDP datagrams ([link] max_path_mtu)
                if sys.platform.startswith("linux"):
                    assert link["mtu"] == 65_507
            assert report["tree"]["source"] == 1
            assert sorted(child for _, child in report["tree"]["edges"]) == [2, 3]
            chat = group(report, "chat")
            assert chat is not None
            assert (chat["size"], chat["local"]) == (2, 1)
            assert report["sessions"]["open"] == 2  # alice and the status command itself
            assert report["truncated"] is False
            assert report["counters"]["group"]["delivered"] > 0

            # d2 by its name, at its default socket: the same replicated table
            report = await report_until(
                ["--config", str(config), "--name", "d2"], lambda r: chat_members(r) == CHAT
            )
            assert report["daemon"]["name"] == "d2"
            assert group(report, "chat")["local"] == 0  # type: ignore[index]
            assert report["sessions"]["open"] == 1  # only the status command

            # d3 over TCP, as a table
            await report_until(
                ["--socket", f"tcp:127.0.0.1:{d3_port}"], lambda r: chat_members(r) == CHAT
            )
            code, out, err = await run_status("--socket", f"tcp:127.0.0.1:{d3_port}")
            assert code == 0, err
            assert out.startswith("daemon d3 (node 3) of cluster test")
            assert "view: 3 daemons" in out
            assert "  chat  view " in out
            assert "#alice#d1  on d1 (1)" in out
            assert "#carol#d3  on d3 (3)" in out

            # the client library asks the same question
            mine = await alice.status()
            assert chat_members(mine) == CHAT
            assert mine["daemon"]["name"] == "d1"
        finally:
            await alice.close()
            await carol.close()
        # each status command was an ordinary, short session that said GOODBYE
        await daemons["d2"].wait_event(
            "client_disconnected", lambda e: e["reason"] == "goodbye", timeout=WAIT
        )


def closed_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_an_unreachable_daemon_is_one_line_and_exit_1(tmp_path: Path) -> None:
    missing = tmp_path / "nobody.sock"
    code, out, err = await run_status("--socket", f"unix:{missing}", "--json")
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"meshcast status: error: cannot reach daemon at unix:{missing}: No such file or directory"
    ]
    port = closed_tcp_port()
    code, out, err = await run_status("--socket", f"tcp:127.0.0.1:{port}")
    assert (code, out) == (1, "")
    assert len(err.splitlines()) == 1
    assert err.startswith(f"meshcast status: error: cannot reach daemon at tcp:127.0.0.1:{port}")
    assert "Traceback" not in err


async def test_status_without_a_daemon_named_is_a_usage_error() -> None:
    code, out, err = await run_status()
    assert (code, out) == (2, "")
    assert err.startswith("meshcast status: error: which daemon?")
    code, _, err = await run_status("--name", "nope")
    assert code == 1  # looked for at the default sockets: none is running
    assert "no daemon called 'nope' is listening" in err
    code, _, err = await run_status("--socket", "unix:/x", "--name", "D1")
    assert code == 2
    assert "not both" in err
