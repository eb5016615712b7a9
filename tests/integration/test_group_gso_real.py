"""Three real daemons with WAN-sized datagrams (``[link] mtu = 1400``), UDP GSO on and off.

At 1,400 bytes a datagram, one client frame of a few kilobytes and every large message
fill runs of equal-size datagrams to each neighbour: with GSO (where the kernel offers
it) a run leaves in one `sendmsg`. Two senders on different daemons send AGREED messages
of 40 bytes to 70 KB at once; every client on every daemon must deliver every message
exactly once, uncorrupted, in one order, each sender's in its own order. The daemons'
final statistics say how many runs went out with GSO (none with ``MESHCAST_UDP_GSO=0``).

Helpers (cluster, clients, payloads) are test_group_real.py's; every daemon is stopped.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from pathlib import Path

import pytest

from meshcast.runtime.gso import ENV, gso_supported
from meshcast.wire.client import ServiceLevel

from .test_group_real import DAEMONS, WAIT, connected, holding, join_all, start_cluster

pytestmark = [pytest.mark.timeout(240), pytest.mark.asyncio]

MTU = 1400  # bytes: the WAN default, which makes runs of equal-size datagrams
PER_SENDER = 150
SENDERS = ("c1a", "c2a")
CLIENTS = ("c1a", "c2a", "c3a")


def size_of(number: int) -> int:
    """Mostly a few hundred bytes, every 10th 70 KB (50 datagrams of 1,400 bytes)."""
    return 70_000 if number % 10 == 3 else 40 + (number * 131) % 1400


def counter(stats: dict[str, object], name: str) -> int:
    value = stats[name]
    assert isinstance(value, int), stats
    return value


def kernel_offers_gso() -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        return gso_supported(probe)


@pytest.mark.parametrize("gso", ["on", "off"])
async def test_agreed_streams_with_wan_sized_datagrams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gso: str
) -> None:
    if gso == "off":
        monkeypatch.setenv(ENV, "0")  # the daemons inherit the environment
    else:
        monkeypatch.delenv(ENV, raising=False)
    async with start_cluster(tmp_path, mtu=MTU) as cluster:
        async with connected(cluster, CLIENTS) as peers:
            everyone = list(peers.values())
            await join_all(everyone, "g")
            expected = {("gso", s, n) for s in SENDERS for n in range(PER_SENDER)}

            async def stream(short: str) -> None:
                for number in range(PER_SENDER):
                    await peers[short].send(
                        "gso", number, ServiceLevel.AGREED, size=size_of(number)
                    )

            async with asyncio.timeout(WAIT * 2):
                await asyncio.gather(*(stream(s) for s in SENDERS))
            for p in everyone:
                await p.wait_until(holding(expected), "every message", WAIT * 2)
            orders = {}
            for p in everyone:
                got = [k for k in p.keys if k[0] == "gso"]
                assert not p.corrupted, f"{p.short}: corrupted payloads {p.corrupted[:3]}"
                assert [k for k, n in Counter(got).items() if n > 1] == []
                assert set(got) == expected
                for s in SENDERS:
                    numbers = [n for _, who, n in got if who == s]
                    assert numbers == list(range(PER_SENDER)), f"{p.short}, {s}"
                orders[p.short] = got
            assert orders["c2a"] == orders["c1a"]
            assert orders["c3a"] == orders["c1a"]
            assert all(p.error is None and not p.rejected for p in everyone)
        assert cluster.problems() == []
        stats = [await cluster.stopped_stats(name) for name in DAEMONS]
    gso_sends = [counter(s, "gso_sends") for s in stats]
    gso_datagrams = [counter(s, "gso_datagrams") for s in stats]
    datagrams_sent = [counter(s, "datagrams_sent") for s in stats]
    if gso == "on" and kernel_offers_gso():
        # the senders' daemons cut 70 KB messages into runs of 1,400-byte datagrams
        assert gso_sends[0] > 0, stats
        assert gso_sends[1] > 0, stats
        for sends, carried, sent in zip(gso_sends, gso_datagrams, datagrams_sent, strict=True):
            assert 2 * sends <= carried <= sent, stats
    else:
        assert gso_sends == [0, 0, 0]
        assert gso_datagrams == [0, 0, 0]
