"""The emulated pipe: serialisation, drop-tail queue, loss, jitter, reordering, duplication."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable

import pytest

from meshcast.errors import ConfigError
from meshcast.ids import NodeId
from meshcast.link.events import Transmit
from meshcast.sim import LinkModel, PipeStats, Simulator
from meshcast.wire.packet import UDP_IP_OVERHEAD

A = NodeId(1)
B = NodeId(2)
WIRE_1000 = b"x" * (1000 - UDP_IP_OVERHEAD)  # 1000 bytes on the wire


class Sink:
    """Records every datagram it receives; never sends, no timer."""

    def __init__(self, node_id: NodeId, now: float, rng: random.Random) -> None:
        self.received: list[tuple[float, NodeId, bytes]] = []

    def datagram_received(self, src: NodeId, datagram: bytes, now: float) -> list[object]:
        self.received.append((now, src, datagram))
        return []

    def on_timer(self, now: float) -> list[object]:
        return []

    def next_deadline(self) -> float | None:
        return None


def pair(model: LinkModel, seed: int = 1) -> Simulator:
    sim = Simulator(seed=seed)
    sim.add_node(A, Sink)
    sim.add_node(B, Sink)
    sim.add_pipe(A, B, model)
    return sim


def send_now(sim: Simulator, datagrams: list[bytes]) -> None:
    sim.act(A, lambda node, now: [Transmit(B, d) for d in datagrams])


def numbered(count: int, pad: int = 0) -> list[bytes]:
    return [i.to_bytes(4, "big") + bytes(pad) for i in range(count)]


def received(sim: Simulator) -> list[tuple[float, NodeId, bytes]]:
    return sim.node_as(B, Sink).received


def assert_conserved(stats: PipeStats) -> None:
    assert stats.sent + stats.duplicated == (
        stats.delivered
        + stats.lost_random
        + stats.dropped_queue
        + stats.dropped_down
        + stats.dropped_crashed
        + stats.in_flight
    )


def test_serialisation_delay_counts_udp_ip_overhead() -> None:
    model = LinkModel(bandwidth_bps=8e6)
    assert model.serialisation_delay(1000 - UDP_IP_OVERHEAD) == pytest.approx(0.001)
    assert LinkModel().serialisation_delay(1000) == 0.0
    assert LinkModel(bandwidth_bps=float("inf")).serialisation_delay(1000) == 0.0


def test_one_packet_arrives_after_serialisation_plus_delay() -> None:
    sim = pair(LinkModel(delay=0.05, bandwidth_bps=8e6))
    sim.run(until=1.0)
    send_now(sim, [WIRE_1000])
    sim.run()
    [(at, src, datagram)] = received(sim)
    assert (src, datagram) == (A, WIRE_1000)
    assert at == pytest.approx(1.0 + 0.001 + 0.05)
    stats = sim.pipe_stats(A, B)
    assert (stats.sent, stats.delivered, stats.bytes_delivered) == (1, 1, len(WIRE_1000))
    assert stats.max_queue_bytes == 0


def test_fifo_transmitter_spaces_back_to_back_packets() -> None:
    sim = pair(LinkModel(delay=0.01, bandwidth_bps=8e6, queue_bytes=1_000_000))
    datagrams = [WIRE_1000] * 5
    send_now(sim, datagrams)
    sim.run()
    times = [t for t, _, _ in received(sim)]
    assert times == pytest.approx([0.01 + 0.001 * (k + 1) for k in range(5)])
    assert sim.pipe_stats(A, B).max_queue_bytes == 4000  # the first one is in service


def test_drop_tail_queue_holds_at_most_queue_bytes() -> None:
    sim = pair(LinkModel(delay=0.01, bandwidth_bps=8e6, queue_bytes=3000))
    send_now(sim, [WIRE_1000] * 10)  # 1 in service + 3 waiting; 6 dropped
    stats = sim.pipe_stats(A, B)
    assert (stats.dropped_queue, stats.max_queue_bytes, stats.in_flight) == (6, 3000, 4)
    # at 2.5 ms: packets 0 and 1 are done, 2 is in service, 3 waits: room for two more
    sim.call_at(0.0025, lambda: send_now(sim, [WIRE_1000] * 5))
    sim.run()
    stats = sim.pipe_stats(A, B)
    assert (stats.sent, stats.delivered, stats.dropped_queue) == (15, 6, 9)
    assert stats.max_queue_bytes == 3000
    times = [t for t, _, _ in received(sim)]
    assert times == pytest.approx([0.011, 0.012, 0.013, 0.014, 0.015, 0.016])
    assert_conserved(stats)


def test_zero_queue_accepts_only_into_an_idle_transmitter() -> None:
    sim = pair(LinkModel(bandwidth_bps=8e6, queue_bytes=0))
    send_now(sim, [WIRE_1000] * 3)
    sim.run()
    assert sim.pipe_stats(A, B).dropped_queue == 2
    assert len(received(sim)) == 1


def test_unlimited_bandwidth_has_no_queue() -> None:
    sim = pair(LinkModel(delay=0.02, queue_bytes=0))
    send_now(sim, [WIRE_1000] * 100)
    sim.run()
    assert [t for t, _, _ in received(sim)] == [0.02] * 100
    assert sim.pipe_stats(A, B).dropped_queue == 0


def test_same_instant_arrivals_keep_sending_order() -> None:
    sim = pair(LinkModel(delay=0.02))
    datagrams = numbered(200)
    send_now(sim, datagrams)
    sim.run()
    assert [d for _, _, d in received(sim)] == datagrams


def test_loss_rate_is_close_to_configured() -> None:
    sim = pair(LinkModel(delay=0.01, loss=0.1), seed=3)
    send_now(sim, [b"p"] * 20_000)
    sim.run()
    stats = sim.pipe_stats(A, B)
    assert stats.lost_random / stats.sent == pytest.approx(0.1, abs=0.01)
    assert stats.delivered == stats.sent - stats.lost_random == len(received(sim))
    assert_conserved(stats)


def test_lost_packets_still_occupy_the_transmitter() -> None:
    sim = pair(LinkModel(delay=0.01, loss=0.5, bandwidth_bps=8e6, queue_bytes=1_000_000))
    send_now(sim, numbered(100, pad=1000 - UDP_IP_OVERHEAD - 4))
    sim.run()
    got = received(sim)
    assert 20 < len(got) < 80
    for t, _, datagram in got:
        k = int.from_bytes(datagram[:4], "big")
        assert t == pytest.approx(0.01 + 0.001 * (k + 1))


def sender(sim: Simulator, k: int) -> Callable[[], None]:
    return lambda: send_now(sim, [k.to_bytes(4, "big")])


def inversions(datagrams: list[bytes]) -> int:
    order = [int.from_bytes(d[:4], "big") for d in datagrams]
    return sum(1 for a, b in itertools.pairwise(order) if a > b)


def test_jitter_reorders_and_stays_within_bound() -> None:
    sim = pair(LinkModel(delay=0.01, jitter=0.005))
    for k in range(500):
        sim.call_at(k * 0.001, sender(sim, k))
    sim.run()
    got = received(sim)
    assert len(got) == 500
    assert inversions([d for _, _, d in got]) > 0
    for t, _, datagram in got:
        sent_at = int.from_bytes(datagram, "big") * 0.001
        assert 0.01 <= t - sent_at <= 0.015 + 1e-12


def test_no_jitter_no_reorder_keeps_order() -> None:
    sim = pair(LinkModel(delay=0.01, bandwidth_bps=1e6, queue_bytes=1_000_000))
    for k in range(300):
        sim.call_at(k * 0.0001, sender(sim, k))
    sim.run()
    assert inversions([d for _, _, d in received(sim)]) == 0


def test_reorder_holds_some_packets_back() -> None:
    sim = pair(LinkModel(delay=0.01, reorder=0.1))
    for k in range(1000):
        sim.call_at(k * 0.001, sender(sim, k))
    sim.run()
    got = received(sim)
    assert len(got) == 1000
    late = [t - int.from_bytes(d, "big") * 0.001 - 0.01 for t, _, d in got]
    held = [x for x in late if x > 1e-12]
    assert 50 < len(held) < 150  # ~10 %
    assert max(held) <= 0.02 + 1e-12  # at most 2 × delay extra
    assert inversions([d for _, _, d in got]) > 0


def test_reorder_delay_overrides_default_bound() -> None:
    model = LinkModel(delay=0.01, reorder=0.5, reorder_delay=0.001)
    assert model.max_reorder_delay == 0.001
    assert LinkModel(delay=0.01, reorder=0.5).max_reorder_delay == 0.02


def test_duplication_delivers_some_packets_twice() -> None:
    sim = pair(LinkModel(delay=0.01, jitter=0.001, duplicate=0.25), seed=5)
    datagrams = numbered(4000)
    send_now(sim, datagrams)
    sim.run()
    stats = sim.pipe_stats(A, B)
    assert stats.duplicated / stats.sent == pytest.approx(0.25, abs=0.03)
    assert stats.delivered == stats.sent + stats.duplicated
    counts = Counter(d for _, _, d in received(sim))
    assert set(counts) == set(datagrams)
    assert sum(1 for c in counts.values() if c == 2) == stats.duplicated
    assert max(counts.values()) == 2
    assert_conserved(stats)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("delay", -0.001),
        ("delay", float("nan")),
        ("jitter", float("inf")),
        ("loss", 1.5),
        ("duplicate", -0.1),
        ("reorder", float("nan")),
        ("bandwidth_bps", 0.0),
        ("bandwidth_bps", -1e6),
        ("queue_bytes", -1),
        ("queue_bytes", 1.5),
        ("reorder_delay", -1.0),
    ],
)
def test_invalid_model_raises_config_error_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(ConfigError) as info:
        LinkModel(**{field: value})  # type: ignore[arg-type]
    assert info.value.key == f"sim.{field}"


def test_reorder_without_any_delay_is_rejected() -> None:
    with pytest.raises(ConfigError):
        LinkModel(reorder=0.1)
