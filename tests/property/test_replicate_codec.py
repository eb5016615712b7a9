"""Replication messages: round trips, the decode contract (only DecodeError), and the
engine's stream deframer on arbitrary cuts of a valid stream."""

from __future__ import annotations

import contextlib
import struct
from itertools import pairwise
from typing import Literal

from hypothesis import given
from hypothesis import strategies as st

from meshcast.errors import DecodeError
from meshcast.ids import NodeId
from meshcast.replicate.manifest import MAX_CHUNK_SIZE, Manifest
from meshcast.replicate.messages import (
    Chunk,
    Done,
    End,
    Have,
    Offer,
    Progress,
    Rate,
    ReceiverState,
    RepairAround,
    Suspect,
    decode_control,
    decode_stream_message,
    encode_chunk_head,
    encode_control,
    encode_stream_message,
)
from meshcast.replicate.plan import PlanSpec, Strategy, Tree, Variant
from meshcast.replicate.transfer import Deframer

SURROGATES: tuple[Literal["Cs"]] = ("Cs",)  # not encodable as UTF-8
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=SURROGATES), max_size=40)
U32 = st.integers(0, 0xFFFF_FFFF)
HASH = st.binary(min_size=32, max_size=32)
FLOAT = st.floats(allow_nan=False)  # NaN is never equal to itself: left out of round trips


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    chunk_size = draw(st.sampled_from([1, 3, 4096, 256 * 1024]) | st.integers(1, MAX_CHUNK_SIZE))
    count = draw(st.integers(1, 40))
    low = (count - 1) * chunk_size + 1 if count > 1 else 0
    size = draw(st.integers(low, count * chunk_size))
    hashes = tuple(draw(st.lists(HASH, min_size=count, max_size=count)))
    return Manifest(draw(TEXT), size, chunk_size, hashes, draw(HASH))


def ranges_in(count: int, max_size: int = 8) -> st.SearchStrategy[tuple[tuple[int, int], ...]]:
    pair = st.tuples(st.integers(0, count - 1), st.integers(1, count)).filter(lambda p: p[0] < p[1])
    return st.lists(pair, max_size=max_size).map(tuple)


@st.composite
def specs(draw: st.DrawFn, chunk_count: int) -> PlanSpec:
    recipients = tuple(NodeId(r) for r in draw(st.lists(U32, max_size=12)))
    capacities = draw(
        st.none()
        | st.lists(FLOAT, min_size=len(recipients) + 1, max_size=len(recipients) + 1).map(tuple)
    )
    return PlanSpec(
        origin=NodeId(draw(U32)),
        recipients=recipients,
        chunk_count=chunk_count,
        strategy=draw(st.sampled_from(Strategy)),
        max_connections=draw(st.integers(0, 255)),
        variant=draw(st.sampled_from(Variant)),
        tree=draw(st.sampled_from(Tree)),
        capacities=capacities,
        capacity_aware=draw(st.booleans()),
    )


@st.composite
def offers(draw: st.DrawFn) -> Offer:
    manifest = draw(manifests())
    return Offer(
        rid=draw(st.integers(0, 2**64 - 1)),
        rate=draw(st.floats(min_value=0.0, allow_infinity=False, allow_nan=False)),
        dest=draw(TEXT),
        ranges=draw(ranges_in(manifest.chunk_count)),
        spec=draw(specs(manifest.chunk_count)),
        manifest=manifest,
    )


haves = ranges_in(0xFFFF_FFFF, 20).map(Have)
progresses = st.builds(
    Progress,
    rid=st.integers(0, 2**64 - 1),
    state=st.sampled_from(ReceiverState),
    held_chunks=U32,
    held_bytes=st.integers(0, 2**64 - 1),
    bad_chunks=U32,
    detail=TEXT,
    path=TEXT,
)
chunks = st.builds(Chunk, index=U32, data=st.binary(max_size=300))
stream_messages = st.one_of(offers(), haves, chunks, st.just(End()))


def framed(message: Offer | Have | Chunk | End) -> bytes:
    if isinstance(message, Chunk):
        return encode_chunk_head(message.index, len(message.data)) + bytes(message.data)
    return encode_stream_message(message)


def same(decoded: object, message: object) -> bool:
    if isinstance(message, Chunk):
        return (
            isinstance(decoded, Chunk)
            and decoded.index == message.index
            and bytes(decoded.data) == bytes(message.data)
        )
    return decoded == message


# ---------------------------------------------------------------- round trips


@given(offers())
def test_offer_round_trip(offer: Offer) -> None:
    data = encode_stream_message(offer)
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    assert decode_stream_message(memoryview(data)[4:]) == offer


@given(haves)
def test_have_round_trip(have: Have) -> None:
    assert decode_stream_message(memoryview(encode_stream_message(have))[4:]) == have


@given(chunks)
def test_chunk_round_trip(chunk: Chunk) -> None:
    assert same(decode_stream_message(memoryview(framed(chunk))[4:]), chunk)


@given(progresses)
def test_progress_round_trip(progress: Progress) -> None:
    assert decode_control(encode_control(progress)) == progress


@given(
    st.builds(
        Rate,
        st.integers(0, 2**64 - 1),
        st.floats(min_value=0.0, allow_nan=False, allow_infinity=False),
    )
)
def test_rate_round_trip(rate: Rate) -> None:
    encoded = encode_control(rate)
    assert encoded[:5] == b"MCRP\x15"  # RATE 21
    assert decode_control(encoded) == rate


@given(st.floats(max_value=-1e-300) | st.just(float("inf")) | st.just(float("nan")))
def test_a_rate_that_is_no_cap_is_refused_both_ways(value: float) -> None:
    try:
        encode_control(Rate(1, value))
    except ValueError:
        pass
    else:
        raise AssertionError("encoded a bad rate")
    raw = b"MCRP\x12" + (1).to_bytes(8, "big") + struct.pack("!d", value)
    try:
        decode_control(raw)
    except DecodeError:
        pass
    else:
        raise AssertionError("decoded a bad rate")


# ---------------------------------------------------------------- decode contract


@given(st.binary(max_size=400))
def test_decode_stream_message_raises_only_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_stream_message(memoryview(data))


@given(st.binary(max_size=200))
def test_decode_control_raises_only_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_control(data)
    with contextlib.suppress(DecodeError):
        decode_control(b"MCRP\x10" + data)
    with contextlib.suppress(DecodeError):
        decode_control(b"MCRP\x12" + data)


@given(offers(), st.data())
def test_mutated_offer_raises_only_decode_error(offer: Offer, data: st.DataObject) -> None:
    """Random bytes overwritten, cut or added in a valid OFFER reach deeper than random
    bytes alone."""
    raw = bytearray(encode_stream_message(offer)[4:])
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    tail = data.draw(st.binary(max_size=8))
    with contextlib.suppress(DecodeError):
        decode_stream_message(memoryview(bytes(raw[:cut]) + tail))


@given(progresses, st.data())
def test_mutated_progress_raises_only_decode_error(progress: Progress, data: st.DataObject) -> None:
    raw = bytearray(encode_control(progress))
    at = data.draw(st.integers(4, len(raw) - 1))
    raw[at] = data.draw(st.integers(0, 255))
    with contextlib.suppress(DecodeError):
        decode_control(bytes(raw[: data.draw(st.integers(0, len(raw)))]))


# ---------------------------------------------------------------- the deframer


@st.composite
def cuts(draw: st.DrawFn, total: int) -> list[int]:
    """Increasing cut points inside 0..total."""
    return sorted(set(draw(st.lists(st.integers(0, total), max_size=12))))


@given(st.lists(stream_messages, min_size=1, max_size=6), st.data())
def test_deframer_yields_the_same_messages_whatever_the_cuts(
    messages: list[Offer | Have | Chunk | End], data: st.DataObject
) -> None:
    stream = b"".join(framed(m) for m in messages)
    points = [0, *data.draw(cuts(len(stream))), len(stream)]
    deframer = Deframer()
    decoded: list[object] = []
    for a, b in pairwise(points):
        decoded.extend(decode_stream_message(frame) for frame in deframer.feed(stream[a:b]))
    assert len(decoded) == len(messages)
    assert all(same(d, m) for d, m in zip(decoded, messages, strict=True))
    assert deframer.buffered == 0


@given(st.binary(max_size=300), st.data())
def test_deframer_raises_only_decode_error(garbage: bytes, data: st.DataObject) -> None:
    deframer = Deframer()
    points = [0, *data.draw(cuts(len(garbage))), len(garbage)]
    with contextlib.suppress(DecodeError):
        for a, b in pairwise(points):
            for frame in deframer.feed(garbage[a:b]):
                assert len(frame) >= 1
                with contextlib.suppress(DecodeError):
                    decode_stream_message(frame)
        assert deframer.buffered <= len(garbage)


# ---------------------------------------------------------------- failure controls

node_ids = st.integers(1, 2**32 - 1).map(NodeId)
rids = st.integers(0, 2**64 - 1)


@given(
    st.one_of(
        st.builds(Suspect, rids, node_ids),
        st.builds(RepairAround, rids, st.lists(node_ids, max_size=50).map(tuple)),
        st.builds(Done, rids),
    )
)
def test_failure_controls_round_trip(message: Suspect | RepairAround | Done) -> None:
    """SUSPECT (18), REPAIR (19) and DONE (20) decode to what was encoded, and any cut or
    extended copy is refused with DecodeError only."""
    encoded = encode_control(message)
    kind = {Suspect: 18, RepairAround: 19, Done: 20}[type(message)]
    assert encoded[:5] == b"MCRP" + bytes([kind])
    assert decode_control(encoded) == message
    for broken in (encoded[:-1], encoded + b"\0"):
        with contextlib.suppress(DecodeError):
            decoded = decode_control(broken)
            assert isinstance(decoded, Suspect | RepairAround | Done)
            raise AssertionError(f"{broken!r} decoded to {decoded!r}")
