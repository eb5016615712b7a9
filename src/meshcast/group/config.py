"""Configuration of the group ordering engine."""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshcast.errors import ConfigError


@dataclass(frozen=True, slots=True)
class GroupConfig:
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
    # gaps, total-order messages waiting for timestamps or acks). A peer's message beyond
    # it is dropped and breaks that peer's stream (OrderingFault); an in-order NULL takes
    # no room and is always processed. A local AGREED/SAFE submit is refused
    # (BufferFull) while half this many total-order messages wait for delivery.
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
    # message beyond it breaks that peer's stream (OrderingFault); a local submit is
    # refused (BufferFull) while a quarter of it is our own.
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
        for key in ("idle_ts_interval", "ack_interval", "flush_retry_interval", "repair_after"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError("must be a positive number of seconds", key=key)
        for key in (
            "max_held_messages",
            "max_future_messages",
            "max_retained_messages",
            "max_retained_bytes",
            "dedup_window",
            "max_past_views",
            "null_lead",
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"must be a positive integer, got {value!r}", key=key)
