"""Token-bucket pacer: the rate-based flow control of a link."""

from __future__ import annotations

from meshcast.wire import UDP_IP_OVERHEAD


class Pacer:
    """Admits datagrams at `rate_bps` on average with bursts of at most `burst_bytes`.

    Tokens may go negative (a datagram is sent whole once any token is left), which keeps
    the long-run rate exact without splitting datagrams. Every byte counts, IP and UDP
    headers included, because that is what the bottleneck carries.
    """

    __slots__ = ("_burst", "_bytes_per_s", "_tokens", "_updated_at")

    def __init__(self, rate_bps: float, burst_bytes: int, now: float = 0.0) -> None:
        self._bytes_per_s = rate_bps / 8.0
        self._burst = float(burst_bytes)
        self._tokens = self._burst
        self._updated_at = now

    def _refill(self, now: float) -> None:
        if now > self._updated_at:
            self._tokens = min(
                self._burst, self._tokens + (now - self._updated_at) * self._bytes_per_s
            )
            self._updated_at = now

    def ready(self, now: float) -> bool:
        self._refill(now)
        return self._tokens > 0.0

    def consume(self, datagram_size: int, now: float) -> None:
        """Charge one datagram of `datagram_size` bytes (IP/UDP headers are added)."""
        self.charge(datagram_size + UDP_IP_OVERHEAD, now)

    def charge(self, wire_bytes: int, now: float) -> None:
        """Charge bytes already counted with every header."""
        self._refill(now)
        self._tokens -= wire_bytes

    def ready_at(self, now: float) -> float:
        """Earliest time at which `ready()` turns true."""
        self._refill(now)
        if self._tokens > 0.0:
            return now
        # A hair past the exact instant, so float rounding cannot leave tokens at -1e-12.
        return now + (-self._tokens + 1e-6) / self._bytes_per_s
