"""Client protocol codec: round trips, the decode contract, and the stream decoder."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import re
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcast.errors import DecodeError
from meshcast.wire import client
from meshcast.wire.client import (
    BlobHeld,
    BlobMissing,
    Cause,
    Confirmed,
    DaemonLimits,
    ErrorCode,
    ErrorReport,
    Frame,
    FrameDecoder,
    FrameType,
    Goodbye,
    Hello,
    HelloFlag,
    Join,
    Leave,
    Membership,
    Message,
    Multicast,
    Ping,
    Pong,
    Replicate,
    Replication,
    ServiceLevel,
    SlowReceiverPolicy,
    StatusReply,
    StatusRequest,
    ViewId,
    Welcome,
    decode,
    encode,
)

u16 = st.integers(0, client.U16_MAX)
u32 = st.integers(0, client.U32_MAX)
u64 = st.integers(0, client.U64_MAX)


def words(max_bytes: int, max_size: int) -> st.SearchStrategy[str]:
    """Client and daemon names: no '#', whitespace or control characters."""
    alphabet = st.characters(
        blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp"), blacklist_characters="#"
    )
    return st.text(alphabet, min_size=1, max_size=max_size).filter(
        lambda s: len(s.encode()) <= max_bytes and not any(c.isspace() for c in s)
    )


client_names = words(client.MAX_CLIENT_NAME, 12)
private_names = st.builds(client.private_name, client_names, words(client.MAX_DAEMON_NAME, 12))
group_names = st.text(
    st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=30
).filter(lambda s: not s.startswith("#"))
group_lists = st.lists(group_names, min_size=1, max_size=8, unique=True).map(tuple)
payloads = st.binary(max_size=300)
services = st.sampled_from(ServiceLevel)
texts = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=80)


@st.composite
def memberships(draw: st.DrawFn) -> Membership:
    members = tuple(draw(st.lists(private_names, max_size=8, unique=True)))
    cause = draw(st.sampled_from(Cause))
    if cause is Cause.NETWORK:
        who = tuple(draw(st.lists(private_names, max_size=5, unique=True)))
    elif cause is Cause.TRANSITIONAL:
        who = ()
    elif cause is Cause.JOIN:
        members = members or (draw(private_names),)
        who = (draw(st.sampled_from(members)),)
    else:
        who = (draw(private_names.filter(lambda n: n not in members)),)
    view = ViewId(draw(st.integers(1, client.U64_MAX)), draw(st.integers(1, client.U32_MAX)))
    return Membership(draw(group_names), view, members, cause, who)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=12,
)
# status reports: JSON objects, written compactly, indented or ASCII-escaped
reports = st.builds(
    lambda value, indent, ascii_only: json.dumps(value, indent=indent, ensure_ascii=ascii_only),
    st.dictionaries(texts, json_values, max_size=5),
    st.sampled_from([None, 0, 2]),
    st.booleans(),
)

paths = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=60).map(
    lambda s: "/" + s
)
daemon_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,11}", fullmatch=True)
targets = (
    st.just("all")
    | group_names.map(lambda g: "group:" + g)
    | st.lists(daemon_names, min_size=1, max_size=6, unique=True).map(",".join)
)
amounts = st.integers(0, 10**12) | st.floats(0, 1e12, allow_nan=False, allow_infinity=False)


@st.composite
def replication_reports(draw: st.DrawFn, final: bool) -> str:
    """A REPLICATION report's JSON text: every documented key, some unknown ones."""
    state = draw(st.sampled_from(["complete", "failed"] if final else ["hashing", "running"]))
    recipients = [
        {
            "daemon": draw(daemon_names),
            "state": draw(st.sampled_from(client.RECIPIENT_STATES)),
            "held_bytes": draw(st.integers(0, 2**50)),
            "bad_chunks": draw(st.integers(0, 1000)),
            "rate": draw(amounts),
            "eta": draw(st.none() | amounts),
            "detail": draw(texts),
            "path": draw(st.none() | paths),
        }
        for _ in range(draw(st.integers(0, 5)))
    ]
    report = {
        "rid": draw(st.from_regex(r"[0-9a-f]{16}", fullmatch=True)),
        "name": draw(texts),
        "size": draw(st.integers(0, 2**50)),
        "digest": draw(st.from_regex(r"[0-9a-f]{0,64}", fullmatch=True)),
        "state": state,
        "elapsed": draw(amounts),
        "detail": draw(texts),
        "recipients": recipients,
        **draw(st.dictionaries(st.sampled_from(["extra", "more"]), json_values, max_size=2)),
    }
    return json.dumps(report, ensure_ascii=draw(st.booleans()))


@st.composite
def replication_replies(draw: st.DrawFn) -> Replication:
    final = draw(st.booleans())
    return Replication(draw(u32), final, draw(replication_reports(final)))


@st.composite
def blob_events(draw: st.DrawFn) -> BlobHeld:
    """BLOB_HELD (v6): distinct daemons split between held_by and missing."""
    daemons = draw(st.lists(daemon_names, max_size=8, unique=True))
    complete = draw(st.booleans())
    cut = len(daemons) if complete else draw(st.integers(0, len(daemons)))
    missing = tuple(
        BlobMissing(d, draw(u64), draw(texts.filter(lambda t: len(t.encode()) <= 255)))
        for d in daemons[cut:]
    )
    return BlobHeld(
        draw(group_names),
        draw(st.from_regex(r"[0-9a-f]{16}", fullmatch=True)),
        draw(texts),
        draw(u64),
        draw(st.binary(max_size=client.MAX_BLOB_DIGEST)).hex(),
        draw(daemon_names),
        complete,
        tuple(daemons[:cut]),
        missing,
    )


FRAMES: dict[FrameType, st.SearchStrategy[Frame]] = {
    FrameType.HELLO: st.builds(
        Hello,
        st.just("") | client_names,
        st.integers(1, 5),
        st.integers(5, client.U16_MAX),
        st.sampled_from([HelloFlag(0), HelloFlag.MEMBERSHIP]),
        st.none()
        | st.text(
            st.characters(min_codepoint=0x21, max_codepoint=0x7E),
            min_size=1,
            max_size=client.MAX_TOKEN,
        ),
    ),
    FrameType.WELCOME: st.builds(
        Welcome,
        st.integers(1, client.U16_MAX),
        private_names,
        st.builds(
            DaemonLimits,
            st.integers(1, client.MAX_MESSAGE_SIZE),
            st.integers(1, client.MAX_GROUP_NAME),
            st.integers(1, client.U32_MAX),
        ),
    ),
    FrameType.JOIN: st.builds(Join, group_names, st.sampled_from(SlowReceiverPolicy), u32),
    FrameType.LEAVE: st.builds(Leave, group_names, u32),
    FrameType.MULTICAST: st.builds(
        Multicast, group_lists, payloads, services, u16, u32, st.booleans()
    ),
    FrameType.MESSAGE: st.builds(Message, private_names, group_lists, services, u16, payloads),
    FrameType.MEMBERSHIP: memberships(),
    FrameType.ERROR: st.builds(ErrorReport, st.sampled_from(ErrorCode), texts, u32),
    FrameType.STATUS: st.builds(StatusRequest, u32),
    FrameType.STATUS_REPLY: st.builds(StatusReply, reports, u32),
    FrameType.CONFIRMED: st.builds(Confirmed, u32),
    FrameType.REPLICATE: st.builds(
        Replicate,
        paths,
        targets,
        u32,
        st.just("") | paths | daemon_names,
        st.floats(0, 1e15, allow_nan=False, allow_infinity=False),
        st.integers(0, 2),
        st.integers(0, 2),
        st.integers(0, 1),
        st.integers(1, 255),
        st.booleans(),
        st.none() | st.just("") | daemon_names,  # v5 layout (None) or v6 with a buddy
    ),
    # any f64 but NaN (which equals nothing) travels: the daemon judges the rate
    FrameType.SET_RATE: st.builds(client.SetRate, u64, st.floats(allow_nan=False), u32),
    FrameType.REPLICATION: replication_replies(),
    FrameType.BLOB_HELD: blob_events(),
    FrameType.PING: st.builds(Ping, u64),
    FrameType.PONG: st.builds(Pong, u64),
    FrameType.GOODBYE: st.just(Goodbye()),
}
frames = st.one_of(*FRAMES.values())


def test_every_frame_type_has_a_strategy() -> None:
    assert set(FRAMES) == set(FrameType)


@pytest.mark.parametrize("ftype", FrameType)
@given(data=st.data())
def test_every_frame_round_trips(ftype: FrameType, data: st.DataObject) -> None:
    frame = data.draw(FRAMES[ftype])
    encoded = encode(frame)
    assert encoded[4] == ftype
    assert struct.unpack_from("!I", encoded)[0] == len(encoded) - 4
    assert decode(encoded) == frame


@given(st.binary(max_size=400))
def test_random_bytes_raise_only_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode(data)


@given(st.sampled_from(FrameType), st.binary(max_size=400))
def test_random_bodies_raise_only_decode_error(ftype: FrameType, body: bytes) -> None:
    data = struct.pack("!IB", 1 + len(body), ftype) + body
    with contextlib.suppress(DecodeError):
        decode(data)


@given(frames, st.data())
def test_mutated_frames_raise_only_decode_error(frame: Frame, data: st.DataObject) -> None:
    mutated = bytearray(encode(frame))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(mutated) - 1))
        mutated[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(mutated)))
    candidate = bytes(mutated[:cut]) + data.draw(st.binary(max_size=4))
    try:
        decoded = decode(candidate)
    except DecodeError:
        return
    assert encode(decoded) == candidate  # whatever decodes has one encoding: this one


@given(frames, st.data())
def test_mutated_frames_in_a_stream_raise_only_decode_error(
    frame: Frame, data: st.DataObject
) -> None:
    stream = bytearray(encode(frame) + encode(Ping(7)))
    position = data.draw(st.integers(0, len(stream) - 1))
    stream[position] = data.draw(st.integers(0, 255))
    decoder = FrameDecoder(max_frame_size=10_000)
    decoder.feed(bytes(stream))
    for _ in range(3):
        with contextlib.suppress(DecodeError):
            decoder.next_frame()


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@given(st.lists(frames, max_size=8), st.lists(st.integers(0, 10_000), max_size=20))
def test_chunking_does_not_change_the_frames(frame_list: list[Frame], cuts: list[int]) -> None:
    stream = b"".join(encode(f) for f in frame_list)
    decoder = FrameDecoder()
    received: list[Frame] = []
    for chunk in _chunks(stream, cuts):
        decoder.feed(chunk)
        received.extend(decoder)
        assert decoder.buffered < client.LENGTH_SIZE + decoder.max_frame_size
    assert received == frame_list
    decoder.end_of_stream()

    whole = FrameDecoder()
    whole.feed(stream)
    assert list(whole) == frame_list


@given(
    st.lists(frames, max_size=4),
    st.integers(200, 5_000),
    st.integers(1, 100_000),
    st.lists(st.integers(0, 100_000), max_size=12),
)
def test_the_length_cap_stops_an_oversized_frame_before_buffering(
    before: list[Frame], cap: int, excess: int, cuts: list[int]
) -> None:
    good = [f for f in before if len(encode(f)) - client.LENGTH_SIZE <= cap]
    length = cap + excess
    oversized = struct.pack("!IB", length, FrameType.MULTICAST) + bytes(min(length - 1, 20_000))
    head_at = sum(len(encode(f)) for f in good)
    stream = b"".join(encode(f) for f in good) + oversized
    decoder = FrameDecoder(max_frame_size=cap)
    received: list[Frame] = []
    failure = ""
    fed = 0
    for chunk in _chunks(stream, cuts):
        decoder.feed(chunk)
        fed += len(chunk)
        try:
            received.extend(decoder)
        except DecodeError as exc:
            failure = str(exc)
        if fed >= head_at + client.LENGTH_SIZE:
            assert failure  # the header is in: the frame was refused ...
            assert decoder.buffered == 0  # ... and none of its body is kept
            assert not decoder.synchronised
    assert f"frame length {length} exceeds the limit of {cap} bytes" in failure
    assert received == good
    with pytest.raises(DecodeError, match="out of sync"):
        decoder.next_frame()


@given(st.lists(frames, min_size=1, max_size=6), st.data())
def test_a_bad_body_costs_one_frame_only(frame_list: list[Frame], data: st.DataObject) -> None:
    bad_at = data.draw(st.integers(0, len(frame_list)))
    bad = struct.pack("!IB", 2, FrameType.GOODBYE) + b"!"  # GOODBYE has no body
    parts = [encode(f) for f in frame_list]
    parts.insert(bad_at, bad)
    decoder = FrameDecoder()
    decoder.feed(b"".join(parts))
    received: list[Frame] = []
    errors = 0
    while True:
        try:
            frame = decoder.next_frame()
        except DecodeError:
            errors += 1
            continue
        if frame is None:
            break
        received.append(frame)
    assert errors == 1
    assert received == frame_list
    assert decoder.synchronised


# ---------------------------------------------------------------- STATUS and STATUS_REPLY


@given(reports, u32)
def test_a_status_reply_keeps_its_text_and_carries_one_object(report: str, request_id: int) -> None:
    frame = decode(encode(StatusReply(report, request_id)))
    assert frame == StatusReply(report, request_id)
    assert isinstance(frame, StatusReply)
    assert json.loads(frame.report) == json.loads(report)


def _reply_bytes(body: bytes, request_id: int = 1) -> bytes:
    return struct.pack("!IBI", 5 + len(body), FrameType.STATUS_REPLY, request_id) + body


MALFORMED_REPORTS = {
    "list": (b"[1, 2]", "report is a JSON list, not an object"),
    "string": (b'"text"', "report is a JSON str, not an object"),
    "empty": (b"", "report is not JSON: Expecting value"),
    "nan": (b'{"a": NaN}', "report is not JSON: NaN is not JSON"),
    "infinity": (b'{"a": -Infinity}', "report is not JSON: -Infinity is not JSON"),
    "extra": (b'{"a": 1} x', "report is not JSON: Extra data"),
    "not-utf8": (b'{"a": "\xff"}', "report is not UTF-8"),
    "deep": (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "report is not JSON"),
    "too-big": (
        b'{"a": "' + b"x" * client.MAX_STATUS_SIZE + b'"}',
        r"report is \d+ bytes, more than 1048576",
    ),
}


@pytest.mark.parametrize(
    ("body", "message"), list(MALFORMED_REPORTS.values()), ids=list(MALFORMED_REPORTS)
)
def test_a_malformed_status_report_is_refused(body: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=f"^STATUS_REPLY frame: {message}"):
        decode(_reply_bytes(body))


def test_status_report_size_limit_and_encode_checks() -> None:
    head = '{"a":"'
    fits = head + "x" * (client.MAX_STATUS_SIZE - len(head) - 2) + '"}'
    assert len(fits.encode()) == client.MAX_STATUS_SIZE
    assert decode(encode(StatusReply(fits, 3))) == StatusReply(fits, 3)
    too_big = fits[:-2] + 'x"}'
    with pytest.raises(ValueError, match="StatusReply: report is 1048577 bytes"):
        encode(StatusReply(too_big))
    with pytest.raises(ValueError, match="StatusReply: report is a JSON list"):
        encode(StatusReply("[]"))
    with pytest.raises(ValueError, match="StatusReply: report must be a str"):
        encode(StatusReply({"a": 1}))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="StatusRequest: request_id -1 is outside"):
        encode(StatusRequest(-1))
    assert client.frame_size_limit(1) > 1 + 4 + client.MAX_STATUS_SIZE


def test_status_frames_come_from_their_own_side_only() -> None:
    request = encode(StatusRequest(9))
    reply = encode(StatusReply("{}", 9))
    assert request.hex() == "000000050500000009"
    assert reply.hex() == "00000007450000000" + "97b7d"
    assert decode(request, accept=client.FROM_CLIENT) == StatusRequest(9)
    assert decode(reply, accept=client.FROM_DAEMON) == StatusReply("{}", 9)
    with pytest.raises(DecodeError, match="unexpected STATUS frame"):
        decode(request, accept=client.FROM_DAEMON)
    with pytest.raises(DecodeError, match="unexpected STATUS_REPLY frame"):
        decode(reply, accept=client.FROM_CLIENT)
    with pytest.raises(DecodeError, match="STATUS frame: 1 trailing bytes"):
        decode(struct.pack("!IBIB", 6, FrameType.STATUS, 9, 0))


# ---------------------------------------------------------------- REPLICATE and REPLICATION


@given(targets)
def test_targets_parse_to_what_they_name(text: str) -> None:
    parsed = client.parse_targets(text)
    assert str(parsed) == text
    if parsed.kind == "daemons":
        assert ",".join(parsed.daemons) == text


@given(st.data())
def test_a_replication_report_keeps_its_text(data: st.DataObject) -> None:
    frame = data.draw(replication_replies())
    decoded = decode(encode(frame))
    assert isinstance(decoded, Replication)
    assert json.loads(decoded.report) == json.loads(frame.report)
    if decoded.final:
        assert json.loads(decoded.report)["state"] in ("complete", "failed")


@given(st.data(), st.binary(max_size=60))
def test_mutated_replication_bodies_raise_only_decode_error(
    data: st.DataObject, junk: bytes
) -> None:
    frame = data.draw(
        st.sampled_from([FrameType.REPLICATE, FrameType.SET_RATE, FrameType.REPLICATION])
    )
    encoded = bytearray(encode(data.draw(FRAMES[frame])))
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(5, len(encoded) - 1))
        encoded[position] = data.draw(st.integers(0, 255))
    body = bytes(encoded[5:]) + junk
    candidate = struct.pack("!IB", 1 + len(body), frame) + body
    try:
        decoded = decode(candidate)
    except DecodeError:
        return
    assert decode(encode(decoded)) == decoded


# ---------------------------------------------------------------- BLOB_HELD (v6)


def _blob(**changes: object) -> BlobHeld:
    fields: dict[str, object] = {
        "group": "chat",
        "rid": "00000000000000ab",
        "name": "a.bin",
        "size": 10,
        "digest": "ab" * 32,
        "origin": "D1",
        "complete": False,
        "held_by": ("D1",),
        "missing": (BlobMissing("D2", 4, "disk full"),),
    }
    fields.update(changes)
    return BlobHeld(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "fault"),
    [
        ({"complete": True}, "complete BLOB_HELD names daemons missing"),
        ({"held_by": ("D1", "D2")}, "named twice"),
        ({"held_by": ("D#1",)}, "contains '#'"),
        ({"digest": "abc"}, "digest must be lowercase hex"),
        ({"digest": "AB"}, "digest must be lowercase hex"),
        ({"digest": "ab" * 65}, "digest must be lowercase hex"),
        ({"rid": "ab"}, "rid must be 16 lowercase hex digits"),
        ({"group": "#membership"}, "starts with '#'"),
        ({"size": -1}, "size -1 is outside"),
        ({"missing": (BlobMissing("D2", 0, "x" * 256),)}, "reason"),
        ({"missing": (BlobMissing("D2", 0, "line\nbreak"),)}, "control character"),
        ({"missing": (BlobMissing("D2", 2**64, ""),)}, "held_bytes"),
        ({"missing": (("D2", 0, ""),)}, "not a BlobMissing"),
        ({"origin": "has space"}, "whitespace"),
        (
            {"held_by": tuple(f"d{i}" for i in range(client.MAX_BLOB_DAEMONS)), "missing": ()},
            None,
        ),
        (
            {"held_by": tuple(f"d{i}" for i in range(client.MAX_BLOB_DAEMONS + 1)), "missing": ()},
            "more than 4096",
        ),
    ],
)
def test_blob_held_checks(changes: dict[str, object], fault: str | None) -> None:
    frame = _blob(**changes)
    if fault is None:
        assert decode(encode(frame)) == frame
        return
    with pytest.raises(ValueError, match=fault):
        encode(frame)


def _blob_bytes(body: bytes) -> bytes:
    return struct.pack("!IB", 1 + len(body), FrameType.BLOB_HELD) + body


def test_blob_held_decode_refuses_what_encode_would() -> None:
    """Bodies built by hand, each wrong in one way: DecodeError naming the fault."""
    good = client.blob_held_body(_blob())
    assert decode(_blob_bytes(good)) == _blob()
    # unknown flags
    with pytest.raises(DecodeError, match="unknown flags 0x02"):
        decode(_blob_bytes(good[:8] + b"\x02" + good[9:]))
    # complete flag with a missing daemon
    with pytest.raises(DecodeError, match="complete BLOB_HELD"):
        decode(_blob_bytes(good[:8] + b"\x01" + good[9:]))
    # a count of missing entries far beyond the bytes left: refused before any loop
    head = client.blob_held_body(_blob(missing=()))
    with pytest.raises(DecodeError, match="more than the 0 bytes left"):
        decode(_blob_bytes(head[:-2] + struct.pack("!H", 4000)))
    with pytest.raises(DecodeError, match="more than 4096"):
        decode(_blob_bytes(head[:-2] + struct.pack("!H", 4096)))
    # a digest longer than 64 bytes
    body = client.blob_held_body(_blob(digest="", missing=(), held_by=()))
    at = body.index(b"\x00\x00\x00\x00", client.BLOB_HELD_HEAD.size)  # digest len, counts
    long_digest = body[:at] + bytes((65,)) + bytes(65) + body[at + 1 :]
    with pytest.raises(DecodeError, match="digest of 65 bytes"):
        decode(_blob_bytes(long_digest))
    # trailing bytes
    with pytest.raises(DecodeError, match="trailing bytes"):
        decode(_blob_bytes(good + b"\x00"))


def test_blob_held_worst_case_fits_its_frame_bound() -> None:
    """The largest valid BLOB_HELD is within MAX_BLOB_HELD_FRAME, which every session's
    frame cap admits, whatever the daemon's max_message_size."""
    daemons = [
        f"{i:04d}" + "d" * (client.MAX_DAEMON_NAME - 4) for i in range(client.MAX_BLOB_DAEMONS)
    ]
    frame = BlobHeld(
        "g" * client.MAX_GROUP_NAME,
        "f" * 16,
        "n" * client.MAX_REPLICATE_PATH,
        client.U64_MAX,
        "ab" * client.MAX_BLOB_DIGEST,
        "o" * client.MAX_DAEMON_NAME,
        False,
        (),
        tuple(BlobMissing(d, client.U64_MAX, "r" * client.MAX_BLOB_REASON) for d in daemons),
    )
    data = encode(frame)
    assert len(data) - client.LENGTH_SIZE == client.MAX_BLOB_HELD_FRAME
    assert client.frame_size_limit(1) >= client.MAX_BLOB_HELD_FRAME
    assert decode(data, max_frame_size=client.MAX_BLOB_HELD_FRAME) == frame


@given(frame=FRAMES[FrameType.REPLICATE], buddy=st.just("") | daemon_names)
def test_a_v6_replicate_is_the_v5_layout_and_a_trailing_buddy(frame: Replicate, buddy: str) -> None:
    """A version-5 REPLICATE (no buddy field) encodes as it always did; version 6 appends
    the buddy's name as one str16, and each decodes to what was encoded."""
    v5 = dataclasses.replace(frame, buddy=None)
    v6 = dataclasses.replace(frame, buddy=buddy)
    old, new = encode(v5), encode(v6)
    tail = struct.pack("!H", len(buddy.encode())) + buddy.encode()
    assert new[4:] == old[4:] + tail
    assert struct.unpack_from("!I", new)[0] == struct.unpack_from("!I", old)[0] + len(tail)
    assert decode(old) == v5
    assert decode(new) == v6


# The data path's two frames: MULTICAST and MESSAGE are decoded by a shortcut (parsed and
# checked without `_check`'s general dispatch), and the daemon encodes MESSAGE with
# `encode_message`; both must say exactly what the general code says.

any_names = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
loose_group_lists = st.lists(any_names | group_names, min_size=0, max_size=4).map(tuple)


def _raw_frame(frame: Multicast | Message) -> bytes:
    """`frame` laid out without `encode`'s checks (names of any form; str8 lengths fit)."""
    body = b"".join(client._encode_body(frame))
    return struct.pack("!IB", 1 + len(body), client.FRAME_TYPE_OF[type(frame)]) + body


def _fits(frame: Multicast | Message) -> bool:
    names = [*frame.groups, frame.sender] if isinstance(frame, Message) else [*frame.groups]
    return all(len(n.encode("utf-8", "surrogatepass")) <= 255 for n in names)


def _fault_of(frame: object) -> str | None:
    """What `_check` (the general validation) finds wrong with `frame`."""
    try:
        client._check(frame)
    except client._Fault as fault:
        return str(fault)
    return None


@given(
    st.builds(Multicast, loose_group_lists, payloads, services, u16, u32, st.booleans())
    | st.builds(Message, any_names | private_names, loose_group_lists, services, u16, payloads)
)
def test_the_data_frames_decode_with_the_checks_of_encode(frame: Multicast | Message) -> None:
    if not _fits(frame):
        return
    data = _raw_frame(frame)
    fault = _fault_of(frame)
    if fault is None:
        assert decode(data) == frame
        assert encode(frame) == data
        return
    name = client.FRAME_TYPE_OF[type(frame)].name
    with pytest.raises(DecodeError, match=f"^{re.escape(f'{name} frame: {fault}')}$"):
        decode(data)
    with pytest.raises(ValueError, match=f"^{re.escape(f'{type(frame).__name__}: {fault}')}$"):
        encode(frame)


@given(st.builds(Message, any_names | private_names, loose_group_lists, services, u16, payloads))
def test_the_daemon_message_encoder_is_encode(frame: Message) -> None:
    fields = (frame.sender, frame.groups, frame.service, frame.msg_type, frame.payload)
    fault = _fault_of(frame)
    if fault is None:
        assert client.encode_message(*fields) == encode(frame)
        return
    # the same refusal, from the same checks
    with pytest.raises(ValueError, match=f"^{re.escape(f'Message: {fault}')}$"):
        client.encode_message(*fields)


@pytest.mark.parametrize(
    "fields",
    [
        ("#a#b", ("g",), ServiceLevel.AGREED, 0x1_0000, b""),  # msg_type over u16
        ("#a#b", ("g",), ServiceLevel.AGREED, True, b""),  # a bool is no msg_type
        ("#a#b", ["g"], ServiceLevel.AGREED, 0, b""),  # groups not a tuple
        ("#a#b", (), ServiceLevel.AGREED, 0, b""),  # no group
        ("#a#b", ("g",), ServiceLevel.AGREED, 0, "text"),  # payload not bytes
        ("#a#b", ("g",), 99, 0, b""),  # unknown service
    ],
)
def test_the_daemon_message_encoder_refuses_what_encode_refuses(fields: tuple[object, ...]) -> None:
    fault = _fault_of(Message(*fields))  # type: ignore[arg-type]
    assert fault is not None
    with pytest.raises(ValueError, match=f"^{re.escape(f'Message: {fault}')}$"):
        client.encode_message(*fields)  # type: ignore[arg-type]


@given(st.builds(Multicast, loose_group_lists, payloads, services, u16, u32, st.booleans()))
def test_the_client_multicast_encoder_is_encode(frame: Multicast) -> None:
    fields = (
        frame.groups,
        frame.payload,
        frame.service,
        frame.msg_type,
        frame.request_id,
        frame.confirm,
    )
    fault = _fault_of(frame)
    if fault is None:
        assert client.encode_multicast(*fields) == client._encode_checked(frame)
        assert client.encode_multicast(*fields) == client._encode_checked(frame)  # remembered
        return
    with pytest.raises(ValueError, match=f"^{re.escape(f'Multicast: {fault}')}$"):
        client.encode_multicast(*fields)


@pytest.mark.parametrize(
    "fields",
    [
        (("g",), b"", ServiceLevel.AGREED, 0x1_0000, 1, False),  # msg_type over u16
        (("g",), b"", ServiceLevel.AGREED, True, 1, False),  # a bool is no msg_type
        (("g",), b"", ServiceLevel.AGREED, 0, 2**32, False),  # request id over u32
        (["g"], b"", ServiceLevel.AGREED, 0, 1, False),  # groups not a tuple
        ((), b"", ServiceLevel.AGREED, 0, 1, False),  # no group
        (("g", "g"), b"", ServiceLevel.AGREED, 0, 1, False),  # a group twice
        (("g",), "text", ServiceLevel.AGREED, 0, 1, False),  # payload not bytes
        (("g",), b"", 99, 0, 1, False),  # unknown service
        ((["g"],), b"", ServiceLevel.AGREED, 0, 1, False),  # an unhashable name
    ],
)
def test_the_client_multicast_encoder_refuses_what_encode_refuses(
    fields: tuple[object, ...],
) -> None:
    fault = _fault_of(Multicast(*fields))  # type: ignore[arg-type]
    assert fault is not None
    with pytest.raises(ValueError, match=f"^{re.escape(f'Multicast: {fault}')}$"):
        client.encode_multicast(*fields)  # type: ignore[arg-type]


@given(
    st.builds(Multicast, loose_group_lists, payloads, services, u16, u32, st.booleans())
    | st.builds(Message, any_names | private_names, loose_group_lists, services, u16, payloads),
    payloads,
    u32,
)
def test_a_remembered_data_frame_head_decodes_as_the_general_decoder(
    frame: Multicast | Message, other_payload: bytes, other_id: int
) -> None:
    """Data frames whose head (all but payload and request id) was seen before are not
    parsed again: the result, and the refusal, are still the general decoder's."""
    if not _fits(frame):
        return
    first = _raw_frame(frame)
    again = dataclasses.replace(frame, payload=other_payload)
    if isinstance(again, Multicast):
        again = dataclasses.replace(again, request_id=other_id)
    second = _raw_frame(again)
    for data in (first, second, first):  # the first time through the general decoder
        body = memoryview(data)[4:]
        try:
            expected: object = client._decode_body(client._FRAME_TYPES[data[4]], body)
        except DecodeError as exc:
            expected = str(exc)
        try:
            got: object = decode(data)
        except DecodeError as exc:
            got = str(exc)
        assert got == expected
    decoder = client.FrameDecoder()
    decoder.feed(first + second)
    if _fault_of(frame) is None:
        assert list(decoder) == [frame, again]


def test_remembered_heads_stay_bounded() -> None:
    for k in range(client._KNOWN_HEADS_MAX + 10):
        decode(encode(Message(f"#c{k}#d", ("g",), ServiceLevel.AGREED, 0, b"p")))
        decode(encode(Multicast((f"g{k}",), b"p", ServiceLevel.AGREED, 0, k)))
    assert len(client._known_messages) <= client._KNOWN_HEADS_MAX
    assert len(client._known_multicasts) <= client._KNOWN_HEADS_MAX
