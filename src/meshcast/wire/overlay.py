"""Overlay messages: what daemons say to each other inside Hop link messages.

Every overlay message starts with one kind byte:

    0x01 LSA       origin u32 | incarnation u32 | seq u32 | view_digest 8s | n u16 |
                   n x (neighbour u32 | weight f64 | bandwidth_bps f64)
    0x02 DATA      source u32 | incarnation u32 | seq u64 | hops u8 | upper u8 | n u16 |
                   n x dest u32 | payload (the rest)
    0x03 FEEDBACK  source u32 | incarnation u32 | highest_delivered u64 | reporter u32 |
                   reporter_incarnation u32

* LSA: a daemon's live overlay links (link-state advertisement), flooded to all daemons;
  `view_digest` is the view the origin has installed, so daemons can tell when they agree.
* DATA: one message from `source` for the explicit list of destination daemons (seed 001,
  claim 4); every daemon on the way splits the list per next hop. `hops` counts links.
  `upper` names the protocol the payload is for at the destination (`Upper`): the daemon
  hands it to that layer without looking inside; forwarders pass it on unread.
* FEEDBACK: a destination tells a source the highest seq of its messages it has delivered,
  for the source's end-to-end window (Spread §2.1: a slow receiver slows the sender).

Decoders raise only `DecodeError`.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache

from meshcast.errors import DecodeError

KIND_LSA = 0x01
KIND_DATA = 0x02
KIND_FEEDBACK = 0x03

LSA_HEAD = struct.Struct("!BIII8sH")
LSA_ENTRY = struct.Struct("!Idd")
DATA_HEAD = struct.Struct("!BIIQBBH")
DEST = struct.Struct("!I")
FEEDBACK = struct.Struct("!BIIQII")

MAX_LSA_ENTRIES = 4096
MAX_DESTS = 4096
MAX_HOPS = 255


@lru_cache(maxsize=64)
def _data_head(n: int) -> struct.Struct:
    """DATA header and `n` destinations, one compiled layout per count (a handful in use)."""
    return struct.Struct(f"{DATA_HEAD.format}{n}I")


@lru_cache(maxsize=64)
def _dests(n: int) -> struct.Struct:
    return struct.Struct(f"!{n}I")


class Upper(IntEnum):
    """The protocol a DATA message's payload is for (its `upper` byte)."""

    RAW = 0  # no daemon layer above: the overlay's own tests and benchmarks
    GROUP = 1  # group communication (meshcast.group)
    PROBE = 2  # the daemon's latency probes
    REPLICATION = 3  # bulk replication (meshcast.replicate)


@dataclass(frozen=True, slots=True)
class LsaEntry:
    neighbour: int
    weight: float
    bandwidth_bps: float


@dataclass(frozen=True, slots=True)
class Lsa:
    origin: int
    incarnation: int
    seq: int
    view_digest: bytes  # 8 bytes; zeros before the first view
    entries: tuple[LsaEntry, ...]


@dataclass(slots=True)  # per message: not frozen, __init__ written out (GroupData)
class Data:
    source: int
    incarnation: int
    seq: int
    hops: int
    upper: int  # an `Upper` value; unknown ones are forwarded and dropped at delivery
    dests: tuple[int, ...]
    payload: bytes

    def __init__(
        self,
        source: int,
        incarnation: int,
        seq: int,
        hops: int,
        upper: int,
        dests: tuple[int, ...],
        payload: bytes,
    ) -> None:
        self.source = source
        self.incarnation = incarnation
        self.seq = seq
        self.hops = hops
        self.upper = upper
        self.dests = dests
        self.payload = payload


@dataclass(frozen=True, slots=True)
class Feedback:
    source: int
    incarnation: int
    highest_delivered: int  # the highest of the source's seqs the reporter delivered
    reporter: int
    reporter_incarnation: int  # a restarted destination counts from 0 again


OverlayMessage = Lsa | Data | Feedback


def encode_lsa(lsa: Lsa) -> bytes:
    if len(lsa.view_digest) != 8:
        raise ValueError("view digest must be 8 bytes")
    parts = [
        LSA_HEAD.pack(
            KIND_LSA, lsa.origin, lsa.incarnation, lsa.seq, lsa.view_digest, len(lsa.entries)
        )
    ]
    parts.extend(LSA_ENTRY.pack(e.neighbour, e.weight, e.bandwidth_bps) for e in lsa.entries)
    return b"".join(parts)


def encode_data_head(
    source: int, incarnation: int, seq: int, hops: int, upper: int, dests: tuple[int, ...]
) -> bytes:
    """Everything of a DATA message but its payload, so a forwarder re-heads without copying twice."""
    if not dests or len(dests) > MAX_DESTS:
        raise ValueError(f"a data message needs 1..{MAX_DESTS} destinations, got {len(dests)}")
    n = len(dests)
    return _data_head(n).pack(KIND_DATA, source, incarnation, seq, hops, upper, n, *dests)


def encode_data(data: Data) -> bytes:
    return (
        encode_data_head(data.source, data.incarnation, data.seq, data.hops, data.upper, data.dests)
        + data.payload
    )


def encode_feedback(feedback: Feedback) -> bytes:
    return FEEDBACK.pack(
        KIND_FEEDBACK,
        feedback.source,
        feedback.incarnation,
        feedback.highest_delivered,
        feedback.reporter,
        feedback.reporter_incarnation,
    )


def decode_overlay(message: bytes) -> OverlayMessage:
    """Parse one overlay message; raises `DecodeError` on anything malformed."""
    if not message:
        raise DecodeError("empty overlay message")
    kind = message[0]
    if kind == KIND_DATA:
        if len(message) < DATA_HEAD.size:
            raise DecodeError("truncated data header")
        _, source, incarnation, seq, hops, upper, n = DATA_HEAD.unpack_from(message)
        if n == 0 or n > MAX_DESTS:
            raise DecodeError(f"data message with {n} destinations")
        end = DATA_HEAD.size + n * DEST.size
        if len(message) < end:
            raise DecodeError("truncated destination list")
        dests = _dests(n).unpack_from(message, DATA_HEAD.size)
        if n > 1 and len(set(dests)) != n:
            raise DecodeError("duplicate destination in a data message")
        return Data(source, incarnation, seq, hops, upper, dests, message[end:])
    if kind == KIND_LSA:
        if len(message) < LSA_HEAD.size:
            raise DecodeError("truncated LSA header")
        _, origin, incarnation, seq, digest, n = LSA_HEAD.unpack_from(message)
        if n > MAX_LSA_ENTRIES:
            raise DecodeError(f"LSA with {n} entries")
        if len(message) != LSA_HEAD.size + n * LSA_ENTRY.size:
            raise DecodeError("LSA length does not match its entry count")
        entries = []
        for i in range(n):
            neighbour, weight, bandwidth = LSA_ENTRY.unpack_from(
                message, LSA_HEAD.size + i * LSA_ENTRY.size
            )
            if not (
                math.isfinite(weight) and weight > 0 and math.isfinite(bandwidth) and bandwidth > 0
            ):
                raise DecodeError(f"LSA entry for {neighbour} has a bad weight or bandwidth")
            entries.append(LsaEntry(neighbour, weight, bandwidth))
        return Lsa(origin, incarnation, seq, digest, tuple(entries))
    if kind == KIND_FEEDBACK:
        if len(message) != FEEDBACK.size:
            raise DecodeError("feedback has the wrong size")
        _, source, incarnation, highest, reporter, reporter_incarnation = FEEDBACK.unpack(message)
        return Feedback(source, incarnation, highest, reporter, reporter_incarnation)
    raise DecodeError(f"unknown overlay message kind 0x{kind:02x}")
