"""The one exception hierarchy of meshcast, split by who is to blame."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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


class StreamFailed(RemoteProtocolError):
    """A secure bulk stream between daemons failed; `cause` names why (docs/security.md,
    "Bulk streams": malformed, unknown_key, bad_handshake, unexpected_peer, forged,
    protocol, truncated, timeout, unreachable)."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


class StreamTruncated(StreamFailed):
    """The stream's connection ended without the peer's authenticated CLOSE: the data
    received may be incomplete (peer crashed, connection cut, or an attacker reset it)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "truncated")


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One mistake in a configuration: the field it is in and what is wrong."""

    message: str
    key: str = ""  # key path in the file: ``daemons[2].port``; "" for the whole file
    source: str = ""  # the file (or "<embedded default>"); "" when not from a file

    def __str__(self) -> str:
        where = ":".join(part for part in (self.source, self.key) if part)
        return f"{where}: {self.message}" if where else self.message


class ConfigError(MeshcastError):
    """Invalid configuration, raised at start-up, naming the offending key.

    `problems` lists every mistake found (a file is checked as a whole); `key` and
    `source` are those of the first, so code that handles one error keeps working.
    ``ConfigError(message, key=..., source=...)`` is an error with one problem;
    ``ConfigError.of(problems)`` one with several.
    """

    def __init__(self, message: str, key: str = "", source: str = "") -> None:
        self._set((ConfigProblem(message, key, source),))

    @classmethod
    def of(cls, problems: Sequence[ConfigProblem]) -> ConfigError:
        """One error carrying every problem in `problems` (at least one)."""
        if not problems:
            raise ValueError("ConfigError.of needs at least one problem")
        error = cls.__new__(cls)
        error._set(tuple(problems))
        return error

    def _set(self, problems: tuple[ConfigProblem, ...]) -> None:
        self.problems = problems
        self.key = problems[0].key
        self.source = problems[0].source
        # one line a problem, each ``source:key: message``, as compilers list errors
        Exception.__init__(self, "\n".join(str(p) for p in problems))


class ReplicationError(MeshcastError):
    """Bulk replication failed on this node: a file could not be read, written or verified."""


class IntegrityError(ReplicationError):
    """Bytes do not match their BLAKE3 hash: a chunk, or a whole file against its manifest's
    digest. `chunks` lists the chunk indices found bad on disk (empty when every chunk matches
    its hash but the whole file does not: a manifest whose digest contradicts its chunks)."""

    def __init__(self, message: str, chunks: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.chunks = chunks


class BlobUnavailable(ReplicationError):
    """A file cannot be used: missing, unreadable or not a regular file; a file name or a
    destination directory that is invalid or not allowed; no space left. The message names
    the path."""


class ClientError(MeshcastError):
    """Client side: daemon unreachable or request rejected."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code
