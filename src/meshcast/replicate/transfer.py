"""A daemon's state in one replication, as the engine keeps it: the transfer (what it
holds, its feeds, its inbound streams), each feed's cursor over its chunks, the origin's
view of each recipient, and the framing of stream messages. Only
`meshcast.replicate.engine` changes these objects."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from meshcast.errors import DecodeError
from meshcast.ids import NodeId
from meshcast.replicate.manifest import Manifest
from meshcast.replicate.messages import MAX_STREAM_MESSAGE, Offer, ReceiverState
from meshcast.replicate.plan import Feed, Plan

__all__ = [
    "STATE_NAME",
    "STATE_RANK",
    "Deframer",
    "FeedOut",
    "Recipient",
    "RecipientState",
    "Transfer",
    "merged_ranges",
    "ranges_of",
]


RecipientState = Literal["waiting", "receiving", "verifying", "complete", "failed"]
STATE_NAME: dict[ReceiverState, RecipientState] = {
    ReceiverState.RECEIVING: "receiving",
    ReceiverState.VERIFYING: "verifying",
    ReceiverState.COMPLETE: "complete",
    ReceiverState.FAILED: "failed",
}
# how far a copy has come (a report of a lower rank than the last one is older)
STATE_RANK = {
    ReceiverState.RECEIVING: 0,
    ReceiverState.VERIFYING: 1,
    ReceiverState.COMPLETE: 2,
    ReceiverState.FAILED: 2,
}


class Deframer:
    """Cuts a byte stream into `length u32 | type u8 | body` messages, bounded in size."""

    __slots__ = ("_need", "_parts", "_size")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._need = 0  # bytes of the message being collected (0: its header not read yet)

    @property
    def buffered(self) -> int:
        return self._size

    def feed(self, data: bytes) -> list[memoryview]:
        """Messages completed by `data` (type + body, each a view of an immutable buffer).
        Raises DecodeError for a message over MAX_STREAM_MESSAGE."""
        self._parts.append(data)
        self._size += len(data)
        frames: list[memoryview] = []
        while True:
            if not self._need:
                if self._size < 4:
                    return frames
                head = self._take_prefix(4)
                length = int.from_bytes(head[:4], "big")
                if not 1 <= length <= MAX_STREAM_MESSAGE:
                    raise DecodeError(f"stream message of {length} bytes")
                self._need = length
            if self._size < self._need:
                return frames
            frames.append(self._take(self._need))
            self._need = 0

    def _take_prefix(self, n: int) -> bytes:
        joined = b"".join(self._parts) if len(self._parts) > 1 else self._parts[0]
        self._parts = [joined[n:]] if len(joined) > n else []
        self._size -= n
        return joined[:n]

    def _take(self, n: int) -> memoryview:
        first = self._parts[0]
        if len(first) >= n:  # the common case: one read held the whole message
            rest = first[n:]
            self._parts[0:1] = [rest] if rest else []
            self._size -= n
            return memoryview(first)[:n]
        joined = b"".join(self._parts)
        self._parts = [joined[n:]] if len(joined) > n else []
        self._size -= n
        return memoryview(joined)[:n]


def merged_ranges(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Ranges in order with adjacent ones joined (a feed's consecutive subfiles)."""
    out: list[tuple[int, int]] = []
    for first, end in ranges:
        if out and out[-1][1] == first:
            out[-1] = (out[-1][0], end)
        else:
            out.append((first, end))
    return tuple(out)


def ranges_of(chunks: Iterable[int]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for c in sorted(chunks):
        if out and out[-1][1] == c:
            out[-1] = (out[-1][0], c + 1)
        else:
            out.append((c, c + 1))
    return tuple(out)


class FeedOut:
    """One feed this node sends: a stream to its receiver and a cursor over its chunks."""

    __slots__ = (
        "after_complete",
        "attempts",
        "checked",
        "cursor",
        "ended",
        "failed",
        "feed",
        "in_heap",
        "outstanding",
        "priority",
        "progress_at",
        "range_index",
        "ranges",
        "remote",
        "remote_known",
        "retry_at",
        "sent_bytes",
        "stream",
        "transfer",
        "weight",
    )

    def __init__(
        self, transfer: Transfer, feed: Feed, stream: int, ranges: tuple[tuple[int, int], ...]
    ) -> None:
        self.transfer = transfer
        self.feed = feed
        self.stream = stream
        self.ranges = ranges
        self.range_index = 0
        self.cursor = ranges[0][0] if ranges else 0
        self.priority = feed.priority
        self.after_complete = feed.after_complete
        manifest = transfer.manifest
        self.weight = max(1, sum(manifest.range_bytes(a, b) for a, b in ranges))
        self.sent_bytes = 0
        self.outstanding = 0
        self.remote: bytearray | None = None  # chunks the receiver holds (its HAVE)
        self.remote_known = False
        self.ended = False
        self.failed = False
        self.in_heap = False
        self.checked = 0  # how many of the feed's chunks, in order, are known to be held
        self.attempts = 0  # times this feed was opened again after its stream broke
        self.retry_at: float | None = None  # when to open it again (its stream broke)
        self.progress_at = 0.0  # when its receiver last took something (HAVE, a drain)

    def next_chunk(self) -> int | None:
        """The next chunk to send (skipping what the receiver holds), None when done."""
        while self.range_index < len(self.ranges):
            end = self.ranges[self.range_index][1]
            while self.cursor < end:
                if self.remote is None or not self.remote[self.cursor]:
                    return self.cursor
                self.cursor += 1
            self.range_index += 1
            if self.range_index < len(self.ranges):
                self.cursor = self.ranges[self.range_index][0]
        return None

    def chunks(self) -> Iterable[int]:
        for first, end in self.ranges:
            yield from range(first, end)


@dataclass(slots=True)
class Recipient:
    node: NodeId
    state: Literal["waiting", "receiving", "verifying", "complete", "failed"] = "waiting"
    held_bytes: int = 0
    bad_chunks: int = 0
    detail: str = ""
    path: str = ""
    rate: float = 0.0
    last_at: float | None = None
    rank: int = -1  # STATE_RANK of the latest report taken
    departed: bool = False  # left the view before its copy was complete


class Transfer:
    """This node's part in one replication."""

    def __init__(
        self,
        rid: int,
        manifest: Manifest,
        plan: Plan,
        *,
        rate: float,
        dest: str,
        origin: bool,
        now: float,
        buddy: bool = False,
    ) -> None:
        self.rid = rid
        self.manifest = manifest
        self.plan = plan
        self.spec = plan.spec
        self.rate = rate  # bytes/s cap of the request, 0 = none
        self.dest = dest
        self.is_origin = origin
        self.is_buddy = buddy  # a mirror of the origin's file, for repairs
        self.source = ""  # the buddy's mirror: the path of the file on its host
        self.held = bytearray(manifest.chunk_count)
        self.held_count = 0
        self.held_bytes = 0
        self.bad_chunks = 0
        self.state = ReceiverState.RECEIVING
        self.detail = ""
        self.outs: list[FeedOut] = []
        self.ins: set[int] = set()
        self.started = now
        self.last_progress = now
        self.report_due: float | None = None
        self.reported: tuple[ReceiverState, int, int] | None = None  # state, held, bad
        self.path: str | None = None
        # the origin's view of every recipient
        self.recipients: dict[NodeId, Recipient] = {}
        self.finished = False
        self.opening = False  # waiting for `begun`: its streams get their HAVE then
        self.waiting: list[tuple[int, Offer]] = []
        self.bad_from: dict[NodeId, int] = {}  # daemons that sent damaged chunks, how many
        self.fetching: set[int] = set()  # chunks asked for again
        # some feed to this node starts only once its sender holds its subfiles
        self.fed_late = False
        # failures (docs/design/replicate.md, "Failures and repair")
        self.failed: set[NodeId] = set()  # nodes repaired around (suspected or departed)
        self.departed: set[NodeId] = set()  # participants not in the current view
        self.substituted: set[tuple[NodeId, int]] = set()  # (receiver, subfile) fed in repair
        self.retries: list[FeedOut] = []  # broken feeds to open again
        self.done = False  # the origin said the replication is over
        self.last_activity = now
        self.fed_at: dict[NodeId, float] = {}  # feeder -> when its stream last brought data

        self.digest = manifest.digest
        self.store_open = False  # the store has the file open for this transfer

    @property
    def participants(self) -> set[NodeId]:
        """The origin, its buddy and every recipient."""
        nodes = {self.spec.origin, *self.spec.recipients}
        if self.spec.buddy is not None:
            nodes.add(self.spec.buddy)
        return nodes

    @property
    def complete(self) -> bool:
        return self.held_count == self.manifest.chunk_count

    def holds_all(self, out: FeedOut) -> bool:
        """Does this node hold every chunk of `out` (an after-complete feed may start)?
        Chunks held stay held, so the scan resumes where it stopped: linear in all."""
        held = self.held
        position = 0
        for first, end in out.ranges:
            size = end - first
            if out.checked >= position + size:
                position += size
                continue
            for c in range(first + max(0, out.checked - position), end):
                if not held[c]:
                    return False
                out.checked += 1
            position += size
        return True
