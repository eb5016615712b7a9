"""Self-checking test traffic: numbered messages whose content proves they arrived intact.

Message `seq` is ``seq`` as 8 big-endian bytes followed by a slice of a fixed pseudo-random
pattern that starts at an offset derived from `seq`. The receiver recomputes the slice and
compares (one memcmp), so corruption, truncation, mix-ups between messages, duplicates and
gaps are all caught, at a cost small enough for the throughput benchmark.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_PATTERN_PERIOD = 4093  # prime: consecutive messages start at unrelated offsets
_SEQ_BYTES = 8
MIN_MESSAGE_SIZE = _SEQ_BYTES


@dataclass(frozen=True, slots=True)
class MessagePlan:
    """`count` messages of `size` bytes, or of mixed sizes in [8, `size`] plus a few large ones.

    Mixed sizes exercise both packing (many small messages per datagram) and splitting
    (every 997th message is `large_size` bytes, several datagrams long).
    """

    count: int
    size: int = 1024
    mixed: bool = False
    large_size: int = 5000
    seed: int = 1

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")
        if self.size < MIN_MESSAGE_SIZE or self.large_size < MIN_MESSAGE_SIZE:
            raise ValueError(f"messages carry at least {MIN_MESSAGE_SIZE} bytes")

    def size_of(self, seq: int) -> int:
        if not self.mixed:
            return self.size
        if seq % 997 == 996:
            return self.large_size
        return MIN_MESSAGE_SIZE + (seq * 7919) % (self.size - MIN_MESSAGE_SIZE + 1)

    def max_size(self) -> int:
        return max(self.size, self.large_size) if self.mixed else self.size

    def pattern(self) -> bytes:
        return random.Random(self.seed).randbytes(_PATTERN_PERIOD + self.max_size())


class MessageSource:
    """Builds the messages of a plan, one per call, without per-message randomness."""

    __slots__ = ("_pattern", "_plan")

    def __init__(self, plan: MessagePlan) -> None:
        self._plan = plan
        self._pattern = plan.pattern()

    def message(self, seq: int) -> bytes:
        start = seq % _PATTERN_PERIOD
        body = self._pattern[start : start + self._plan.size_of(seq) - _SEQ_BYTES]
        return seq.to_bytes(_SEQ_BYTES, "big") + body


class MessageChecker:
    """Counts what arrived: intact and new, duplicated, or corrupt."""

    __slots__ = (
        "_pattern",
        "_plan",
        "_seen",
        "bytes_delivered",
        "corrupt",
        "delivered",
        "duplicates",
    )

    def __init__(self, plan: MessagePlan) -> None:
        self._plan = plan
        self._pattern = plan.pattern()
        self._seen = bytearray(plan.count)
        self.delivered = 0  # distinct intact messages
        self.bytes_delivered = 0
        self.duplicates = 0
        self.corrupt = 0

    @property
    def complete(self) -> bool:
        return self.delivered == self._plan.count

    def missing(self) -> int:
        return self._plan.count - self.delivered

    def check_light(self, payload: bytes) -> None:
        """Like `check` without the content comparison (for throughput measurements)."""
        seq = int.from_bytes(payload[:_SEQ_BYTES], "big")
        if seq >= self._plan.count or len(payload) != self._plan.size_of(seq):
            self.corrupt += 1
        elif self._seen[seq]:
            self.duplicates += 1
        else:
            self._seen[seq] = 1
            self.delivered += 1
            self.bytes_delivered += len(payload)

    def check(self, payload: bytes) -> None:
        seq = int.from_bytes(payload[:_SEQ_BYTES], "big")
        plan = self._plan
        if len(payload) < _SEQ_BYTES or seq >= plan.count:
            self.corrupt += 1
            return
        start = seq % _PATTERN_PERIOD
        size = plan.size_of(seq)
        if (
            len(payload) != size
            or payload[_SEQ_BYTES:] != self._pattern[start : start + size - _SEQ_BYTES]
        ):
            self.corrupt += 1
            return
        if self._seen[seq]:
            self.duplicates += 1
            return
        self._seen[seq] = 1
        self.delivered += 1
        self.bytes_delivered += size
