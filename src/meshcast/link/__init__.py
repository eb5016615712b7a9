"""Links between neighbour daemons: the Hop protocol and a TCP link for comparison."""

from meshcast.link.config import LinkConfig
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

__all__ = [
    "Delivered",
    "Link",
    "LinkConfig",
    "LinkEffect",
    "LinkEstablished",
    "LinkFailed",
    "LinkStats",
    "PeerRestarted",
    "Transmit",
]
