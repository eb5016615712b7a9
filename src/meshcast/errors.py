"""The one exception hierarchy of meshcast, split by who is to blame."""

from __future__ import annotations


class MeshcastError(Exception):
    """Base of every error meshcast raises on purpose."""


class DecodeError(MeshcastError):
    """Malformed bytes. Raised only by `meshcast.wire` decoders."""


# The wire layer's public name for the same error (issue contract: `WireError`).
WireError = DecodeError


class RemoteProtocolError(MeshcastError):
    """A peer broke the protocol; `code` is what goes back on the wire."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class UsageError(MeshcastError):
    """The local caller misused an API (message too large, send after close...)."""


class MessageTooLarge(UsageError):
    """A message exceeds the configured maximum size."""


class BufferFull(UsageError):
    """A bounded send buffer cannot take the message now; wait until it drains."""


class ConfigError(MeshcastError):
    """Invalid configuration, raised at start-up, naming the offending key."""

    def __init__(self, message: str, key: str = "", source: str = "") -> None:
        where = ":".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {message}" if where else message)
        self.key = key
        self.source = source


class ClientError(MeshcastError):
    """Client side: daemon unreachable or request rejected."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code
