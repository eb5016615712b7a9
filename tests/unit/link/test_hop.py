"""HopLink driven directly: explicit time, hand-made losses, no event loop."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from meshcast import wire
from meshcast.errors import BufferFull, MessageTooLarge
from meshcast.link import HopLink, LinkConfig, LinkEstablished, LinkFailed, PeerRestarted
from meshcast.wire import PacketType
from tests.unit.link.pair import A, B, Pair

CONFIG = LinkConfig(rate_bps=10e6)


def make_pair(config: LinkConfig = CONFIG, **kwargs: object) -> Pair:
    pair = Pair(HopLink(A, B, config, epoch=101), HopLink(B, A, config, epoch=202), **kwargs)  # type: ignore[arg-type]
    pair.start()
    pair.run(0.2)
    return pair


def numbered(i: int, size: int = 100) -> bytes:
    return i.to_bytes(4, "big") + bytes([i % 251]) * (size - 4)


def data_seq(datagram: bytes) -> int | None:
    header = wire.decode_header(datagram)
    return header.seq if header.ptype is PacketType.DATA else None


def test_handshake_establishes_both_ends() -> None:
    pair = make_pair()
    assert pair.a.established
    assert pair.b.established
    established = [node for _, node, e in pair.effects if isinstance(e, LinkEstablished)]
    assert sorted(established) == [A, B]


def test_data_sent_before_the_handshake_waits_for_it() -> None:
    pair = Pair(HopLink(A, B, CONFIG, epoch=1), HopLink(B, A, CONFIG, epoch=2), delay=0.02)
    pair.start()
    pair.send(A, b"early")
    pair.run(1.0)
    assert pair.delivered[B] == [b"early"]


def test_small_messages_are_packed_into_few_datagrams() -> None:
    pair = make_pair(delay=0.01)
    sent_before = pair.a.statistics().packets_sent
    # A driver holding a batch queues it all, then the link packs it up to the MTU.
    for i in range(200):
        pair.apply(A, pair.a.send(numbered(i, 50), pair.now, flush=False))
    pair.run(1.0)
    assert len(pair.delivered[B]) == 200
    data_packets = pair.a.statistics().packets_sent - sent_before
    assert data_packets <= 12  # 53 bytes each: 25 fit in one 1400-byte datagram


def test_lost_packet_does_not_delay_later_ones() -> None:
    dropped: set[int] = set()

    def drop_first_copy_of_seq_2(src: object, datagram: bytes) -> bool:
        seq = data_seq(datagram)
        if src == A and seq == 2 and seq not in dropped:
            dropped.add(seq)
            return False
        return True

    pair = make_pair(delay=0.05, filter=drop_first_copy_of_seq_2)
    start = pair.now
    for i in range(1, 4):
        pair.send(A, numbered(i))
    pair.run(start + 1.0)
    order = [int.from_bytes(m[:4], "big") for m in pair.delivered[B]]
    assert order == [1, 3, 2]  # 3 is handed up at once, 2 when recovered
    assert pair.delivered_at[B][1] == pytest.approx(start + 0.05, abs=0.002)
    assert pair.delivered_at[B][2] > start + 0.1


def test_reordering_within_the_nack_delay_costs_no_retransmission() -> None:
    config = LinkConfig(rate_bps=10e6, nack_delay_interval=0.02)
    pair = make_pair(config, delay=0.01, jitter=0.01, seed=4)
    for i in range(500):
        pair.send(A, numbered(i, 1000))
    pair.run(pair.now + 3)
    assert sorted(pair.delivered[B]) == sorted(numbered(i, 1000) for i in range(500))
    assert pair.delivered[B] != [numbered(i, 1000) for i in range(500)]  # really reordered
    assert pair.b.statistics().nacks_sent == 0
    assert pair.a.statistics().retransmissions == 0


def test_gap_is_nacked_repeatedly_until_recovered() -> None:
    drops = {"left": 3}

    def drop_seq_5_three_times(src: object, datagram: bytes) -> bool:
        if src == A and data_seq(datagram) == 5 and drops["left"] > 0:
            drops["left"] -= 1
            return False
        return True

    pair = make_pair(delay=0.02, filter=drop_seq_5_three_times)
    for i in range(10):
        pair.send(A, numbered(i))
    pair.run(pair.now + 2)
    assert len(pair.delivered[B]) == 10
    assert pair.a.statistics().retransmissions >= 2


def hold_back(seqs: set[int], held: list[bytes]) -> Callable[[object, bytes], bool]:
    """A pipe filter that keeps the first copy of A's data packets `seqs` in `held`."""

    def keep(src: object, datagram: bytes) -> bool:
        seq = data_seq(datagram)
        if src == A and seq in seqs:
            seqs.discard(seq)
            held.append(datagram)
            return False
        return True

    return keep


def test_an_in_order_exchange_opens_no_gap() -> None:
    # Each side answers the other, so most data packets carry a piggybacked ACK whose
    # send_high names the very packet it rides in.
    pair = make_pair(delay=0.001)
    for i in range(50):
        pair.send(A, numbered(i))
        pair.run(pair.now + 0.003)
        pair.send(B, numbered(i))
        pair.run(pair.now + 0.003)
    pair.run(pair.now + 0.5)
    assert len(pair.delivered[A]) == len(pair.delivered[B]) == 50
    for link in (pair.a, pair.b):
        stats = link.statistics()
        assert stats.retransmissions == 0
        assert stats.gaps_opened == 0


def test_a_late_packet_opens_one_gap() -> None:
    held: list[bytes] = []
    pair = make_pair(delay=0.01, filter=hold_back({2}, held))
    for i in range(1, 4):
        pair.send(A, numbered(i))
    pair.run(pair.now + 0.011)
    pair.inject(B, held.pop())
    assert pair.b.statistics().gaps_opened == 1


def test_a_filled_gap_sets_no_deadline() -> None:
    held: list[bytes] = []
    pair = make_pair(delay=0.01, filter=hold_back({2}, held))
    for i in range(1, 4):
        pair.send(A, numbered(i))
    gap_nack_at = pair.now + 0.01 + CONFIG.nack_delay_interval
    pair.run(pair.now + 0.011)  # 1 and 3 arrived: a gap at 2
    assert pair.b.next_deadline() == pytest.approx(gap_nack_at)
    pair.inject(B, held.pop())  # 2 arrives late, within the reorder allowance
    deadline = pair.b.next_deadline()
    assert deadline is not None
    assert deadline > gap_nack_at + 0.001  # the delayed ACK, not the filled gap
    pair.run(pair.now + 0.5)
    assert pair.b.statistics().nacks_sent == 0


def test_a_partly_filled_gap_is_still_nacked() -> None:
    held: list[bytes] = []
    pair = make_pair(delay=0.01, filter=hold_back({2, 3}, held))
    for i in range(1, 5):
        pair.send(A, numbered(i))
    gap_nack_at = pair.now + 0.01 + CONFIG.nack_delay_interval
    pair.run(pair.now + 0.011)  # 1 and 4 arrived: a gap at 2-3
    pair.inject(B, held.pop(0))  # 2 arrives; 3 is still missing
    assert pair.b.next_deadline() == pytest.approx(gap_nack_at)
    pair.run(pair.now + 0.5)
    assert pair.b.statistics().nacks_sent >= 1
    assert sorted(pair.delivered[B]) == sorted(numbered(i) for i in range(1, 5))


@pytest.mark.parametrize("size", [3000, 1 << 20])
def test_large_messages_are_fragmented_and_reassembled_under_loss(size: int) -> None:
    pair = make_pair(delay=0.01, loss=0.1, seed=9)
    payloads = [bytes([i]) * size + numbered(i) for i in range(3)]
    for payload in payloads:
        pair.send(A, payload)
    pair.run_until(lambda: len(pair.delivered[B]) == 3, limit=60)
    assert sorted(pair.delivered[B]) == sorted(payloads)
    assert pair.b.statistics().reassembly_bytes == 0


def test_oversized_message_is_refused() -> None:
    pair = make_pair(LinkConfig(max_message_size=1000, max_send_queue_bytes=4000))
    with pytest.raises(MessageTooLarge):
        pair.send(A, bytes(1001))


def test_slow_receiver_bounds_the_sender_buffers() -> None:
    config = LinkConfig(
        rate_bps=50e6,
        max_unacked_packets=64,
        max_send_queue_bytes=64_000,
        max_message_size=10_000,
        failure_rounds=1000,
    )
    pair = make_pair(config, delay=0.01)
    pair.cut = True  # the receiver hears nothing for a while
    accepted = 0
    while pair.a.can_send(1000) and accepted < 10_000:
        pair.send(A, numbered(accepted, 1000))
        accepted += 1
        pair.run(pair.now + 0.001)
    with pytest.raises(BufferFull):
        pair.send(A, numbered(accepted, 1000))
    stats = pair.a.statistics()
    assert stats.unacked_packets <= 64
    assert stats.queued_bytes <= 64_000
    assert not pair.a.can_send(1000)
    pair.cut = False
    pair.run_until(lambda: len(pair.delivered[B]) == accepted, limit=pair.now + 30)
    assert sorted(pair.delivered[B]) == sorted(numbered(i, 1000) for i in range(accepted))


def test_cut_link_is_declared_failed_within_the_bound() -> None:
    config = LinkConfig(heartbeat_interval=0.1, failure_rounds=5)
    pair = make_pair(config, delay=0.01)
    cut_at = pair.now
    pair.cut = True
    pair.run(cut_at + 2)
    failures = [(t, node, e) for t, node, e in pair.effects if isinstance(e, LinkFailed)]
    assert {node for _, node, _ in failures} == {A, B}
    bound = config.failure_rounds * config.heartbeat_interval + 0.05
    assert all(t - cut_at <= bound for t, _, _ in failures)
    assert pair.a.failed
    assert pair.a.next_deadline() is None


def test_packet_that_never_arrives_fails_the_link() -> None:
    def black_hole_for_seq_3(src: object, datagram: bytes) -> bool:
        return not (src == A and data_seq(datagram) == 3)

    pair = make_pair(delay=0.01, filter=black_hole_for_seq_3)
    for i in range(5):
        pair.send(A, numbered(i))
    pair.run(pair.now + 30)
    reasons = [e.reason for _, _, e in pair.effects if isinstance(e, LinkFailed)]
    assert any("not recovered" in reason for reason in reasons)


def test_peer_restart_is_detected_and_the_link_recovers() -> None:
    pair = make_pair(delay=0.01)
    pair.send(A, b"before")
    pair.run(pair.now + 0.5)
    pair.b = HopLink(B, A, CONFIG, epoch=999)  # B crashed and came back
    pair.delivered[B].clear()
    pair.apply(B, pair.b.start(pair.now))
    pair.run(pair.now + 0.5)
    assert any(isinstance(e, PeerRestarted) for _, node, e in pair.effects if node == A)
    pair.send(A, b"after")
    pair.send(B, b"hello back")
    pair.run(pair.now + 0.5)
    assert pair.delivered[B] == [b"after"]
    assert pair.delivered[A][-1] == b"hello back"


def test_stale_datagrams_from_an_old_incarnation_are_dropped() -> None:
    pair = make_pair(delay=0.01)
    old = [e for _, node, e in pair.effects if node == A]
    pair.b = HopLink(B, A, CONFIG, epoch=999)
    pair.apply(B, pair.b.start(pair.now))
    pair.run(pair.now + 0.5)
    before = pair.b.statistics().stale_dropped
    stale = wire.encode(
        wire.Packet(wire.Header(PacketType.DATA, A, 101, 1), body=(wire.WholeMessage(b"old"),))
    )
    pair.inject(B, stale)
    assert pair.b.statistics().stale_dropped == before + 1
    assert b"old" not in pair.delivered[B]
    assert old  # the first incarnation did talk to A


def test_malformed_and_foreign_datagrams_are_counted_not_raised() -> None:
    pair = make_pair(delay=0.01)
    pair.inject(B, b"")
    pair.inject(B, b"\x00" * 40)
    pair.inject(B, b"MC" + bytes(60))
    foreign = wire.encode(
        wire.Packet(wire.Header(PacketType.DATA, 77, 1, 1), body=(wire.WholeMessage(b"x"),))
    )
    pair.inject(B, foreign)
    stats = pair.b.statistics()
    assert stats.malformed_dropped == 3
    assert stats.foreign_dropped == 1
    pair.send(A, b"still fine")
    pair.run(pair.now + 0.2)
    assert pair.delivered[B] == [b"still fine"]


def test_pacer_holds_the_configured_rate() -> None:
    config = LinkConfig(rate_bps=2e6, burst_bytes=4000)
    pair = make_pair(config, delay=0.01)
    start = pair.now
    for i in range(2000):
        pair.send(A, numbered(i, 1000))
    pair.run_until(lambda: len(pair.delivered[B]) == 2000, limit=start + 60)
    elapsed = pair.delivered_at[B][-1] - start
    wire_bytes = 2000 * (1000 + 3 + wire.HEADER_SIZE + wire.UDP_IP_OVERHEAD)
    assert wire_bytes * 8 / elapsed == pytest.approx(2e6, rel=0.03)


@pytest.mark.parametrize(
    ("mtu_a", "mtu_b"), [(1400, 1400), (16_384, 1400), (1400, 9000), (65_507, 9000)]
)
def test_each_side_sends_datagrams_no_larger_than_the_smaller_mtu(mtu_a: int, mtu_b: int) -> None:
    sizes: dict[object, int] = {A: 0, B: 0}

    def largest(src: object, datagram: bytes) -> bool:
        sizes[src] = max(sizes[src], len(datagram))
        return True

    pair = Pair(
        HopLink(A, B, LinkConfig(rate_bps=1e9, mtu=mtu_a), epoch=101),
        HopLink(B, A, LinkConfig(rate_bps=1e9, mtu=mtu_b), epoch=202),
        filter=largest,
    )
    pair.start()
    pair.run(0.2)
    smaller = min(mtu_a, mtu_b)
    assert pair.a.mtu == pair.b.mtu == smaller
    messages = [numbered(i, 1000) for i in range(300)] + [numbered(300, 200_000)]
    for m in messages:
        pair.send(A, m)
        pair.send(B, m)
    pair.run(5.0)
    assert pair.delivered[A] == pair.delivered[B] == messages
    # the data fills datagrams up to the smaller MTU, never beyond
    assert smaller - 1100 < sizes[A] <= smaller
    assert smaller - 1100 < sizes[B] <= smaller
