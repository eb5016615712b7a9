"""Sliding anti-replay window over datagram counters (RFC 6479, as IPsec and WireGuard use).

The receiver remembers the highest counter accepted and a bitmap of the `size` counters
below it. A counter above the highest is new; one inside the window is new unless its bit
is set; one below the window is too old to tell and is refused. `check` comes before the
(costly) authentication, `accept` after it succeeds, so a forged datagram cannot move the
window.
"""

from __future__ import annotations

DEFAULT_WINDOW = 2048  # counters: reordering deeper than this is refused as a replay


class ReplayWindow:
    __slots__ = ("_bits", "_highest", "_mask", "_size")

    def __init__(self, size: int = DEFAULT_WINDOW) -> None:
        if size < 1:
            raise ValueError(f"window size must be positive, got {size}")
        self._size = size
        self._mask = (1 << size) - 1
        self._highest = 0  # counters start at 1
        self._bits = 0  # bit i set: counter highest - i seen (bit 0 is `highest` itself)

    def check(self, counter: int) -> bool:
        """Whether `counter` may be new (not seen and not older than the window)."""
        if counter <= 0:
            return False
        if counter > self._highest:
            return True
        offset = self._highest - counter
        return offset < self._size and not (self._bits >> offset) & 1

    def accept(self, counter: int) -> None:
        """Record `counter` (call only after `check` passed and the datagram authenticated)."""
        if counter == self._highest + 1:  # in order, the common case
            self._bits = ((self._bits << 1) | 1) & self._mask
            self._highest = counter
        elif counter > self._highest:
            shift = counter - self._highest
            self._bits = ((self._bits << shift) | 1) & self._mask if shift < self._size else 1
            self._highest = counter
        else:
            self._bits |= 1 << (self._highest - counter)
