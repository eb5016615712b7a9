"""Effects returned by link state machines, and the interface every link offers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from meshcast.ids import NodeId


@dataclass(slots=True)  # per message: not frozen, __init__ written out (GroupData)
class Transmit:
    """Send these bytes to that neighbour (one datagram, or one chunk of a stream)."""

    to: NodeId
    datagram: bytes

    def __init__(self, to: NodeId, datagram: bytes) -> None:
        self.to = to
        self.datagram = datagram


@dataclass(slots=True)  # per message: not frozen, __init__ written out (GroupData)
class Delivered:
    """A complete message arrived from `peer` (handed up at once, in arrival order)."""

    peer: NodeId
    payload: bytes

    def __init__(self, peer: NodeId, payload: bytes) -> None:
        self.peer = peer
        self.payload = payload


@dataclass(frozen=True, slots=True)
class LinkEstablished:
    peer: NodeId


@dataclass(frozen=True, slots=True)
class LinkFailed:
    """The link gave up; `reason` says why. A failed link stays failed."""

    peer: NodeId
    reason: str


@dataclass(frozen=True, slots=True)
class PeerRestarted:
    """The peer came back with a new incarnation; `discarded` queued messages were dropped."""

    peer: NodeId
    discarded: int


LinkEffect = Transmit | Delivered | LinkEstablished | LinkFailed | PeerRestarted


@dataclass(frozen=True, slots=True)
class LinkStats:
    """Counters of one link endpoint (a frozen snapshot)."""

    messages_sent: int = 0
    messages_delivered: int = 0
    bytes_delivered: int = 0
    packets_sent: int = 0
    packets_received: int = 0
    retransmissions: int = 0
    probes_sent: int = 0
    nacks_sent: int = 0
    gaps_opened: int = 0  # packets found missing: a later one, or news of one, came first
    state_packets_sent: int = 0
    duplicates_dropped: int = 0
    malformed_dropped: int = 0
    foreign_dropped: int = 0
    stale_dropped: int = 0
    out_of_window_dropped: int = 0
    protocol_violations: int = 0
    # dropped by the encryption layer (`meshcast.link.secure`); 0 on unencrypted links
    cleartext_dropped: int = 0
    truncated_dropped: int = 0
    unknown_key_dropped: int = 0
    forged_dropped: int = 0
    replayed_dropped: int = 0
    no_session_dropped: int = 0
    unsendable_dropped: int = 0
    handshakes_accepted: int = 0
    queued_messages: int = 0
    queued_bytes: int = 0
    unacked_packets: int = 0
    reassembly_bytes: int = 0
    srtt: float = 0.0


class Link(Protocol):
    """What the overlay, the simulator and the runtime rely on; Hop and TCP both offer it.

    Inputs return the effects they caused and never raise on bad peer input.
    """

    @property
    def peer(self) -> NodeId: ...
    @property
    def established(self) -> bool: ...
    @property
    def failed(self) -> bool: ...
    @property
    def queued_messages(self) -> int: ...  # accepted by `send`, not yet in a packet: O(1)

    def start(self, now: float) -> list[LinkEffect]: ...
    def can_send(self, size: int) -> bool: ...
    def send(self, payload: bytes, now: float, *, flush: bool = True) -> list[LinkEffect]: ...
    def datagram_received(self, datagram: bytes, now: float) -> list[LinkEffect]: ...
    def on_timer(self, now: float) -> list[LinkEffect]: ...
    def next_deadline(self) -> float | None: ...
    def statistics(self) -> LinkStats: ...
