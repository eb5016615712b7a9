"""The daemon as one sans-I/O object: `DaemonNode` joins the overlay, the group layers and
the client sessions; the asyncio runtime and the simulator both drive it unchanged."""

from meshcast.daemon.effects import (
    ClientClose,
    ClientReading,
    ClientWrite,
    DaemonEffect,
    DaemonEvent,
)
from meshcast.daemon.node import DaemonNode, DaemonNodeConfig, DaemonNodeStats

__all__ = [
    "ClientClose",
    "ClientReading",
    "ClientWrite",
    "DaemonEffect",
    "DaemonEvent",
    "DaemonNode",
    "DaemonNodeConfig",
    "DaemonNodeStats",
]
