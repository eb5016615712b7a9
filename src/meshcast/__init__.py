"""meshcast: reliable group communication and bulk data replication over an overlay of daemons."""

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

__version__ = "0.1.0"

__all__ = [
    "BufferFull",
    "ClientError",
    "ConfigError",
    "DecodeError",
    "MeshcastError",
    "MessageTooLarge",
    "RemoteProtocolError",
    "UsageError",
    "WireError",
    "__version__",
]
