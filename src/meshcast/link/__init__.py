"""Links between neighbour daemons: the Hop protocol and a TCP link for comparison."""

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
