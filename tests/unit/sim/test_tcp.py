"""Unit tests of the TCP link model: two `TcpLink`s driven against each other.

The pump below is deliberately tiny (fixed one-way delay, seeded loss, optional jitter
and duplication, no bandwidth) so these tests do not depend on `meshcast.sim`.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import FrozenInstanceError

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcast.errors import BufferFull, ConfigError, MessageTooLarge, UsageError
from meshcast.ids import NodeId
from meshcast.link import (
    Delivered,
    Link,
    LinkConfig,
    LinkEffect,
    LinkEstablished,
    LinkFailed,
    PeerRestarted,
    Transmit,
)
from meshcast.sim.tcp import TcpConfig, TcpLink
from meshcast.sim.tcp_congestion import NewReno, RtoEstimator, SackReno, Scoreboard
from meshcast.wire import (
    Header,
    Hello,
    LinkState,
    MessagePiece,
    Packet,
    PacketType,
    WholeMessage,
    decode,
    encode,
)

A = NodeId(1)
B = NodeId(2)
EPOCH_A = 11
EPOCH_B = 22
DELAY = 0.05  # s one way: RTT 100 ms

Drop = Callable[[NodeId, bytes], bool]


def make_pair(
    config: LinkConfig | None = None, tcp: TcpConfig | None = None
) -> tuple[TcpLink, TcpLink]:
    config = config or LinkConfig()
    a = TcpLink(A, B, config, epoch=EPOCH_A, tcp=tcp)
    b = TcpLink(B, A, config, epoch=EPOCH_B, tcp=tcp)
    return a, b


class Pump:
    """Moves datagrams between two links with a fixed delay and seeded loss.

    `jitter` adds a uniform extra delay (so packets can overtake each other) and
    `duplicate` is the probability that a packet arrives twice.
    """

    def __init__(
        self,
        a: TcpLink,
        b: TcpLink,
        *,
        delay: float = DELAY,
        loss: float = 0.0,
        seed: int = 0,
        drop: Drop | None = None,
        jitter: float = 0.0,
        duplicate: float = 0.0,
    ) -> None:
        self.links = {A: a, B: b}
        self.delay = delay
        self.jitter = jitter
        self.duplicate = duplicate
        self.loss = loss
        self.rng = random.Random(seed)
        self.drop = drop
        self.now = 0.0
        self.wire: list[tuple[float, int, NodeId, bytes]] = []
        self.order = itertools.count()
        self.delivered: dict[NodeId, list[bytes]] = {A: [], B: []}
        self.delivered_at: dict[NodeId, list[float]] = {A: [], B: []}
        self.established_at: dict[NodeId, float] = {}
        self.failures: dict[NodeId, str] = {}

    def apply(self, node: NodeId, effects: list[LinkEffect]) -> None:
        for effect in effects:
            match effect:
                case Transmit(to=to, datagram=datagram):
                    if self.drop is not None and self.drop(node, datagram):
                        continue
                    if self.loss and self.rng.random() < self.loss:
                        continue
                    copies = 2 if self.duplicate and self.rng.random() < self.duplicate else 1
                    for _ in range(copies):
                        at = self.now + self.delay + self.jitter * self.rng.random()
                        heapq.heappush(self.wire, (at, next(self.order), to, datagram))
                case Delivered(payload=payload):
                    self.delivered[node].append(payload)
                    self.delivered_at[node].append(self.now)
                case LinkEstablished():
                    self.established_at[node] = self.now
                case LinkFailed(reason=reason):
                    self.failures[node] = reason
                case _:
                    pass

    def start(self, *nodes: NodeId) -> None:
        for node in nodes:
            self.apply(node, self.links[node].start(self.now))

    def send(self, node: NodeId, payload: bytes) -> None:
        self.apply(node, self.links[node].send(payload, self.now))

    def step(self) -> bool:
        times = [self.wire[0][0]] if self.wire else []
        times += [t for link in self.links.values() if (t := link.next_deadline()) is not None]
        if not times:
            return False
        self.now = max(self.now, min(times))
        if self.wire and self.wire[0][0] <= self.now:
            _, _, to, datagram = heapq.heappop(self.wire)
            self.apply(to, self.links[to].datagram_received(datagram, self.now))
            return True
        for node, link in self.links.items():
            deadline = link.next_deadline()
            if deadline is not None and deadline <= self.now:
                self.apply(node, link.on_timer(self.now))
        return True

    def run(self, until: float, done: Callable[[], bool] | None = None) -> None:
        for _ in range(2_000_000):
            if (done is not None and done()) or self.now > until or not self.step():
                return
        raise AssertionError("pump did not settle")


def established_pump(
    config: LinkConfig | None = None,
    tcp: TcpConfig | None = None,
    *,
    loss: float = 0.0,
    seed: int = 0,
    drop: Drop | None = None,
) -> tuple[Pump, TcpLink, TcpLink]:
    a, b = make_pair(config, tcp)
    pump = Pump(a, b, loss=loss, seed=seed, drop=drop)
    pump.start(A, B)
    pump.run(until=60.0, done=lambda: a.established and b.established)
    assert a.established
    assert b.established
    pump.run(until=pump.now + 1.0)  # let the handshake's last ACKs land
    return pump, a, b


def transmits(effects: list[LinkEffect]) -> list[Packet]:
    return [decode(e.datagram) for e in effects if isinstance(e, Transmit)]


def data_seqs(effects: list[LinkEffect]) -> list[int]:
    return [p.header.seq for p in transmits(effects) if p.header.ptype is PacketType.DATA]


def datagrams(effects: list[LinkEffect]) -> list[bytes]:
    return [e.datagram for e in effects if isinstance(e, Transmit)]


def payloads(effects: list[LinkEffect]) -> list[bytes]:
    return [e.payload for e in effects if isinstance(e, Delivered)]


def ack_from_b(*, sender: int = B, epoch: int = EPOCH_B) -> bytes:
    """A pure ACK acknowledging nothing, as b would send it."""
    return encode(Packet(Header(PacketType.STATE, sender, epoch), LinkState(EPOCH_A, 0, 0)))


# ---------------------------------------------------------------- handshake


def test_satisfies_link_protocol() -> None:
    a, _ = make_pair()
    link: Link = a
    assert link.peer == B
    assert not link.established
    assert not link.failed


def test_statistics_are_frozen_snapshots_that_count() -> None:
    pump, a, b = established_pump()
    before, tcp_before = a.statistics(), a.tcp_statistics()
    assert before.messages_sent == b.statistics().messages_delivered == 0
    for payload in (b"one", b"two"):
        pump.send(A, payload)
    pump.apply(B, b.datagram_received(b"junk", pump.now))
    pump.run(until=pump.now + 1.0)
    assert pump.delivered[B] == [b"one", b"two"]
    sent, got = a.statistics(), b.statistics()
    assert sent.messages_sent == 2
    assert sent.packets_sent > before.packets_sent
    assert (got.messages_delivered, got.bytes_delivered, got.malformed_dropped) == (2, 6, 1)
    # a snapshot stays as it was taken, and cannot be changed
    assert before.messages_sent == 0
    with pytest.raises(FrozenInstanceError):
        sent.messages_sent = 0  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        tcp_before.timeouts = 1  # type: ignore[misc]


def test_active_open_takes_one_round_trip_and_passive_side_one_and_a_half() -> None:
    a, b = make_pair()
    pump = Pump(a, b)
    pump.start(A)  # b only listens
    pump.run(until=5.0)
    assert pump.established_at[A] == pytest.approx(2 * DELAY)
    assert pump.established_at[B] == pytest.approx(3 * DELAY)


def test_data_sent_before_the_handshake_waits_for_it() -> None:
    a, b = make_pair()
    pump = Pump(a, b)
    pump.send(A, b"early")
    pump.start(A)
    pump.run(until=5.0)
    assert pump.delivered[B] == [b"early"]
    # SYN, SYN-ACK, then the data carrying the handshake's third leg.
    assert pump.delivered_at[B] == [pytest.approx(3 * DELAY)]
    assert pump.established_at[B] == pytest.approx(3 * DELAY)


def test_simultaneous_open() -> None:
    a, b = make_pair()
    pump = Pump(a, b)
    pump.start(A, B)
    pump.run(until=5.0)
    assert pump.established_at == {A: pytest.approx(2 * DELAY), B: pytest.approx(2 * DELAY)}


def test_handshake_survives_lost_syn() -> None:
    lost: list[bytes] = []

    def drop_first_hello(node: NodeId, datagram: bytes) -> bool:
        if node == A and not lost:
            lost.append(datagram)
            return True
        return False

    a, b = make_pair()
    pump = Pump(a, b, drop=drop_first_hello)
    pump.start(A)
    pump.run(until=10.0)
    assert lost
    # The SYN is resent after the initial RTO of 1 s (RFC 6298 §2.1).
    assert pump.established_at[A] == pytest.approx(1.0 + 2 * DELAY)


def test_handshake_gives_up_with_backoff() -> None:
    config = LinkConfig(failure_rounds=4)
    a, _ = make_pair(config)
    effects = a.start(0.0)
    sent_at = [0.0]
    assert len(transmits(effects)) == 1
    while not a.failed:
        deadline = a.next_deadline()
        assert deadline is not None
        effects = a.on_timer(deadline)
        if transmits(effects):
            sent_at.append(deadline)
    gaps = [later - earlier for earlier, later in itertools.pairwise(sent_at)]
    assert gaps == pytest.approx([1.0, 2.0, 4.0, 8.0])
    assert [e for e in effects if isinstance(e, LinkFailed)]
    assert a.next_deadline() is None


# ---------------------------------------------------------------- reliability and order


def random_messages(rng: random.Random, count: int) -> list[bytes]:
    sizes = [rng.choice((0, 10, 100, 700, 1300, 1400, 3000, 9000)) for _ in range(count)]
    return [rng.randbytes(size) for size in sizes]


@pytest.mark.parametrize("sack", [True, False], ids=["sack", "newreno"])
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("loss", [0.0, 0.05, 0.1, 0.2, 0.3])
def test_every_message_delivered_once_in_order(loss: float, seed: int, sack: bool) -> None:
    rng = random.Random(seed)
    config = LinkConfig(failure_rounds=30)  # at 30 % loss 8 lost rounds in a row happen
    sizes: list[int] = []

    def measure(node: NodeId, datagram: bytes) -> bool:
        sizes.append(len(datagram))
        return False

    pump, a, b = established_pump(config, TcpConfig(sack=sack), loss=loss, seed=seed, drop=measure)
    from_a = random_messages(rng, 150)
    from_b = random_messages(rng, 60)
    for message in from_a[:100]:
        pump.send(A, message)
    for message in from_b:
        pump.send(B, message)
    pump.run(until=pump.now + 3.0)
    for message in from_a[100:]:  # more after a pause, mixed with recovery
        pump.send(A, message)

    def done() -> bool:
        return len(pump.delivered[B]) == len(from_a) and len(pump.delivered[A]) == len(from_b)

    pump.run(until=pump.now + 1200.0, done=done)
    assert not pump.failures
    assert pump.delivered[B] == from_a
    assert pump.delivered[A] == from_b
    pump.run(until=pump.now + 120.0)  # drain: everything acknowledged, nothing more
    for link in (a, b):
        stats = link.statistics()
        assert stats.unacked_packets == 0
        assert stats.queued_messages == 0
        assert stats.queued_bytes == 0
        assert stats.reassembly_bytes == 0
        assert stats.protocol_violations == 0
    assert b.statistics().messages_delivered == len(from_a)
    assert a.statistics().bytes_delivered == sum(map(len, from_b))
    # Data segments carrying SACK blocks for the reverse stream still fit the MTU.
    assert max(sizes) <= config.mtu


@pytest.mark.parametrize("sack", [True, False], ids=["sack", "newreno"])
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_reordering_and_duplicates_keep_exactly_once_in_order(seed: int, sack: bool) -> None:
    rng = random.Random(seed)
    a, b = make_pair(LinkConfig(failure_rounds=30), TcpConfig(sack=sack))

    pump = Pump(a, b, loss=0.05, seed=seed, jitter=0.03, duplicate=0.1)
    from_a = random_messages(rng, 120)
    from_b = random_messages(rng, 40)
    for message in from_a:
        pump.send(A, message)
    for message in from_b:
        pump.send(B, message)
    pump.start(A, B)

    def done() -> bool:
        return len(pump.delivered[B]) == len(from_a) and len(pump.delivered[A]) == len(from_b)

    pump.run(until=1200.0, done=done)
    assert not pump.failures
    assert pump.delivered[B] == from_a
    assert pump.delivered[A] == from_b
    assert b.statistics().duplicates_dropped > 0


@pytest.mark.parametrize("loss", [0.0, 0.05])
def test_one_mebibyte_messages_reassemble(loss: float) -> None:
    rng = random.Random(7)
    pump, _, _ = established_pump(loss=loss, seed=7)
    messages = [rng.randbytes(1 << 20), b"small", rng.randbytes(1 << 20), b"tail"]
    for message in messages:
        pump.send(A, message)
    pump.run(until=600.0, done=lambda: len(pump.delivered[B]) == len(messages))
    assert pump.delivered[B] == messages


def test_batch_queued_without_flush_is_packed_on_the_next_timer() -> None:
    pump, a, _ = established_pump()
    now = pump.now
    for i in range(20):
        assert a.send(bytes([i]) * 50, now, flush=False) == []
    assert a.next_deadline() == now
    assert data_seqs(a.on_timer(now)) == [1]  # 20 small messages, one segment
    pump.run(until=now + 5.0)
    assert pump.delivered[B] == [bytes([i]) * 50 for i in range(20)]


def test_small_messages_share_segments_when_window_limited() -> None:
    pump, a, _ = established_pump()
    messages = [bytes([i]) * 100 for i in range(200)]
    for message in messages:
        pump.send(A, message)
    pump.run(until=60.0, done=lambda: len(pump.delivered[B]) == len(messages))
    assert pump.delivered[B] == messages
    # Nagle is off: the first cwnd of segments leave one message each; the rest queue up
    # behind the window and are packed together.
    assert a.statistics().packets_sent < len(messages)


# ---------------------------------------------------------------- head-of-line blocking


def test_hole_delays_later_messages_then_releases_a_burst() -> None:
    pump, a, b = established_pump()
    now = pump.now
    sent = [a.send(bytes([i]) * 500, now) for i in range(3)]
    assert [data_seqs(effects) for effects in sent] == [[1], [2], [3]]
    segments = [datagrams(effects)[0] for effects in sent]
    # Segment 1 is lost; 2 and 3 arrive but are held (Hop would deliver them now).
    arrive = now + DELAY
    for segment in segments[1:]:
        out = b.datagram_received(segment, arrive)
        assert payloads(out) == []
        # Each out-of-order arrival is acknowledged at once: a duplicate ACK.
        [ack] = transmits(out)
        assert ack.header.ptype is PacketType.STATE
        assert ack.state is not None
        assert ack.state.cum_ack == 0
    assert b.statistics().reassembly_bytes > 0
    # The repair arrives: all three come out at once, in order.
    out = b.datagram_received(segments[0], arrive + 0.3)
    assert payloads(out) == [bytes([i]) * 500 for i in range(3)]
    assert b.statistics().reassembly_bytes == 0


def test_loss_delays_delivery_of_messages_sent_after_it() -> None:
    dropped: list[int] = []

    def drop_segment_one(node: NodeId, datagram: bytes) -> bool:
        header = decode(datagram).header
        if node == A and header.ptype is PacketType.DATA and header.seq == 1 and not dropped:
            dropped.append(header.seq)
            return True
        return False

    pump, _, _ = established_pump(drop=drop_segment_one)
    start = pump.now
    for i in range(5):
        pump.send(A, bytes([i]) * 200)
    pump.run(until=start + 10.0, done=lambda: len(pump.delivered[B]) == 5)
    assert dropped == [1]
    assert pump.delivered[B] == [bytes([i]) * 200 for i in range(5)]
    # Messages 2-5 arrived after one delay, yet all wait for message 1's fast
    # retransmit: three dup ACKs back (one more delay) and the repair (one more).
    assert pump.delivered_at[B] == [pytest.approx(start + 3 * DELAY)] * 5


# ---------------------------------------------------------------- congestion control


def test_fast_retransmit_on_third_duplicate_ack() -> None:
    pump, a, b = established_pump()
    now = pump.now
    sent = [a.send(bytes([i]) * 800, now)[0] for i in range(6)]
    dup_acks: list[bytes] = []
    for effect in sent[1:5]:  # segment 1 is lost
        assert isinstance(effect, Transmit)
        out = b.datagram_received(effect.datagram, now + DELAY)
        dup_acks += [e.datagram for e in out if isinstance(e, Transmit)]
    assert len(dup_acks) == 4
    at = now + 2 * DELAY
    assert data_seqs(a.datagram_received(dup_acks[0], at)) == []
    assert data_seqs(a.datagram_received(dup_acks[1], at)) == []
    assert data_seqs(a.datagram_received(dup_acks[2], at)) == [1]  # before any timeout
    deadline = a.next_deadline()
    assert deadline is not None
    assert deadline > at
    stats = a.tcp_statistics()
    assert stats.fast_retransmits == 1
    assert stats.timeouts == 0
    assert stats.in_recovery
    assert stats.dup_acks_received == 3
    assert a.statistics().retransmissions == 1
    # The fourth dup ACK inflates the window but resends nothing.
    assert data_seqs(a.datagram_received(dup_acks[3], at)) == []


def test_limited_transmit_sends_new_data_on_early_dup_acks() -> None:
    pump, a, b = established_pump()
    now = pump.now
    sent = [a.send(bytes([i]) * 800, now)[0] for i in range(10)]  # fills cwnd 10
    assert data_seqs(a.send(b"queued-1", now)) == []
    assert data_seqs(a.send(b"queued-2", now)) == []
    effect = sent[1]
    assert isinstance(effect, Transmit)
    [dup_ack] = [e for e in b.datagram_received(effect.datagram, now) if isinstance(e, Transmit)]
    assert data_seqs(a.datagram_received(dup_ack.datagram, now + DELAY)) == [11]


def test_retransmission_timeout_doubles() -> None:
    pump, a, _ = established_pump(LinkConfig(failure_rounds=6))
    now = pump.now
    assert data_seqs(a.send(b"into the void", now)) == [1]
    first_rto = a.tcp_statistics().rto
    # One sample of 100 ms: SRTT 0.1 + max(4 * RTTVAR, 0.2) as Linux computes it.
    assert first_rto == pytest.approx(0.3)
    times = [now]
    for _ in range(6):
        deadline = a.next_deadline()
        assert deadline is not None
        assert data_seqs(a.on_timer(deadline)) == [1]
        times.append(deadline)
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert gaps == pytest.approx([first_rto * 2**i for i in range(6)])
    stats = a.tcp_statistics()
    assert stats.timeouts == 6
    assert stats.cwnd == 1
    assert stats.ssthresh == 2


def test_rto_resets_after_progress() -> None:
    dropped: list[int] = []

    def drop_once(node: NodeId, datagram: bytes) -> bool:
        packet = decode(datagram)
        if node == A and packet.header.ptype is PacketType.DATA and len(dropped) < 2:
            dropped.append(packet.header.seq)
            return True
        return False

    pump, a, _ = established_pump(drop=drop_once)
    pump.send(A, b"lost twice")
    pump.run(until=pump.now + 10.0, done=lambda: bool(pump.delivered[B]))
    assert dropped == [1, 1]
    assert a.tcp_statistics().timeouts == 2
    pump.run(until=pump.now + 1.0)
    # Karn: the ACK of a resent segment is no sample, but progress undoes the back-off.
    assert a.tcp_statistics().rto == pytest.approx(0.3)


def test_window_grows_in_slow_start_and_is_capped_by_receive_window() -> None:
    config = LinkConfig(max_unacked_packets=40)
    pump, a, _ = established_pump(config)
    for _ in range(400):
        pump.send(A, bytes(1300))
    peak = 0
    while len(pump.delivered[B]) < 400:
        assert pump.step()
        peak = max(peak, a.statistics().unacked_packets)
    assert peak == 40
    assert a.tcp_statistics().cwnd > 40


def test_delayed_ack_waits_for_a_second_segment_or_the_timer() -> None:
    pump, a, b = established_pump(tcp=TcpConfig(initial_quickacks=0))
    now = pump.now
    [first] = a.send(bytes(100), now)
    assert isinstance(first, Transmit)
    out = b.datagram_received(first.datagram, now + DELAY)
    assert transmits(out) == []
    assert b.next_deadline() == pytest.approx(now + DELAY + 0.040)
    # A second arrival that brings more than a full segment of data is ACKed at once.
    [second] = a.send(bytes(1300), now)
    assert isinstance(second, Transmit)
    [ack] = transmits(b.datagram_received(second.datagram, now + DELAY + 0.001))
    assert ack.state is not None
    assert ack.state.cum_ack == 2
    assert b.next_deadline() is None


def test_delayed_ack_timer_fires() -> None:
    pump, a, b = established_pump(tcp=TcpConfig(initial_quickacks=0))
    now = pump.now
    [first] = a.send(bytes(100), now)
    assert isinstance(first, Transmit)
    b.datagram_received(first.datagram, now)
    deadline = b.next_deadline()
    assert deadline is not None
    [ack] = transmits(b.on_timer(deadline))
    assert ack.header.ptype is PacketType.STATE
    assert ack.state is not None
    assert ack.state.cum_ack == 1


def make_reno() -> NewReno:
    return NewReno(
        initial_cwnd=10, loss_cwnd=1, min_ssthresh=2, dupack_threshold=3, initial_ssthresh=64
    )


def test_newreno_slow_start_then_congestion_avoidance() -> None:
    reno = make_reno()
    reno.on_new_ack(2, 2, 8, cwnd_limited=True)
    assert reno.cwnd == 12  # one per acknowledged segment
    reno.on_new_ack(2, 4, 8, cwnd_limited=False)
    assert reno.cwnd == 12  # an application-limited window does not grow
    reno.cwnd = 64.0
    reno.on_new_ack(32, 36, 32, cwnd_limited=True)
    assert reno.cwnd == pytest.approx(64.5)  # about one segment per window


def test_newreno_fast_recovery_partial_and_full_ack() -> None:
    reno = make_reno()
    assert not reno.on_dupack(cum_ack=5, flight=20, high_sent=25)
    assert not reno.on_dupack(cum_ack=5, flight=20, high_sent=25)
    assert reno.window(limited_transmit=True) == 12  # RFC 3042
    assert reno.on_dupack(cum_ack=5, flight=20, high_sent=25)
    assert (reno.ssthresh, reno.cwnd, reno.recover) == (10, 13, 25)
    reno.on_dupack(cum_ack=5, flight=20, high_sent=25)
    assert reno.cwnd == 14  # inflation
    outcome = reno.on_new_ack(4, 9, 16, cwnd_limited=True)  # partial: 9 < recover
    assert outcome.retransmit_head
    assert outcome.restart_timer  # only the first partial ACK restarts the timer
    assert reno.cwnd == 11  # deflated by 4, plus 1
    assert not reno.on_new_ack(1, 10, 15, cwnd_limited=True).restart_timer
    outcome = reno.on_new_ack(15, 25, 0, cwnd_limited=True)  # full
    assert not outcome.retransmit_head
    assert not reno.in_recovery
    assert reno.cwnd == 2  # min(ssthresh, max(flight, 1) + 1)


def test_newreno_no_second_fast_retransmit_below_recover() -> None:
    reno = make_reno()
    reno.on_timeout(flight=30, high_sent=40, first=True)
    assert (reno.cwnd, reno.ssthresh, reno.recover) == (1, 15, 40)
    assert not any(reno.on_dupack(cum_ack=20, flight=20, high_sent=40) for _ in range(5))
    reno.on_timeout(flight=1, high_sent=40, first=False)
    assert reno.ssthresh == 15  # a repeated timeout keeps the first estimate


def test_rto_estimator_rfc6298_and_linux_floor() -> None:
    linux = RtoEstimator(
        initial_rto=1.0, min_rto=0.2, max_rto=120.0, granularity=0.001, linux_floor=True
    )
    rfc = RtoEstimator(
        initial_rto=1.0, min_rto=0.2, max_rto=120.0, granularity=0.001, linux_floor=False
    )
    assert linux.rto == rfc.rto == 1.0
    for estimator in (linux, rfc):
        estimator.sample(0.1)
        assert (estimator.srtt, estimator.rttvar) == (0.1, 0.05)
    assert linux.rto == pytest.approx(0.3)  # 0.1 + max(4 * 0.05, 0.2)
    assert rfc.rto == pytest.approx(0.3)  # max(0.2, 0.1 + 0.2)
    linux.sample(0.1)
    rfc.sample(0.1)
    assert linux.srtt == pytest.approx(0.1)
    assert linux.rttvar == pytest.approx(0.0375)
    assert linux.rto == pytest.approx(0.3)  # the floor holds
    assert rfc.rto == pytest.approx(0.25)
    for _ in range(12):
        linux.back_off()
    assert linux.rto == 120.0  # capped at max_rto
    linux.progressed()
    assert linux.rto == pytest.approx(0.3)


# ---------------------------------------------------------------- SACK


def data_from_a(seq: int, payload: bytes = b"x") -> bytes:
    """A DATA segment as a would send it, for driving b's receiver by hand."""
    header = Header(PacketType.DATA, A, EPOCH_A, seq)
    return encode(Packet(header, LinkState(EPOCH_B, 0, seq), (WholeMessage(payload),)))


def ack_state(effects: list[LinkEffect]) -> LinkState:
    [ack] = transmits(effects)
    assert ack.header.ptype is PacketType.STATE
    assert ack.state is not None
    return ack.state


def test_receiver_reports_sack_blocks_most_recent_first() -> None:
    pump, _, b = established_pump()
    now = pump.now
    assert ack_state(b.datagram_received(data_from_a(1), now)).nacks == ()
    # Each out-of-order arrival is acknowledged at once; its block comes first
    # (RFC 2018 §4), the others follow, at most three (as Linux with timestamps).
    expected = {
        3: ((3, 1),),
        5: ((5, 1), (3, 1)),
        7: ((7, 1), (5, 1), (3, 1)),
        9: ((9, 1), (7, 1), (5, 1)),
        4: ((3, 3), (9, 1), (7, 1)),  # 4 joins 3 and 5 into one block
        10: ((9, 2), (3, 3), (7, 1)),
    }
    for seq, blocks in expected.items():
        state = ack_state(b.datagram_received(data_from_a(seq), now))
        assert state.cum_ack == 1
        assert state.nacks == blocks
    # Filling the first hole moves the cumulative ACK over 2..5; those blocks go.
    state = ack_state(b.datagram_received(data_from_a(2), now))
    assert (state.cum_ack, state.nacks) == (5, ((9, 2), (7, 1)))
    state = ack_state(b.datagram_received(data_from_a(6), now))
    assert (state.cum_ack, state.nacks) == (7, ((9, 2),))
    state = ack_state(b.datagram_received(data_from_a(8), now))
    assert (state.cum_ack, state.nacks) == (10, ())
    assert b.statistics().reassembly_bytes == 0


def test_receiver_without_sack_reports_no_blocks() -> None:
    pump, _, b = established_pump(tcp=TcpConfig(sack=False))
    now = pump.now
    b.datagram_received(data_from_a(1), now)
    for seq in (3, 5, 7):
        state = ack_state(b.datagram_received(data_from_a(seq), now))
        assert (state.cum_ack, state.nacks) == (1, ())


def test_sack_blocks_take_room_from_data_not_beyond_the_mtu() -> None:
    config = LinkConfig(mtu=600)
    pump, _, b = established_pump(config)
    now = pump.now
    b.datagram_received(data_from_a(1), now)
    for seq in (3, 5, 7, 9):
        b.datagram_received(data_from_a(seq), now)
    segments = datagrams(b.send(bytes(2000), now))  # a large message, cut to fit
    assert len(segments) == 4
    for datagram in segments:
        state = decode(datagram).state
        assert state is not None
        assert len(state.nacks) == 3
        assert len(datagram) <= config.mtu
    assert len(segments[0]) == config.mtu


def make_board(sent: int) -> Scoreboard:
    board = Scoreboard(dupthresh=3)
    for seq in range(1, sent + 1):
        board.sent(seq, 0.0, retransmit=False)
    return board


def test_scoreboard_is_lost_needs_dupthresh_sacked_segments_above() -> None:
    board = make_board(10)
    assert (board.una, board.nxt, board.pipe) == (1, 11, 10)
    update = board.ack(0, [(3, 2)], 0.1, 0.1)
    assert (update.delivered, update.newly_sacked, update.newly_lost) == (2, 2, 0)
    assert board.pipe == 8
    assert not board.is_lost(1)
    assert board.next_lost() is None
    # A third SACKed segment above 1 and 2 makes them lost; 5 has one above it.
    update = board.ack(0, [(6, 1), (3, 2)], 0.1, 0.1)
    assert (update.delivered, update.newly_sacked, update.newly_lost) == (1, 1, 2)
    assert [board.is_lost(seq) for seq in (1, 2, 5)] == [True, True, False]
    assert board.pipe == 10 - 3 - 2  # outstanding − SACKed − lost
    # Holes go out lowest first; a retransmission in flight counts in the pipe again.
    assert board.next_lost() == 1
    board.sent(1, 0.2, retransmit=True)
    assert board.pipe == 6
    assert board.next_lost() == 2
    board.sent(2, 0.2, retransmit=True)
    assert board.next_lost() is None
    # The cumulative ACK covers 1..4: 1 and 2 are newly delivered, 3 and 4 were SACKed.
    update = board.ack(4, [(6, 3)], 0.3, 0.1)
    assert (update.delivered, update.newly_sacked, update.newly_lost) == (4, 2, 1)
    assert (board.una, board.sacked) == (5, 3)
    assert board.is_lost(5)  # 6, 7 and 8 are above it
    assert board.pipe == 6 - 3 - 1
    assert board.next_lost() == 5


def test_scoreboard_detects_a_lost_retransmission() -> None:
    board = make_board(6)
    board.ack(0, [(2, 3)], 0.1, 0.1)
    assert board.next_lost() == 1
    board.sent(1, 0.1, retransmit=True)
    board.sent(7, 0.1, retransmit=False)  # new data after the retransmission
    # 7 arrives but 1 does not: the retransmission was lost (RACK), resend it.
    update = board.ack(0, [(7, 1), (2, 3)], 0.2, 0.1)
    assert update.lost_retransmissions == 1
    assert board.next_lost() == 1
    assert board.pipe == 7 - 4 - 1


def test_scoreboard_ignores_ambiguous_deliveries_of_resent_segments() -> None:
    board = make_board(8)
    board.ack(0, [(4, 3)], 0.1, 0.1)  # 1..3 lost
    board.sent(1, 0.1, retransmit=True)
    board.sent(2, 0.11, retransmit=True)
    # 2 is SACKed 10 ms after its retransmission, less than min_rtt: that was its
    # original copy arriving late, so it says nothing about the retransmission of 1.
    update = board.ack(0, [(2, 1), (4, 3)], 0.12, 0.1)
    assert update.lost_retransmissions == 0
    assert board.next_lost() == 3


def test_scoreboard_timeout_keeps_sacked_segments() -> None:
    board = make_board(10)
    board.ack(2, [(4, 2), (8, 2)], 0.1, 0.1)
    board.sent(3, 0.2, retransmit=True)
    board.timeout()
    # Everything not SACKed is lost, the retransmission too: 3, 6, 7, 10.
    assert board.lost == 4
    assert board.pipe == 0
    resent = []
    while (seq := board.next_lost()) is not None:
        board.sent(seq, 0.5, retransmit=True)
        resent.append(seq)
    assert resent == [3, 6, 7, 10]


def test_scoreboard_forgets_sacks_after_reneging() -> None:
    board = make_board(6)
    board.ack(0, [(2, 3)], 0.1, 0.1)
    board.ack(1, [(2, 3)], 0.2, 0.1)  # stops just below a SACKed segment: reneged
    board.timeout()
    assert board.sacked == 0
    assert board.lost == 5


def test_scoreboard_clips_blocks_beyond_what_was_sent() -> None:
    board = make_board(4)
    update = board.ack(0, [(3, 2**32 - 1)], 0.1, 0.1)
    assert update.beyond_sent
    assert update.newly_sacked == 2


def make_sack_reno(*, prr: bool) -> SackReno:
    return SackReno(
        initial_cwnd=10,
        loss_cwnd=1,
        min_ssthresh=2,
        dupack_threshold=3,
        initial_ssthresh=math.inf,
        prr=prr,
    )


def sends_per_ack_in_recovery(reno: SackReno, flight: int, lost: int) -> list[int]:
    """Deliver the `flight - lost` survivors one ACK at a time; what may go out each."""
    reno.enter_recovery(flight, high_sent=flight)
    pipe = flight - lost
    sends = []
    for _ in range(flight - lost):
        pipe -= 1
        reno.on_ack(1, pipe, safe=False, cwnd_limited=True)
        sent = 0
        while pipe < reno.window():
            pipe += 1
            sent += 1
            reno.on_sent()
        sends.append(sent)
    return sends


def test_prr_spreads_the_reduction_over_the_round_trip() -> None:
    sends = sends_per_ack_in_recovery(make_sack_reno(prr=True), flight=20, lost=1)
    assert sends[0] == 1  # the fast retransmit leaves at once
    assert max(sends) == 1  # no burst
    assert sum(sends) == 10  # ssthresh per RecoverFS delivered: half of 19, rounded up
    # Without PRR cwnd drops to ssthresh at once: silence for half a window.
    sends = sends_per_ack_in_recovery(make_sack_reno(prr=False), flight=20, lost=1)
    assert sends[:9] == [0] * 9
    assert sum(sends) == 10


def test_prr_slow_starts_back_to_ssthresh_after_heavy_loss() -> None:
    reno = make_sack_reno(prr=True)
    reno.enter_recovery(20, high_sent=20)
    assert reno.ssthresh == 10
    # 15 of 20 lost: the pipe is far below ssthresh. A safe ACK (the cumulative ACK
    # moved, no new loss) may send what was delivered plus one (PRR-SSRB).
    reno.on_ack(1, 4, safe=True, cwnd_limited=True)
    assert reno.cwnd == 4 + 2
    reno.on_ack(1, 4, safe=False, cwnd_limited=True)
    assert reno.cwnd == 4 + 1  # otherwise no more than was delivered
    reno.end_recovery()
    assert (reno.cwnd, reno.in_recovery) == (10, False)


def drop_first_copies(*seqs: int, times: int = 1) -> tuple[Drop, list[int]]:
    """Drop the first `times` copies of a's DATA segments `seqs`; log every seq a sends."""
    dropped = dict.fromkeys(seqs, 0)
    sent: list[int] = []

    def drop(node: NodeId, datagram: bytes) -> bool:
        header = decode(datagram).header
        if node != A or header.ptype is not PacketType.DATA:
            return False
        sent.append(header.seq)
        if header.seq in dropped and dropped[header.seq] < times:
            dropped[header.seq] += 1
            return True
        return False

    return drop, sent


@pytest.mark.parametrize("sack", [True, False], ids=["sack", "newreno"])
def test_several_holes_in_one_window(sack: bool) -> None:
    holes = (2, 5, 8, 11)
    drop, sent = drop_first_copies(*holes)
    tcp = TcpConfig(sack=sack, initial_cwnd_segments=40)
    pump, a, _ = established_pump(tcp=tcp, drop=drop)
    start = pump.now
    messages = [bytes([i]) * 1000 for i in range(30)]  # one segment each
    for message in messages:
        pump.send(A, message)
    pump.run(until=start + 10.0, done=lambda: len(pump.delivered[B]) == len(messages))
    assert pump.delivered[B] == messages
    finished = pump.delivered_at[B][-1] - start
    stats = a.tcp_statistics()
    assert stats.timeouts == 0
    assert stats.fast_retransmits == 1
    assert a.statistics().retransmissions == len(holes)  # no segment resent needlessly
    rtt = 2 * DELAY
    if sack:
        # All four holes are resent when the SACKs come back: one RTT of repair.
        assert sorted(sent[30:]) == list(holes)
        assert finished == pytest.approx(DELAY + rtt)
    else:
        # NewReno learns of the next hole only from the partial ACK: one per RTT.
        assert sent[30:] == list(holes)
        assert finished == pytest.approx(DELAY + rtt * len(holes))


@pytest.mark.parametrize("sack", [True, False], ids=["sack", "newreno"])
def test_after_a_timeout_only_unsacked_segments_are_resent(sack: bool) -> None:
    # 1 is lost twice (no new data follows its fast retransmit, so only the RTO
    # finds out), and 5 once.
    drop, sent = drop_first_copies(1, 5, times=2)
    pump, a, b = established_pump(tcp=TcpConfig(sack=sack), drop=drop)
    start = pump.now
    messages = [bytes([i]) * 1000 for i in range(10)]
    for message in messages:
        pump.send(A, message)
    pump.run(until=start + 30.0, done=lambda: len(pump.delivered[B]) == len(messages))
    assert pump.delivered[B] == messages
    assert a.tcp_statistics().timeouts >= 1
    if sack:
        resent = sent[10:]
        assert set(resent) == {1, 5}  # 2-4 and 6-10 were SACKed: never resent
        assert b.statistics().duplicates_dropped == 0
    else:
        assert b.statistics().duplicates_dropped > 0  # go-back-N resent what b held


def test_lost_retransmission_is_repaired_without_a_timeout() -> None:
    drop, sent = drop_first_copies(3, times=2)
    pump, a, _ = established_pump(drop=drop)
    start = pump.now
    messages = [bytes([i % 256]) * 1000 for i in range(40)]
    for message in messages:
        pump.send(A, message)
    pump.run(until=start + 10.0, done=lambda: len(pump.delivered[B]) == len(messages))
    assert pump.delivered[B] == messages
    stats = a.tcp_statistics()
    assert stats.timeouts == 0
    assert stats.lost_retransmissions == 1
    assert sent.count(3) == 3
    assert pump.delivered_at[B][-1] - start < 0.5  # an RTO would cost 0.3 s on its own


@pytest.mark.parametrize(("sack_a", "sack_b"), [(True, False), (False, True)])
def test_mismatched_sack_settings_still_deliver_everything(sack_a: bool, sack_b: bool) -> None:
    # The model's SYN cannot negotiate SACK; a mismatch is only slower.
    config = LinkConfig(failure_rounds=30)
    a = TcpLink(A, B, config, epoch=EPOCH_A, tcp=TcpConfig(sack=sack_a))
    b = TcpLink(B, A, config, epoch=EPOCH_B, tcp=TcpConfig(sack=sack_b))
    pump = Pump(a, b, loss=0.1, seed=5)
    rng = random.Random(5)
    from_a = random_messages(rng, 100)
    from_b = random_messages(rng, 100)
    for message in from_a:
        pump.send(A, message)
    for message in from_b:
        pump.send(B, message)
    pump.start(A, B)

    def done() -> bool:
        return len(pump.delivered[B]) == len(from_a) and len(pump.delivered[A]) == len(from_b)

    pump.run(until=1200.0, done=done)
    assert pump.delivered[B] == from_a
    assert pump.delivered[A] == from_b


def test_sack_ack_beyond_what_was_sent_is_a_protocol_violation() -> None:
    pump, a, _ = established_pump()
    a.send(b"one", pump.now)
    state = LinkState(EPOCH_A, 0, 0, ((5, 3),))
    a.datagram_received(encode(Packet(Header(PacketType.STATE, B, EPOCH_B), state)), pump.now)
    assert a.statistics().protocol_violations == 1
    assert a.established


# ---------------------------------------------------------------- failure


def test_link_fails_when_the_peer_vanishes() -> None:
    gone = False

    def vanish(node: NodeId, datagram: bytes) -> bool:
        return gone

    config = LinkConfig(failure_rounds=5)
    pump, a, _ = established_pump(config, drop=vanish)
    gone = True
    pump.send(A, b"anyone there?")
    pump.run(until=pump.now + 600.0, done=lambda: A in pump.failures)
    assert a.failed
    assert not a.established
    assert "retransmission timeouts" in pump.failures[A]
    assert a.statistics().retransmissions == 5
    assert a.next_deadline() is None
    assert a.statistics().unacked_packets == 0  # buffers released
    assert not a.can_send(1)
    assert a.send(b"more", pump.now) == []  # as HopLink: a failed link takes nothing
    assert a.on_timer(pump.now + 1000.0) == []


def test_keepalive_detects_a_silent_peer() -> None:
    gone = False

    def vanish(node: NodeId, datagram: bytes) -> bool:
        return gone

    tcp = TcpConfig(keepalive_interval=1.0)
    pump, a, b = established_pump(LinkConfig(failure_rounds=3), tcp, drop=vanish)
    pump.run(until=pump.now + 10.0)  # probes answered: still up
    assert a.established
    assert b.established
    assert a.statistics().probes_sent > 0
    gone = True
    pump.run(until=pump.now + 30.0, done=lambda: A in pump.failures)
    assert "keepalive" in pump.failures[A]


def test_peer_restart_resets_the_connection_and_reconnects() -> None:
    pump, a, _ = established_pump()
    for _ in range(3):
        pump.send(A, b"m" * 500)
    pump.wire.clear()  # the peer dies with these segments in flight
    restarted = TcpLink(B, A, LinkConfig(), epoch=EPOCH_B + 1)
    pump.links[B] = restarted
    pump.start(B)
    pump.run(until=pump.now + 5.0)
    assert a.epoch != EPOCH_A  # a fresh stream, so old segments cannot be mistaken
    assert a.established
    assert restarted.established
    pump.send(A, b"after")
    pump.run(until=pump.now + 5.0)
    assert pump.delivered[B] == [b"after"]


def test_peer_restart_is_reported_with_the_discarded_count() -> None:
    pump, a, _ = established_pump()
    for _ in range(3):
        a.send(b"m" * 500, pump.now)
    [syn] = TcpLink(B, A, LinkConfig(), epoch=EPOCH_B + 1).start(pump.now)
    assert isinstance(syn, Transmit)
    effects = a.datagram_received(syn.datagram, pump.now)
    [restart] = [e for e in effects if isinstance(e, PeerRestarted)]
    assert restart.discarded == 3
    assert not a.established
    assert not a.failed
    [hello] = transmits(effects)
    assert isinstance(hello.body, Hello)
    assert hello.body.seen_epoch == EPOCH_B + 1  # the SYN-ACK of the new connection


# ---------------------------------------------------------------- bad input


def test_malformed_and_foreign_datagrams_are_counted_not_raised() -> None:
    pump, a, _ = established_pump()
    now = pump.now
    good = ack_from_b()
    bad = [b"", b"\x00" * 10, b"\xff" * 64, good[:-3], good[:24] + b"\x01"]
    for datagram in bad:
        assert a.datagram_received(datagram, now) == []
    assert a.statistics().malformed_dropped == len(bad)
    assert a.datagram_received(ack_from_b(sender=99), now) == []
    assert a.statistics().foreign_dropped == 1
    assert a.datagram_received(ack_from_b(epoch=EPOCH_B + 5), now) == []
    assert a.statistics().stale_dropped == 1
    assert a.established


def test_acknowledging_unsent_segments_is_a_protocol_violation() -> None:
    pump, a, _ = established_pump()
    bogus = encode(Packet(Header(PacketType.STATE, B, EPOCH_B), LinkState(EPOCH_A, 1000, 0), None))
    assert a.datagram_received(bogus, pump.now) == []
    assert a.statistics().protocol_violations == 1
    assert a.established


def test_inconsistent_pieces_are_violations() -> None:
    pump, _, b = established_pump()
    now = pump.now

    def data(seq: int, *fragments: WholeMessage | MessagePiece) -> bytes:
        header = Header(PacketType.DATA, A, EPOCH_A, seq)
        return encode(Packet(header, LinkState(EPOCH_B, 0, seq), fragments))

    b.datagram_received(data(1, MessagePiece(7, 100, 10, b"x" * 10)), now)  # no start
    b.datagram_received(data(2, MessagePiece(8, 100, 0, b"y" * 10)), now)  # starts
    b.datagram_received(data(3, MessagePiece(9, 100, 10, b"z" * 10)), now)  # wrong id
    out = b.datagram_received(data(4, WholeMessage(b"fine")), now)
    assert payloads(out) == [b"fine"]
    assert b.statistics().protocol_violations == 2
    assert b.statistics().reassembly_bytes == 0


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(datagram: bytes) -> None:
    a, _ = make_pair()
    a.start(0.0)
    a.datagram_received(datagram, 0.1)
    a.on_timer(5.0)


@st.composite
def fragments(draw: st.DrawFn) -> tuple[WholeMessage | MessagePiece, ...]:
    result: list[WholeMessage | MessagePiece] = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            result.append(WholeMessage(draw(st.binary(max_size=50))))
        else:
            total = draw(st.integers(1, 200))
            offset = draw(st.integers(0, total - 1))
            length = draw(st.integers(1, min(60, total - offset)))
            result.append(MessagePiece(draw(st.integers(0, 5)), total, offset, b"p" * length))
    return tuple(result)


@st.composite
def packets_from_b(draw: st.DrawFn) -> Packet:
    """Well-formed packets with hostile contents: odd epochs, seqs, ACKs and pieces."""
    ptype = draw(st.sampled_from([PacketType.DATA, PacketType.STATE, PacketType.HELLO]))
    epoch = draw(st.sampled_from([EPOCH_B, EPOCH_B, EPOCH_B + 1]))
    small_or_huge = st.integers(0, 20) | st.integers(0, 2**64 - 1)
    sack_block = st.tuples(
        st.integers(1, 20) | st.integers(1, 2**63), st.integers(1, 5) | st.integers(1, 2**32 - 1)
    )
    state = LinkState(
        draw(st.sampled_from([0, EPOCH_A, EPOCH_A, 5])),
        draw(small_or_huge),
        draw(small_or_huge),
        tuple(draw(st.lists(sack_block, max_size=4))),
    )
    if ptype is PacketType.HELLO:
        hello = Hello(draw(st.sampled_from([0, EPOCH_A, 3])), draw(st.integers(512, 9000)))
        return Packet(Header(ptype, B, epoch), None, hello)
    if ptype is PacketType.STATE:
        return Packet(Header(ptype, B, epoch), state, None)
    seq = draw(st.integers(1, 20) | st.integers(1, 2**64 - 1))
    return Packet(Header(ptype, B, epoch, seq), state, draw(fragments()))


@given(st.lists(packets_from_b(), max_size=20))
def test_well_formed_but_hostile_packets_never_raise(packets: list[Packet]) -> None:
    pump, a, _ = established_pump()
    a.send(b"x" * 3000, pump.now)
    now = pump.now
    for packet in packets:
        now += 0.01
        a.datagram_received(encode(packet), now)
        deadline = a.next_deadline()
        if deadline is not None:
            a.on_timer(max(deadline, now))
    stats = a.statistics()
    assert stats.unacked_packets >= 0
    assert stats.reassembly_bytes >= 0


# ---------------------------------------------------------------- API bounds


def test_send_buffer_bound_raises_buffer_full() -> None:
    config = LinkConfig(max_send_queue_bytes=4096, max_message_size=2048)
    a, _ = make_pair(config)  # never established: nothing drains
    assert a.can_send(2048)
    a.send(bytes(2048), 0.0)
    a.send(bytes(2048), 0.0)
    assert not a.can_send(1)
    with pytest.raises(BufferFull):
        a.send(b"x", 0.0)
    assert a.statistics().queued_bytes == 4096
    assert a.statistics().queued_messages == 2
    assert not a.can_send(2049)
    with pytest.raises(MessageTooLarge):
        a.send(bytes(2049), 0.0)


def test_send_buffer_drains_as_segments_are_cut() -> None:
    config = LinkConfig(max_send_queue_bytes=4096, max_message_size=2048)
    pump, a, _ = established_pump(config)
    for _ in range(2):
        pump.send(A, bytes(2048))
    assert a.can_send(2048)  # already packetised: the send queue is empty again


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("initial_cwnd_segments", 0),
        ("dupack_threshold", -1),
        ("min_rto", 0.0),
        ("delayed_ack_timeout", float("inf")),
        ("keepalive_interval", 0.0),
        ("sack_blocks", 0),
        ("sack_blocks", 257),
    ],
)
def test_bad_tcp_config_names_the_key(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"tcp\.{field}"):
        TcpConfig(**{field: value})  # type: ignore[arg-type]


def test_min_rto_above_max_rto_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"tcp\.min_rto"):
        TcpConfig(min_rto=10.0, max_rto=5.0)


def test_bad_ids_are_usage_errors() -> None:
    with pytest.raises(UsageError):
        TcpLink(A, A, LinkConfig(), epoch=1)
    with pytest.raises(UsageError):
        TcpLink(A, B, LinkConfig(), epoch=0)
