"""`meshcast status` shows what a real daemon dropped, per link and summed, by cause.

Cluster d1, d2; only d1 runs (a ``meshcast daemon`` process). The test binds d2's
configured address with a raw UDP socket and sends d1 datagrams that its link to d2 must
drop: 5 that do not decode, 3 whose header names another daemon (wrong sender), 2 that
are not sealed (cleartext: the link is encrypted). A socket on an unconfigured port sends 4 more (foreign
to the daemon). ``meshcast status --json`` reports each cause on the d2 link and summed
under ``counters.links``, the foreign ones under ``counters.daemon``; the table shows them.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from meshcast.config import load_config
from meshcast.runtime.endpoints import daemon_address
from meshcast.wire.packet import Header, Heartbeat, HeartbeatKind, Packet, PacketType, encode

from .daemon_helpers import DaemonProcess, host_of, run_command, write_cluster

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio]

STATUS_COMMAND = (sys.executable, "-m", "meshcast", "status")
WAIT = 20.0  # s: the daemon counting what was sent
EXPECTED = {
    "malformed": 5,
    "wrong_sender": 3,
    "stale_epoch": 0,
    "out_of_window": 0,
    "duplicates": 0,
    "protocol_violations": 0,
    "cleartext": 2,
    "truncated": 0,
    "unknown_key": 0,
    "forged": 0,
    "replayed": 0,
    "no_session": 0,
    "total": 10,
}


async def run_status(*args: str) -> tuple[int, str, str]:
    """Run ``python -m meshcast status ARGS``: (exit status, stdout, stderr)."""
    return await run_command(*STATUS_COMMAND, *args)


def heartbeat(sender: int, epoch: int) -> bytes:
    return encode(
        Packet(
            Header(PacketType.HEARTBEAT, sender, epoch), body=Heartbeat(HeartbeatKind.REQUEST, 0)
        )
    )


async def test_status_shows_drops_per_link_and_summed(tmp_path: Path) -> None:
    path = write_cluster(tmp_path, 2, [(1, 2)])
    config = load_config(path)
    with tempfile.TemporaryDirectory(prefix="mcsd", dir="/tmp") as sockets:
        sock = str(Path(sockets) / "d1.sock")
        d1 = await DaemonProcess.start(path, "d1", "--client-socket", sock)
        try:
            target = daemon_address(config.daemon("d1"))
            with (
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as as_d2,
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger,
            ):
                as_d2.bind(daemon_address(config.daemon("d2")))
                stranger.bind((host_of(1), 0))
                for i in range(5):
                    as_d2.sendto(b"not a meshcast datagram %d" % i, target)
                for _ in range(3):
                    as_d2.sendto(heartbeat(sender=7, epoch=1), target)
                for _ in range(2):
                    as_d2.sendto(heartbeat(sender=2, epoch=12345), target)
                for _ in range(4):
                    stranger.sendto(b"who am I", target)
                report = await _report_until_counted(sock)
            (link,) = report["links"]
            assert link["name"] == "d2"
            assert link["dropped"] == EXPECTED
            assert report["counters"]["links"] == EXPECTED
            assert report["counters"]["daemon"]["foreign_dropped"] == 4
            code, out, err = await run_status("--socket", f"unix:{sock}")
            assert code == 0, err
            lines = out.splitlines()
            assert "  dropped from d2 (2): malformed 5, wrong sender 3, cleartext 2" in lines
            assert (
                "dropped: 10 datagrams on links (malformed 5, wrong sender 3, cleartext 2); "
                "4 datagrams from unknown addresses"
            ) in lines
        finally:
            await d1.stop()


async def _report_until_counted(sock: str) -> dict[str, Any]:
    """``meshcast status --json`` until the daemon has counted all 14 datagrams."""
    report: dict[str, Any] = {}
    try:
        async with asyncio.timeout(WAIT):
            while True:
                code, out, err = await run_status("--socket", f"unix:{sock}", "--json")
                assert code == 0, err
                report = json.loads(out)
                links = report["counters"].get("links", {})
                foreign = report["counters"]["daemon"]["foreign_dropped"]
                if links.get("total", 0) >= 10 and foreign >= 4:
                    return report
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"drops not counted within {WAIT} s; last: {report}") from None
