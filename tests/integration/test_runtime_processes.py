"""Link endpoints in separate OS processes on real loopback sockets (meshcast.runtime)."""

from __future__ import annotations

import asyncio

import pytest

from meshcast.ids import NodeId
from meshcast.runtime.peer_process import PeerProcess, PeerProcessError

SENDER = NodeId(1)
RECEIVER = NodeId(2)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.asyncio
async def test_hundred_thousand_messages_through_ten_percent_loss_arrive_once_intact() -> None:
    count = 100_000
    # Mixed sizes: small ones packed many to a datagram, every 997th split into pieces.
    # The shim drops 10 % of the datagrams in each direction (data, ACKs and NACKs alike).
    # Generous bounds: a behaviour test, not a speed test (a loaded 2-core machine is slow).
    lossy = ["--mixed", "--loss", "0.1", "--max-runtime", "150"]
    receiver = await PeerProcess.start(RECEIVER, "--expect", str(count), "--seed", "2", *lossy)
    try:
        sender = await PeerProcess.start(SENDER, "--send", str(count), "--seed", "1", *lossy)
        try:
            sender.connect(receiver)
            receiver.connect(sender)
            got = (await receiver.wait_event("done", 150))["report"]
            sent = (await sender.wait_event("done", 150))["report"]
        finally:
            assert await sender.stop() == 0
    finally:
        assert await receiver.stop() == 0

    assert got["delivered"] == count  # every byte of each message was compared
    assert got["duplicates"] == 0
    assert got["corrupt"] == 0
    link = sent["stats"]["links"][str(RECEIVER)]
    assert link["messages_sent"] == count
    assert link["retransmissions"] > 0
    for report in (sent, got):
        shim = report["stats"]["impairment"]
        assert 0.08 < shim["lost"] / shim["submitted"] < 0.12
        assert report["stats"]["internal_errors"] == 0
        assert report["stats"]["malformed_dropped"] == 0


@pytest.mark.asyncio
async def test_child_exits_by_itself_when_its_parent_goes_away() -> None:
    child = await PeerProcess.start(NodeId(5))
    try:
        stdin = child.process.stdin
        assert stdin is not None
        stdin.close()  # what the OS does when the parent dies
        async with asyncio.timeout(20):
            code = await child.process.wait()
        assert code == 0
    finally:
        await child.stop()


@pytest.mark.asyncio
async def test_child_gives_up_after_its_maximum_runtime() -> None:
    child = await PeerProcess.start(NodeId(6), "--max-runtime", "1")
    try:
        with pytest.raises(PeerProcessError, match="max runtime"):
            await child.wait_event("done", 20)
        async with asyncio.timeout(20):
            assert await child.process.wait() == 1
    finally:
        await child.stop()


@pytest.mark.asyncio
async def test_tcp_transport_between_processes_delivers_everything() -> None:
    count = 5000
    common = ["--transport", "tcp", "--mixed", "--max-runtime", "60"]
    receiver = await PeerProcess.start(RECEIVER, "--expect", str(count), *common)
    try:
        sender = await PeerProcess.start(SENDER, "--send", str(count), *common)
        try:
            sender.connect(receiver)
            receiver.connect(sender)
            got = (await receiver.wait_event("done", 60))["report"]
            await sender.wait_event("done", 60)
        finally:
            assert await sender.stop() == 0
    finally:
        assert await receiver.stop() == 0
    assert (got["delivered"], got["duplicates"], got["corrupt"]) == (count, 0, 0)
