"""Membership operations codec (`meshcast.wire.membership`): golden bytes, every refusal
a `DecodeError`, the encoder refusing what the decoder would."""

from __future__ import annotations

import pytest

from meshcast.errors import DecodeError
from meshcast.wire.membership import (
    MembershipOp,
    MembershipRecord,
    OpKind,
    State,
    StateEntry,
    decode_membership,
    encode_membership,
)

STATE = State((StateEntry("g", 3, 2, (("#a#D1", 1), ("#b#D2", 2))),), (("g", ("#a#D1",)),))

# Computed with the codec as it was inside group/membership.py before it moved here: the
# format is unchanged, so daemons of either version understand each other.
GOLDEN: list[tuple[MembershipRecord, str]] = [
    # "MCGM" | JOIN 1 | member "#a#D1" | 2 groups "g" "h"
    (
        MembershipOp(OpKind.JOIN, "#a#D1", ("g", "h")),
        "4d43474d 01 05 2361234431 0002 01 67 01 68",
    ),
    # LEAVE 2 | "#b#D2" | 1 group "chat"
    (MembershipOp(OpKind.LEAVE, "#b#D2", ("chat",)), "4d43474d 02 05 2362234432 0001 04 63686174"),
    # DISCONNECT 3 | "#b#D2" | 3 groups
    (
        MembershipOp(OpKind.DISCONNECT, "#b#D2", ("x", "y", "z")),
        "4d43474d 03 05 2362234432 0003 01 78 01 79 01 7a",
    ),
    # STATE 4 | 1 table entry: "g", counter 3, coordinator 2, 2 members with their daemons
    # | 1 own group: "g" with "#a#D1"
    (
        STATE,
        "4d43474d 04 00000001 01 67 0000000000000003 00000002 00000002"
        " 05 2361234431 00000001 05 2362234432 00000002"
        " 00000001 01 67 00000001 05 2361234431",
    ),
    # STATE of a daemon with an empty table and no clients
    (State((), ()), "4d43474d 04 00000000 00000000"),
]


@pytest.mark.parametrize(("record", "hex_bytes"), GOLDEN)
def test_golden_records(record: MembershipRecord, hex_bytes: str) -> None:
    data = bytes.fromhex(hex_bytes)
    assert encode_membership(record) == data
    assert decode_membership(data) == record


@pytest.mark.parametrize(
    ("hex_bytes", "words"),
    [
        ("", "no MCGM magic"),
        ("4d43474e 01", "no MCGM magic"),
        ("4d43474d", "truncated in op"),
        ("4d43474d 09", "unknown membership operation 9"),
        ("4d43474d 01 00 0001 01 67", "empty member"),
        ("4d43474d 01 01 23 0000", "names no group"),
        ("4d43474d 01 01 23 0002 01 67", "claims 2 groups"),
        ("4d43474d 01 01 23 0001 02 67", "truncated in group"),
        ("4d43474d 01 01 ff 0001 01 67", "not UTF-8"),
        ("4d43474d 01 01 23 0001 01 67 00", "1 trailing bytes"),
        ("4d43474d 04 ffffffff 00000000", "claims 4294967295 table entries"),
        ("4d43474d 04 00000000 00000001 01 67 ffffff00", "claims 4294967040 members"),
        ("4d43474d 04 00000000", "truncated in own groups"),
    ],
)
def test_malformed_records_raise_decode_error(hex_bytes: str, words: str) -> None:
    with pytest.raises(DecodeError, match=words.replace("(", r"\(")):
        decode_membership(bytes.fromhex(hex_bytes))


@pytest.mark.parametrize(
    "record",
    [
        MembershipOp(OpKind.JOIN, "#a#D1", ()),
        MembershipOp(OpKind.JOIN, "", ("g",)),
        MembershipOp(OpKind.LEAVE, "#a#D1", ("g" * 256,)),
        MembershipOp(OpKind.STATE, "#a#D1", ("g",)),
        MembershipOp(OpKind.JOIN, "#a#D1", ("g",) * 0x10000),
        State((StateEntry("g", -1, 2, ()),), ()),
        State((StateEntry("g", 1, 2**32, ()),), ()),
        State((), (("", ("#a#D1",)),)),
    ],
)
def test_encode_refuses_what_decode_would_refuse(record: MembershipRecord) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (any ValueError: the contract)
        encode_membership(record)
