"""meshcast: reliable group communication and bulk data replication over an overlay of daemons.

The client API is re-exported here and imported on first use, so ``import meshcast``
stays fast::

    import meshcast
    async with await meshcast.connect("unix:/tmp/meshcast-D1.sock", name="alice") as c:
        await c.join("chat")
        await c.multicast("chat", b"hello", service=meshcast.AGREED, msg_type=7)
        async for event in c:  # meshcast.Message | meshcast.Membership | meshcast.BlobHeld
            ...
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from meshcast.errors import (
    BufferFull,
    ClientError,
    ConfigError,
    DecodeError,
    MeshcastError,
    MessageTooLarge,
    RemoteProtocolError,
    UsageError,
    WireError,
)

if TYPE_CHECKING:
    from meshcast.client.connection import (
        AccessDenied,
        Busy,
        Client,
        RequestRejected,
        Unauthenticated,
        connect,
    )
    from meshcast.client.replication import (
        RecipientProgress,
        Replication,
        ReplicationFailed,
        ReplicationReport,
    )
    from meshcast.wire.client import (
        BlobHeld,
        BlobMissing,
        Cause,
        ErrorCode,
        Membership,
        Message,
        ServiceLevel,
        SlowReceiverPolicy,
        ViewId,
    )

    UNRELIABLE = ServiceLevel.UNRELIABLE
    RELIABLE = ServiceLevel.RELIABLE
    FIFO = ServiceLevel.FIFO
    CAUSAL = ServiceLevel.CAUSAL
    AGREED = ServiceLevel.AGREED
    SAFE = ServiceLevel.SAFE

__version__ = "0.1.0"

_LAZY = {
    "connect": "meshcast.client.connection",
    "Client": "meshcast.client.connection",
    "RequestRejected": "meshcast.client.connection",
    "AccessDenied": "meshcast.client.connection",
    "Busy": "meshcast.client.connection",
    "Unauthenticated": "meshcast.client.connection",
    "Replication": "meshcast.client.replication",
    "ReplicationFailed": "meshcast.client.replication",
    "ReplicationReport": "meshcast.client.replication",
    "RecipientProgress": "meshcast.client.replication",
    "BlobHeld": "meshcast.wire.client",
    "BlobMissing": "meshcast.wire.client",
    "Cause": "meshcast.wire.client",
    "ErrorCode": "meshcast.wire.client",
    "Membership": "meshcast.wire.client",
    "Message": "meshcast.wire.client",
    "ServiceLevel": "meshcast.wire.client",
    "SlowReceiverPolicy": "meshcast.wire.client",
    "ViewId": "meshcast.wire.client",
}
_SERVICE_LEVELS = ("UNRELIABLE", "RELIABLE", "FIFO", "CAUSAL", "AGREED", "SAFE")


def __getattr__(name: str) -> object:
    """Import the client API on first use (PEP 562)."""
    if name in _SERVICE_LEVELS:
        value: object = importlib.import_module("meshcast.wire.client").ServiceLevel[name]
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'meshcast' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SERVICE_LEVELS))


__all__ = [
    "AGREED",
    "CAUSAL",
    "FIFO",
    "RELIABLE",
    "SAFE",
    "UNRELIABLE",
    "AccessDenied",
    "BlobHeld",
    "BlobMissing",
    "BufferFull",
    "Busy",
    "Cause",
    "Client",
    "ClientError",
    "ConfigError",
    "DecodeError",
    "ErrorCode",
    "Membership",
    "MeshcastError",
    "Message",
    "MessageTooLarge",
    "RecipientProgress",
    "RemoteProtocolError",
    "Replication",
    "ReplicationFailed",
    "ReplicationReport",
    "RequestRejected",
    "ServiceLevel",
    "SlowReceiverPolicy",
    "Unauthenticated",
    "UsageError",
    "ViewId",
    "WireError",
    "__version__",
    "connect",
]
