"""What a `DaemonNode` asks its driver to do: one typed union, `DaemonEffect`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from meshcast.link.events import Transmit
from meshcast.replicate.engine import (
    BeginCopy,
    CloseStream,
    Finalize,
    HashFile,
    OpenStream,
    StreamSend,
)


@dataclass(slots=True)  # per message: not frozen, __init__ written out (GroupData)
class ClientWrite:
    """Write these bytes (whole frames) to client connection `conn`, after what was
    written to it before."""

    conn: int
    data: bytes

    def __init__(self, conn: int, data: bytes) -> None:
        self.conn = conn
        self.data = data


@dataclass(frozen=True, slots=True)
class ClientClose:
    """Close client connection `conn`. Without `abort`, after everything written to it;
    with `abort`, drop what its socket has not taken yet, write `last` (the reason) after
    what it has, and cut the connection if the client does not read that in time."""

    conn: int
    abort: bool = False
    last: bytes = b""


@dataclass(frozen=True, slots=True)
class ClientReading:
    """Stop (`paused`) or resume reading connection `conn`: the node holds as many of its
    bytes as it takes now. A paused connection's bytes wait in its socket, so a client
    that sends faster than the daemon takes is slowed by TCP, not buffered."""

    conn: int
    paused: bool


@dataclass(frozen=True, slots=True)
class DaemonEvent:
    """A state change for the log: `name` and its fields (JSON-ready values)."""

    name: str
    fields: Mapping[str, object] = field(default_factory=dict)
    level: Literal["info", "warning", "error"] = "info"


# the replication engine's stream and file work passes through unchanged
ReplicationWork = OpenStream | StreamSend | CloseStream | HashFile | BeginCopy | Finalize
DaemonEffect = Transmit | ClientWrite | ClientClose | ClientReading | DaemonEvent | ReplicationWork
