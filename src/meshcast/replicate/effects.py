"""What the replication engine takes and gives: its configuration, a client's request,
the effects its inputs return (stream and file work for the driver, reports for the
client, events for the log) and its statistics. The engine is `meshcast.replicate.engine`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from meshcast.errors import UsageError
from meshcast.ids import NodeId
from meshcast.replicate.manifest import Manifest
from meshcast.replicate.plan import Strategy, Tree, Variant

__all__ = [
    "BeginCopy",
    "CloseStream",
    "Finalize",
    "HashFile",
    "OpenStream",
    "RecipientReport",
    "ReplicationEffect",
    "ReplicationEvent",
    "ReplicationReport",
    "ReplicationRequest",
    "ReplicationUpdate",
    "ReplicatorConfig",
    "ReplicatorStats",
    "SendControl",
    "StreamSend",
]


# ---------------------------------------------------------------- configuration, requests


@dataclass(frozen=True, slots=True)
class ReplicatorConfig:
    """`rate`: bytes/s this node uploads for replication at most (None: no cap; a request's
    rate caps it further). `window_chunks`: chunks handed to one stream's driver before it
    says they left (bounds what waits in user space, and keeps the write order the wire
    order). `give_up_after`: an origin ends a replication that made no progress that long.
    `stall_after`: s without progress after which `Replicator.transfers()` calls a transfer
    stalled, naming the peers it waits on.
    """

    rate: float | None = None
    window_chunks: int = 2
    progress_interval: float = 0.25
    give_up_after: float = 120.0
    max_transfers: int = 64
    max_streams: int = 4096
    burst_seconds: float = 0.005
    stall_after: float = 10.0

    def __post_init__(self) -> None:
        if self.rate is not None and not self.rate > 0:
            raise UsageError("replication rate must be positive")
        if self.window_chunks < 1 or self.max_transfers < 1 or self.max_streams < 1:
            raise UsageError("replication window and limits must be at least 1")
        if not (self.progress_interval > 0 and self.give_up_after > 0 and self.stall_after > 0):
            raise UsageError("replication intervals must be positive")


@dataclass(frozen=True, slots=True)
class ReplicationRequest:
    """What a client asks the origin daemon: send the file at `path` to `recipients`."""

    path: str
    recipients: tuple[NodeId, ...]
    strategy: Strategy = Strategy.FASTREPLICA
    max_connections: int = 9
    variant: Variant = Variant.K1
    tree: Tree = Tree.CHAIN
    capacity_aware: bool = False
    rate: float | None = None  # bytes/s per sender; None: the daemons' own caps
    dest: str = ""  # directory on each recipient; "": its default
    buddy: NodeId | None = (
        None  # a daemon holding the same file that repairs failures in the origin's place
    )


# ---------------------------------------------------------------- effects


@dataclass(frozen=True, slots=True)
class HashFile:
    """Hash the origin's file (`meshcast.runtime.blob_store.hash_file`), then call
    `hashed(rid, manifest or error)`."""

    rid: int
    path: str


@dataclass(frozen=True, slots=True)
class OpenStream:
    """Open secure stream `stream` to `peer`. Sends may follow at once: the driver keeps
    them until the stream is up (or reports `stream_closed` with an error)."""

    stream: int
    peer: NodeId


@dataclass(frozen=True, slots=True)
class StreamSend:
    """Write `parts` to `stream`, in order (a chunk's header, then its data unchanged)."""

    stream: int
    parts: tuple[bytes | memoryview, ...]


@dataclass(frozen=True, slots=True)
class CloseStream:
    """Close `stream` after what was sent on it (`abort`: at once, dropping the rest)."""

    stream: int
    abort: bool = False


@dataclass(frozen=True, slots=True)
class SendControl:
    dest: NodeId
    payload: bytes


@dataclass(frozen=True, slots=True)
class BeginCopy:
    """Open (or resume) the copy of `manifest` in `dest` (`ChunkStore.begin`, in a worker
    thread: resuming re-hashes what a partial file holds), then call `begun`."""

    rid: int
    manifest: Manifest
    dest: str | None


@dataclass(frozen=True, slots=True)
class Finalize:
    """Every chunk of `digest` is written: check the whole file, rename it into place (in
    a worker thread: it reads the whole file), then call `finalized`."""

    rid: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class RecipientReport:
    node: NodeId
    state: Literal["waiting", "receiving", "verifying", "complete", "failed"]
    held_bytes: int
    bad_chunks: int
    rate: float  # bytes/s over the last reports
    eta: float | None  # s, at that rate
    detail: str
    path: str  # where the complete copy is on that daemon ("" until then)
    stalled: float | None = None  # s since its last progress report, once stall_after


@dataclass(frozen=True, slots=True)
class ReplicationReport:
    rid: int
    name: str
    size: int
    digest: str  # hex
    state: Literal["hashing", "running", "complete", "failed"]
    elapsed: float
    recipients: tuple[RecipientReport, ...]
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ReplicationUpdate:
    """Progress of a replication this node originated; `final` once it ended."""

    rid: int
    report: ReplicationReport
    final: bool


@dataclass(frozen=True, slots=True)
class ReplicationEvent:
    name: str
    fields: Mapping[str, object] = field(default_factory=dict)
    level: Literal["info", "warning", "error"] = "info"


ReplicationEffect = (
    HashFile
    | BeginCopy
    | OpenStream
    | StreamSend
    | CloseStream
    | SendControl
    | Finalize
    | ReplicationUpdate
    | ReplicationEvent
)


@dataclass(frozen=True, slots=True)
class ReplicatorStats:
    replications_started: int
    replications_completed: int
    replications_failed: int
    copies_completed: int
    copies_failed: int
    chunks_received: int
    chunks_duplicate: int
    chunks_bad: int
    reports_stale: int
    repairs_sent: int
    chunks_sent: int
    bytes_received: int
    bytes_sent: int
    bytes_skipped: int
    streams_opened: int
    streams_accepted: int
    streams_failed: int
    streams_refused: int
    malformed: int
    suspects: int  # streams that broke before their end (their peer may have failed)
    repairs_opened: int  # feeds sent in place of a failed node's
    feeds_retried: int  # broken feeds opened again
    transfers: int
    streams: int
