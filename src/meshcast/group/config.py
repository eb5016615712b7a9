"""Configuration of the group layer.

`GroupConfig` is what a user sets (the cluster file's `[group]` section). The engine is a
stack of four protocols (docs/design/group.md, "The protocol stack"), each with its own
frozen config below; `split_config` derives them from one `GroupConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshcast.errors import ConfigError

FLUSH_PART_BYTES = 1 << 20  # carried copies per FLUSH part (one bigger copy: a part alone)
REPAIR_BATCH = 256  # own copies sent again per repair look, at most


def _check_seconds(config: object, *keys: str) -> None:
    for key in keys:
        value = getattr(config, key)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError("must be a positive number of seconds", key=key)


def _check_counts(config: object, *keys: str) -> None:
    for key in keys:
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"must be a positive integer, got {value!r}", key=key)


@dataclass(frozen=True, slots=True)
class GroupConfig:
    """The group layer's settings, as a user gives them (`split_config`: per protocol)."""

    # s: a daemon that owes the others its timestamp or ARU (some AGREED/SAFE message waits
    # for it) answers at its next timer, at once, when a peer's stream message arrived
    # since its own last one: one NULL per batch of input, however many messages the
    # batch held. Otherwise (nothing new came in) it sends one at most this long after
    # its last total-order message. None at all while no ordered message is pending.
    idle_ts_interval: float = 0.01
    # timestamps: a daemon that sent no AGREED/SAFE message of its own for
    # idle_ts_interval (it hosts no member, or only listeners) stamps its NULLs this far
    # ahead of its clock (and its clock jumps there). NULLs do not move the receivers'
    # clocks, so its one NULL also covers the next messages of the busy daemons, up to
    # that many: it is off the critical path of a round trip between two other daemons,
    # and under a flood it sends one NULL per null_lead timestamps at most. Its own next
    # message is stamped above the lead: one answer round from the others, whose clocks
    # move on data. A daemon that sends stamps its NULLs at clock + 1.
    null_lead: int = 1 << 20
    # messages: everything held back at once (FIFO and causal gaps, total-order stream
    # gaps, total-order messages waiting for timestamps or acks). A peer's message that
    # cannot be taken in order is dropped beyond it, as if lost (its source sends it
    # again after repair_after); one that comes in order is always taken. A local
    # AGREED/SAFE submit waits while max_held_messages / (2 x daemons of the view) of
    # ours wait for delivery: every member's wait at every other member too.
    max_held_messages: int = 10_000
    # messages: received for a view (or a flush) this daemon has not reached yet, kept
    # until it does. Others may finish a flush first and send; the overlay window bounds
    # each source's messages in flight (1,000 by default), so this covers ~20 sources.
    max_future_messages: int = 20_000
    # s: a daemon tells the others what it holds (ACK) at most this often, and only when
    # that changed; ACKs let every daemon forget the copies kept for a flush
    ack_interval: float = 0.02
    # s: a daemon still flushing probes a member whose FLUSH it lacks parts of this long
    # after the last part came from it (the overlay may lose a message while views
    # change), doubling the wait while the member stays silent (up to 8x); the member
    # answers with the parts the probe does not list, unless its path to the prober
    # still holds earlier ones
    flush_retry_interval: float = 0.25
    # s: a daemon sends its own message again to a destination whose ACKs still lack it
    # this long after sending, unless the path to it still holds messages of ours (the
    # overlay loses what a failing link held; when the link comes back without a view
    # change, nothing else would recover it)
    repair_after: float = 1.0
    # messages: copies kept for a flush (not yet held by every destination). A peer's
    # message that cannot be taken in order is dropped beyond it, as if lost; a local
    # submit is refused (BufferFull) while a quarter of it is our own.
    max_retained_messages: int = 100_000
    # bytes: a local submit is also refused while our own copies not yet held by every
    # destination reach a quarter of this (the end-to-end window of a sending daemon:
    # keep it well below the sessions' max_backlog, so that a `block` member's daemon can
    # stop the senders before its backlog bound disconnects the member)
    max_retained_bytes: int = 64 * 1024 * 1024
    # msg ids remembered per source for duplicate detection of UNRELIABLE/RELIABLE data
    dedup_window: int = 4096
    # earlier view ids remembered, whose late messages are dropped at once
    max_past_views: int = 16

    def __post_init__(self) -> None:
        _check_seconds(
            self, "idle_ts_interval", "ack_interval", "flush_retry_interval", "repair_after"
        )
        _check_counts(
            self,
            "max_held_messages",
            "max_future_messages",
            "max_retained_messages",
            "max_retained_bytes",
            "dedup_window",
            "max_past_views",
            "null_lead",
        )


@dataclass(frozen=True, slots=True)
class OrderingConfig:
    """`meshcast.group.ordering.Ordering`: FIFO, causal and total order, hold-back."""

    # s, timestamps, messages: as the GroupConfig fields of the same names
    idle_ts_interval: float = 0.01
    null_lead: int = 1 << 20
    max_held_messages: int = 10_000  # own AGREED/SAFE waiting: half of it / members
    # msg ids remembered per source for duplicate detection of UNRELIABLE/RELIABLE data
    dedup_window: int = 4096

    def __post_init__(self) -> None:
        _check_seconds(self, "idle_ts_interval")
        _check_counts(self, "null_lead", "max_held_messages", "dedup_window")


@dataclass(frozen=True, slots=True)
class StabilityConfig:
    """`meshcast.group.stability.Stability`: copies kept until stable, ACKs."""

    ack_interval: float = 0.02  # s: ACKs at most this often, and only when they changed
    # messages: copies kept; a local submit is refused while a quarter of it is our own
    max_retained_messages: int = 100_000
    # bytes: a local submit is refused while our own copies reach a quarter of this
    max_retained_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        _check_seconds(self, "ack_interval")
        _check_counts(self, "max_retained_messages", "max_retained_bytes")


@dataclass(frozen=True, slots=True)
class FlushConfig:
    """`meshcast.group.flush.Flush`: the view change (and messages of other views)."""

    flush_retry_interval: float = 0.25  # s: probe a silent member after this (doubling)
    max_future_messages: int = 20_000  # messages: kept for a view not installed yet
    max_past_views: int = 16  # earlier view ids remembered: their messages are dropped
    # messages: local submits queued during a flush (GroupConfig: max_held_messages / 2)
    max_queued_submits: int = 5_000
    max_part_bytes: int = FLUSH_PART_BYTES  # bytes of carried copies per FLUSH part

    def __post_init__(self) -> None:
        _check_seconds(self, "flush_retry_interval")
        _check_counts(
            self, "max_future_messages", "max_past_views", "max_queued_submits", "max_part_bytes"
        )


@dataclass(frozen=True, slots=True)
class RepairConfig:
    """`meshcast.group.repair.Repair`: own copies sent again to who still lacks them."""

    repair_after: float = 1.0  # s: a copy unacknowledged this long is sent again
    max_repairs_per_look: int = REPAIR_BATCH  # copies sent again per look (every half)

    def __post_init__(self) -> None:
        _check_seconds(self, "repair_after")
        _check_counts(self, "max_repairs_per_look")


@dataclass(frozen=True, slots=True)
class StackConfig:
    """The configuration of each protocol of one daemon's group stack."""

    ordering: OrderingConfig
    stability: StabilityConfig
    flush: FlushConfig
    repair: RepairConfig


def split_config(config: GroupConfig) -> StackConfig:
    """The per-protocol configs of `config` (each takes the fields it owns)."""
    return StackConfig(
        OrderingConfig(
            config.idle_ts_interval,
            config.null_lead,
            config.max_held_messages,
            config.dedup_window,
        ),
        StabilityConfig(
            config.ack_interval, config.max_retained_messages, config.max_retained_bytes
        ),
        FlushConfig(
            config.flush_retry_interval,
            config.max_future_messages,
            config.max_past_views,
            max(config.max_held_messages // 2, 1),
        ),
        RepairConfig(config.repair_after),
    )
