"""Counters of the runtime drivers (frozen snapshots, like `LinkStats`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from meshcast.daemon import DaemonNodeStats
from meshcast.group import GroupStats
from meshcast.group.membership import MembershipStats
from meshcast.group.sessions import SessionStats
from meshcast.ids import NodeId
from meshcast.link.events import LinkStats
from meshcast.overlay.node import OverlayStats


@dataclass(frozen=True, slots=True)
class ImpairmentStats:
    """What the impairment shim did to the datagrams handed to it."""

    submitted: int = 0  # datagrams offered to the emulated path
    lost: int = 0  # dropped by the random loss
    queue_dropped: int = 0  # dropped at the tail of the full rate-limiter queue
    released: int = 0  # datagrams that reached the real socket
    in_flight: int = 0  # datagrams currently delayed or queued


@dataclass(frozen=True, slots=True)
class DriverStats:
    """A driver's own counters plus a `LinkStats` snapshot per peer.

    Every datagram or frame the driver refuses is counted in exactly one `*_dropped`
    counter; `internal_errors` counts bugs contained by the bulkhead.
    """

    links: dict[NodeId, LinkStats] = field(default_factory=dict)
    datagrams_received: int = 0  # datagrams (UDP) or frames (TCP) read from the socket
    datagrams_sent: int = 0  # datagrams (UDP) or frames (TCP) written to the socket
    malformed_dropped: int = 0  # header did not decode / frame broke the framing rules
    foreign_dropped: int = 0  # unknown sender id, or a known id from the wrong address
    overflow_dropped: int = 0  # data datagrams refused while the receive queue was full
    unroutable_dropped: int = 0  # effects addressed to a peer the driver no longer knows
    socket_errors: int = 0  # errors the socket reported (ICMP unreachable, EPERM, ...)
    internal_errors: int = 0  # unexpected exceptions contained by the bulkhead
    callback_errors: int = 0  # exceptions raised by the application's callbacks
    impairment: ImpairmentStats | None = None  # set when an impairment shim is in use

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form (peer ids become strings)."""
        data = asdict(self)
        data["links"] = {str(peer): asdict(stats) for peer, stats in self.links.items()}
        return data


@dataclass(frozen=True, slots=True)
class DaemonStats:
    """Counters of one daemon (a frozen snapshot, logged with ``daemon_stopped``)."""

    datagrams_received: int = 0  # datagrams read from the socket
    datagrams_sent: int = 0  # datagrams handed to the socket (or to an impairment shim)
    gso_sends: int = 0  # system calls that each sent a run of datagrams (UDP GSO)
    gso_datagrams: int = 0  # datagrams among datagrams_sent that left in those runs
    foreign_dropped: int = 0  # from an address that is no configured neighbour's
    unroutable_dropped: int = 0  # transmissions to a node that is not a neighbour
    socket_errors: int = 0  # errors the socket reported (ICMP port unreachable, ...)
    internal_errors: int = 0  # unexpected exceptions contained (the node's and the pump's)
    unknown_effects: int = 0  # effects the pump has no case for (a bug), dropped
    view_members: tuple[int, ...] | None = None  # members of the current view
    daemon: DaemonNodeStats = field(default_factory=DaemonNodeStats)
    sessions: SessionStats = field(default_factory=SessionStats)
    group: GroupStats = field(default_factory=GroupStats)
    membership: MembershipStats = field(default_factory=MembershipStats)
    overlay: OverlayStats = field(default_factory=OverlayStats)
    links: dict[NodeId, LinkStats] = field(default_factory=dict)  # per neighbour
    impairment: dict[NodeId, ImpairmentStats] = field(default_factory=dict)  # emulated links

    def as_dict(self) -> dict[str, object]:
        """Plain JSON-ready form (peer ids become strings)."""
        data = asdict(self)
        data["links"] = {str(peer): asdict(stats) for peer, stats in self.links.items()}
        data["impairment"] = {str(peer): asdict(stats) for peer, stats in self.impairment.items()}
        return data
