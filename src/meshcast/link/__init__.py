"""Links between neighbour daemons: the Hop protocol (its TCP model for comparison is
`meshcast.sim.tcp`, beside the simulator that runs it)."""

from meshcast.link.config import LinkConfig
from meshcast.link.endpoint import LinkEndpoint
from meshcast.link.events import (
    Delivered,
    Link,
    LinkEffect,
    LinkEstablished,
    LinkFailed,
    LinkStats,
    PeerRestarted,
    Transmit,
)
from meshcast.link.hop import HopLink

__all__ = [
    "Delivered",
    "HopLink",
    "Link",
    "LinkConfig",
    "LinkEffect",
    "LinkEndpoint",
    "LinkEstablished",
    "LinkFailed",
    "LinkStats",
    "PeerRestarted",
    "Transmit",
]
