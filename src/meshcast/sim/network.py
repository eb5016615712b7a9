"""Emulated network: the link model and one-directional pipes. (Theory: docs/design/sim.md)

A `Pipe` carries datagrams from one simulated node to another. It is a FIFO
transmitter with a drop-tail queue, followed by a wire that adds propagation delay,
jitter, random loss, reordering and duplication. Its arithmetic is analytic: a packet's
arrival time is computed when it is sent, so a packet costs one heap entry (two when
duplicated), and departures from the queue need no events of their own.
"""

from __future__ import annotations

import itertools
import math
import random
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from heapq import heappush

from meshcast.errors import ConfigError
from meshcast.ids import NodeId
from meshcast.sim.trace import TraceLog
from meshcast.wire.packet import UDP_IP_OVERHEAD

Handler = Callable[[bytes, int], None]
"""What a heap entry calls: ``handler(datagram, number)``; unused arguments are ignored."""

Entry = tuple[float, int, Handler, bytes, int]
"""A heap entry: ``(time, seq, handler, datagram, number)``; `seq` makes every entry unique."""

REASON_DOWN = "down"
REASON_CRASHED = "crashed"


@dataclass(frozen=True, slots=True)
class LinkModel:
    """How an emulated pipe treats the datagrams it carries (one direction).

    Every random choice is drawn when the packet is sent, from the pipe's own seeded RNG.
    """

    delay: float = 0.0  # s: one-way propagation delay, added after serialisation
    jitter: float = 0.0  # s: extra delay drawn uniformly in [0, jitter] per packet
    loss: float = 0.0  # probability in [0, 1] that a packet is lost on the wire
    duplicate: float = 0.0  # probability in [0, 1] that a packet is delivered twice
    reorder: float = 0.0  # probability in [0, 1] that a packet is held back (see reorder_delay)
    bandwidth_bps: float | None = None  # bits/s incl. UDP/IP overhead; None or inf: no limit
    queue_bytes: int = 256 * 1024  # bytes (wire size) that may wait behind the transmitter
    reorder_delay: float | None = None  # s: max extra delay of a held-back packet; None: 2×delay

    def __post_init__(self) -> None:
        for name in ("delay", "jitter"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"must be finite and >= 0, got {value!r}", key=f"sim.{name}")
        for name in ("loss", "duplicate", "reorder"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(
                    f"must be a probability in [0, 1], got {value!r}", key=f"sim.{name}"
                )
        bw = self.bandwidth_bps
        if bw is not None and not bw > 0:  # NaN fails too
            raise ConfigError(f"must be > 0 (or None), got {bw!r}", key="sim.bandwidth_bps")
        if isinstance(self.queue_bytes, bool) or not isinstance(self.queue_bytes, int):
            raise ConfigError(f"must be an int, got {self.queue_bytes!r}", key="sim.queue_bytes")
        if self.queue_bytes < 0:
            raise ConfigError(f"must be >= 0, got {self.queue_bytes!r}", key="sim.queue_bytes")
        rd = self.reorder_delay
        if rd is not None and not (math.isfinite(rd) and rd >= 0):
            raise ConfigError(f"must be finite and >= 0, got {rd!r}", key="sim.reorder_delay")
        if self.reorder > 0 and self.max_reorder_delay == 0:
            raise ConfigError(
                "reordering needs delay > 0 or reorder_delay > 0", key="sim.reorder_delay"
            )

    @property
    def max_reorder_delay(self) -> float:
        """Upper bound (s) of the extra delay of a held-back packet."""
        return 2.0 * self.delay if self.reorder_delay is None else self.reorder_delay

    def serialisation_delay(self, size: int) -> float:
        """Seconds the transmitter is busy with a datagram of `size` bytes (plus UDP/IP)."""
        bw = self.bandwidth_bps
        if bw is None or math.isinf(bw):
            return 0.0
        return (size + UDP_IP_OVERHEAD) * 8 / bw


@dataclass(frozen=True, slots=True)
class PipeStats:
    """Counters of one pipe (a frozen snapshot). Sizes are bytes.

    Conservation: ``sent + duplicated == delivered + lost_random + dropped_queue +
    dropped_down + dropped_crashed + in_flight``.
    """

    sent: int = 0  # datagrams offered by the source node
    delivered: int = 0  # datagrams handed to the destination (duplicates included)
    lost_random: int = 0  # lost on the wire by the seeded loss draw
    dropped_queue: int = 0  # refused by the full drop-tail queue
    dropped_down: int = 0  # sent while the pipe was down, or in flight when it went down
    duplicated: int = 0  # extra copies created by the duplicate draw
    bytes_delivered: int = 0  # datagram bytes delivered (UDP/IP overhead not included)
    max_queue_bytes: int = 0  # high-water mark of the queue, wire bytes (datagram + overhead)
    dropped_crashed: int = 0  # arrived at a crashed node, or in flight to it when it crashed
    in_flight: int = 0  # scheduled to arrive and not yet arrived


class Pipe:
    """One direction of an emulated link: FIFO transmitter, drop-tail queue, lossy wire."""

    __slots__ = (
        "_busy_until",
        "_counter",
        "_delay",
        "_heap",
        "_queue_limit",
        "_random",
        "_rng",
        "_ser_factor",
        "_trace",
        "_waiting",
        "admin_up",
        "arrive",
        "bytes_delivered",
        "delivered",
        "dropped_crashed",
        "dropped_down",
        "dropped_queue",
        "dst",
        "duplicated",
        "epoch",
        "in_flight",
        "lost_random",
        "max_queue_bytes",
        "model",
        "partitioned",
        "queued_bytes",
        "sent",
        "src",
        "up",
    )

    def __init__(
        self,
        src: NodeId,
        dst: NodeId,
        model: LinkModel,
        rng: random.Random,
        heap: list[Entry],
        counter: itertools.count[int],
        trace: TraceLog | None,
    ) -> None:
        self.src = src
        self.dst = dst
        self.model = model
        self._rng = rng
        self._heap = heap
        self._counter = counter
        self._trace = trace  # only when per-packet tracing is on
        bw = model.bandwidth_bps
        self._ser_factor = 0.0 if bw is None or math.isinf(bw) else 8.0 / bw
        self._queue_limit = model.queue_bytes
        self._delay = model.delay
        self._random = bool(model.loss or model.jitter or model.reorder or model.duplicate)
        self._busy_until = -math.inf  # when the transmitter finishes the last accepted packet
        self._waiting: deque[tuple[float, int]] = deque()  # (start, wire size) not yet started
        self.queued_bytes = 0
        self.arrive: Handler = _unwired  # set by the simulator: handler(datagram, epoch)
        self.epoch = 0  # bumped on every flush; arrivals of an older epoch are void
        self.admin_up = True  # set_link_up / set_pipe_up
        self.partitioned = False  # cut by the current partition
        self.up = True  # admin_up and not partitioned
        self.sent = 0
        self.delivered = 0
        self.lost_random = 0
        self.dropped_queue = 0
        self.dropped_down = 0
        self.dropped_crashed = 0
        self.duplicated = 0
        self.bytes_delivered = 0
        self.max_queue_bytes = 0
        self.in_flight = 0

    def send(self, datagram: bytes, now: float) -> None:
        """Accept one datagram at `now`; schedule its arrival (or count its loss)."""
        self.sent += 1
        trace = self._trace
        if not self.up:
            self.dropped_down += 1
            if trace is not None:
                self._trace_packet(trace, now, "packet_dropped", datagram, reason=REASON_DOWN)
            return
        if self._ser_factor:
            size = len(datagram) + UDP_IP_OVERHEAD
            busy = self._busy_until
            if busy > now:  # the transmitter is busy: wait in the queue
                waiting = self._waiting
                while waiting and waiting[0][0] <= now:  # these have started by now
                    self.queued_bytes -= waiting.popleft()[1]
                queued = self.queued_bytes + size
                if queued > self._queue_limit:
                    self.dropped_queue += 1
                    if trace is not None:
                        self._trace_packet(trace, now, "packet_dropped", datagram, reason="queue")
                    return
                waiting.append((busy, size))
                self.queued_bytes = queued
                if queued > self.max_queue_bytes:
                    self.max_queue_bytes = queued
                start = busy
            else:
                start = now
            done = start + size * self._ser_factor
            self._busy_until = done
        else:
            done = now
        if not self._random:
            heappush(
                self._heap,
                (done + self._delay, next(self._counter), self.arrive, datagram, self.epoch),
            )
            self.in_flight += 1
            if trace is not None:
                self._trace_packet(
                    trace, now, "packet_sent", datagram, arrive_at=done + self._delay
                )
            return
        self._send_random(datagram, now, done, trace)

    def _send_random(
        self, datagram: bytes, now: float, done: float, trace: TraceLog | None
    ) -> None:
        """The wire part of `send` when loss, jitter, reordering or duplication is on."""
        model = self.model
        rng = self._rng
        if model.loss and rng.random() < model.loss:
            self.lost_random += 1
            if trace is not None:
                self._trace_packet(trace, now, "packet_lost", datagram)
            return
        at = done + model.delay
        if model.jitter:
            at += rng.random() * model.jitter
        if model.reorder and rng.random() < model.reorder:
            at += rng.random() * model.max_reorder_delay
        heappush(self._heap, (at, next(self._counter), self.arrive, datagram, self.epoch))
        self.in_flight += 1
        if trace is not None:
            self._trace_packet(trace, now, "packet_sent", datagram, arrive_at=at)
        if model.duplicate and rng.random() < model.duplicate:
            at = done + model.delay
            if model.jitter:
                at += rng.random() * model.jitter
            heappush(self._heap, (at, next(self._counter), self.arrive, datagram, self.epoch))
            self.in_flight += 1
            self.duplicated += 1
            if trace is not None:
                self._trace_packet(trace, now, "packet_duplicated", datagram, arrive_at=at)

    def flush(self, now: float, reason: str) -> int:
        """Lose every packet queued or in flight (link cut, destination crashed)."""
        lost = self.in_flight
        if reason == REASON_DOWN:
            self.dropped_down += lost
        else:
            self.dropped_crashed += lost
        self.in_flight = 0
        self.epoch += 1
        self._waiting.clear()
        self.queued_bytes = 0
        if self._busy_until > now:
            self._busy_until = now
        return lost

    def statistics(self) -> PipeStats:
        return PipeStats(
            sent=self.sent,
            delivered=self.delivered,
            lost_random=self.lost_random,
            dropped_queue=self.dropped_queue,
            dropped_down=self.dropped_down,
            duplicated=self.duplicated,
            bytes_delivered=self.bytes_delivered,
            max_queue_bytes=self.max_queue_bytes,
            dropped_crashed=self.dropped_crashed,
            in_flight=self.in_flight,
        )

    def _trace_packet(
        self,
        trace: TraceLog,
        now: float,
        kind: str,
        datagram: bytes,
        reason: str | None = None,
        arrive_at: float | None = None,
    ) -> None:
        trace.record_packet(
            now, kind, self.src, self.dst, len(datagram), datagram_crc(datagram), reason, arrive_at
        )


def datagram_crc(datagram: bytes) -> str:
    """Short fingerprint of a datagram for the trace (CRC-32, 8 hex digits)."""
    return f"{zlib.crc32(datagram):08x}"


def _unwired(datagram: bytes, epoch: int) -> None:
    raise AssertionError("pipe arrival handler not wired")
