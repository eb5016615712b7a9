"""The user-space impairment shim: the model alone, then on real sockets."""

from __future__ import annotations

import time

import pytest

from meshcast.errors import ConfigError
from meshcast.ids import NodeId
from meshcast.runtime.impair import ImpairedPath, Impairment
from meshcast.runtime.udp import UdpLinkDriver
from meshcast.wire import UDP_IP_OVERHEAD

from .runtime_helpers import A, B, Received, driver_pair

DEST = ("127.0.0.1", 9)


def test_loss_rate_is_roughly_as_configured_and_seeded() -> None:
    path = ImpairedPath(Impairment(loss=0.1, seed=3))
    kept = sum(path.submit(b"x", DEST, 0.0) for _ in range(20_000))
    stats = path.statistics()
    assert stats.lost + kept == 20_000 == stats.submitted
    assert 0.09 < stats.lost / stats.submitted < 0.11
    again = ImpairedPath(Impairment(loss=0.1, seed=3))
    assert sum(again.submit(b"x", DEST, 0.0) for _ in range(20_000)) == kept


def test_delay_and_jitter_hold_datagrams_for_the_configured_time() -> None:
    path = ImpairedPath(Impairment(delay=0.02, jitter=0.005, seed=1))
    for i in range(1000):
        assert not path.submit(i.to_bytes(2, "big"), DEST, 1.0)
    assert path.release(1.0199) == []
    assert path.next_deadline() == pytest.approx(1.02, abs=0.005)
    released = path.release(1.025)
    assert len(released) == 1000
    order = [int.from_bytes(datagram, "big") for datagram, _ in released]
    assert order != sorted(order)  # jitter reorders, as netem's does
    assert path.next_deadline() is None


def test_rate_limit_paces_and_tail_drops_when_the_queue_is_full() -> None:
    size = 1000
    wire_size = size + UDP_IP_OVERHEAD
    rate_bps = 8 * wire_size * 100  # 100 datagrams per second
    path = ImpairedPath(
        Impairment(rate_bps=rate_bps, burst_bytes=wire_size, queue_bytes=50 * wire_size)
    )
    for _ in range(80):
        path.submit(bytes(size), DEST, 0.0)
    stats = path.statistics()
    assert stats.queue_dropped == 80 - 51  # one left at once, fifty queued, the rest dropped
    now, released = 0.0, 0
    while (deadline := path.next_deadline()) is not None:
        now = deadline
        released += len(path.release(now))
    assert released == 51
    assert now == pytest.approx(0.5, rel=0.05)  # fifty queued at 100 per second


def test_impairment_config_is_checked() -> None:
    for bad in (
        {"loss": 1.0},
        {"loss": -0.1},
        {"delay": -1.0},
        {"jitter": float("nan")},
        {"rate_bps": 0.0},
        {"queue_bytes": 0},
    ):
        with pytest.raises(ConfigError):
            Impairment(**bad)
    assert Impairment().passthrough
    assert not Impairment(delay=0.01).passthrough


@pytest.mark.asyncio
async def test_shim_on_a_real_driver_delays_and_drops_yet_everything_arrives() -> None:
    lossy = Impairment(loss=0.2, delay=0.05, jitter=0.01, seed=5)
    async with driver_pair(impair_a=lossy, impair_b=lossy) as (a, _b, got):
        started = time.monotonic()
        await a.send(B, b"first")
        await got.wait_count(1, timeout=10)
        one_way = time.monotonic() - started
        # Delivered after at least the emulated delay (or later, if the shim dropped it).
        assert one_way >= 0.045
        payloads = [i.to_bytes(4, "big") * 50 for i in range(2000)]
        for payload in payloads:
            await a.send(B, payload)
        await got.wait_count(1 + len(payloads), timeout=60)
        assert got.payloads() == [b"first", *payloads] or sorted(got.payloads()[1:]) == sorted(
            payloads
        )
        assert len(set(got.payloads())) == len(payloads) + 1
        shim = a.statistics().impairment
        assert shim is not None
        assert 0.12 < shim.lost / shim.submitted < 0.28
        assert a.statistics().links[B].retransmissions > 0


@pytest.mark.asyncio
async def test_echo_round_trip_through_the_shim_takes_about_twice_the_delay() -> None:
    delayed = Impairment(delay=0.03)
    echoes = Received()
    a = await UdpLinkDriver.open(A, impairment=delayed, on_delivered=echoes)
    try:
        b: UdpLinkDriver | None = None

        def echo(peer: NodeId, payload: bytes) -> None:
            assert b is not None
            b.send_nowait(peer, payload)

        b = await UdpLinkDriver.open(B, impairment=delayed, on_delivered=echo)
        try:
            a.add_peer(B, b.local_address)
            b.add_peer(A, a.local_address)
            await a.wait_established(B, timeout=10)
            for i in range(3):
                started = time.monotonic()
                await a.send(B, bytes([i]))
                await echoes.wait_count(i + 1, timeout=10)
                assert 0.055 <= time.monotonic() - started < 1.0
            assert echoes.payloads() == [b"\x00", b"\x01", b"\x02"]
        finally:
            await b.aclose()
    finally:
        await a.aclose()
