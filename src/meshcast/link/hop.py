"""The Hop link protocol: reliable, non-blocking, paced delivery to one neighbour.

Theory of operation: docs/design/link.md. In short (Amir, Danilov, Stanton, DSN 2000):

* every packet gets a link sequence number and is handed up the moment it arrives, even
  when earlier ones are missing (non-blocking); duplicates are suppressed;
* the receiver NACKs a gap only after `nack_delay_interval` (so reordered packets are not
  requested) and re-NACKs it about every 1.5 RTT until it arrives (lazy selective NACKs);
* the sender keeps every packet until it is cumulatively acknowledged and retransmits it
  on NACK, ahead of new data; a probe after an ack-less RTO recovers lost tail packets;
* a token bucket paces everything at the link's rate, and at most
  `max_unacked_packets` may be outstanding, so memory is bounded on both sides;
* after `failure_rounds` silent heartbeat rounds, or a packet NACKed
  `max_nack_rounds` times in vain, the link reports `LinkFailed`.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, fields

from meshcast import wire
from meshcast.errors import DecodeError
from meshcast.ids import NodeId
from meshcast.link.config import LinkConfig
from meshcast.link.events import (
    Delivered,
    LinkEffect,
    LinkEstablished,
    LinkFailed,
    LinkStats,
    PeerRestarted,
    Transmit,
)
from meshcast.link.pacer import Pacer
from meshcast.link.reassembly import Reassembler
from meshcast.link.rtt import RttEstimator
from meshcast.link.sendqueue import SendQueue
from meshcast.wire.packet import (
    FLAG_AUTH,
    FLAG_STATE,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    NACK_RANGE,
    STATE_BLOCK,
    U32_MAX,
    U64_MAX,
    VERSION,
    Heartbeat,
    HeartbeatKind,
    Hello,
    LinkState,
    MessagePiece,
    Packet,
    PacketType,
)

log = logging.getLogger(__name__)

_DATA = int(PacketType.DATA)
_STATE = int(PacketType.STATE)
_MAX_NACK_ROUNDS = 40  # a packet NACKed this often in vain means the link eats it
_PROBE_BACKOFF_LIMIT = 6  # probe interval doubles at most this many times


@dataclass(slots=True)
class _Outstanding:
    body: bytes
    sent_at: float
    retransmitted: bool = False

    def __init__(self, body: bytes, sent_at: float, retransmitted: bool = False) -> None:
        self.body = body
        self.sent_at = sent_at
        self.retransmitted = retransmitted


@dataclass(slots=True)
class _Counters:
    """The cumulative counters of `LinkStats`, updated in place on the hot path."""

    messages_sent: int = 0
    messages_delivered: int = 0
    bytes_delivered: int = 0
    packets_sent: int = 0
    packets_received: int = 0
    retransmissions: int = 0
    probes_sent: int = 0
    nacks_sent: int = 0
    gaps_opened: int = 0
    state_packets_sent: int = 0
    duplicates_dropped: int = 0
    malformed_dropped: int = 0
    foreign_dropped: int = 0
    stale_dropped: int = 0
    out_of_window_dropped: int = 0
    protocol_violations: int = 0


_COUNTER_NAMES = tuple(f.name for f in fields(_Counters))


@dataclass(slots=True)
class _Gap:
    nack_at: float
    opened_at: float
    rounds: int = 0


class HopLink:
    """One endpoint of a Hop link to `peer`. Sans-I/O: time comes in, effects go out."""

    def __init__(self, local: NodeId, peer: NodeId, config: LinkConfig, *, epoch: int) -> None:
        if not 0 < epoch <= U32_MAX:
            raise ValueError(f"epoch must be a non-zero u32, got {epoch}")
        self._local = local
        self._peer = peer
        self._config = config
        self._mtu = 0
        self._body_budget = 0
        self._max_nacks_per_packet = 0
        self._set_mtu(config.mtu)
        self._epoch = epoch
        self._established = False
        self._failed = False
        self._started = False
        self._rtt = RttEstimator(config.initial_rtt)
        self._pacer = Pacer(config.rate_bps, config.burst_bytes)
        # sending side
        self._queue = SendQueue(config.max_send_queue_bytes, config.max_message_size)
        self._next_seq = 1
        self._cum_acked = 0
        self._unacked: dict[int, _Outstanding] = {}
        self._retransmit: list[int] = []  # min-heap: oldest NACKed packet first
        self._retransmit_set: set[int] = set()
        self._probe_at: float | None = None
        self._probe_backoff = 0
        # receiving side
        self._peer_epoch = 0
        self._rcv_cum = 0
        self._rcv_high = 0
        self._rcv_above: set[int] = set()
        self._gaps: dict[int, _Gap] = {}
        # NACK times as a min-heap, and how many open gaps wait for each: a filled gap only
        # lowers its time's count, and a time nobody waits for is dropped from the heap top,
        # so the top is always a NACK that is really due.
        self._gap_heap: list[float] = []
        self._gaps_waiting: dict[float, int] = {}
        self._ack_pending = 0
        self._ack_due_at: float | None = None
        self._reassembly = Reassembler(config.max_message_size, config.max_reassembly_bytes)
        # liveness
        self._last_heard_at = 0.0
        self._pacer_clock = 0.0  # time of the latest input, for next_deadline()
        self._heartbeat_at: float | None = None
        self._hello_at: float | None = None
        self._counters = _Counters()

    # ------------------------------------------------------------------ queries

    @property
    def peer(self) -> NodeId:
        return self._peer

    @property
    def established(self) -> bool:
        return self._established

    @property
    def failed(self) -> bool:
        return self._failed

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def mtu(self) -> int:
        """Bytes per datagram: the configured MTU, lowered to the peer's once its HELLO
        arrived (each side announces the largest datagram it takes)."""
        return self._mtu

    @property
    def queued_messages(self) -> int:
        """Messages accepted by `send` and not yet put in a packet."""
        return len(self._queue)

    def can_send(self, size: int) -> bool:
        return not self._failed and self._queue.can_accept(size)

    def statistics(self) -> LinkStats:
        return LinkStats(
            **self._counter_values(),
            queued_messages=len(self._queue),
            queued_bytes=self._queue.queued_bytes,
            unacked_packets=len(self._unacked),
            reassembly_bytes=self._reassembly.buffered_bytes,
            srtt=self._rtt.srtt,
        )

    def _counter_values(self) -> dict[str, int]:
        """The counters of `statistics` (no `asdict`: waiters poll statistics often)."""
        counters = self._counters
        return {name: getattr(counters, name) for name in _COUNTER_NAMES}

    def next_deadline(self) -> float | None:
        if self._failed or not self._started:
            return None
        # Asked several times per message: a running minimum, no list.
        deadline = self._last_heard_at + self._silence_timeout()
        at = self._hello_at
        if at is not None and at < deadline:
            deadline = at
        at = self._heartbeat_at
        if at is not None and at < deadline:
            deadline = at
        at = self._ack_due_at
        if at is not None and at < deadline:
            deadline = at
        if self._gap_heap and self._gap_heap[0] < deadline:
            deadline = self._gap_heap[0]
        at = self._probe_at
        if at is not None and at < deadline:
            deadline = at
        if self._has_sendable():
            at = self._pacer.ready_at(self._pacer_clock)
            if at < deadline:
                deadline = at
        return deadline

    # ------------------------------------------------------------------ inputs

    def start(self, now: float) -> list[LinkEffect]:
        """Begin the handshake. Call once, before anything else."""
        self._started = True
        self._last_heard_at = now
        self._pacer_clock = now
        effects: list[LinkEffect] = []
        self._send_hello(now, effects)
        return effects

    def send(self, payload: bytes, now: float, *, flush: bool = True) -> list[LinkEffect]:
        """Queue one message. Raises `MessageTooLarge` or `BufferFull` (see `can_send`).

        With `flush=False` the message only joins the queue, so a driver holding a batch
        can queue it all and let the next `on_timer` (due at once) pack it densely.
        """
        if self._failed:
            return []
        self._queue.push(payload)
        effects: list[LinkEffect] = []
        if flush:
            self._pump(now, effects)
        else:
            self._pacer_clock = now
        return effects

    def on_timer(self, now: float) -> list[LinkEffect]:
        effects: list[LinkEffect] = []
        if self._failed or not self._started:
            return effects
        if now >= self._last_heard_at + self._silence_timeout():  # the sum next_deadline uses
            silent = now - self._last_heard_at
            self._fail(f"no packet from peer for {silent:.3f} s", effects)
            return effects
        if self._hello_at is not None and now >= self._hello_at:
            self._send_hello(now, effects)
        if self._heartbeat_at is not None and now >= self._heartbeat_at:
            self._send_heartbeat(now, effects)
        due_gaps = bool(self._gap_heap) and self._gap_heap[0] <= now
        if due_gaps and not self._send_nacks(now, effects):
            return effects
        if self._ack_due_at is not None and now >= self._ack_due_at:
            self._send_state(now, effects)
        if self._probe_at is not None and now >= self._probe_at:
            self._probe(now)
        self._pump(now, effects)
        return effects

    def datagram_received(self, datagram: bytes, now: float) -> list[LinkEffect]:
        effects: list[LinkEffect] = []
        if self._failed:
            return effects
        counters = self._counters
        try:
            header = wire.decode_header(datagram)
        except DecodeError as exc:
            counters.malformed_dropped += 1
            log.debug("link %s->%s: drop malformed datagram: %s", self._local, self._peer, exc)
            return effects
        if header.sender != self._peer:
            counters.foreign_dropped += 1
            return effects
        if header.flags & FLAG_AUTH:
            # No keys at this layer yet: an authenticated packet cannot be verified, so it
            # cannot be trusted either.
            counters.malformed_dropped += 1
            return effects
        try:
            if header.ptype is PacketType.DATA:
                state, fragments = wire.decode_data(datagram, header)
                body: wire.Body = None
            else:
                packet = wire.decode(datagram)
                state, fragments, body = packet.state, [], packet.body
        except DecodeError as exc:
            counters.malformed_dropped += 1
            log.debug("link %s->%s: drop malformed datagram: %s", self._local, self._peer, exc)
            return effects
        if header.ptype is PacketType.HELLO:
            counters.packets_received += 1
            assert isinstance(body, Hello)
            self._on_hello(header.epoch, body, now, effects)
            self._pump(now, effects)
            return effects
        if self._peer_epoch == 0 or header.epoch != self._peer_epoch:
            counters.stale_dropped += 1
            return effects
        counters.packets_received += 1
        self._last_heard_at = now
        if header.ptype is PacketType.DATA:
            self._on_data(header.seq, fragments, now, effects)
        # After the data: a piggybacked state's send_high counts the packet it rides in,
        # which must not look like a lost tail first.
        if state is not None:
            self._on_state(state, now)
        if header.ptype is PacketType.HEARTBEAT:
            assert isinstance(body, Heartbeat)
            self._on_heartbeat(body, now, effects)
        self._pump(now, effects)
        if self._ack_due_at is not None and self._ack_due_at <= now:
            self._send_state(now, effects)
        return effects

    # ------------------------------------------------------------------ handshake

    def _send_hello(self, now: float, effects: list[LinkEffect]) -> None:
        hello = Hello(self._peer_epoch, self._config.mtu, self._established)
        datagram = wire.encode(
            Packet(wire.Header(PacketType.HELLO, self._local, self._epoch), body=hello)
        )
        self._emit(datagram, now, effects)
        # Retry until the peer confirms our epoch; the silence timeout bounds the retries.
        self._hello_at = None if self._established else now + self._config.hello_interval

    def _set_mtu(self, mtu: int) -> None:
        self._mtu = mtu
        self._body_budget = mtu - HEADER_SIZE - STATE_BLOCK.size
        self._max_nacks_per_packet = min(wire.MAX_NACK_RANGES, self._body_budget // NACK_RANGE.size)

    def _on_hello(
        self, peer_epoch: int, hello: Hello, now: float, effects: list[LinkEffect]
    ) -> None:
        self._last_heard_at = now
        self._set_mtu(min(self._config.mtu, hello.mtu))
        new_peer = peer_epoch != self._peer_epoch
        if new_peer:
            if self._peer_epoch != 0:
                log.info(
                    "link %s->%s: peer restarted (epoch %d)", self._local, self._peer, peer_epoch
                )
            self._reset_receiver(peer_epoch)
            if self._established and hello.seen_epoch != self._epoch:
                # The peer lost our stream: start a fresh one it can follow from seq 1.
                self._reset_sender(effects)
        if hello.seen_epoch == self._epoch and not self._established:
            self._established = True
            self._hello_at = None
            self._heartbeat_at = now
            effects.append(LinkEstablished(self._peer))
        if not hello.established or new_peer:
            self._send_hello(now, effects)

    def _reset_receiver(self, peer_epoch: int) -> None:
        self._peer_epoch = peer_epoch
        self._rcv_cum = 0
        self._rcv_high = 0
        self._rcv_above.clear()
        self._gaps.clear()
        self._gap_heap.clear()
        self._gaps_waiting.clear()
        self._ack_pending = 0
        self._ack_due_at = None
        self._reassembly.clear()

    def _reset_sender(self, effects: list[LinkEffect]) -> None:
        discarded = self._queue.clear() + len(self._unacked)
        self._epoch = self._epoch % U32_MAX + 1
        self._next_seq = 1
        self._cum_acked = 0
        self._unacked.clear()
        self._retransmit.clear()
        self._retransmit_set.clear()
        self._probe_at = None
        self._established = False
        effects.append(PeerRestarted(self._peer, discarded))

    # ------------------------------------------------------------------ receiving

    def _on_data(
        self,
        seq: int,
        fragments: list[bytes | MessagePiece],
        now: float,
        effects: list[LinkEffect],
    ) -> None:
        if seq <= self._rcv_cum or seq in self._rcv_above:
            self._counters.duplicates_dropped += 1
            # The sender may have missed our ACK (a probe or a spurious retransmission).
            self._ack_due_at = now
            return
        if seq > self._rcv_cum + self._config.max_unacked_packets:
            self._counters.out_of_window_dropped += 1
            return
        if seq == self._rcv_cum + 1:
            self._rcv_cum = seq
            above = self._rcv_above
            while self._rcv_cum + 1 in above:
                self._rcv_cum += 1
                above.remove(self._rcv_cum)
        else:
            self._rcv_above.add(seq)
        if seq > self._rcv_high:
            self._open_gaps(self._rcv_high + 1, seq, now)
            self._rcv_high = seq
        else:
            gap = self._gaps.pop(seq, None)
            if gap is not None:
                self._gap_filled(gap)
        self._ack_pending += 1
        if self._ack_pending >= self._config.ack_every_packets:
            self._ack_due_at = now
        elif self._ack_due_at is None:
            self._ack_due_at = now + self._config.ack_delay_interval
        self._deliver(fragments, effects)

    def _deliver(self, fragments: list[bytes | MessagePiece], effects: list[LinkEffect]) -> None:
        counters = self._counters
        for fragment in fragments:
            if fragment.__class__ is MessagePiece:
                assert isinstance(fragment, MessagePiece)
                try:
                    payload = self._reassembly.add(
                        fragment.msg_id, fragment.total, fragment.offset, fragment.data
                    )
                except ValueError as exc:
                    counters.protocol_violations += 1
                    log.warning("link %s->%s: dropped piece: %s", self._local, self._peer, exc)
                    continue
                if payload is None:
                    continue
            else:
                assert isinstance(fragment, bytes)
                payload = fragment
            counters.messages_delivered += 1
            counters.bytes_delivered += len(payload)
            effects.append(Delivered(self._peer, payload))

    def _open_gaps(self, first: int, end: int, now: float) -> None:
        """Seqs in [first, end) are missing: NACK them after the reorder allowance."""
        nack_at = now + self._config.nack_delay_interval
        self._counters.gaps_opened += end - first
        gaps = self._gaps
        for seq in range(first, end):
            gaps[seq] = _Gap(nack_at, now)
        if end > first:
            self._schedule_nacks(nack_at, end - first)

    def _schedule_nacks(self, nack_at: float, count: int) -> None:
        """`count` more gaps are due for a NACK at `nack_at`."""
        waiting = self._gaps_waiting.get(nack_at, 0)
        self._gaps_waiting[nack_at] = waiting + count
        if not waiting:
            heapq.heappush(self._gap_heap, nack_at)

    def _gap_filled(self, gap: _Gap) -> None:
        waiting = self._gaps_waiting[gap.nack_at] - 1
        if waiting:
            self._gaps_waiting[gap.nack_at] = waiting
        else:
            del self._gaps_waiting[gap.nack_at]
            self._drop_unwaited_nack_times()

    def _drop_unwaited_nack_times(self) -> None:
        # Each time is pushed once and popped once: amortised O(log n) a NACK time.
        heap = self._gap_heap
        waiting = self._gaps_waiting
        while heap and heap[0] not in waiting:
            heapq.heappop(heap)

    def _renack_interval(self) -> float:
        return max(
            self._config.min_renack_interval,
            1.2 * self._rtt.srtt + self._config.nack_delay_interval,
        )

    def _send_nacks(self, now: float, effects: list[LinkEffect]) -> bool:
        """NACK every gap that is due; False if one was NACKed too often (link failed)."""
        heap = self._gap_heap
        waiting = self._gaps_waiting
        while heap and heap[0] <= now:
            waiting.pop(heapq.heappop(heap), None)  # every gap due by now is NACKed below
        due = sorted(seq for seq, gap in self._gaps.items() if gap.nack_at <= now)
        if not due:
            self._drop_unwaited_nack_times()
            return True
        renack_at = now + self._renack_interval()
        ranges: list[tuple[int, int]] = []
        for seq in due:
            gap = self._gaps[seq]
            gap.rounds += 1
            # Rounds alone are no bound on a fast link (40 NACKs of a loopback link take
            # 0.4 s, less than a receiver's hiccup); the hole must also have outlived the
            # silence timeout.
            if gap.rounds > _MAX_NACK_ROUNDS and now - gap.opened_at >= self._silence_timeout():
                self._fail(f"packet {seq} not recovered after {_MAX_NACK_ROUNDS} NACKs", effects)
                return False
            gap.nack_at = renack_at
            if ranges and ranges[-1][0] + ranges[-1][1] == seq:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + 1)
            else:
                ranges.append((seq, 1))
        self._schedule_nacks(renack_at, len(due))
        self._drop_unwaited_nack_times()
        step = self._max_nacks_per_packet
        for i in range(0, len(ranges), step):
            self._counters.nacks_sent += 1
            self._send_state(now, effects, tuple(ranges[i : i + step]))
        return True

    def _known_holes(self) -> tuple[tuple[int, int], ...]:
        """Gaps NACKed at least once, as ranges: every ACK repeats them, so the sender
        learns at once when a retransmission was lost too (a NACK round costs an RTT)."""
        ranges: list[tuple[int, int]] = []
        for seq in sorted(seq for seq, gap in self._gaps.items() if gap.rounds):
            if ranges and ranges[-1][0] + ranges[-1][1] == seq:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + 1)
            elif len(ranges) == self._max_nacks_per_packet:
                break
            else:
                ranges.append((seq, 1))
        return tuple(ranges)

    def _send_state(
        self, now: float, effects: list[LinkEffect], nacks: tuple[tuple[int, int], ...] = ()
    ) -> None:
        if not nacks and self._gaps:
            nacks = self._known_holes()
        block = LinkState(self._peer_epoch, self._rcv_cum, self._next_seq - 1, nacks)
        datagram = HEADER.pack(
            MAGIC, VERSION, _STATE, FLAG_STATE, 0, 0, self._local, self._epoch, 0
        ) + wire.encode_state(block)
        self._counters.state_packets_sent += 1
        self._ack_pending = 0
        self._ack_due_at = None
        self._emit(datagram, now, effects)

    # ------------------------------------------------------------------ heartbeats

    def _silence_timeout(self) -> float:
        return self._config.failure_rounds * self._config.heartbeat_interval

    def _send_heartbeat(self, now: float, effects: list[LinkEffect]) -> None:
        stamp = int(now * 1e6) & U64_MAX
        self._emit_heartbeat(HeartbeatKind.REQUEST, stamp, now, effects)
        silent = now - self._last_heard_at
        # Probe faster once half the silence budget is gone, so a slow answer still counts.
        fast = silent > self._silence_timeout() / 2
        interval = self._config.heartbeat_interval / (4 if fast else 1)
        self._heartbeat_at = now + interval

    def _emit_heartbeat(
        self, kind: HeartbeatKind, stamp: int, now: float, effects: list[LinkEffect]
    ) -> None:
        body = Heartbeat(kind, stamp)
        header = wire.Header(PacketType.HEARTBEAT, self._local, self._epoch)
        self._emit(wire.encode(Packet(header, body=body)), now, effects)

    def _on_heartbeat(self, heartbeat: Heartbeat, now: float, effects: list[LinkEffect]) -> None:
        if heartbeat.kind is HeartbeatKind.REQUEST:
            self._emit_heartbeat(HeartbeatKind.REPLY, heartbeat.stamp, now, effects)
            return
        sample = now - heartbeat.stamp / 1e6
        if 0 <= sample < self._silence_timeout():
            self._rtt.observe(sample)

    # ------------------------------------------------------------------ sending

    def _on_state(self, state: LinkState, now: float) -> None:
        if state.send_high > self._rcv_high and self._peer_epoch:
            # The peer sent packets we never saw: the tail of its stream was lost.
            end = min(state.send_high, self._rcv_cum + self._config.max_unacked_packets) + 1
            if end > self._rcv_high + 1:
                self._open_gaps(self._rcv_high + 1, end, now)
                self._rcv_high = end - 1
        if state.ack_epoch != self._epoch:
            return  # feedback about a stream of ours that no longer exists
        cum = state.cum_ack
        if cum >= self._next_seq:
            self._counters.protocol_violations += 1
            return
        if cum > self._cum_acked:
            unacked = self._unacked
            for seq in range(self._cum_acked + 1, cum + 1):
                unacked.pop(seq, None)
            self._cum_acked = cum
            self._probe_backoff = 0
            self._probe_at = self._probe_deadline(now) if unacked else None
        # A NACK for a packet sent once is acted on at once (the receiver already allowed
        # for reordering). A NACK for a retransmitted packet counts only if it was written
        # after that retransmission should have arrived, i.e. one RTT after we sent it.
        rtt = self._rtt
        resend_after = rtt.srtt + max(4 * rtt.rttvar, 0.002)
        unacked = self._unacked
        queued = self._retransmit_set
        for first, count in state.nacks:
            for seq in range(max(first, self._cum_acked + 1), min(first + count, self._next_seq)):
                outstanding = unacked.get(seq)
                if (
                    outstanding is not None
                    and seq not in queued
                    and (not outstanding.retransmitted or now - outstanding.sent_at >= resend_after)
                ):
                    queued.add(seq)
                    heapq.heappush(self._retransmit, seq)

    def _probe_deadline(self, now: float) -> float:
        # RTT samples come from heartbeats, so RTTVAR can decay to nothing; without a floor
        # the ACK of a lone packet (sent after ack_delay) would race the probe every time.
        rtt = self._rtt
        pto = rtt.srtt + max(4 * rtt.rttvar, rtt.srtt / 4, 0.002) + self._config.ack_delay_interval
        return now + pto * (1 << self._probe_backoff)

    def _probe(self, now: float) -> None:
        """No ACK progress for a whole probe timeout: resend the newest unacked packet.

        Its arrival (or its duplicate) makes the receiver ACK and reveals any hole before it.
        """
        self._probe_backoff = min(self._probe_backoff + 1, _PROBE_BACKOFF_LIMIT)
        self._probe_at = self._probe_deadline(now) if self._unacked else None
        if self._unacked:
            newest = self._next_seq - 1
            if newest in self._unacked and newest not in self._retransmit_set:
                self._counters.probes_sent += 1
                self._retransmit_set.add(newest)
                heapq.heappush(self._retransmit, newest)

    def _window_open(self) -> bool:
        return self._next_seq - self._cum_acked <= self._config.max_unacked_packets

    def _has_sendable(self) -> bool:
        return self._established and (
            bool(self._retransmit) or (len(self._queue) > 0 and self._window_open())
        )

    def _pump(self, now: float, effects: list[LinkEffect]) -> None:
        """Send retransmissions, then new packets, while the pacer and window allow."""
        self._pacer_clock = now
        if not self._established:
            return
        pacer = self._pacer
        while pacer.ready(now):
            if self._retransmit:
                seq = heapq.heappop(self._retransmit)
                self._retransmit_set.discard(seq)
                outstanding = self._unacked.get(seq)
                if outstanding is None:
                    continue
                outstanding.sent_at = now
                outstanding.retransmitted = True
                self._counters.retransmissions += 1
                self._emit_data(seq, outstanding.body, now, effects)
                if self._config.idle_duplicate_retransmits and not len(self._queue):
                    # Nothing new waits: spend idle capacity on a second copy, so one more
                    # loss does not cost the last delivery another round trip.
                    self._counters.retransmissions += 1
                    self._emit_data(seq, outstanding.body, now, effects)
            elif len(self._queue) and self._window_open():
                body, finished = self._queue.pop_body(self._body_budget)
                seq = self._next_seq
                self._next_seq += 1
                self._unacked[seq] = _Outstanding(body, now)
                self._counters.messages_sent += finished
                self._emit_data(seq, body, now, effects)
                if self._probe_at is None:
                    self._probe_at = self._probe_deadline(now)
            else:
                break

    def _emit_data(self, seq: int, body: bytes, now: float, effects: list[LinkEffect]) -> None:
        if self._ack_due_at is not None:
            # Piggyback the pending ACK instead of sending a packet of its own.
            block = STATE_BLOCK.pack(self._peer_epoch, self._rcv_cum, self._next_seq - 1, 0)
            header = HEADER.pack(
                MAGIC, VERSION, _DATA, FLAG_STATE, 0, 0, self._local, self._epoch, seq
            )
            datagram = header + block + body
            self._ack_pending = 0
            self._ack_due_at = None
        else:
            header = HEADER.pack(MAGIC, VERSION, _DATA, 0, 0, 0, self._local, self._epoch, seq)
            datagram = header + body
        self._emit(datagram, now, effects)

    def _emit(self, datagram: bytes, now: float, effects: list[LinkEffect]) -> None:
        self._counters.packets_sent += 1
        self._pacer.consume(len(datagram), now)
        effects.append(Transmit(self._peer, datagram))

    def _fail(self, reason: str, effects: list[LinkEffect]) -> None:
        log.info("link %s->%s failed: %s", self._local, self._peer, reason)
        self._failed = True
        # A failed link is dead for good: release its buffers at once.
        self._queue.clear()
        self._unacked.clear()
        self._retransmit.clear()
        self._retransmit_set.clear()
        self._reassembly.clear()
        effects.append(LinkFailed(self._peer, reason))
