"""A user-space impairment shim: emulated loss, delay, jitter and rate on real sockets.

Kernel netem is not available on these machines, so demos and tests that need a lossy
WAN link on loopback put this shim on a driver's outgoing path. Each direction of an
emulated link is the shim of the sending endpoint; give both endpoints one to impair
both directions.

The model, in the order a datagram meets it:

1. **loss**: dropped with probability `loss` (seeded, so one seed gives one loss pattern);
2. **bottleneck** (only with `rate_bps`): a FIFO drained at `rate_bps`, IP and UDP headers
   included, after an initial burst of `burst_bytes` (a token bucket whose backlog waits
   in a queue of at most `queue_bytes`; a datagram that does not fit is dropped, tail drop;
   like the link pacer, a datagram leaves whole once any token is left, so the bucket may
   go negative and the long-run rate stays exact);
3. **propagation**: `delay` plus a uniform random extra in ``[0, jitter)``. Jitter
   reorders datagrams, as netem's does.

`ImpairedPath` is the model (sans-I/O: explicit `now`, a `next_deadline()`); `ImpairedSender`
runs it on an event loop in front of a real send function.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from meshcast.errors import ConfigError
from meshcast.runtime.stats import ImpairmentStats
from meshcast.wire import UDP_IP_OVERHEAD

Address = tuple[str, int]
SendFunction = Callable[[bytes, Address], None]


@dataclass(frozen=True, slots=True)
class Impairment:
    """One direction of an emulated link. The defaults impair nothing."""

    loss: float = 0.0  # probability in [0, 1) that a datagram is dropped
    delay: float = 0.0  # s: one-way propagation delay added to every datagram
    jitter: float = 0.0  # s: uniform random extra delay in [0, jitter); reorders datagrams
    rate_bps: float | None = None  # bits/s of the emulated bottleneck; None: unlimited
    burst_bytes: int = 16 * 1024  # bytes the bottleneck may pass back to back after idling
    queue_bytes: int = 256 * 1024  # bytes waiting at the bottleneck; tail drop beyond
    seed: int = 0  # seeds the loss and jitter draws

    def __post_init__(self) -> None:
        if not 0.0 <= self.loss < 1.0:
            raise ConfigError(f"must be in [0, 1), got {self.loss!r}", key="impairment.loss")
        for key, value in (("delay", self.delay), ("jitter", self.jitter)):
            if not (math.isfinite(value) and value >= 0.0):
                raise ConfigError(f"must be >= 0 s, got {value!r}", key=f"impairment.{key}")
        if self.rate_bps is not None and not (math.isfinite(self.rate_bps) and self.rate_bps > 0):
            raise ConfigError(
                f"must be positive or None, got {self.rate_bps!r}", key="impairment.rate_bps"
            )
        for key, size in (("burst_bytes", self.burst_bytes), ("queue_bytes", self.queue_bytes)):
            if size <= 0:
                raise ConfigError(f"must be positive, got {size!r}", key=f"impairment.{key}")

    @property
    def passthrough(self) -> bool:
        """True when no datagram is ever held back (loss at most)."""
        return self.delay == 0.0 and self.jitter == 0.0 and self.rate_bps is None


class ImpairedPath:
    """The impairment model. `submit` a datagram; `release` the ones whose time has come."""

    __slots__ = (
        "_backlog",
        "_backlog_bytes",
        "_bytes_per_s",
        "_config",
        "_counter",
        "_in_flight",
        "_lost",
        "_queue_dropped",
        "_released",
        "_rng",
        "_submitted",
        "_tokens",
        "_tokens_at",
    )

    def __init__(self, config: Impairment) -> None:
        self._config = config
        self._rng = random.Random(config.seed)
        self._bytes_per_s = None if config.rate_bps is None else config.rate_bps / 8.0
        self._tokens = float(config.burst_bytes)
        self._tokens_at = 0.0
        # The bottleneck's queue: (size on the wire, datagram, address), FIFO.
        self._backlog: deque[tuple[int, bytes, Address]] = deque()
        self._backlog_bytes = 0
        # Datagrams past the bottleneck, waiting out their delay: (arrive_at, n, ...).
        self._in_flight: list[tuple[float, int, bytes, Address]] = []
        self._counter = 0
        self._submitted = 0
        self._lost = 0
        self._queue_dropped = 0
        self._released = 0

    @property
    def config(self) -> Impairment:
        return self._config

    def statistics(self) -> ImpairmentStats:
        return ImpairmentStats(
            submitted=self._submitted,
            lost=self._lost,
            queue_dropped=self._queue_dropped,
            released=self._released,
            in_flight=len(self._in_flight) + len(self._backlog),
        )

    def submit(self, datagram: bytes, address: Address, now: float) -> bool:
        """Offer one datagram at `now`. True: send it at once; False: lost or held back."""
        self._submitted += 1
        config = self._config
        if config.loss and self._rng.random() < config.loss:
            self._lost += 1
            return False
        if config.passthrough:
            self._released += 1
            return True
        if self._bytes_per_s is None:
            self._propagate(datagram, address, now)
            return False
        size = len(datagram) + UDP_IP_OVERHEAD
        if self._backlog_bytes + size > config.queue_bytes:
            self._queue_dropped += 1
            return False
        self._backlog.append((size, datagram, address))
        self._backlog_bytes += size
        self._drain(now)
        return False

    def release(self, now: float) -> list[tuple[bytes, Address]]:
        """Datagrams due by `now`, in arrival order."""
        if self._backlog:
            self._drain(now)
        heap = self._in_flight
        due: list[tuple[bytes, Address]] = []
        while heap and heap[0][0] <= now:
            _, _, datagram, address = heapq.heappop(heap)
            due.append((datagram, address))
        self._released += len(due)
        return due

    def next_deadline(self) -> float | None:
        deadlines: list[float] = []
        if self._in_flight:
            deadlines.append(self._in_flight[0][0])
        if self._backlog and self._bytes_per_s is not None:
            # A hair past the exact instant, so rounding cannot leave the tokens at -1e-12.
            missing = max(-self._tokens + 1e-6, 0.0)
            deadlines.append(self._tokens_at + missing / self._bytes_per_s)
        return min(deadlines) if deadlines else None

    def _drain(self, now: float) -> None:
        """Pass queued datagrams through the bottleneck as far as the tokens allow."""
        assert self._bytes_per_s is not None
        if now > self._tokens_at:
            self._tokens = min(
                float(self._config.burst_bytes),
                self._tokens + (now - self._tokens_at) * self._bytes_per_s,
            )
            self._tokens_at = now
        backlog = self._backlog
        while backlog and self._tokens > 0.0:  # whole datagrams; tokens may go negative
            size, datagram, address = backlog.popleft()
            self._backlog_bytes -= size
            self._tokens -= size
            self._propagate(datagram, address, now)

    def _propagate(self, datagram: bytes, address: Address, now: float) -> None:
        config = self._config
        arrive_at = now + config.delay
        if config.jitter:
            arrive_at += self._rng.random() * config.jitter
        self._counter += 1
        heapq.heappush(self._in_flight, (arrive_at, self._counter, datagram, address))


class ImpairedSender:
    """Runs an `ImpairedPath` in front of `send` on the running event loop (one timer)."""

    def __init__(self, config: Impairment, send: SendFunction) -> None:
        self._path = ImpairedPath(config)
        self._send = send
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._closed = False

    def statistics(self) -> ImpairmentStats:
        return self._path.statistics()

    def __call__(self, datagram: bytes, address: Address) -> None:
        if self._closed:
            return
        if self._path.submit(datagram, address, self._loop.time()):
            self._send(datagram, address)
        else:
            self._rearm()

    def close(self) -> None:
        """Drop whatever is still held back and stop the timer."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _rearm(self) -> None:
        deadline = self._path.next_deadline()
        if deadline is None or deadline >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = max(self._timer_at, self._loop.time())
        self._timer_at = math.inf
        send = self._send
        for datagram, address in self._path.release(now):
            send(datagram, address)
        self._rearm()
