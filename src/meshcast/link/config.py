"""Configuration of one link endpoint (Hop, or the TCP model of `meshcast.sim.tcp`)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from meshcast.errors import ConfigError
from meshcast.wire import MAX_MTU, MIN_MTU


@dataclass(frozen=True, slots=True)
class LinkConfig:
    mtu: int = 1400  # bytes per datagram, headers included
    # bytes per datagram where the route to the peer carries more than Ethernet's 1,500
    # bytes (loopback, jumbo frames): fewer datagrams, seals and system calls per message
    max_path_mtu: int = 65_507
    rate_bps: float = 100e6  # pacer rate in bits/s, IP+UDP overhead included
    burst_bytes: int = 16 * 1024  # token-bucket depth in bytes
    max_unacked_packets: int = 4096  # cap on seq_next - cum_ack: bounds retransmit memory
    max_send_queue_bytes: int = 32 * 1024 * 1024  # messages accepted but not yet packetised
    max_message_size: int = 16 * 1024 * 1024  # bytes per message
    ack_delay_interval: float = 0.010  # s: delayed cumulative ACK
    ack_every_packets: int = 16  # send an ACK at once after this many unacknowledged arrivals
    nack_delay_interval: float = 0.004  # s: a gap waits this long before its first NACK
    initial_rtt: float = 0.2  # s: RTT assumed until measured
    min_renack_interval: float = 0.010  # s: floor of the re-NACK interval (~1.5 RTT)
    heartbeat_interval: float = 0.5  # s: liveness probe and RTT sample
    hello_interval: float = 0.25  # s: handshake retry
    failure_rounds: int = 8  # unanswered heartbeat or NACK rounds before the link fails
    idle_duplicate_retransmits: bool = True  # send retransmissions twice when nothing new waits
    max_reassembly_bytes: int = 48 * 1024 * 1024  # bytes of partially received messages

    def __post_init__(self) -> None:
        if not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ConfigError(f"must be between {MIN_MTU} and {MAX_MTU}", key="link.mtu")
        if not MIN_MTU <= self.max_path_mtu <= MAX_MTU:
            raise ConfigError(f"must be between {MIN_MTU} and {MAX_MTU}", key="link.max_path_mtu")
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, bool) and value <= 0:
                raise ConfigError(f"must be positive, got {value!r}", key=f"link.{f.name}")
        if self.max_send_queue_bytes < self.max_message_size:
            raise ConfigError(
                "must hold at least one message of max_message_size",
                key="link.max_send_queue_bytes",
            )
        if self.max_reassembly_bytes < self.max_message_size:
            raise ConfigError(
                "must hold at least one message of max_message_size",
                key="link.max_reassembly_bytes",
            )
