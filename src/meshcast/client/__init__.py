"""Client library: the asyncio API over the client protocol (docs/client-api.md).

``meshcast.connect`` is `connect` here; `meshcast.client.blocking.connect` is the
blocking wrapper for scripts.
"""

from meshcast.client.connection import (
    DEFAULT_QUEUE_SIZE,
    DEFAULT_TIMEOUT,
    AccessDenied,
    Address,
    Busy,
    Client,
    ClientStatistics,
    Event,
    RequestRejected,
    Unauthenticated,
    connect,
    parse_address,
    service_level,
)
from meshcast.client.replication import (
    RecipientProgress,
    Replication,
    ReplicationFailed,
    ReplicationReport,
)
from meshcast.errors import ClientError, MessageTooLarge, UsageError
from meshcast.wire.client import (
    BlobHeld,
    BlobMissing,
    Cause,
    DaemonLimits,
    ErrorCode,
    Membership,
    Message,
    ServiceLevel,
    SlowReceiverPolicy,
    ViewId,
)

__all__ = [
    "DEFAULT_QUEUE_SIZE",
    "DEFAULT_TIMEOUT",
    "AccessDenied",
    "Address",
    "BlobHeld",
    "BlobMissing",
    "Busy",
    "Cause",
    "Client",
    "ClientError",
    "ClientStatistics",
    "DaemonLimits",
    "ErrorCode",
    "Event",
    "Membership",
    "Message",
    "MessageTooLarge",
    "RecipientProgress",
    "Replication",
    "ReplicationFailed",
    "ReplicationReport",
    "RequestRejected",
    "ServiceLevel",
    "SlowReceiverPolicy",
    "Unauthenticated",
    "UsageError",
    "ViewId",
    "connect",
    "parse_address",
    "service_level",
]
