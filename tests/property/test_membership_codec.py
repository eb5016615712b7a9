"""Membership operations codec: round trips, decode raises only DecodeError."""

from __future__ import annotations

import contextlib

from hypothesis import given
from hypothesis import strategies as st

from meshcast.errors import DecodeError
from meshcast.wire.membership import (
    MAGIC,
    MembershipOp,
    MembershipRecord,
    OpKind,
    State,
    StateEntry,
    decode_membership,
    encode_membership,
)

# Characters on both sides of the surrogates, never next to them: hypothesis 6.155 fails
# internally ("55296 is not in list") when it shrinks text that borders them.
letters = st.characters(min_codepoint=1, max_codepoint=0xD7FE) | st.characters(
    min_codepoint=0x10000, max_codepoint=0x10FFFF
)
names = st.text(letters, min_size=1, max_size=12).filter(lambda t: len(t.encode("utf-8")) <= 255)
long_names = st.text(
    st.characters(min_codepoint=1, max_codepoint=0xD7FE), min_size=60, max_size=85
).filter(lambda t: 1 <= len(t.encode("utf-8")) <= 255)
u32 = st.integers(0, 2**32 - 1)
ops = st.builds(
    MembershipOp,
    st.sampled_from([OpKind.JOIN, OpKind.LEAVE, OpKind.DISCONNECT]),
    names | long_names,
    st.lists(names, min_size=1, max_size=8).map(tuple),
)
entries = st.builds(
    StateEntry,
    names,
    st.integers(0, 2**64 - 1),
    u32,
    st.lists(st.tuples(names, u32), max_size=5).map(tuple),
)
states = st.builds(
    State,
    st.lists(entries, max_size=5).map(tuple),
    st.lists(st.tuples(names, st.lists(names, max_size=5).map(tuple)), max_size=5).map(tuple),
)
records = ops | states


@given(records)
def test_records_round_trip(record: MembershipRecord) -> None:
    assert decode_membership(encode_membership(record)) == record


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_decode_error(raw: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_membership(raw)


@given(st.sampled_from(list(OpKind)), st.binary(max_size=200))
def test_random_bodies_raise_only_decode_error(kind: OpKind, body: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_membership(MAGIC + bytes([kind]) + body)


@given(records, st.data())
def test_mutated_and_cut_records_decode_or_raise_decode_error(
    record: MembershipRecord, data: st.DataObject
) -> None:
    raw = bytearray(encode_membership(record))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    for candidate in (bytes(raw), bytes(raw[:cut])):
        with contextlib.suppress(DecodeError):
            decoded = decode_membership(candidate)
            assert encode_membership(decoded) == candidate  # what decodes is canonical
