"""Overlay message codec: round trips, and decode raises only DecodeError."""

from __future__ import annotations

import contextlib

from hypothesis import given
from hypothesis import strategies as st

from meshcast.errors import DecodeError
from meshcast.wire.overlay import (
    Data,
    Feedback,
    Lsa,
    LsaEntry,
    decode_overlay,
    encode_data,
    encode_feedback,
    encode_lsa,
)

u32 = st.integers(0, 2**32 - 1)
positive = st.floats(min_value=1e-6, max_value=1e12, allow_nan=False, allow_infinity=False)
lsas = st.builds(
    Lsa,
    u32,
    u32,
    u32,
    st.binary(min_size=8, max_size=8),
    st.lists(st.builds(LsaEntry, u32, positive, positive), max_size=30).map(tuple),
)
datas = st.builds(
    Data,
    u32,
    u32,
    st.integers(0, 2**64 - 1),
    st.integers(0, 255),
    st.integers(0, 255),
    st.lists(u32, min_size=1, max_size=60, unique=True).map(tuple),
    st.binary(max_size=500),
)
feedbacks = st.builds(Feedback, u32, u32, st.integers(0, 2**64 - 1), u32, u32)


@given(lsas)
def test_lsa_round_trips(lsa: Lsa) -> None:
    assert decode_overlay(encode_lsa(lsa)) == lsa


@given(datas)
def test_data_round_trips(data: Data) -> None:
    assert decode_overlay(encode_data(data)) == data


@given(feedbacks)
def test_feedback_round_trips(feedback: Feedback) -> None:
    assert decode_overlay(encode_feedback(feedback)) == feedback


@given(st.binary(max_size=600))
def test_random_bytes_raise_only_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_overlay(data)


@given(st.one_of(lsas.map(encode_lsa), datas.map(encode_data)), st.data())
def test_mutations_raise_only_decode_error(encoded: bytes, data: st.DataObject) -> None:
    mutated = bytearray(encoded)
    position = data.draw(st.integers(0, len(mutated) - 1))
    mutated[position] = data.draw(st.integers(0, 255))
    with contextlib.suppress(DecodeError):
        decode_overlay(bytes(mutated[: data.draw(st.integers(0, len(mutated)))]))
