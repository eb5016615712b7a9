"""Client protocol frames: golden bytes, and every error path naming what is wrong.

The golden frames below are written out by hand from the layout in docs/client-protocol.md
(big-endian, `length u32 | type u8 | body`); the comment above each names its fields.
"""

from __future__ import annotations

import json
import math
import re
import struct

import pytest

from meshcast.config import LimitsConfig
from meshcast.errors import DecodeError
from meshcast.wire import client
from meshcast.wire.client import (
    FROM_CLIENT,
    FROM_DAEMON,
    MAX_DEST_GROUPS,
    MAX_MEMBERS,
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
    SetRate,
    SlowReceiverPolicy,
    ViewId,
    Welcome,
    decode,
    encode,
)

ALICE = "#alice#D1"
BOB = "#bob#D2"
# a final REPLICATION report: the daemon refused the request (no recipients planned)
FAILED_REPORT = (
    '{"rid":"00000000000000ab","name":"a.bin","size":0,"digest":"","state":"failed",'
    '"elapsed":0.0,"detail":"no such file","recipients":[]}'
)

GOLDEN: list[tuple[Frame, str]] = [
    # HELLO: length 17 | type 01 | magic "MCCP" | min 1 | max 6 | flags MEMBERSHIP | name "alice"
    (Hello("alice"), "00000011 01 4d434350 0001 0006 0001 05 616c696365"),
    # HELLO of a version-5 client: max 5
    (Hello("alice", max_version=5), "00000011 01 4d434350 0001 0005 0001 05 616c696365"),
    # HELLO of a version-4 client: max 4
    (Hello("alice", max_version=4), "00000011 01 4d434350 0001 0004 0001 05 616c696365"),
    # HELLO of a version-3 client: max 3
    (Hello("alice", max_version=3), "00000011 01 4d434350 0001 0003 0001 05 616c696365"),
    # HELLO (v3) with a token: flags MEMBERSHIP|TOKEN (0x0003) | name "bob" | token "s3cret"
    (
        Hello("bob", token="s3cret"),
        "00000016 01 4d434350 0001 0006 0003 03 626f62 06 733363726574",
    ),
    # HELLO from a version-1 client letting the daemon pick its name, no membership events
    (Hello(max_version=1, flags=HelloFlag(0)), "0000000c 01 4d434350 0001 0001 0000 00"),
    # WELCOME: version 1 | private name "#alice#D1" | 16 MiB | 64-byte groups | 100 groups
    (
        Welcome(1, ALICE, DaemonLimits()),
        "0000001a 41 4d434350 0001 09 23616c696365234431 01000000 40 00000064",
    ),
    # JOIN: request 7 | policy 2 (drop-unreliable) | group "chat"
    (
        Join("chat", SlowReceiverPolicy.DROP_UNRELIABLE, request_id=7),
        "0000000b 02 00000007 02 04 63686174",
    ),
    # LEAVE: request 8 | group "chat"
    (Leave("chat", request_id=8), "0000000a 03 00000008 04 63686174"),
    # MULTICAST: request 9 | AGREED (4) | msg_type 0x0102 | 2 groups "chat" "ops" | "hi"
    (
        Multicast(("chat", "ops"), b"hi", ServiceLevel.AGREED, msg_type=0x0102, request_id=9),
        "00000015 04 00000009 04 0102 0002 04 63686174 03 6f7073 6869",
    ),
    # MULTICAST (v2) asking for CONFIRMED: SAFE (5) with bit 0x80 | request 10 | 1 group "ops"
    (
        Multicast(("ops",), b"", ServiceLevel.SAFE, request_id=10, confirm=True),
        "0000000e 04 0000000a 85 0000 0001 03 6f7073",
    ),
    # CONFIRMED (v2): request 10
    (Confirmed(10), "00000005 46 0000000a"),
    # MESSAGE: SAFE (5) | msg_type 0xffff | sender "#bob#D2" | 1 group "chat" | empty payload
    (
        Message(BOB, ("chat",), ServiceLevel.SAFE, 0xFFFF, b""),
        "00000013 42 05 ffff 07 23626f62234432 0001 04 63686174",
    ),
    # MEMBERSHIP: group "chat" | view (3, daemon 1) | cause 0 JOIN | 2 members | who: bob
    (
        Membership("chat", ViewId(3, 1), (ALICE, BOB), Cause.JOIN, (BOB,)),
        "00000035 43 04 63686174 0000000000000003 00000001 00"
        " 00000002 09 23616c696365234431 07 23626f62234432 00000001 07 23626f62234432",
    ),
    # MEMBERSHIP (v2): group "chat" | view (3, daemon 1) | cause 4 TRANSITIONAL | alice | no who
    (
        Membership("chat", ViewId(3, 1), (ALICE,), Cause.TRANSITIONAL, ()),
        "00000025 43 04 63686174 0000000000000003 00000001 04"
        " 00000001 09 23616c696365234431 00000000",
    ),
    # ERROR (v3): code 209 ACCESS_DENIED | request 4 | text "no" (str16)
    (ErrorReport(ErrorCode.ACCESS_DENIED, "no", 4), "0000000b 44 00d1 00000004 0002 6e6f"),
    # ERROR (v4): code 210 BUSY | request 5 | text "later" (str16)
    (ErrorReport(ErrorCode.BUSY, "later", 5), "0000000e 44 00d2 00000005 0005 6c61746572"),
    # ERROR: code 203 MESSAGE_TOO_LARGE | request 9 | text "too big" (str16)
    (
        ErrorReport(ErrorCode.MESSAGE_TOO_LARGE, "too big", 9),
        "00000010 44 00cb 00000009 0007 746f6f20626967",
    ),
    # REPLICATE (v5): token 7 | path "/srv/a.bin" (str16) | targets "D2,D3" (str16) | dest ""
    # | rate 1e7 bytes/s (f64) | strategy 0 fastreplica | variant 1 (k+1) | tree 0 chain
    # | max_connections 9 | flags 0x01 capacity-aware
    (
        Replicate("/srv/a.bin", "D2,D3", 7, "", 1e7, 0, 1, 0, 9, capacity_aware=True),
        "00000027 06 00000007 000a 2f7372762f612e62696e 0005 44322c4433 0000"
        " 416312d000000000 00 01 00 09 01",
    ),
    # REPLICATE (v5): token 0xffffffff | "/f" | "group:g" | dest "/d" | no cap | alm_tree (2)
    # | variant 2 (k+2) | tree 1 balanced | 255 connections | no flags
    (
        Replicate("/f", "group:g", 0xFFFFFFFF, "/d", 0.0, 2, 2, 1, 255),
        "00000023 06 ffffffff 0002 2f66 0007 67726f75703a67 0002 2f64"
        " 0000000000000000 02 02 01 ff 00",
    ),
    # REPLICATE (v6): the same with a trailing buddy "D4" (str16)
    (
        Replicate("/f", "group:g", 0xFFFFFFFF, "/d", 0.0, 2, 2, 1, 255, buddy="D4"),
        "00000027 06 ffffffff 0002 2f66 0007 67726f75703a67 0002 2f64"
        " 0000000000000000 02 02 01 ff 00 0002 4434",
    ),
    # REPLICATE (v6) with no buddy: an empty str16
    (
        Replicate("/f", "all", 1, "", 0.0, 0, 1, 0, 9, buddy=""),
        "0000001f 06 00000001 0002 2f66 0003 616c6c 0000 0000000000000000 00 01 00 09 00 0000",
    ),
    # SET_RATE (v6): token 3 | rid 0x0123456789abcdef | rate 1.25e6 bytes/s (f64)
    (
        SetRate(0x0123456789ABCDEF, 1.25e6, 3),
        "00000015 07 00000003 0123456789abcdef 413312d000000000",
    ),
    # ERROR (v6): code 211 UNKNOWN_REPLICATION | request 3 | text "no" (str16)
    (ErrorReport(ErrorCode.UNKNOWN_REPLICATION, "no", 3), "0000000b 44 00d3 00000003 0002 6e6f"),
    # REPLICATION (v5): token 7 | final 1 | the report's JSON text (the rest of the frame)
    (
        Replication(7, True, FAILED_REPORT),
        f"{5 + 1 + len(FAILED_REPORT):08x} 47 00000007 01 {FAILED_REPORT.encode().hex()}",
    ),
    # BLOB_HELD (v6): rid 0xab | flags 0 (incomplete) | size 3 | group "chat" | origin "D1"
    # | name "a" (str16) | digest 2 bytes abcd | held_by D1 D2 | missing D3 (1 byte held, "x")
    (
        BlobHeld(
            "chat",
            "00000000000000ab",
            "a",
            3,
            "abcd",
            "D1",
            False,
            ("D1", "D2"),
            (BlobMissing("D3", 1, "x"),),
        ),
        "00000037 48 00000000000000ab 00 0000000000000003 04 63686174 02 4431 0001 61"
        " 02 abcd 0002 02 4431 02 4432 0001 02 4433 0000000000000001 01 78",
    ),
    # BLOB_HELD (v6): complete (flags 0x01) | empty name, no digest | held by the origin alone
    (
        BlobHeld("g", "ffffffffffffffff", "", 0, "", "D1", True, ("D1",)),
        "00000021 48 ffffffffffffffff 01 0000000000000000 01 67 02 4431 0000 00 0001 02 4431 0000",
    ),
    # PING / PONG: nonce u64
    (Ping(0x0102030405060708), "00000009 81 0102030405060708"),
    (Pong(1), "00000009 82 0000000000000001"),
    # GOODBYE: no body, so length 1
    (Goodbye(), "00000001 83"),
]


@pytest.mark.parametrize(("frame", "hex_bytes"), GOLDEN)
def test_golden_frames(frame: Frame, hex_bytes: str) -> None:
    data = bytes.fromhex(hex_bytes)
    assert encode(frame) == data
    assert decode(data) == frame


def test_defaults_match_the_daemon_config() -> None:
    limits = LimitsConfig()
    assert DaemonLimits() == DaemonLimits(
        limits.max_message_size, limits.max_group_name, limits.max_groups_per_client
    )
    assert DaemonLimits().max_frame_size == client.DEFAULT_MAX_FRAME_SIZE
    assert limits.max_message_size < client.DEFAULT_MAX_FRAME_SIZE


def test_frame_size_limit_covers_the_largest_frames() -> None:
    long_group = "g" * client.MAX_GROUP_NAME
    groups = tuple(f"{i:03d}{long_group[3:]}" for i in range(MAX_DEST_GROUPS))
    sender = client.private_name("c" * client.MAX_CLIENT_NAME, "d" * client.MAX_DAEMON_NAME)
    size = DaemonLimits().max_message_size
    overhead = client.frame_size_limit(size) - size
    message = Message(sender, groups, ServiceLevel.SAFE, 1, b"")
    multicast = Multicast(groups, b"", request_id=client.U32_MAX)
    assert len(encode(message)) - 4 == overhead  # the largest MESSAGE fits exactly
    assert len(encode(multicast)) - 4 <= overhead
    # small payloads: the cap still fits a MEMBERSHIP of MAX_MEMBERS longest names twice
    assert client.frame_size_limit(1) > 2 * MAX_MEMBERS * (1 + client.MAX_PRIVATE_NAME)


def test_enumerations_have_their_documented_values() -> None:
    assert [int(s) for s in ServiceLevel] == [0, 1, 2, 3, 4, 5]
    assert ServiceLevel.SAFE > ServiceLevel.AGREED > ServiceLevel.FIFO
    assert [p.value for p in SlowReceiverPolicy] == ["block", "disconnect", "drop-unreliable"]
    assert Cause("network") is Cause.NETWORK
    assert ErrorCode.SLOW_RECEIVER.ends_session
    assert not ErrorCode.NOT_A_MEMBER.ends_session
    assert not ErrorCode.MESSAGES_DROPPED.ends_session
    assert {FrameType.PING, FrameType.PONG, FrameType.GOODBYE} == FROM_CLIENT & FROM_DAEMON


def test_plain_values_encode_like_enum_members() -> None:
    assert encode(Join("chat", "drop-unreliable", 7)) == encode(  # type: ignore[arg-type]
        Join("chat", SlowReceiverPolicy.DROP_UNRELIABLE, 7)
    )
    assert decode(encode(Multicast(("g",), b"", 3))) == Multicast(  # type: ignore[arg-type]
        ("g",), b"", ServiceLevel.CAUSAL
    )


def test_names_helpers() -> None:
    assert client.private_name("alice", "D1") == ALICE
    assert client.split_private_name(ALICE) == ("alice", "D1")
    client.check_client_name("")  # the daemon picks a name
    client.check_client_name("ålice-2")
    client.check_group_name("chat room ☕")
    with pytest.raises(ValueError, match="more than the 4 allowed"):
        client.check_group_name("chat!", max_bytes=4)
    with pytest.raises(ValueError, match="contains '#'"):
        client.private_name("a#b", "D1")
    with pytest.raises(ValueError, match="form '#client#daemon'"):
        client.split_private_name("alice")


def test_an_oversized_name_is_echoed_short_naming_the_one_limit() -> None:
    huge = "g" * 100_000
    with pytest.raises(ValueError, match="100000 bytes") as caught:
        client.check_group_name(huge, max_bytes=64)
    text = str(caught.value)
    assert len(text) < 200
    assert "64" in text
    assert "255" not in text
    assert "100000 characters" in text
    with pytest.raises(ValueError, match="more than 255") as encoded:
        encode(Join(huge))
    assert len(str(encoded.value)) < 200
    with pytest.raises(ValueError, match=r"\(50020 characters\) is 50020 bytes") as word:
        client.private_name("#" * 20 + "x" * 50_000, "D1")
    assert len(str(word.value)) < 200
    client.check_group_name("g" * 64, max_bytes=64)  # at the limit: fine


def test_clip_text_makes_any_text_fit_an_error() -> None:
    text = client.clip_text("bad\x00name " + "é" * 2000)
    assert "\x00" not in text
    assert len(text.encode()) <= client.MAX_ERROR_TEXT
    assert decode(encode(ErrorReport(ErrorCode.BAD_FRAME, text))) == ErrorReport(
        ErrorCode.BAD_FRAME, text
    )


def test_a_token_stays_out_of_repr() -> None:
    hello = Hello("bob", token="s3cret-t0ken")
    assert "s3cret-t0ken" not in repr(hello)
    assert decode(encode(hello)).token == "s3cret-t0ken"  # type: ignore[union-attr]


def test_version_choice() -> None:
    assert client.choose_version(Hello()) == 6
    assert client.choose_version(Hello(max_version=1)) == 1  # a version-1 client
    assert client.choose_version(Hello(max_version=3)) == 3  # cannot be told BUSY
    assert client.choose_version(Hello(max_version=4)) == 4  # cannot REPLICATE
    assert client.choose_version(Hello(max_version=5)) == 5  # no BLOB_HELD, cannot SET_RATE
    assert client.choose_version(Hello(min_version=1, max_version=8)) == 6
    assert client.choose_version(Hello(min_version=7, max_version=8)) is None
    assert client.choose_version(Hello(min_version=2, max_version=9), lowest=1, highest=4) == 4


# ---------------------------------------------------------------- encode refuses invalid frames

G = ("chat",)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (Hello("al ice"), "client name 'al ice' has whitespace at index 2"),
        (Hello("a#b"), "client name 'a#b' contains '#'"),
        (Hello("x" * 33), "is 33 bytes, more than 32"),
        (Hello("bell\x07"), "control character at index 4"),
        (Hello("\ud800"), "cannot be encoded as UTF-8"),
        (Hello(min_version=2, max_version=1), "min_version 2 is above max_version 1"),
        (Hello(min_version=0), "min_version 0 is outside 1..65535"),
        (Hello(flags=HelloFlag(0x8000)), "unknown flags 0x8000"),
        (Hello(flags=HelloFlag.TOKEN), "unknown flags 0x0002"),  # set from `token` only
        (Hello(token=""), "token of 0 characters; allowed: 1..128"),
        (Hello(token="x" * 129), "token of 129 characters"),
        (Hello(token="with space"), "token has a character other than printable ASCII"),
        (Hello(token="caf\u00e9"), "token has a character other than printable ASCII"),
        (Hello(max_version=2, token="secret"), "a token needs max_version >= 3, not 2"),
        (Welcome(1, "alice"), "private name 'alice' is not of the form"),
        (Welcome(1, "#alice#"), "daemon part of private name is empty"),
        (Welcome(0, ALICE), "version 0 is outside"),
        (Welcome(1, ALICE, DaemonLimits(max_group_name=256)), "max_group_name 256 is outside"),
        (Welcome(1, ALICE, DaemonLimits(max_message_size=0)), "max_message_size 0 is outside"),
        (Join(""), "group name is empty"),
        (Join("#alice#D1"), "starts with '#'"),
        (Join("x" * 256), "is 256 bytes, more than 255"),
        (Join("chat", "never"), "unknown slow-receiver policy 'never'"),  # type: ignore[arg-type]
        (Leave("chat", request_id=-1), "request_id -1 is outside"),
        (Multicast((), b"x"), "groups has 0 names; allowed: 1..256"),
        (Multicast("chat", b"x"), "groups must be a tuple"),  # type: ignore[arg-type]
        (Multicast(("a", "b", "a"), b"x"), "groups lists 'a' twice"),
        (Multicast(G, b"x", 6), "unknown service level 6"),  # type: ignore[arg-type]
        (Multicast(G, b"x", msg_type=-1), "msg_type -1 is outside 0..65535"),
        (Multicast(G, b"x", msg_type=True), "msg_type must be an int"),
        (Multicast(G, "text"), "payload must be bytes"),  # type: ignore[arg-type]
        (Message("bob", G, ServiceLevel.FIFO, 0, b""), "sender 'bob' is not of the form"),
        (
            Membership("chat", ViewId(0, 1), (ALICE,), Cause.JOIN, (ALICE,)),
            "view counter 0 is outside",
        ),
        (
            Membership("chat", ViewId(1, 0), (ALICE,), Cause.JOIN, (ALICE,)),
            "view coordinator 0 is outside",
        ),
        (
            Membership("chat", ViewId(1, 1), (ALICE, ALICE), Cause.JOIN, (ALICE,)),
            "members lists '#alice#D1' twice",
        ),
        (
            Membership("chat", ViewId(1, 1), (ALICE,), Cause.JOIN, (BOB,)),
            "joiner '#bob#D2' is missing from the members",
        ),
        (
            Membership("chat", ViewId(1, 1), (ALICE,), Cause.LEAVE, (ALICE,)),
            "'#alice#D1' is still among the members after a leave",
        ),
        (
            Membership("chat", ViewId(1, 1), (ALICE,), Cause.DISCONNECT, ()),
            "a disconnect change names exactly one member in who, not 0",
        ),
        (
            Membership("chat", ViewId(1, 1), (), "lost", ()),  # type: ignore[arg-type]
            "unknown cause 'lost'",
        ),
        (ErrorReport(ErrorCode.BAD_FRAME, "x" * 1025), "is 1025 bytes, more than 1024"),
        (ErrorReport(ErrorCode.BAD_FRAME, "two\nlines"), "control character at index 3"),
        (ErrorReport(999, "x"), "unknown error code 999"),  # type: ignore[arg-type]
        (Replicate("", "all"), "path is empty"),
        (Replicate("relative/a", "all"), "path 'relative/a' is not absolute"),
        (Replicate("/a\nb", "all"), "path '/a\\nb' has a control character at index 2"),
        (Replicate("/" + "x" * 4096, "all"), "is 4097 bytes, more than 4096"),
        (Replicate("/a", ""), "targets is empty"),
        (Replicate("/a", "D2,,D3"), "daemon name in targets is empty"),
        (Replicate("/a", "D2, D3"), "daemon name in targets ' D3' has whitespace"),
        (Replicate("/a", "D2,D2"), "targets name daemon 'D2' twice"),
        (Replicate("/a", "D#2"), "daemon name in targets 'D#2' contains '#'"),
        (Replicate("/a", "group:"), "group name in targets is empty"),
        (Replicate("/a", "group:#x"), "group name in targets '#x' starts with '#'"),
        (Replicate("/a", "all", dest="/d\x00"), "dest '/d\\x00' has a control character"),
        (Replicate("/a", "all", token=2**32), "token 4294967296 is outside 0..4294967295"),
        (Replicate("/a", "all", rate=math.nan), "rate nan is not a finite number"),
        (Replicate("/a", "all", rate=math.inf), "rate inf is not a finite number"),
        (Replicate("/a", "all", rate=-1.0), "rate -1.0 is not a finite number of bytes/s >= 0"),
        (Replicate("/a", "all", rate="1M"), "rate must be a number, not str"),  # type: ignore[arg-type]
        (Replicate("/a", "all", strategy=3), "strategy 3 is outside 0..2"),
        (Replicate("/a", "all", variant=3), "variant 3 is outside 0..2"),
        (Replicate("/a", "all", tree=2), "tree 2 is outside 0..1"),
        (Replicate("/a", "all", max_connections=0), "max_connections 0 is outside 1..255"),
        (Replicate("/a", "all", max_connections=256), "max_connections 256 is outside 1..255"),
        (Replicate("/a", "all", capacity_aware=1), "capacity_aware must be a bool, not 1"),  # type: ignore[arg-type]
        (Replication(1, True, "[]"), "report is a JSON list, not an object"),
        (Replication(1, 1, FAILED_REPORT), "final must be a bool, not int"),  # type: ignore[arg-type]
        (Replication(1, True, FAILED_REPORT.replace("failed", "hashing")), "a final report in"),
        (Replication(-1, True, FAILED_REPORT), "token -1 is outside"),
        (Ping(-1), "nonce -1 is outside"),
        (Pong(2**64), "nonce 18446744073709551616 is outside"),
    ],
)
def test_encode_refuses_invalid_frames(frame: Frame, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{type(frame).__name__}: .*{re.escape(message)}"):
        encode(frame)


def test_encode_refuses_non_frames() -> None:
    with pytest.raises(ValueError, match="not a client-protocol frame: bytes"):
        encode(b"hello")  # type: ignore[arg-type]


# ---------------------------------------------------------------- decode names every fault


def frame_bytes(ftype: int, body: bytes) -> bytes:
    return struct.pack("!IB", 1 + len(body), ftype) + body


def str8(text: str) -> bytes:
    data = text.encode()
    return bytes([len(data)]) + data


HELLO_BODY = b"MCCP" + struct.pack("!HHH", 1, 1, 1) + str8("alice")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x00", "2 bytes are too short for a frame length"),
        (b"\x00\x00\x00\x00", "frame length 0"),
        (frame_bytes(0x01, HELLO_BODY)[:-1], "frame length 17 does not match the 16 bytes"),
        (frame_bytes(0x55, b""), "unknown frame type 0x55"),
        (frame_bytes(0x01, b"MCXP" + HELLO_BODY[4:]), "HELLO frame: bad magic b'MCXP'"),
        (frame_bytes(0x01, b"MCCP\x00\x01"), "HELLO frame: truncated HELLO header: 2 of 6"),
        (frame_bytes(0x01, HELLO_BODY[:10]), "HELLO frame: truncated length of client name"),
        (frame_bytes(0x01, HELLO_BODY[:-1]), "client name of 5 bytes runs past the end"),
        (frame_bytes(0x01, HELLO_BODY + b"!"), "HELLO frame: 1 trailing bytes after the body"),
        (
            frame_bytes(0x01, HELLO_BODY[:8] + b"\x00\x03" + HELLO_BODY[10:]),
            "HELLO frame: truncated length of token",  # flag TOKEN (v3), no token
        ),
        (
            frame_bytes(0x01, HELLO_BODY[:8] + b"\x00\x03" + HELLO_BODY[10:] + str8("a b")),
            "HELLO frame: token has a character other than printable ASCII",
        ),
        (
            frame_bytes(0x01, HELLO_BODY[:8] + b"\x00\x05" + HELLO_BODY[10:]),
            "HELLO frame: unknown flags 0x0004",
        ),
        (
            frame_bytes(0x01, HELLO_BODY[:10] + b"\x02\xc3\x28"),
            "HELLO frame: client name is not UTF-8 (invalid continuation byte at byte 0)",
        ),
        (frame_bytes(0x02, struct.pack("!IB", 1, 3) + str8("g")), "unknown slow-receiver policy 3"),
        (frame_bytes(0x02, struct.pack("!IB", 1, 0) + str8("a\x00")), "control character"),
        (
            frame_bytes(0x04, struct.pack("!IBHH", 1, 9, 0, 1) + str8("g")),
            "MULTICAST frame: unknown service level 9",
        ),
        (
            frame_bytes(0x04, struct.pack("!IBHH", 1, 0, 0, 0)),
            "MULTICAST frame: groups has 0 names; allowed: 1..256",
        ),
        (
            frame_bytes(0x04, struct.pack("!IBHH", 1, 0, 0, 257) + bytes(300)),
            "groups has 257 names; at most 256 allowed",
        ),
        (
            frame_bytes(0x04, struct.pack("!IBHH", 1, 0, 0, 200) + bytes(10)),
            "groups has 200 names, more than the 10 bytes left",
        ),
        (
            frame_bytes(0x42, struct.pack("!BH", 1, 0) + str8(BOB) + b"\x00"),
            "MESSAGE frame: truncated group count: 1 of 2 bytes",
        ),
        (
            frame_bytes(0x43, str8("g") + struct.pack("!QIB", 1, 1, 7)),
            "MEMBERSHIP frame: unknown cause 7",
        ),
        (
            frame_bytes(0x43, str8("g") + struct.pack("!QIBI", 1, 1, 3, MAX_MEMBERS + 1)),
            f"members has {MAX_MEMBERS + 1} names; at most {MAX_MEMBERS} allowed",
        ),
        (
            frame_bytes(0x43, str8("g") + struct.pack("!QIBI", 1, 1, 3, 0)),
            "MEMBERSHIP frame: truncated who count",
        ),
        (
            frame_bytes(0x43, str8("g") + struct.pack("!QIBI", 1, 1, 3, 1) + str8("#x") + bytes(4)),
            "name in members '#x' is not of the form '#client#daemon'",
        ),
        (frame_bytes(0x44, struct.pack("!HIH", 42, 0, 0)), "ERROR frame: unknown error code 42"),
        (
            frame_bytes(0x44, struct.pack("!HIH", 101, 0, 9) + b"short"),
            "error text of 9 bytes runs past the end",
        ),
        (frame_bytes(0x81, bytes(7)), "PING frame: truncated nonce: 7 of 8 bytes"),
        (frame_bytes(0x83, b"\x00"), "GOODBYE frame: 1 trailing bytes"),
    ],
)
def test_malformed_frames_name_the_fault(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=re.escape(message)):
        decode(data)


REPLICATE_BODY = struct.pack("!I", 1) + b"\x00\x02/a" + b"\x00\x03all" + b"\x00\x00"


def replicate_tail(
    rate: float = 0.0,
    strategy: int = 0,
    variant: int = 1,
    tree: int = 0,
    k: int = 9,
    flags: int = 0,
) -> bytes:
    return struct.pack("!dBBBBB", rate, strategy, variant, tree, k, flags)


def replication_body(report: dict[str, object], final: int = 0) -> bytes:
    return struct.pack("!IB", 3, final) + json.dumps(report).encode()


RUNNING = {
    "rid": "0123456789abcdef",
    "name": "a.bin",
    "size": 100,
    "digest": "ab12",
    "state": "running",
    "elapsed": 1.5,
    "detail": "",
    "recipients": [
        {
            "daemon": "D2",
            "state": "receiving",
            "held_bytes": 50,
            "bad_chunks": 0,
            "rate": 10.0,
            "eta": 5.0,
            "detail": "",
            "path": None,
        }
    ],
}


def running(**changes: object) -> dict[str, object]:
    return {**RUNNING, **changes}


def recipient(**changes: object) -> dict[str, object]:
    entry = RUNNING["recipients"][0]  # type: ignore[index]
    return running(recipients=[{**entry, **changes}])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (frame_bytes(0x06, REPLICATE_BODY + replicate_tail()[:-1]), "truncated REPLICATE tail"),
        (frame_bytes(0x06, REPLICATE_BODY[:8]), "truncated length of targets"),
        (frame_bytes(0x06, REPLICATE_BODY + replicate_tail(flags=0x82)), "unknown flags 0x82"),
        (frame_bytes(0x06, REPLICATE_BODY + replicate_tail(rate=math.nan)), "rate nan"),
        (frame_bytes(0x06, REPLICATE_BODY + replicate_tail(rate=-2.0)), "rate -2.0"),
        (frame_bytes(0x06, REPLICATE_BODY + replicate_tail(strategy=7)), "strategy 7 is outside"),
        (frame_bytes(0x06, REPLICATE_BODY + replicate_tail(variant=3)), "variant 3 is outside"),
        (frame_bytes(0x06, REPLICATE_BODY + replicate_tail(tree=9)), "tree 9 is outside"),
        (frame_bytes(0x06, REPLICATE_BODY + replicate_tail(k=0)), "max_connections 0 is outside"),
        (frame_bytes(0x06, REPLICATE_BODY + replicate_tail() + b"!"), "truncated length of buddy"),
        (
            frame_bytes(0x06, REPLICATE_BODY + replicate_tail() + b"\x00\x01D!"),
            "1 trailing bytes",
        ),
        (
            frame_bytes(0x06, REPLICATE_BODY + replicate_tail() + b"\x00\x02D#"),
            "buddy 'D#' contains '#'",
        ),
        (frame_bytes(0x07, b"\x00" * 19), "truncated SET_RATE: 19 of 20 bytes"),
        (frame_bytes(0x07, b"\x00" * 21), "SET_RATE frame: 1 trailing bytes"),
        (
            frame_bytes(
                0x06, struct.pack("!I", 1) + b"\x00\x02ab" + REPLICATE_BODY[8:] + replicate_tail()
            ),
            "REPLICATE frame: path 'ab' is not absolute",
        ),
        (frame_bytes(0x47, struct.pack("!IB", 3, 2) + b"{}"), "final is 2, not 0 or 1"),
        (frame_bytes(0x47, struct.pack("!I", 3)), "truncated REPLICATION header"),
        (
            frame_bytes(0x47, replication_body(running(), final=1)),
            "a final report in state 'running'",
        ),
        (frame_bytes(0x47, replication_body(running(rid="ABC"))), "'rid' must be 16 lowercase hex"),
        (frame_bytes(0x47, replication_body(running(size=-1))), "'size' must be an integer >= 0"),
        (frame_bytes(0x47, replication_body(running(size=True))), "'size' must be an integer"),
        (
            frame_bytes(0x47, replication_body(running(digest="xy"))),
            "'digest' must be lowercase hex",
        ),
        (frame_bytes(0x47, replication_body(running(state="paused"))), "'state' must be one of"),
        (
            frame_bytes(0x47, replication_body(running(elapsed=-1))),
            "'elapsed' must be a number >= 0",
        ),
        (
            frame_bytes(0x47, replication_body(running(recipients={}))),
            "'recipients' must be a list",
        ),
        (frame_bytes(0x47, replication_body(running(recipients=[1]))), "recipient 0 is a JSON int"),
        (frame_bytes(0x47, replication_body(recipient(state="gone"))), "recipient 0: 'state'"),
        (frame_bytes(0x47, replication_body(recipient(rate=None))), "recipient 0: 'rate' must be"),
        (
            frame_bytes(0x47, replication_body(recipient(eta="soon"))),
            "'eta' must be a number >= 0 or null",
        ),
        (frame_bytes(0x47, replication_body(recipient(path=3))), "'path' must be a string or null"),
        (
            frame_bytes(0x47, replication_body({k: v for k, v in RUNNING.items() if k != "name"})),
            "REPLICATION frame: report has no 'name'",
        ),
        (
            frame_bytes(0x47, struct.pack("!IB", 3, 0) + b'{"a": "' + b"x" * (1 << 20) + b'"}'),
            "report is 1048585 bytes, more than 1048576",
        ),
    ],
    ids=lambda value: value[:40] if isinstance(value, str) else "",
)
def test_malformed_replication_frames_name_the_fault(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=re.escape(message)):
        decode(data)


def test_a_cap_smaller_than_the_frame_is_enforced() -> None:
    data = encode(Multicast(G, bytes(100)))
    with pytest.raises(DecodeError, match=r"frame length 115 exceeds the limit of 64 bytes"):
        decode(data, max_frame_size=64)


def test_replication_frames_keep_their_fields() -> None:
    progress = decode(frame_bytes(0x47, replication_body(running(extra={"new": 1}))))
    assert progress == Replication(3, False, json.dumps(running(extra={"new": 1})))
    frame = Replicate("/f", "D2", 9, "out", 12.5, 1, 0, 1, 3, capacity_aware=False)
    assert decode(encode(frame)) == frame  # a relative dest: under each daemon's data directory
    assert client.parse_targets("all") == client.ReplicationTargets("all")
    assert client.parse_targets("group:ops") == client.ReplicationTargets("group", group="ops")
    names = client.parse_targets("D2,D3")
    assert names == client.ReplicationTargets("daemons", daemons=("D2", "D3"))
    assert [str(t) for t in (client.parse_targets(x) for x in ("all", "group:g", "a,b"))] == [
        "all",
        "group:g",
        "a,b",
    ]


def test_replicate_names_index_the_engines_enumerations() -> None:
    from meshcast.replicate.plan import Strategy, Tree, Variant

    assert tuple(s.value for s in Strategy) == client.REPLICATE_STRATEGIES
    assert [f"k+{v.value}" if v.value else "k" for v in Variant] == list(client.REPLICATE_VARIANTS)
    assert [int(v) for v in Variant] == [0, 1, 2]
    assert tuple(t.value for t in Tree) == client.REPLICATE_TREES


def test_each_end_accepts_only_the_other_ends_frames() -> None:
    with pytest.raises(DecodeError, match="unexpected WELCOME frame"):
        decode(encode(Welcome(1, ALICE)), accept=FROM_CLIENT)
    with pytest.raises(DecodeError, match=r"unexpected JOIN frame \(accepted here: WELCOME,"):
        decode(encode(Join("chat")), accept=FROM_DAEMON)
    assert decode(encode(Ping(5)), accept=FROM_DAEMON) == Ping(5)


# ---------------------------------------------------------------- the stream decoder


def test_stream_decoder_splits_frames_and_keeps_partial_ones() -> None:
    frames: list[Frame] = [Hello("alice"), Join("chat"), Multicast(G, b"payload"), Goodbye()]
    stream = b"".join(encode(f) for f in frames)
    decoder = FrameDecoder(accept=FROM_CLIENT)
    decoder.feed(stream[:-8])  # all but GOODBYE (5 bytes) and 3 of MULTICAST
    assert list(decoder) == frames[:2]
    assert decoder.buffered == len(encode(frames[2])) - 3
    with pytest.raises(DecodeError, match="stream ended inside a frame"):
        decoder.end_of_stream()
    decoder.feed(stream[-8:])
    assert list(decoder) == frames[2:]
    assert decoder.buffered == 0
    decoder.end_of_stream()


def test_oversized_frame_is_refused_before_its_body_is_buffered() -> None:
    decoder = FrameDecoder(max_frame_size=1000)
    decoder.feed(encode(Ping(1)))
    decoder.feed(struct.pack("!I", 1001)[:2])
    assert decoder.next_frame() == Ping(1)
    decoder.feed(struct.pack("!I", 1001)[2:])
    assert decoder.buffered == 0
    assert not decoder.synchronised
    with pytest.raises(
        DecodeError, match="stream out of sync: frame length 1001 exceeds the limit"
    ):
        decoder.next_frame()
    decoder.feed(bytes(5000))  # the rest of the oversized body is discarded, not kept
    assert decoder.buffered == 0
    with pytest.raises(DecodeError, match="out of sync"):
        decoder.next_frame()
    with pytest.raises(DecodeError, match="out of sync"):
        decoder.end_of_stream()


def test_a_bad_body_is_skipped_and_the_stream_stays_in_sync() -> None:
    bad = frame_bytes(0x02, struct.pack("!IB", 1, 9) + str8("g"))
    decoder = FrameDecoder()
    decoder.feed(bad + encode(Leave("chat")))
    with pytest.raises(DecodeError, match="JOIN frame: unknown slow-receiver policy 9"):
        decoder.next_frame()
    assert decoder.synchronised
    assert decoder.next_frame() == Leave("chat")
    assert decoder.next_frame() is None


def test_raising_the_cap_after_welcome_applies_to_the_next_frame() -> None:
    welcome = Welcome(1, ALICE, DaemonLimits(max_message_size=client.MAX_MESSAGE_SIZE))
    big = Message(BOB, G, ServiceLevel.RELIABLE, 0, bytes(100_000))
    decoder = FrameDecoder(max_frame_size=50_000, accept=FROM_DAEMON)
    decoder.feed(encode(welcome) + encode(big))
    frame = decoder.next_frame()
    assert isinstance(frame, Welcome)
    decoder.max_frame_size = frame.limits.max_frame_size
    assert decoder.next_frame() == big


def test_decoder_rejects_a_nonsense_cap() -> None:
    with pytest.raises(ValueError, match="max_frame_size must be within"):
        FrameDecoder(max_frame_size=0)
