"""Bulk replication messages: on the transfer streams and between daemons.

**Stream messages** travel on a secure stream (`meshcast.link.stream`) from a feeder to a
receiver, one stream per (replication, feeder, receiver). Each is framed as
``length u32 | type u8 | body`` (length counts type and body)::

    OFFER 1   rid u64 | rate f64 | dest str16 | source str16 |
              n u16 | n x (first u32 | end u32) | spec | manifest    feeder -> receiver, first
    HAVE 2    n u32 | n x (first u32 | end u32)                 receiver -> feeder, once
    CHUNK 3   index u32 | data                                  feeder -> receiver
    END 4     (empty)                                           feeder -> receiver, last

    spec      origin u32 | n u32 | n x recipient u32 | chunk_count u32 | strategy u8 |
              max_connections u8 | variant u8 | tree u8 | capacity_aware u8 |
              c u32 | c x capacity f64 | buddy u32   (c = 0: no capacities, else n + 1;
                                                     buddy 0: none)
    manifest  name str16 | size u64 | chunk_size u32 | digest 32 bytes |
              m u32 | m x chunk hash 32 bytes

The OFFER names the chunk ranges this stream will carry; the receiver answers with the
ranges it already holds (a resumed or complete copy), which the feeder skips. `source` is
empty except in the origin's OFFER to its buddy (no ranges): the path of the file there.

**Control messages** travel as overlay DATA with ``upper = REPLICATION`` (reliable on
every hop): ``"MCRP" | type u8 | body``::

    PROGRESS 16  rid u64 | state u8 | held_chunks u32 | held_bytes u64 | bad_chunks u32 |
                 detail str16 | path str16                      recipient -> origin
    FETCH 17     rid u64 | n u16 | n x (first u32 | end u32)    recipient -> a holder
    SUSPECT 18   rid u64 | node u32                             any -> origin (or buddy)
    REPAIR 19    rid u64 | n u16 | n x node u32                 origin (or buddy) -> all
    DONE 20      rid u64                                        origin -> all
    RATE 21      rid u64 | rate f64                             origin -> every participant

FETCH asks a daemon that holds the chunks (the origin) to send them again on a new stream
(a chunk that arrived damaged). SUSPECT tells the origin that a stream with `node` broke
before its end (it may have failed); the origin (the buddy, when the suspect is the origin)
answers every participant with REPAIR: the nodes to repair around. DONE: the replication
is over, its participants may forget it. RATE is the replication's new upload cap per
sender in bytes/s (0: none), which each participant applies to its feeds of it at once.

`decode_*` raise only `DecodeError`; `encode_*` refuse (`ValueError`) what they would refuse.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from meshcast.errors import DecodeError, UsageError
from meshcast.ids import NodeId
from meshcast.replicate.manifest import HASH_SIZE, MAX_CHUNK_SIZE, MAX_CHUNKS, Manifest
from meshcast.replicate.plan import PlanSpec, Strategy, Tree, Variant

__all__ = [
    "CONTROL_MAGIC",
    "FRAME_HEADER",
    "MAX_RECIPIENTS",
    "MAX_STREAM_MESSAGE",
    "Chunk",
    "ControlType",
    "Done",
    "End",
    "Fetch",
    "Have",
    "Offer",
    "Progress",
    "Rate",
    "ReceiverState",
    "RepairAround",
    "StreamMessage",
    "StreamType",
    "Suspect",
    "decode_control",
    "decode_stream_message",
    "encode_chunk_head",
    "encode_control",
    "encode_stream_message",
]

CONTROL_MAGIC = b"MCRP"
FRAME_HEADER = 5  # length u32 + type u8
MAX_RECIPIENTS = 65_535
MAX_RANGES = 65_535
# the largest stream message a receiver buffers: a CHUNK of the largest chunk size (an
# OFFER's manifest and plan take at most about 3 MiB)
MAX_STREAM_MESSAGE = MAX_CHUNK_SIZE + 16

_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_F64 = struct.Struct("!d")
_RANGE = struct.Struct("!II")
_HEAD = struct.Struct("!IB")
_CHUNK_HEAD = struct.Struct("!IBI")
_PROGRESS = struct.Struct("!QBIQI")


class StreamType(IntEnum):
    OFFER = 1
    HAVE = 2
    CHUNK = 3
    END = 4


class ControlType(IntEnum):
    PROGRESS = 16
    FETCH = 17
    SUSPECT = 18
    REPAIR = 19
    DONE = 20
    RATE = 21


class ReceiverState(IntEnum):
    RECEIVING = 1  # chunks are arriving
    VERIFYING = 2  # all chunks held: the whole file is being checked and renamed into place
    COMPLETE = 3  # the file is in place and its digest checked
    FAILED = 4  # the copy cannot complete (the detail says why)


Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Offer:
    rid: int
    rate: float  # bytes/s each sender may upload for this replication; 0 = no cap
    dest: str  # destination directory on the receiver; "" = its default
    ranges: Ranges  # the chunks this stream carries
    spec: PlanSpec
    manifest: Manifest
    source: str = ""  # to the buddy only: the file's path (it holds a mirror there)


@dataclass(frozen=True, slots=True)
class Have:
    ranges: Ranges


@dataclass(frozen=True, slots=True)
class Chunk:
    index: int
    data: memoryview | bytes


@dataclass(frozen=True, slots=True)
class End:
    pass


StreamMessage = Offer | Have | Chunk | End


@dataclass(frozen=True, slots=True)
class Progress:
    rid: int
    state: ReceiverState
    held_chunks: int
    held_bytes: int
    bad_chunks: int
    detail: str = ""
    path: str = ""  # where the complete copy is


@dataclass(frozen=True, slots=True)
class Fetch:
    rid: int
    ranges: Ranges


@dataclass(frozen=True, slots=True)
class Suspect:
    rid: int
    node: NodeId  # a stream with it broke before its end


@dataclass(frozen=True, slots=True)
class RepairAround:
    rid: int
    failed: tuple[NodeId, ...]  # every node the replication now repairs around


@dataclass(frozen=True, slots=True)
class Done:
    rid: int


@dataclass(frozen=True, slots=True)
class Rate:
    rid: int
    rate: float  # bytes/s each sender may upload for this replication; 0 = no cap


Control = Progress | Fetch | Suspect | RepairAround | Done | Rate


# ---------------------------------------------------------------- encoding


def _str16(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 0xFFFF:
        raise ValueError("string longer than 65535 bytes")
    return _U16.pack(len(raw)) + raw


def _ranges32(ranges: Ranges, count: struct.Struct) -> bytes:
    if len(ranges) > MAX_RANGES:
        raise ValueError("too many ranges")
    parts = [count.pack(len(ranges))]
    for first, end in ranges:
        if not 0 <= first < end <= 0xFFFF_FFFF:
            raise ValueError(f"bad range {first}..{end}")
        parts.append(_RANGE.pack(first, end))
    return b"".join(parts)


def _spec(spec: PlanSpec) -> bytes:
    if len(spec.recipients) > MAX_RECIPIENTS:
        raise ValueError("too many recipients")
    caps = spec.capacities or ()
    if caps and len(caps) != len(spec.recipients) + 1:
        raise ValueError("capacities must list the origin and every recipient")
    return b"".join(
        [
            _U32.pack(spec.origin),
            _U32.pack(len(spec.recipients)),
            b"".join(_U32.pack(r) for r in spec.recipients),
            _U32.pack(spec.chunk_count),
            bytes(
                [
                    list(Strategy).index(spec.strategy),
                    spec.max_connections,
                    int(spec.variant),
                    list(Tree).index(spec.tree),
                    int(spec.capacity_aware),
                ]
            ),
            _U32.pack(len(caps)),
            b"".join(_F64.pack(c) for c in caps),
            _U32.pack(spec.buddy or 0),
        ]
    )


def _manifest(manifest: Manifest) -> bytes:
    return b"".join(
        [
            _str16(manifest.name),
            _U64.pack(manifest.size),
            _U32.pack(manifest.chunk_size),
            manifest.digest,
            _U32.pack(manifest.chunk_count),
            *manifest.chunk_hashes,
        ]
    )


def _frame(kind: StreamType, body: bytes) -> bytes:
    return _HEAD.pack(len(body) + 1, kind) + body


def encode_stream_message(message: Offer | Have | End) -> bytes:
    """One framed stream message (CHUNK: `encode_chunk_head`, then the data itself)."""
    match message:
        case Offer():
            body = b"".join(
                [
                    _U64.pack(message.rid),
                    _F64.pack(message.rate),
                    _str16(message.dest),
                    _str16(message.source),
                    _ranges32(message.ranges, _U16),
                    _spec(message.spec),
                    _manifest(message.manifest),
                ]
            )
            if len(body) + 1 > MAX_STREAM_MESSAGE:
                raise ValueError("OFFER too large")
            return _frame(StreamType.OFFER, body)
        case Have():
            return _frame(StreamType.HAVE, _ranges32(message.ranges, _U32))
        case End():
            return _frame(StreamType.END, b"")
    raise ValueError(f"not a stream message: {message!r}")  # pragma: no cover


def encode_chunk_head(index: int, length: int) -> bytes:
    """The frame header and index of a CHUNK of `length` data bytes (the data follows
    as a separate buffer: it is never copied into the frame)."""
    if length > MAX_CHUNK_SIZE:
        raise ValueError("chunk too large")
    return _CHUNK_HEAD.pack(length + 5, StreamType.CHUNK, index)


def encode_control(message: Control) -> bytes:
    match message:
        case Suspect(rid, node):
            return CONTROL_MAGIC + _U8.pack(ControlType.SUSPECT) + _U64.pack(rid) + _U32.pack(node)
        case RepairAround(rid, failed):
            if len(failed) > MAX_RECIPIENTS:
                raise ValueError("too many failed nodes")
            return b"".join(
                [
                    CONTROL_MAGIC,
                    _U8.pack(ControlType.REPAIR),
                    _U64.pack(rid),
                    _U16.pack(len(failed)),
                    *(_U32.pack(node) for node in failed),
                ]
            )
        case Done(rid):
            return CONTROL_MAGIC + _U8.pack(ControlType.DONE) + _U64.pack(rid)
    if isinstance(message, Rate):
        if not (0.0 <= message.rate < float("inf")):
            raise ValueError(f"bad rate {message.rate}")
        return (
            CONTROL_MAGIC
            + _U8.pack(ControlType.RATE)
            + _U64.pack(message.rid)
            + _F64.pack(message.rate)
        )
    if isinstance(message, Fetch):
        return (
            CONTROL_MAGIC
            + _U8.pack(ControlType.FETCH)
            + _U64.pack(message.rid)
            + _ranges32(message.ranges, _U16)
        )
    return (
        CONTROL_MAGIC
        + _U8.pack(ControlType.PROGRESS)
        + _PROGRESS.pack(
            message.rid,
            message.state,
            message.held_chunks,
            message.held_bytes,
            message.bad_chunks,
        )
        + _str16(message.detail)
        + _str16(message.path)
    )


# ---------------------------------------------------------------- decoding


class _Reader:
    __slots__ = ("_data", "_pos")

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int) -> memoryview:
        end = self._pos + n
        if end > len(self._data):
            raise DecodeError("message truncated")
        view = self._data[self._pos : end]
        self._pos = end
        return view

    def unpack(self, fmt: struct.Struct) -> tuple[int | float, ...]:
        return fmt.unpack(self.take(fmt.size))

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(self.unpack(_U16)[0])

    def u32(self) -> int:
        return int(self.unpack(_U32)[0])

    def u64(self) -> int:
        return int(self.unpack(_U64)[0])

    def f64(self) -> float:
        return float(self.unpack(_F64)[0])

    def str16(self) -> str:
        raw = self.take(self.u16())
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError("string is not UTF-8") from exc

    def count(self, n: int, each: int) -> int:
        if n * each > len(self._data) - self._pos:
            raise DecodeError(f"count {n} beyond the message")
        return n

    def ranges(self, n: int) -> Ranges:
        self.count(n, _RANGE.size)
        out = []
        for _ in range(n):
            first, end = self.unpack(_RANGE)
            if not first < end:
                raise DecodeError(f"empty or inverted range {first}..{end}")
            out.append((int(first), int(end)))
        return tuple(out)

    def rest(self) -> memoryview:
        return self._data[self._pos :]

    def done(self) -> None:
        if self._pos != len(self._data):
            raise DecodeError(f"{len(self._data) - self._pos} bytes after the message")


def _decode_spec(r: _Reader) -> PlanSpec:
    origin = r.u32()
    recipients = tuple(NodeId(r.u32()) for _ in range(r.count(r.u32(), 4)))
    chunk_count = r.u32()
    strategy, max_connections, variant, tree, aware = (r.u8() for _ in range(5))
    caps = tuple(r.f64() for _ in range(r.count(r.u32(), 8)))
    buddy = r.u32()
    try:
        return PlanSpec(
            origin=NodeId(origin),
            recipients=recipients,
            chunk_count=chunk_count,
            strategy=list(Strategy)[strategy],
            max_connections=max_connections,
            variant=Variant(variant),
            tree=list(Tree)[tree],
            capacities=caps or None,
            capacity_aware=bool(aware),
            buddy=NodeId(buddy) if buddy else None,
        )
    except (IndexError, ValueError) as exc:
        raise DecodeError(f"bad plan spec: {exc}") from exc


def _decode_manifest(r: _Reader) -> Manifest:
    name = r.str16()
    size = r.u64()
    chunk_size = r.u32()
    digest = bytes(r.take(HASH_SIZE))
    count = r.count(r.u32(), HASH_SIZE)
    if count > MAX_CHUNKS:
        raise DecodeError(f"{count} chunks, more than {MAX_CHUNKS}")
    hashes = tuple(bytes(r.take(HASH_SIZE)) for _ in range(count))
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise DecodeError(f"chunk size {chunk_size}")
    try:
        return Manifest(name, size, chunk_size, hashes, digest)
    except UsageError as exc:  # (the manifest's own check: hashes that do not cover size)
        raise DecodeError(str(exc)) from exc


def decode_stream_message(frame: memoryview) -> StreamMessage:
    """One stream message from `frame` = type u8 | body (the length prefix removed).
    A CHUNK's data is a slice of `frame` (no copy)."""
    if not frame:
        raise DecodeError("empty stream message")
    kind = frame[0]
    r = _Reader(frame[1:])
    if kind == StreamType.CHUNK:
        index = r.u32()
        return Chunk(index, r.rest())
    if kind == StreamType.HAVE:
        have = Have(r.ranges(r.u32()))
        r.done()
        return have
    if kind == StreamType.END:
        r.done()
        return End()
    if kind == StreamType.OFFER:
        rid = r.u64()
        rate = r.f64()
        if not rate >= 0.0 or rate == float("inf"):
            raise DecodeError(f"bad rate {rate}")
        dest = r.str16()
        source = r.str16()
        ranges = r.ranges(r.u16())
        offer = Offer(rid, rate, dest, ranges, _decode_spec(r), _decode_manifest(r), source)
        r.done()
        if offer.spec.chunk_count != offer.manifest.chunk_count:
            raise DecodeError("plan and manifest disagree on the chunk count")
        if any(end > offer.manifest.chunk_count for _, end in ranges):
            raise DecodeError("range beyond the file")
        return offer
    raise DecodeError(f"unknown stream message type {kind}")


def decode_control(payload: bytes | memoryview) -> Control:
    view = memoryview(payload)
    if bytes(view[:4]) != CONTROL_MAGIC:
        raise DecodeError("not a replication control message")
    r = _Reader(view[4:])
    kind = r.u8()
    if kind == ControlType.FETCH:
        fetch = Fetch(r.u64(), r.ranges(r.u16()))
        r.done()
        return fetch
    if kind == ControlType.SUSPECT:
        suspect = Suspect(r.u64(), NodeId(r.u32()))
        r.done()
        return suspect
    if kind == ControlType.REPAIR:
        repaired = r.u64()
        failed = tuple(NodeId(r.u32()) for _ in range(r.count(r.u16(), 4)))
        repair = RepairAround(repaired, failed)
        r.done()
        return repair
    if kind == ControlType.DONE:
        done = Done(r.u64())
        r.done()
        return done
    if kind == ControlType.RATE:
        message = Rate(r.u64(), r.f64())
        r.done()
        if not message.rate >= 0.0 or message.rate == float("inf"):
            raise DecodeError(f"bad rate {message.rate}")
        return message
    if kind != ControlType.PROGRESS:
        raise DecodeError(f"unknown control message type {kind}")
    rid, state, held_chunks, held_bytes, bad = r.unpack(_PROGRESS)
    detail = r.str16()
    path = r.str16()
    r.done()
    try:
        return Progress(
            int(rid),
            ReceiverState(int(state)),
            int(held_chunks),
            int(held_bytes),
            int(bad),
            detail,
            path,
        )
    except ValueError as exc:
        raise DecodeError(f"bad receiver state {state}") from exc
