"""Replication messages: golden bytes written out from the module docstring's format, and one
test per way a message can be malformed (each raises DecodeError, nothing else)."""

from __future__ import annotations

import struct

import pytest

from meshcast.errors import DecodeError
from meshcast.ids import NodeId
from meshcast.replicate.manifest import MAX_CHUNKS, Manifest
from meshcast.replicate.messages import (
    Chunk,
    End,
    Have,
    Offer,
    Progress,
    ReceiverState,
    decode_control,
    decode_stream_message,
    encode_chunk_head,
    encode_control,
    encode_stream_message,
)
from meshcast.replicate.plan import PlanSpec, Strategy, Tree, Variant

DIGEST = bytes([0xAA]) * 32
H0 = bytes([0x11]) * 32
H1 = bytes([0x22]) * 32
MANIFEST = Manifest("f", 5, 4, (H0, H1), DIGEST)
SPEC = PlanSpec(NodeId(7), (NodeId(8), NodeId(9)), 2)
OFFER = Offer(0x0102030405060708, 1000.0, "d", ((0, 2),), SPEC, MANIFEST)


# length u32 | type u8 | body, every field in network byte order
def hexb(*fields: str) -> bytes:
    """Bytes from hex fields (spaces ignored)."""
    return bytes.fromhex(" ".join(fields))


OFFER_BYTES = hexb(
    "000000b4",  # length: type + 179 body bytes
    "01",  # OFFER
    "0102030405060708",  # rid
    "408f400000000000",  # rate 1000.0
    "0001 64",  # dest "d"
    "0000",  # source "" (not an OFFER to the buddy)
    "0001 00000000 00000002",  # n = 1 range: chunks 0..2
    # spec: origin 7, recipients (8, 9), 2 chunks, fastreplica, 9 connections, K1, chain,
    # not capacity-aware, no capacities, no buddy
    "00000007 00000002 00000008 00000009 00000002 00 09 01 00 00 00000000 00000000",
    # manifest: name "f", size 5, chunk size 4, digest, 2 chunk hashes
    "0001 66 0000000000000005 00000004",
    DIGEST.hex(),
    "00000002",
    H0.hex(),
    H1.hex(),
)


def decode(framed: bytes) -> object:
    """Decode one framed stream message (the length prefix checked, then removed)."""
    (length,) = struct.unpack("!I", framed[:4])
    assert length == len(framed) - 4
    return decode_stream_message(memoryview(framed[4:]))


# ---------------------------------------------------------------- golden bytes


def test_offer_golden_bytes() -> None:
    assert encode_stream_message(OFFER) == OFFER_BYTES
    assert decode(OFFER_BYTES) == OFFER


def test_offer_to_the_buddy_golden_bytes() -> None:
    spec = PlanSpec(NodeId(7), (NodeId(8), NodeId(9)), 2, buddy=NodeId(10))
    offer = Offer(1, 0.0, "", (), spec, MANIFEST, source="/srv/f")
    body = (
        hexb(
            "0000000000000001",  # rid
            "0000000000000000",  # rate 0: no cap
            "0000",  # dest ""
            "0006 2f7372762f66",  # source "/srv/f": the file's path at the buddy
            "0000",  # no ranges: the buddy is told, not fed
            "00000007 00000002 00000008 00000009 00000002 00 09 01 00 00 00000000",
            "0000000a",  # buddy 10
        )
        + OFFER_BYTES[-(3 + 8 + 4 + 32 + 4 + 64) :]  # the same manifest
    )
    framed = struct.pack("!IB", len(body) + 1, 1) + body
    assert encode_stream_message(offer) == framed
    assert decode(framed) == offer


def test_offer_with_capacities_golden_bytes() -> None:
    spec = PlanSpec(
        NodeId(1),
        (NodeId(2), NodeId(3)),
        2,
        strategy=Strategy.ALM_TREE,
        max_connections=4,
        variant=Variant.K2,
        tree=Tree.BALANCED,
        capacities=(1.0, 2.0, 4.0),
        capacity_aware=True,
    )
    offer = Offer(1, 0.0, "", ((0, 1), (1, 2)), spec, MANIFEST)
    body = (
        hexb(
            "0000000000000001",  # rid
            "0000000000000000",  # rate 0: no cap
            "0000",  # dest ""
            "0000",  # source ""
            "0002 00000000 00000001 00000001 00000002",  # two ranges
            "00000001 00000002 00000002 00000003 00000002",  # origin, 2 recipients, 2 chunks
            "02 04 02 01 01",  # alm_tree, 4 connections, K2, balanced, capacity-aware
            "00000003 3ff0000000000000 4000000000000000 4010000000000000",  # 1.0, 2.0, 4.0
            "00000000",  # no buddy
        )
        + OFFER_BYTES[-(3 + 8 + 4 + 32 + 4 + 64) :]  # the same manifest
    )
    framed = struct.pack("!IB", len(body) + 1, 1) + body
    assert encode_stream_message(offer) == framed
    assert decode(framed) == offer


def test_have_golden_bytes() -> None:
    framed = hexb("00000015 02 00000002 00000000 00000003 00000005 00000006")
    assert encode_stream_message(Have(((0, 3), (5, 6)))) == framed
    assert decode(framed) == Have(((0, 3), (5, 6)))


def test_empty_have_golden_bytes() -> None:
    framed = hexb("00000005 02 00000000")
    assert encode_stream_message(Have(())) == framed
    assert decode(framed) == Have(())


def test_end_golden_bytes() -> None:
    assert encode_stream_message(End()) == hexb("00000001 04")
    assert decode(bytes.fromhex("0000000104")) == End()


def test_chunk_golden_bytes_and_data_is_a_view() -> None:
    head = encode_chunk_head(7, 3)
    assert head == hexb("00000008 03 00000007")
    framed = head + b"abc"
    message = decode(framed)
    assert isinstance(message, Chunk)
    assert message.index == 7
    assert isinstance(message.data, memoryview)  # a slice of the frame, not a copy
    assert bytes(message.data) == b"abc"


def test_empty_chunk() -> None:
    framed = encode_chunk_head(0, 0)
    assert framed == hexb("00000005 03 00000000")
    message = decode(framed)
    assert isinstance(message, Chunk)
    assert bytes(message.data) == b""


def test_progress_golden_bytes() -> None:
    progress = Progress(0x1122334455667788, ReceiverState.COMPLETE, 3, 1 << 40, 2, "ok", "/d/f")
    payload = hexb(
        "4d435250",  # "MCRP"
        "10",  # PROGRESS
        "1122334455667788",  # rid
        "03",  # COMPLETE
        "00000003",  # held chunks
        "0000010000000000",  # held bytes: 2**40
        "00000002",  # bad chunks
        "0002 6f6b",  # detail "ok"
        "0004 2f642f66",  # path "/d/f"
    )
    assert encode_control(progress) == payload
    assert decode_control(payload) == progress
    assert decode_control(memoryview(payload)) == progress


def test_progress_defaults_golden_bytes() -> None:
    progress = Progress(1, ReceiverState.RECEIVING, 0, 0, 0)
    payload = b"MCRP\x10" + hexb("0000000000000001 01", "00" * 16, "0000 0000")
    assert encode_control(progress) == payload
    assert decode_control(payload) == progress


# ---------------------------------------------------------------- encoders refuse


def test_encoders_refuse_what_cannot_be_encoded() -> None:
    with pytest.raises(ValueError, match="bad range"):
        encode_stream_message(Have(((3, 3),)))
    with pytest.raises(ValueError, match="chunk too large"):
        encode_chunk_head(0, 16 * 1024 * 1024 + 1)
    with pytest.raises(ValueError, match="65535 bytes"):
        encode_control(Progress(1, ReceiverState.FAILED, 0, 0, 0, "x" * 70_000))
    spec = PlanSpec(NodeId(7), (NodeId(8), NodeId(9)), 2, capacities=(1.0, 2.0))
    with pytest.raises(ValueError, match="capacities"):
        encode_stream_message(Offer(1, 0.0, "", ((0, 2),), spec, MANIFEST))


# ---------------------------------------------------------------- decode errors


def offer_body(
    *,
    rate: float = 0.0,
    dest: bytes = b"",
    ranges: tuple[tuple[int, int], ...] = ((0, 2),),
    spec_chunks: int = 2,
    strategy: int = 0,
    variant: int = 1,
    size: int = 5,
    chunk_size: int = 4,
    hashes: int = 2,
    hash_count: int | None = None,
) -> bytes:
    """An OFFER (type and body) built field by field from the docstring's format."""
    parts = [
        b"\x01",
        struct.pack("!Qd", 9, rate),
        struct.pack("!H", len(dest)) + dest,
        struct.pack("!H", 0),  # source: none (not an OFFER to the buddy)
        struct.pack("!H", len(ranges)),
        *(struct.pack("!II", a, b) for a, b in ranges),
        struct.pack("!IIIII", 7, 2, 8, 9, spec_chunks),
        bytes([strategy, 9, variant, 0, 0]),
        struct.pack("!I", 0),  # no capacities
        struct.pack("!I", 0),  # no buddy
        struct.pack("!H", 1) + b"f",
        struct.pack("!QI", size, chunk_size),
        DIGEST,
        struct.pack("!I", hashes if hash_count is None else hash_count),
        H0 * hashes,
    ]
    return b"".join(parts)


def decode_frame(frame: bytes) -> object:
    return decode_stream_message(memoryview(frame))


def test_offer_body_builder_matches_the_encoder() -> None:
    """(The builder the error tests use writes a valid OFFER when left alone.)"""
    message = decode_frame(offer_body())
    assert isinstance(message, Offer)
    assert message.manifest == Manifest("f", 5, 4, (H0, H0), DIGEST)


def test_empty_frame() -> None:
    with pytest.raises(DecodeError, match="empty"):
        decode_frame(b"")


@pytest.mark.parametrize(
    "frame",
    [
        OFFER_BYTES[4:-1],  # the last chunk hash cut short
        OFFER_BYTES[4:20],  # inside the dest string
        hexb("02 00000001 00000000"),  # HAVE: half a range
        hexb("02 0000"),  # HAVE: half a count
        hexb("03 000007"),  # CHUNK: half an index
    ],
)
def test_truncated(frame: bytes) -> None:
    with pytest.raises(DecodeError, match=r"truncated|beyond the message"):
        decode_frame(frame)


def test_truncated_progress() -> None:
    payload = encode_control(Progress(1, ReceiverState.RECEIVING, 0, 0, 0, "abc"))
    with pytest.raises(DecodeError, match="truncated"):
        decode_control(payload[:-1])
    with pytest.raises(DecodeError, match="truncated"):
        decode_control(payload[:10])


@pytest.mark.parametrize("kind", [0, 5, 16, 255])
def test_unknown_stream_type(kind: int) -> None:
    with pytest.raises(DecodeError, match=f"unknown stream message type {kind}"):
        decode_frame(bytes([kind]))


def test_unknown_control_type_and_bad_magic() -> None:
    with pytest.raises(DecodeError, match="unknown control message type 99"):
        decode_control(b"MCRP\x63" + bytes(40))
    with pytest.raises(DecodeError, match="not a replication control message"):
        decode_control(b"MCRX\x10" + bytes(40))
    with pytest.raises(DecodeError, match="not a replication control message"):
        decode_control(b"MC")


@pytest.mark.parametrize("state", [0, 5, 255])
def test_bad_receiver_state(state: int) -> None:
    payload = b"MCRP\x10" + struct.pack("!QBIQI", 1, state, 0, 0, 0) + b"\0\0\0\0"
    with pytest.raises(DecodeError, match="bad receiver state"):
        decode_control(payload)


@pytest.mark.parametrize("bad", [(3, 3), (4, 2)])
def test_bad_range(bad: tuple[int, int]) -> None:
    with pytest.raises(DecodeError, match="empty or inverted range"):
        decode_frame(b"\x02" + struct.pack("!III", 1, *bad))
    with pytest.raises(DecodeError, match="empty or inverted range"):
        decode_frame(offer_body(ranges=(bad,)))


def test_count_beyond_the_message() -> None:
    # HAVE: 1000 ranges announced, one present
    with pytest.raises(DecodeError, match="count 1000 beyond the message"):
        decode_frame(b"\x02" + struct.pack("!III", 1000, 0, 1))
    # OFFER: more chunk hashes announced than the message holds
    with pytest.raises(DecodeError, match="beyond the message"):
        decode_frame(offer_body(hash_count=0xFFFF_FFFF))
    # a spec announcing 2**32 - 1 recipients
    frame = bytearray(offer_body())
    at = 1 + 16 + 2 + 2 + 8 + 4  # type, rid and rate, dest, n, one range, origin
    frame[at : at + 4] = b"\xff\xff\xff\xff"
    with pytest.raises(DecodeError, match="beyond the message"):
        decode_frame(bytes(frame))


def test_bad_utf8() -> None:
    with pytest.raises(DecodeError, match="not UTF-8"):
        decode_frame(offer_body(dest=b"\xff\xfe"))
    with pytest.raises(DecodeError, match="not UTF-8"):
        decode_frame(offer_body(dest=b"\xed\xa0\x80"))  # an encoded surrogate
    payload = b"MCRP\x10" + struct.pack("!QBIQI", 1, 1, 0, 0, 0) + b"\0\x01\x80\0\0"
    with pytest.raises(DecodeError, match="not UTF-8"):
        decode_control(payload)


@pytest.mark.parametrize("rate", [float("nan"), -1.0, -0.5e-300, float("inf"), float("-inf")])
def test_bad_rate(rate: float) -> None:
    with pytest.raises(DecodeError, match="bad rate"):
        decode_frame(offer_body(rate=rate))


def test_chunk_count_mismatch() -> None:
    with pytest.raises(DecodeError, match="disagree on the chunk count"):
        decode_frame(offer_body(spec_chunks=3))


def test_range_beyond_the_file() -> None:
    with pytest.raises(DecodeError, match="range beyond the file"):
        decode_frame(offer_body(ranges=((0, 3),)))


def test_trailing_bytes() -> None:
    with pytest.raises(DecodeError, match="1 bytes after the message"):
        decode_frame(OFFER_BYTES[4:] + b"\0")
    with pytest.raises(DecodeError, match="bytes after the message"):
        decode_frame(b"\x04\x00")
    with pytest.raises(DecodeError, match="bytes after the message"):
        decode_frame(b"\x02" + struct.pack("!IIII", 1, 0, 1, 0))
    payload = encode_control(Progress(1, ReceiverState.RECEIVING, 0, 0, 0))
    with pytest.raises(DecodeError, match="2 bytes after the message"):
        decode_control(payload + b"xy")


@pytest.mark.parametrize(("strategy", "variant"), [(3, 1), (0, 3), (255, 255)])
def test_bad_plan_spec(strategy: int, variant: int) -> None:
    with pytest.raises(DecodeError, match="bad plan spec"):
        decode_frame(offer_body(strategy=strategy, variant=variant))


def test_bad_chunk_size() -> None:
    with pytest.raises(DecodeError, match="chunk size 0"):
        decode_frame(offer_body(chunk_size=0))
    with pytest.raises(DecodeError, match="chunk size"):
        decode_frame(offer_body(chunk_size=16 * 1024 * 1024 + 1))


def test_too_many_chunks() -> None:
    frame = offer_body(hash_count=MAX_CHUNKS + 1, hashes=0) + bytes(32 * (MAX_CHUNKS + 1))
    with pytest.raises(DecodeError, match="chunks, more than"):
        decode_frame(frame)


@pytest.mark.parametrize(("size", "hashes"), [(5, 1), (5, 3), (0, 2), (2**64 - 1, 2)])
def test_manifest_hash_count_disagrees_with_size(size: int, hashes: int) -> None:
    """A manifest whose chunk hashes do not cover its size is malformed input (a DecodeError),
    not a caller's mistake."""
    with pytest.raises(DecodeError, match="chunk hashes"):
        decode_frame(offer_body(size=size, hashes=hashes, spec_chunks=hashes, ranges=((0, 1),)))
