"""Upload shaping for replication: a token bucket, one for the daemon's whole upload
(`[replicate] rate`) and one for each replication it feeds (the request's rate, which the
origin can change while it runs). A chunk goes out only when both buckets allow it.

The bucket may overdraw by one chunk (a chunk is never split): it then waits until the
debt is paid. Its burst is `burst_seconds` of its rate, so a sender never bunches its
writes after an idle spell. Sans-I/O: the caller passes `now`.
"""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    """Bytes/s at most (`rate` 0: no cap); `take` spends, `ready_at` says when to go on."""

    __slots__ = ("_at", "_burst_seconds", "_tokens", "rate")

    def __init__(self, rate: float, now: float, burst_seconds: float) -> None:
        self.rate = rate
        self._burst_seconds = burst_seconds
        self._tokens = 0.0
        self._at = now

    def set_rate(self, rate: float, now: float) -> None:
        """A new cap from now on (tokens earned at the old rate are kept, up to the new
        burst; a debt is kept too: the chunk it paid for went out at the old rate)."""
        self.refill(now)
        self.rate = rate
        self._tokens = min(self._tokens, self._burst())

    def _burst(self) -> float:
        return max(self.rate * self._burst_seconds, 1.0)

    def refill(self, now: float) -> None:
        if self.rate and now > self._at:
            self._tokens = min(self._burst(), self._tokens + (now - self._at) * self.rate)
        self._at = max(self._at, now)

    def ready_at(self, now: float) -> float | None:
        """None if a chunk may go now (after `refill(now)`), else when it may."""
        if not self.rate or self._tokens >= 0:
            return None
        return now + max(-self._tokens / self.rate, 1e-6)  # (float rounding: never zero)

    def take(self, length: int) -> None:
        if self.rate:
            self._tokens -= length
