"""A sans-I/O model of one TCP connection, to compare with the Hop link.

It carries the same messages in the same datagrams as the Hop link (`meshcast.wire`
packets) but behaves like a Linux TCP socket with TCP_NODELAY: a three-way handshake,
cumulative ACKs with delayed ACK, SACK with RFC 6675 loss recovery and PRR (or NewReno
when `TcpConfig.sack` is off), Reno window growth, the RFC 6298 retransmission timer, no
pacing, and above all in-order delivery. A lost segment holds back everything behind it
until it is repaired, and then the backlog comes out in one burst.

Wire use:

* HELLO is SYN / SYN-ACK: ``seen_epoch`` 0 asks, the peer's epoch answers. A HELLO that
  names our epoch completes the handshake; the third leg is any STATE or DATA packet whose
  link-state block acknowledges our epoch.
* DATA: ``seq`` is the segment number (1, 2, ...); the body packs small messages whole and
  cuts large ones into pieces, as Hop does. Every DATA packet carries our cumulative ACK.
* STATE: a pure ACK. ``cum_ack`` is the last in-order segment.
* SACK (RFC 2018): the link-state block's ``nacks`` field, which Hop fills with *missing*
  ranges, carries *received* ranges here: ``(first, count)`` blocks of segments held
  above ``cum_ack``, most recently changed first, at most `TcpConfig.sack_blocks` and
  only as many as fit in the datagram. Empty with `TcpConfig.sack` off.
* HEARTBEAT: keepalive probe and reply, only when `TcpConfig.keepalive_interval` is set.

A HELLO from a new incarnation of the peer resets the connection (as an RST would) and
opens a new one under a new epoch of ours, reporting `PeerRestarted` as Hop does.

Theory, defaults and what is left out: docs/design/tcp-model.md.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields

from meshcast.errors import ConfigError, DecodeError, UsageError
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
from meshcast.link.sendqueue import SendQueue
from meshcast.sim.tcp_congestion import NewReno, RtoEstimator, SackReno
from meshcast.wire.packet import (
    FLAG_STATE,
    HEADER_SIZE,
    MAX_NACK_RANGES,
    NACK_RANGE,
    STATE_BLOCK,
    U32_MAX,
    U64_MAX,
    Fragment,
    Header,
    Heartbeat,
    HeartbeatKind,
    Hello,
    LinkState,
    MessagePiece,
    Packet,
    PacketType,
    WholeMessage,
    decode,
    encode,
    encode_header,
    encode_state,
)

logger = logging.getLogger(__name__)

__all__ = ["TcpConfig", "TcpLink", "TcpStats"]


@dataclass(frozen=True, slots=True)
class TcpConfig:
    """Knobs of the TCP model. Defaults are Linux's; sources in docs/design/tcp-model.md."""

    initial_cwnd_segments: int = 10  # segments: RFC 6928, Linux TCP_INIT_CWND
    loss_cwnd_segments: int = 1  # segments: cwnd after a retransmission timeout (RFC 5681)
    min_ssthresh_segments: int = 2  # segments: floor of ssthresh after a loss (RFC 5681)
    dupack_threshold: int = 3  # DupThresh: dup ACKs (or SACKed segments above a hole)
    limited_transmit: bool = True  # RFC 3042: one new segment on each of the first 2 dup ACKs
    # SACK (RFC 2018) with RFC 6675 loss recovery, as Linux (tcp_sack=1); False: NewReno.
    # Both ends must agree: the model's SYN has no SACK-permitted option.
    sack: bool = True
    sack_blocks: int = 3  # SACK blocks per ACK: Linux fits 3 beside the timestamp option
    prr: bool = True  # RFC 6937 Proportional Rate Reduction in SACK recovery (Linux)
    slow_start_after_idle: bool = True  # RFC 5681 §4.1; Linux tcp_slow_start_after_idle=1
    initial_rto: float = 1.0  # s: RTO before an RTT sample, also the SYN timeout (RFC 6298)
    min_rto: float = 0.2  # s: Linux TCP_RTO_MIN
    max_rto: float = 120.0  # s: Linux TCP_RTO_MAX (RFC 6298 asks for at least 60 s)
    rto_granularity: float = 0.001  # s: clock granularity G of RFC 6298
    # True: RTO = SRTT + max(4·RTTVAR, min_rto), as Linux computes it;
    # False: RTO = max(min_rto, SRTT + max(G, 4·RTTVAR)), as RFC 6298 §2.4 writes it.
    linux_rto_floor: bool = True
    delayed_ack_timeout: float = 0.040  # s: Linux TCP_DELACK_MIN (RFC 5681 allows 0.5 s)
    delayed_ack_segments: int = 2  # full segments of unacknowledged data that force an ACK
    initial_quickacks: int = 16  # segments ACKed at once when data starts (TCP_MAX_QUICKACKS)
    keepalive_interval: float | None = None  # s: idle time before each probe; None = off

    def __post_init__(self) -> None:
        for f in fields(self):
            value: object = getattr(self, f.name)
            if value is None or isinstance(value, bool):
                continue
            if not isinstance(value, int | float):
                raise ConfigError(f"must be a number, got {value!r}", key=f"tcp.{f.name}")
            floor_ok = value >= 0 if f.name == "initial_quickacks" else value > 0
            if not floor_ok or not math.isfinite(value):
                raise ConfigError(f"must be positive, got {value!r}", key=f"tcp.{f.name}")
        if self.min_rto > self.max_rto:
            raise ConfigError("must not exceed tcp.max_rto", key="tcp.min_rto")
        if self.initial_rto > self.max_rto:
            raise ConfigError("must not exceed tcp.max_rto", key="tcp.initial_rto")
        if self.sack_blocks > MAX_NACK_RANGES:
            raise ConfigError(f"must not exceed {MAX_NACK_RANGES}", key="tcp.sack_blocks")


@dataclass(frozen=True, slots=True)
class TcpStats:
    """Congestion-control state and events of one TCP endpoint (a frozen snapshot)."""

    cwnd: float  # segments
    ssthresh: float  # segments; inf until the first loss
    rto: float  # s, back-off included
    srtt: float  # s, 0.0 before the first sample
    rttvar: float  # s
    in_recovery: bool  # fast recovery in progress (NewReno, or SACK recovery)
    fast_retransmits: int  # recoveries started by duplicate ACKs or SACKs
    timeouts: int  # retransmission timer expiries
    dup_acks_received: int  # RFC 5681 duplicate ACKs, or with SACK those of RFC 6675
    pipe: int  # segments presumed in the network (RFC 6675 SetPipe; flight for NewReno)
    sacked: int  # outstanding segments the peer reported holding (0 without SACK)
    lost_retransmissions: int  # retransmissions presumed lost again (SACK mode)


@dataclass(slots=True)
class _Segment:
    body: bytes  # encoded fragments; the header and ACK block are rebuilt on every send
    sent_at: float
    retransmitted: bool = False  # Karn: no RTT sample from this segment


@dataclass(slots=True)
class _Sent:
    """How many handshake packets of one kind went out, and when the first did."""

    count: int = 0
    first_at: float = 0.0

    def record(self, now: float) -> None:
        if self.count == 0:
            self.first_at = now
        self.count += 1


@dataclass(slots=True)
class _Partial:
    """The one large message being reassembled: the stream is in order, so pieces are too."""

    msg_id: int
    total: int
    data: bytearray


@dataclass(slots=True)
class _Counters:
    """The counters of `LinkStats` and `TcpStats`, bumped in place (`+= 1`, checked by mypy)."""

    messages_sent: int = 0
    messages_delivered: int = 0
    bytes_delivered: int = 0
    packets_sent: int = 0
    packets_received: int = 0
    retransmissions: int = 0
    probes_sent: int = 0
    state_packets_sent: int = 0
    duplicates_dropped: int = 0
    malformed_dropped: int = 0
    foreign_dropped: int = 0
    stale_dropped: int = 0
    out_of_window_dropped: int = 0
    protocol_violations: int = 0
    fast_retransmits: int = 0
    timeouts: int = 0
    dup_acks_received: int = 0
    lost_retransmissions: int = 0


def _payload_size(fragments: tuple[Fragment, ...]) -> int:
    return sum(len(f.data) for f in fragments)


class TcpLink:
    """One endpoint of a modelled TCP connection to a neighbour; implements `Link`.

    Inputs return the effects they caused and never raise on bad peer input; `send`
    raises `MessageTooLarge` or `BufferFull`, and the constructor `UsageError` for ids
    or an epoch outside 1..2³²-1. A link answers a peer's handshake even before `start`
    (a listening socket).
    """

    def __init__(
        self,
        local: NodeId,
        peer: NodeId,
        config: LinkConfig,
        *,
        epoch: int,
        tcp: TcpConfig | None = None,
    ) -> None:
        for name, value in (("local", local), ("peer", peer), ("epoch", epoch)):
            if not 0 < value <= U32_MAX:
                raise UsageError(f"{name} must be in 1..{U32_MAX}, got {value}")
        if local == peer:
            raise UsageError(f"a link needs two different nodes, got {local} twice")
        self._local = local
        self._peer = peer
        self._config = config
        self._tcp = tcp if tcp is not None else TcpConfig()
        self._epoch = epoch
        self._counters = _Counters()
        self._started = False
        self._failed = False
        self._queue = SendQueue(config.max_send_queue_bytes, config.max_message_size)
        self._flush_at: float | None = None  # a batch was queued without flushing
        self._last_heard = 0.0
        self._last_probe_at = 0.0
        self._probes_unanswered = 0
        self._open_connection()

    def _open_connection(self) -> None:
        """Fresh per-connection state: at creation, and when the peer restarts."""
        tcp = self._tcp
        # Handshake.
        self._established = False
        self._peer_epoch = 0  # 0 until the peer's HELLO tells us
        self._peer_mtu = self._config.mtu
        self._hello_at: float | None = None
        self._hello_timeout = tcp.initial_rto
        self._hello_rounds = 0
        # Karn for the handshake: how many HELLOs asked (SYN) and answered (SYN-ACK),
        # and when the first of each went out.
        self._syn_sent = _Sent()
        self._synack_sent = _Sent()
        self._segment_size = self._config.mtu  # datagram bytes; min of both MTUs once up
        # Sender. Outstanding segments are snd_una .. snd_nxt-1. With SACK the scoreboard
        # says which to resend; NewReno after a timeout presumes those from rtx_next on
        # lost and resends them first (go-back-N, as without SACK).
        self._segments: dict[int, _Segment] = {}
        self._snd_una = 1
        self._snd_nxt = 1
        self._rtx_next = 1
        self._dupacks = 0  # SACK mode: RFC 6675 DupAcks (NewReno counts its own)
        self._peer_sacks = False  # SACK mode: the peer has sent a SACK block
        self._rto_at: float | None = None
        self._last_data_sent_at: float | None = None
        self._rto = RtoEstimator(
            initial_rto=tcp.initial_rto,
            min_rto=tcp.min_rto,
            max_rto=tcp.max_rto,
            granularity=tcp.rto_granularity,
            linux_floor=tcp.linux_rto_floor,
        )
        self._cc: NewReno | SackReno
        if tcp.sack:
            self._cc = SackReno(
                initial_cwnd=tcp.initial_cwnd_segments,
                loss_cwnd=tcp.loss_cwnd_segments,
                min_ssthresh=tcp.min_ssthresh_segments,
                dupack_threshold=tcp.dupack_threshold,
                initial_ssthresh=math.inf,
                prr=tcp.prr,
            )
        else:
            self._cc = NewReno(
                initial_cwnd=tcp.initial_cwnd_segments,
                loss_cwnd=tcp.loss_cwnd_segments,
                min_ssthresh=tcp.min_ssthresh_segments,
                dupack_threshold=tcp.dupack_threshold,
                initial_ssthresh=math.inf,
            )
        # Receiver.
        self._rcv_cum = 0  # every segment <= this has been delivered
        self._ooo: dict[int, tuple[Fragment, ...]] = {}  # arrived after a hole
        self._ooo_bytes = 0
        # SACK: the runs of segments held above rcv_cum, as [first, last], the most
        # recently extended first (RFC 2018 §4); empty with SACK off.
        self._sack_runs: list[tuple[int, int]] = []
        self._partial: _Partial | None = None
        self._ack_now = False
        self._ack_at: float | None = None
        self._unacked_bytes = 0  # datagram bytes received since our last ACK
        self._quickacks = tcp.initial_quickacks

    # ---------------------------------------------------------------- queries

    @property
    def peer(self) -> NodeId:
        return self._peer

    @property
    def established(self) -> bool:
        return self._established and not self._failed

    @property
    def failed(self) -> bool:
        return self._failed

    @property
    def epoch(self) -> int:
        """Our current stream incarnation; bumped when the peer restarts."""
        return self._epoch

    @property
    def queued_messages(self) -> int:
        return len(self._queue)

    def can_send(self, size: int) -> bool:
        return not self._failed and self._queue.can_accept(size)

    def next_deadline(self) -> float | None:
        if self._failed:
            return None
        deadlines = [
            t
            for t in (
                self._flush_at,
                self._hello_at,
                self._rto_at,
                self._ack_at,
                self._keepalive_at(),
            )
            if t is not None
        ]
        return min(deadlines, default=None)

    def statistics(self) -> LinkStats:
        c = self._counters
        partial = len(self._partial.data) if self._partial is not None else 0
        return LinkStats(
            messages_sent=c.messages_sent,
            messages_delivered=c.messages_delivered,
            bytes_delivered=c.bytes_delivered,
            packets_sent=c.packets_sent,
            packets_received=c.packets_received,
            retransmissions=c.retransmissions,
            probes_sent=c.probes_sent,
            nacks_sent=0,
            state_packets_sent=c.state_packets_sent,
            duplicates_dropped=c.duplicates_dropped,
            malformed_dropped=c.malformed_dropped,
            foreign_dropped=c.foreign_dropped,
            stale_dropped=c.stale_dropped,
            out_of_window_dropped=c.out_of_window_dropped,
            protocol_violations=c.protocol_violations,
            queued_messages=len(self._queue),
            queued_bytes=self._queue.queued_bytes,
            unacked_packets=len(self._segments),
            reassembly_bytes=self._ooo_bytes + partial,
            srtt=self._rto.srtt or 0.0,
        )

    def tcp_statistics(self) -> TcpStats:
        """TCP-only state for benchmarks and tests: window, timer and recovery events."""
        cc = self._cc
        c = self._counters
        if isinstance(cc, SackReno):
            pipe, sacked = cc.board.pipe, cc.board.sacked
        else:
            pipe, sacked = self._rtx_next - self._snd_una, 0
        return TcpStats(
            cwnd=cc.cwnd,
            ssthresh=cc.ssthresh,
            rto=self._rto.rto,
            srtt=self._rto.srtt or 0.0,
            rttvar=self._rto.rttvar,
            in_recovery=cc.in_recovery,
            fast_retransmits=c.fast_retransmits,
            timeouts=c.timeouts,
            dup_acks_received=c.dup_acks_received,
            pipe=pipe,
            sacked=sacked,
            lost_retransmissions=c.lost_retransmissions,
        )

    # ---------------------------------------------------------------- inputs

    def start(self, now: float) -> list[LinkEffect]:
        """Active open: send a SYN (HELLO) and retry it with back-off until answered."""
        if self._started or self._failed:
            return []
        self._started = True
        effects: list[LinkEffect] = []
        if not self._established:
            self._send_hello(now, effects)
        return effects

    def send(self, payload: bytes, now: float, *, flush: bool = True) -> list[LinkEffect]:
        """Queue one message; it goes out as soon as the window allows (Nagle is off).

        With `flush=False` it only joins the queue (like MSG_MORE), and `next_deadline`
        says "now" so that the next `on_timer` packs the whole batch densely.
        Raises `MessageTooLarge`, or `BufferFull` when the send queue cannot take it now
        (see `can_send`). On a failed link it does nothing, as `HopLink.send`.
        """
        if self._failed:
            return []
        self._queue.push(bytes(payload))
        self._counters.messages_sent += 1
        effects: list[LinkEffect] = []
        if flush:
            self._flush(now, effects)
        elif self._flush_at is None:
            self._flush_at = now
        return effects

    def datagram_received(self, datagram: bytes, now: float) -> list[LinkEffect]:
        if self._failed:
            return []
        try:
            packet = decode(datagram)
        except DecodeError as exc:
            self._counters.malformed_dropped += 1
            logger.debug("%d: drop malformed datagram from %d: %s", self._local, self._peer, exc)
            return []
        header = packet.header
        if header.sender != self._peer:
            self._counters.foreign_dropped += 1
            return []
        if header.epoch == 0:
            self._counters.stale_dropped += 1  # epochs are never 0
            return []
        effects: list[LinkEffect] = []
        if isinstance(packet.body, Hello):
            self._on_hello(header, packet.body, now, effects)
        elif self._peer_epoch == 0 or header.epoch != self._peer_epoch:
            # From before a restart, or ahead of the handshake (no TCP Fast Open).
            self._counters.stale_dropped += 1
            return []
        else:
            self._heard(now)
            if packet.state is not None:
                self._on_state(
                    packet.state, now, pure=header.ptype is PacketType.STATE, effects=effects
                )
            if isinstance(packet.body, tuple):
                self._on_data(header.seq, packet.body, len(datagram), now, effects)
            elif isinstance(packet.body, Heartbeat):
                self._on_heartbeat(packet.body, effects)
        if not self._failed:
            self._flush(now, effects)
        return effects

    def on_timer(self, now: float) -> list[LinkEffect]:
        if self._failed:
            return []
        effects: list[LinkEffect] = []
        if self._hello_at is not None and now >= self._hello_at:
            self._on_hello_timeout(now, effects)
        if self._rto_at is not None and now >= self._rto_at:
            self._on_retransmission_timeout(effects)
        if self._ack_at is not None and now >= self._ack_at:
            self._ack_now = True
        keepalive_at = self._keepalive_at()
        if keepalive_at is not None and now >= keepalive_at:
            self._on_keepalive_timeout(now, effects)
        if not self._failed:
            self._flush(now, effects)
        return effects

    # ---------------------------------------------------------------- handshake

    def _send_hello(self, now: float, effects: list[LinkEffect]) -> None:
        hello = Hello(self._peer_epoch, self._config.mtu, self._established)
        packet = Packet(Header(PacketType.HELLO, self._local, self._epoch), body=hello)
        effects.append(Transmit(self._peer, encode(packet)))
        self._counters.packets_sent += 1
        (self._synack_sent if self._peer_epoch else self._syn_sent).record(now)
        if self._hello_at is None and not self._established:
            self._hello_at = now + self._hello_timeout

    def _on_hello(
        self, header: Header, hello: Hello, now: float, effects: list[LinkEffect]
    ) -> None:
        if header.epoch != self._peer_epoch and self._peer_epoch != 0:
            self._reconnect(effects)
        self._peer_epoch = header.epoch
        self._heard(now)
        self._peer_mtu = hello.mtu
        if hello.seen_epoch != self._epoch:
            self._send_hello(now, effects)  # SYN-ACK (again if ours was lost)
            return
        if not self._established:
            self._establish(now, self._syn_sent, effects)
        if not hello.established:
            self._ack_now = True  # third leg; rides on data if there is any

    def _reconnect(self, effects: list[LinkEffect]) -> None:
        """A new incarnation of the peer: the connection is reset (as by an RST) and
        opened afresh, as a messaging layer over TCP reconnects. What was queued or in
        flight is lost, counted like Hop does (messages queued + segments unacked).
        """
        if not self._established:
            self._open_connection()  # nothing sent yet: forget the old handshake only
            return
        discarded = self._queue.clear() + (self._snd_nxt - self._snd_una)
        logger.info("%d: peer %d restarted: connection reset", self._local, self._peer)
        # A new epoch of ours too, so segments of the old connection still in flight
        # cannot be taken for the new one's.
        self._epoch = self._epoch % U32_MAX + 1
        self._open_connection()
        effects.append(PeerRestarted(self._peer, discarded))

    def _establish(self, now: float, answered: _Sent, effects: list[LinkEffect]) -> None:
        """`answered`: the HELLOs of ours that the peer's packet answers."""
        self._established = True
        self._hello_at = None
        if answered.count == 1:  # Karn: a resent SYN (or SYN-ACK) gives no sample
            self._rto.sample(now - answered.first_at)
            self._rto.progressed()
        self._segment_size = min(self._config.mtu, self._peer_mtu)
        effects.append(LinkEstablished(self._peer))

    def _on_hello_timeout(self, now: float, effects: list[LinkEffect]) -> None:
        self._hello_at = None
        if self._hello_rounds >= self._config.failure_rounds:
            self._fail(f"handshake unanswered after {self._hello_rounds} retries", effects)
            return
        self._hello_rounds += 1
        self._hello_timeout = min(self._hello_timeout * 2, self._tcp.max_rto)
        self._send_hello(now, effects)

    # ---------------------------------------------------------------- sender

    def _flush(self, now: float, effects: list[LinkEffect]) -> None:
        """Send what the windows allow, then a pure ACK if one is still owed."""
        self._flush_at = None
        if self._established:
            self._send_segments(now, effects)
            if self._ack_now:
                self._send_ack(effects)

    def _send_segments(self, now: float, effects: list[LinkEffect]) -> None:
        idle = self._snd_una == self._snd_nxt
        if (
            idle
            and self._queue
            and self._tcp.slow_start_after_idle
            and self._last_data_sent_at is not None
            and now - self._last_data_sent_at >= self._rto.rto
        ):
            self._cc.restart_after_idle()
        if isinstance(self._cc, SackReno):
            self._send_segments_sack(self._cc, now, effects)
        else:
            self._send_segments_newreno(self._cc, now, effects)

    def _send_segments_newreno(self, cc: NewReno, now: float, effects: list[LinkEffect]) -> None:
        in_loss = self._rtx_next < self._snd_nxt
        window = cc.window(limited_transmit=self._tcp.limited_transmit and not in_loss)
        while self._rtx_next - self._snd_una < window:
            if self._rtx_next < self._snd_nxt:
                seq = self._rtx_next
                self._rtx_next += 1
                self._transmit_segment(seq, now, effects, retransmit=True)
            elif self._may_send_new():
                self._transmit_segment(self._new_segment(now), now, effects, retransmit=False)
            else:
                break

    def _send_segments_sack(self, cc: SackReno, now: float, effects: list[LinkEffect]) -> None:
        """RFC 6675 NextSeg() rules 1 and 2: lost segments first, lowest first, then new
        data, while the pipe is below cwnd. Limited transmit (RFC 3042) is built in:
        each SACKed segment leaves the pipe.
        """
        board = cc.board
        while board.pipe < cc.window():
            seq = board.next_lost()
            if seq is not None:
                self._transmit_segment(seq, now, effects, retransmit=True)
            elif self._may_send_new():
                self._transmit_segment(self._new_segment(now), now, effects, retransmit=False)
            else:
                break

    def _may_send_new(self) -> bool:
        """Queued data and room in the receive window."""
        return bool(self._queue) and (
            self._snd_nxt - self._snd_una < self._config.max_unacked_packets
        )

    def _new_segment(self, now: float) -> int:
        """Cut the next segment from the send queue; return its number."""
        seq = self._snd_nxt
        body, _ = self._queue.pop_body(self._body_budget())
        self._segments[seq] = _Segment(body, now)
        self._snd_nxt += 1
        self._rtx_next = self._snd_nxt
        return seq

    def _body_budget(self) -> int:
        """Bytes of fragments per segment: Hop's packing, at the negotiated size, less
        the room of the SACK blocks we report now (as Linux `tcp_current_mss`).
        """
        sack = min(len(self._sack_runs), self._tcp.sack_blocks) * NACK_RANGE.size
        return self._segment_size - HEADER_SIZE - STATE_BLOCK.size - sack

    def _state_block(self, room: int) -> bytes:
        """Our ACK: the cumulative ACK, and as many SACK blocks as `room` bytes hold."""
        runs = self._sack_runs[: min(self._tcp.sack_blocks, max(room, 0) // NACK_RANGE.size)]
        blocks = tuple((first, last - first + 1) for first, last in runs)
        return encode_state(LinkState(self._peer_epoch, self._rcv_cum, self._snd_nxt - 1, blocks))

    def _transmit_segment(
        self, seq: int, now: float, effects: list[LinkEffect], *, retransmit: bool
    ) -> None:
        segment = self._segments[seq]
        if retransmit:
            segment.retransmitted = True
            self._counters.retransmissions += 1
        segment.sent_at = now
        head = encode_header(PacketType.DATA, self._local, self._epoch, seq, FLAG_STATE)
        room = self._segment_size - HEADER_SIZE - STATE_BLOCK.size - len(segment.body)
        effects.append(Transmit(self._peer, head + self._state_block(room) + segment.body))
        self._counters.packets_sent += 1
        self._last_data_sent_at = now
        self._ack_sent()  # every segment carries our cumulative ACK
        if isinstance(self._cc, SackReno):
            self._cc.board.sent(seq, now, retransmit=retransmit)
            self._cc.on_sent()
            if retransmit and seq == self._snd_una:
                self._rto_at = now + self._rto.rto  # Linux re-arms it when the head is resent
        if self._rto_at is None:
            self._rto_at = now + self._rto.rto  # RFC 6298 §5.1

    def _send_ack(self, effects: list[LinkEffect]) -> None:
        head = encode_header(PacketType.STATE, self._local, self._epoch, 0, FLAG_STATE)
        room = self._segment_size - HEADER_SIZE - STATE_BLOCK.size
        effects.append(Transmit(self._peer, head + self._state_block(room)))
        self._counters.packets_sent += 1
        self._counters.state_packets_sent += 1
        self._ack_sent()

    def _ack_sent(self) -> None:
        self._ack_now = False
        self._ack_at = None
        self._unacked_bytes = 0

    def _on_state(
        self, state: LinkState, now: float, *, pure: bool, effects: list[LinkEffect]
    ) -> None:
        if state.ack_epoch != self._epoch:
            return  # acknowledges a stream we never sent
        if not self._established:
            self._establish(now, self._synack_sent, effects)  # third leg of the handshake
        cum = state.cum_ack
        cc = self._cc
        if cum >= self._snd_nxt:
            self._counters.protocol_violations += 1  # acknowledges segments never sent
        elif isinstance(cc, SackReno):
            self._on_sack_ack(cc, state, now, pure=pure)
        elif cum >= self._snd_una:
            self._on_new_ack(cc, cum, now, effects)
        elif pure and cum == self._snd_una - 1 and self._snd_una < self._snd_nxt:
            # RFC 5681 §2: no data, no progress, data outstanding: a duplicate ACK.
            self._counters.dup_acks_received += 1
            if cc.on_dupack(cum, self._snd_nxt - self._snd_una, self._snd_nxt - 1):
                self._counters.fast_retransmits += 1
                self._transmit_segment(self._snd_una, now, effects, retransmit=True)

    def _take_acked(self, cum: int, now: float) -> None:
        """Segments up to `cum` are acknowledged: free them and take an RTT sample from
        the newest unless one of them was resent (Karn).
        """
        sample_ok = True
        newest = self._segments[cum]
        for seq in range(self._snd_una, cum + 1):
            if self._segments.pop(seq).retransmitted:
                sample_ok = False
        if sample_ok:
            self._rto.sample(now - newest.sent_at)
        self._rto.progressed()
        self._snd_una = cum + 1

    def _on_sack_ack(self, cc: SackReno, state: LinkState, now: float, *, pure: bool) -> None:
        """An ACK in SACK mode: scoreboard, RFC 6675 recovery with PRR, growth, timer.

        The sending itself happens in `_flush`, which every input ends with.
        """
        board = cc.board
        outstanding = self._snd_una < self._snd_nxt
        pipe_before = board.pipe
        cwnd_limited = pipe_before >= cc.window() or (
            cc.in_slow_start and cc.cwnd < 2 * pipe_before
        )
        advanced = state.cum_ack >= self._snd_una
        if advanced:
            self._take_acked(state.cum_ack, now)
        # An older ACK (reordered) still brings its SACK blocks.
        update = board.ack(self._snd_una - 1, state.nacks, now, self._rto.min_rtt or 0.0)
        if update.beyond_sent:
            self._counters.protocol_violations += 1  # SACKs segments never sent
        self._peer_sacks = self._peer_sacks or bool(state.nacks)
        self._counters.lost_retransmissions += update.lost_retransmissions
        if update.delivered:
            self._rto.progressed()
        if advanced:
            self._dupacks = 0
        elif update.newly_sacked or (
            # RFC 5681 §2 duplicate ACK, from a peer that has sent no SACK block so far.
            pure and outstanding and not self._peer_sacks and state.cum_ack == self._snd_una - 1
        ):
            self._dupacks += 1
            self._counters.dup_acks_received += 1
        if cc.in_recovery and self._snd_una > cc.recover:
            cc.end_recovery()
        if (
            self._snd_una < self._snd_nxt
            and cc.may_enter_recovery(self._snd_una - 1)
            and (board.is_lost(self._snd_una) or self._dupacks >= self._tcp.dupack_threshold)
        ):
            board.mark_head_lost()
            cc.enter_recovery(self._snd_nxt - self._snd_una, self._snd_nxt - 1)
            self._counters.fast_retransmits += 1
        cc.on_ack(
            update.delivered,
            board.pipe,
            safe=advanced and update.newly_lost == 0,
            cwnd_limited=cwnd_limited,
        )
        if self._snd_una == self._snd_nxt:
            self._rto_at = None
        elif advanced:
            self._rto_at = now + self._rto.rto  # RFC 6298 §5.3

    def _on_new_ack(self, cc: NewReno, cum: int, now: float, effects: list[LinkEffect]) -> None:
        acked = cum - self._snd_una + 1
        pipe_before = self._rtx_next - self._snd_una
        self._take_acked(cum, now)
        self._rtx_next = max(self._rtx_next, self._snd_una)
        window = cc.window(limited_transmit=False)
        cwnd_limited = pipe_before >= window or (cc.in_slow_start and cc.cwnd < 2 * pipe_before)
        outcome = cc.on_new_ack(
            acked, cum, self._snd_nxt - self._snd_una, cwnd_limited=cwnd_limited
        )
        if self._snd_una == self._snd_nxt:
            self._rto_at = None
        elif outcome.restart_timer:
            self._rto_at = now + self._rto.rto
        if outcome.retransmit_head and self._snd_una < self._snd_nxt:
            self._transmit_segment(self._snd_una, now, effects, retransmit=True)

    def _on_retransmission_timeout(self, effects: list[LinkEffect]) -> None:
        self._rto_at = None
        if self._rto.backoffs >= self._config.failure_rounds:
            self._fail(
                f"segment {self._snd_una} unacknowledged after "
                f"{self._rto.backoffs} retransmission timeouts",
                effects,
            )
            return
        self._counters.timeouts += 1
        self._cc.on_timeout(
            self._snd_nxt - self._snd_una, self._snd_nxt - 1, first=self._rto.backoffs == 0
        )
        self._rto.back_off()
        self._rtx_next = self._snd_una  # everything outstanding is presumed lost
        self._dupacks = 0
        # `on_timer` flushes next: the head goes out with cwnd 1 and re-arms the timer.

    # ---------------------------------------------------------------- receiver

    def _on_data(
        self,
        seq: int,
        fragments: tuple[Fragment, ...],
        size: int,
        now: float,
        effects: list[LinkEffect],
    ) -> None:
        if not self._established:
            self._counters.stale_dropped += 1  # its ACK block did not complete our handshake
            return
        cum = self._rcv_cum
        if seq <= cum or seq in self._ooo:
            self._counters.duplicates_dropped += 1
            self._ack_now = True  # tell the sender at once (RFC 5681 §4.2)
            return
        if seq > cum + self._config.max_unacked_packets:
            self._counters.out_of_window_dropped += 1
            self._ack_now = True
            return
        if seq > cum + 1:
            # Head-of-line blocking: held until the hole is filled; dup ACK at once.
            self._ooo[seq] = fragments
            self._ooo_bytes += _payload_size(fragments)
            self._ack_now = True
            if self._tcp.sack:
                self._note_sack(seq)
            return
        filled_hole = bool(self._ooo)
        self._rcv_cum = seq
        self._deliver(fragments, effects)
        while self._rcv_cum + 1 in self._ooo:
            self._rcv_cum += 1
            held = self._ooo.pop(self._rcv_cum)
            self._ooo_bytes -= _payload_size(held)
            self._deliver(held, effects)
        if self._sack_runs:
            self._sack_runs = [run for run in self._sack_runs if run[0] > self._rcv_cum]
        self._unacked_bytes += size
        full = (self._tcp.delayed_ack_segments - 1) * self._segment_size
        if filled_hole or self._quickacks > 0 or self._unacked_bytes > full:
            self._quickacks = max(self._quickacks - 1, 0)
            self._ack_now = True
        elif self._ack_at is None:
            self._ack_at = now + self._tcp.delayed_ack_timeout

    def _note_sack(self, seq: int) -> None:
        """RFC 2018 §4: the block holding the segment just received goes first; the
        others follow in the order they last changed.
        """
        first = last = seq
        others: list[tuple[int, int]] = []
        for run in self._sack_runs:
            if run[1] + 1 == first:
                first = run[0]
            elif run[0] - 1 == last:
                last = run[1]
            else:
                others.append(run)
        self._sack_runs = [(first, last), *others]

    def _deliver(self, fragments: tuple[Fragment, ...], effects: list[LinkEffect]) -> None:
        for fragment in fragments:
            if isinstance(fragment, WholeMessage):
                if self._partial is not None:
                    self._violation("a whole message interrupts a large one")
                self._hand_up(fragment.data, effects)
            else:
                self._on_piece(fragment, effects)

    def _on_piece(self, piece: MessagePiece, effects: list[LinkEffect]) -> None:
        partial = self._partial
        if partial is None:
            if piece.offset != 0:
                self._violation(f"piece at offset {piece.offset} of an unknown message")
                return
            if piece.total > self._config.max_message_size:
                self._violation(f"message of {piece.total} bytes exceeds the maximum")
                return
            partial = self._partial = _Partial(piece.msg_id, piece.total, bytearray())
        elif (
            piece.msg_id != partial.msg_id
            or piece.total != partial.total
            or piece.offset != len(partial.data)
        ):
            self._violation(f"piece of message {piece.msg_id} out of sequence")
            return
        partial.data += piece.data
        if len(partial.data) == partial.total:
            self._partial = None
            self._hand_up(bytes(partial.data), effects)

    def _violation(self, what: str) -> None:
        """The stream is corrupt: count it and drop the message being reassembled."""
        self._counters.protocol_violations += 1
        self._partial = None
        logger.debug("%d: protocol violation by %d: %s", self._local, self._peer, what)

    def _hand_up(self, payload: bytes, effects: list[LinkEffect]) -> None:
        self._counters.messages_delivered += 1
        self._counters.bytes_delivered += len(payload)
        effects.append(Delivered(self._peer, payload))

    # ---------------------------------------------------------------- liveness

    def _heard(self, now: float) -> None:
        self._counters.packets_received += 1
        self._last_heard = now
        self._probes_unanswered = 0

    def _keepalive_at(self) -> float | None:
        interval = self._tcp.keepalive_interval
        if (
            interval is None
            or not self._established
            or self._failed
            or self._snd_una != self._snd_nxt  # the retransmission timer watches instead
        ):
            return None
        return max(self._last_heard, self._last_probe_at) + interval

    def _on_keepalive_timeout(self, now: float, effects: list[LinkEffect]) -> None:
        if self._probes_unanswered >= self._config.failure_rounds:
            self._fail(f"{self._probes_unanswered} keepalive probes unanswered", effects)
            return
        stamp = min(max(int(now * 1e6), 0), U64_MAX)
        self._send_heartbeat(HeartbeatKind.REQUEST, stamp, effects)
        self._counters.probes_sent += 1
        self._probes_unanswered += 1
        self._last_probe_at = now

    def _on_heartbeat(self, heartbeat: Heartbeat, effects: list[LinkEffect]) -> None:
        if heartbeat.kind is HeartbeatKind.REQUEST and self._established:
            self._send_heartbeat(HeartbeatKind.REPLY, heartbeat.stamp, effects)

    def _send_heartbeat(self, kind: HeartbeatKind, stamp: int, effects: list[LinkEffect]) -> None:
        packet = Packet(
            Header(PacketType.HEARTBEAT, self._local, self._epoch), body=Heartbeat(kind, stamp)
        )
        effects.append(Transmit(self._peer, encode(packet)))
        self._counters.packets_sent += 1

    def _fail(self, reason: str, effects: list[LinkEffect]) -> None:
        self._failed = True
        self._hello_at = self._rto_at = self._ack_at = self._flush_at = None
        self._ack_now = False
        # A failed link is dead for good: release its buffers at once.
        self._queue.clear()
        self._segments.clear()
        self._ooo.clear()
        self._ooo_bytes = 0
        self._sack_runs.clear()
        self._partial = None
        logger.info("%d: link to %d failed: %s", self._local, self._peer, reason)
        effects.append(LinkFailed(self._peer, reason))
