"""A forged LSA naming a daemon that is not configured never puts it in a real view.

Cluster d1, d2, d3 (full mesh); d1 and d2 run as ``meshcast daemon`` processes. d3 does
not run: the test binds d3's configured address and speaks the real Hop link protocol to
d1 and d2 from it (node id 3, a `UdpLinkDriver`), which is what a misconfigured or
spoofing daemon at that address could do, holding the cluster key (an insider: without
the key nothing it sends gets past the link, tests/integration/test_attacks.py). Over those links it floods two forged LSAs: one
from d3 claiming links to d1, d2 and a daemon 99, one from daemon 99 claiming a link to
d3. (Without the check, d1 and d2 took both, installed the view {1, 2, 3, 99}, and AGREED
traffic between their clients stalled: neither 3 nor 99 ever acknowledges.) The daemons
drop and count both LSAs; their views stay {d1, d2}; a client on d1 reaches a client on
d2 in AGREED order; the status report shows the drops.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import pytest

import meshcast
from meshcast.config import load_config
from meshcast.daemon.config import membership_link_config
from meshcast.ids import NodeId
from meshcast.runtime.endpoints import daemon_address
from meshcast.runtime.udp import UdpLinkDriver, link_security, secure_link_factory
from meshcast.wire.client import Message
from meshcast.wire.overlay import Lsa, LsaEntry, encode_lsa

from .daemon_helpers import (
    DaemonProcess,
    cluster_ring,
    running_daemons,
    wait_agreed,
    write_cluster,
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio]

PHANTOM = NodeId(99)
WAIT = 20.0  # s: any one condition the test waits for
MESSAGES = 20


async def test_forged_lsas_are_dropped_and_group_traffic_flows(tmp_path: Path) -> None:
    path = write_cluster(tmp_path, 3, [(1, 2), (1, 3), (2, 3)])
    config = load_config(path)
    with tempfile.TemporaryDirectory(prefix="mcph", dir="/tmp") as sockets:
        socks = {name: str(Path(sockets) / f"{name}.sock") for name in ("d1", "d2")}
        async with running_daemons(path, []) as daemons:
            for name, sock in socks.items():
                daemons[name] = await DaemonProcess.start(path, name, "--client-socket", sock)
            await wait_agreed(daemons.values(), {1, 2}, WAIT)
            forger = await UdpLinkDriver.open(
                NodeId(3),
                listen=daemon_address(config.daemon("d3")),
                config=membership_link_config(config),
                on_delivered=lambda _peer, _message: None,
                link_factory=secure_link_factory(link_security(cluster_ring(config))),
            )
            try:
                for name in ("d1", "d2"):
                    peer = NodeId(config.daemon(name).node_id)
                    forger.add_peer(peer, daemon_address(config.daemon(name)))
                for peer in (NodeId(1), NodeId(2)):
                    await forger.wait_established(peer, timeout=WAIT)
                    links = tuple(LsaEntry(n, 1.0, 100e6) for n in (1, 2, PHANTOM))
                    forger.send_nowait(peer, encode_lsa(Lsa(3, 1, 1_000, bytes(8), links)))
                    claim = (LsaEntry(3, 1.0, 100e6),)
                    forger.send_nowait(peer, encode_lsa(Lsa(PHANTOM, 1, 1, bytes(8), claim)))
                    await forger.wait_flushed(peer, timeout=WAIT)
                reports = [await _until_dropped(sock) for sock in socks.values()]
                await _agreed_traffic(socks["d1"], socks["d2"])
            finally:
                await forger.aclose()
            for report in reports:
                overlay = report["counters"]["overlay"]
                assert overlay["lsas_unknown_dropped"] >= 1
                assert overlay["lsas_bad_link_dropped"] >= 1
                assert [m["node"] for m in report["view"]["members"]] == [1, 2]
            for daemon in daemons.values():
                for view in daemon.named("view_installed"):
                    assert set(view["members"]) <= {1, 2, 3}, view
                    assert int(PHANTOM) not in view["members"]


async def _until_dropped(sock: str) -> dict[str, Any]:
    """The daemon's status report once it counts both forged LSAs (bounded wait)."""
    async with asyncio.timeout(WAIT), await meshcast.connect(sock, timeout=WAIT) as client:
        while True:
            report = await client.status()
            overlay = report["counters"]["overlay"]
            if overlay["lsas_unknown_dropped"] and overlay["lsas_bad_link_dropped"]:
                return report
            await asyncio.sleep(0.1)


async def _agreed_traffic(sender_sock: str, receiver_sock: str) -> None:
    """MESSAGES AGREED messages from a client on d1 reach a client on d2, in order."""
    async with (
        await meshcast.connect(sender_sock, name="alice", timeout=WAIT) as alice,
        await meshcast.connect(receiver_sock, name="bob", timeout=WAIT) as bob,
    ):
        await bob.join("g")
        await alice.join("g")
        payloads: list[bytes] = []
        async with asyncio.timeout(WAIT):
            # both members in the view of g, seen by the receiver
            while True:
                event = await bob.receive()
                if not isinstance(event, Message) and len(event.members) == 2:
                    break
            for i in range(MESSAGES):
                await alice.multicast("g", b"m%d" % i, service="agreed")
            while len(payloads) < MESSAGES:
                event = await bob.receive()
                if isinstance(event, Message):
                    payloads.append(event.payload)
        assert payloads == [b"m%d" % i for i in range(MESSAGES)]
