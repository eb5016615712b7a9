"""Configuration of the group ordering engine."""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshcast.errors import ConfigError


@dataclass(frozen=True, slots=True)
class GroupConfig:
    # s: a daemon that owes the others its timestamp or ARU (some AGREED/SAFE message waits
    # for it) sends a NULL at most this long after its last total-order message; it is
    # also the least time between two of its NULLs, so NULL traffic per daemon is at most
    # 1/idle_ts_interval messages/s, and none at all while no ordered message is pending.
    idle_ts_interval: float = 0.01
    # messages: everything held back at once (FIFO and causal gaps, total-order stream
    # gaps, total-order messages waiting for timestamps or acks). A peer's message beyond
    # it is dropped and breaks that peer's stream (OrderingFault); an in-order NULL takes
    # no room and is always processed. A local AGREED/SAFE submit is refused
    # (BufferFull) while half this many total-order messages wait for delivery.
    max_held_messages: int = 10_000
    # messages: received for a view this daemon has not installed yet (kept until it does)
    max_future_messages: int = 1_000
    # msg ids remembered per source for duplicate detection of UNRELIABLE/RELIABLE data
    dedup_window: int = 4096
    # earlier view ids remembered, whose late messages are dropped at once
    max_past_views: int = 16

    def __post_init__(self) -> None:
        if not (math.isfinite(self.idle_ts_interval) and self.idle_ts_interval > 0):
            raise ConfigError("must be a positive number of seconds", key="idle_ts_interval")
        for key in ("max_held_messages", "max_future_messages", "dedup_window", "max_past_views"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"must be a positive integer, got {value!r}", key=key)
