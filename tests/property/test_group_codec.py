"""Group message codec: round trips, decode raises only DecodeError, encode refuses what
decode would refuse."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcast.errors import DecodeError
from meshcast.wire import group
from meshcast.wire.client import ServiceLevel
from meshcast.wire.group import GroupData, GroupFlush, GroupNull, decode_group, encode_group

u64 = st.integers(0, 2**64 - 1)
view_ids = st.binary(min_size=8, max_size=8)
names = st.text(min_size=1, max_size=20)
fifo = st.lists(
    st.tuples(st.integers(0, 2**32 - 1), u64), max_size=10, unique_by=lambda e: e[0]
).map(tuple)
datas = st.builds(
    GroupData,
    st.sampled_from(list(ServiceLevel)),
    view_ids,
    u64,
    u64,
    u64,
    u64,
    st.integers(0, 0xFFFF),
    st.text(max_size=30),
    st.lists(names, min_size=1, max_size=5).map(tuple),
    fifo,
    st.lists(u64, max_size=10).map(tuple),
    st.binary(max_size=200),
    st.booleans(),  # confirm: the service byte's high bit
)
nulls = st.builds(GroupNull, view_ids, u64, u64, u64)


@st.composite
def flushes(draw: st.DrawFn) -> GroupFlush:
    """A FLUSH part, or a probe (RETRY: no copies, the parts it holds)."""
    parts = draw(st.integers(1, 50))
    prefixes = draw(st.lists(st.tuples(st.integers(0, 2**32 - 1), u64), max_size=6).map(tuple))
    head = (draw(view_ids), draw(view_ids), draw(u64), draw(u64), draw(u64))
    if draw(st.booleans()):
        held = draw(st.lists(st.integers(0, 2**32 - 1), max_size=20).map(tuple))
        return GroupFlush(*head, 0, 1, prefixes, (), True, (draw(u64), draw(u64)), held)
    carried = draw(
        st.lists(st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=40)), max_size=5)
    )
    part = draw(st.integers(0, parts - 1))
    return GroupFlush(*head, part, parts, prefixes, tuple(carried))


@given(flushes())
def test_flush_and_probe_round_trip(message: GroupFlush) -> None:
    assert decode_group(encode_group(message)) == message


def test_only_a_probe_lists_held_parts() -> None:
    part = GroupFlush(bytes(8), bytes(8), 1, 1, 0, 0, 1, (), (), held=(0,))
    with pytest.raises(ValueError, match="only a probe"):
        encode_group(part)


@given(st.one_of(datas, nulls))
def test_round_trip(message: GroupData | GroupNull) -> None:
    assert decode_group(encode_group(message)) == message


@given(st.binary(max_size=300))
def test_decode_raises_only_decode_error(raw: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_group(raw)


@given(datas, st.data())
def test_mutated_messages_decode_or_raise_decode_error(
    message: GroupData, data: st.DataObject
) -> None:
    raw = bytearray(encode_group(message))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    with contextlib.suppress(DecodeError):
        decode_group(bytes(raw[:cut]))


def test_encode_refuses_what_decode_would_refuse() -> None:
    base = GroupData(ServiceLevel.FIFO, bytes(8), 1, 1, 1, 0, 0, "s", ("g",), (), (), b"")
    bad = [
        GroupData(ServiceLevel.FIFO, bytes(8), 1, 1, 1, 0, 0, "s", (), (), (), b""),
        GroupData(ServiceLevel.FIFO, bytes(8), 1, 1, 1, 0, 0, "s", ("",), (), (), b""),
        GroupData(ServiceLevel.FIFO, bytes(8), 1, 1, 1, 0, 0, "s", ("g" * 256,), (), (), b""),
        GroupData(ServiceLevel.FIFO, bytes(7), 1, 1, 1, 0, 0, "s", ("g",), (), (), b""),
        GroupData(
            ServiceLevel.FIFO, bytes(8), 1, 1, 1, 0, 0, "s", ("g",), ((2, 1), (2, 2)), (), b""
        ),
        GroupData(ServiceLevel.FIFO, bytes(8), -1, 1, 1, 0, 0, "s", ("g",), (), (), b""),
    ]
    assert decode_group(encode_group(base)) == base
    for message in bad:
        with pytest.raises(ValueError):  # noqa: PT011 (any ValueError: the contract)
            encode_group(message)


def test_unknown_kind_and_service_are_decode_errors() -> None:
    raw = bytearray(
        encode_group(
            GroupData(ServiceLevel.AGREED, bytes(8), 1, 1, 1, 0, 0, "", ("g",), (), (), b"")
        )
    )
    with pytest.raises(DecodeError):
        decode_group(b"\x7f" + bytes(raw[1:]))
    raw[1] = 9
    with pytest.raises(DecodeError):
        decode_group(bytes(raw))
    raw[1] = 9 | group.SERVICE_CONFIRM  # the flag does not make an unknown service known
    with pytest.raises(DecodeError):
        decode_group(bytes(raw))
    with pytest.raises(DecodeError):
        decode_group(encode_group(GroupNull(bytes(8), 1, 1, 1)) + b"x")


def _outcome(decode: Callable[[bytes], object], raw: bytes) -> object:
    try:
        return decode(raw)
    except DecodeError as exc:
        return f"DecodeError: {exc}"


@given(datas, st.data())
def test_the_fast_data_decoder_agrees_with_the_checked_one(
    message: GroupData, data: st.DataObject
) -> None:
    """DATA decodes by plain offsets and falls back to the step-by-step decoder for
    anything unusual: the outcome, message or error text, is the step-by-step one."""
    raw = bytearray(encode_group(message))
    head_end = len(raw) - len(message.payload)  # mutate the fields, not the payload
    for _ in range(data.draw(st.integers(0, 3))):
        i = data.draw(st.integers(1, min(head_end, len(raw) - 1)))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(group.DATA_HEAD.size, len(raw)))
    candidate = bytes(raw[:cut])
    assert _outcome(decode_group, candidate) == _outcome(group._decode_data, candidate)


@given(st.lists(st.one_of(datas, nulls), min_size=2, max_size=20))
def test_batch_round_trip(messages: list[GroupData | GroupNull]) -> None:
    """A BATCH gives back the messages it was made of, in order, each decodable alone."""
    raws = [encode_group(m) for m in messages]
    batch = group.encode_batch(raws)
    assert group.is_batch(batch)
    assert group.split_batch(batch) == raws
    assert [decode_group(r) for r in group.split_batch(batch)] == messages


@given(st.lists(nulls, min_size=2, max_size=5), st.data())
def test_mutated_batches_split_or_raise_decode_error(
    messages: list[GroupNull], data: st.DataObject
) -> None:
    raw = bytearray(group.encode_batch([encode_group(m) for m in messages]))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    with contextlib.suppress(DecodeError):
        group.split_batch(bytes(raw[:cut]))


def test_batch_framing_refused() -> None:
    one = encode_group(GroupNull(bytes(8), 1, 1, 0))
    batch = group.encode_batch([one, one])
    with pytest.raises(ValueError, match=r"holds 2\.\."):
        group.encode_batch([one])
    with pytest.raises(ValueError, match="not batches"):
        group.encode_batch([one, batch])
    with pytest.raises(ValueError, match="not batches"):
        group.encode_batch([one, b""])
    for bad, reason in [
        (batch + b"x", "after the last"),
        (batch[:-1], "wrong length"),
        (batch[:3], "truncated"),
        (bytes((group.KIND_BATCH, 0, 1)) + group.BATCH_ITEM.pack(len(one)) + one, "of 1"),
        (
            bytes((group.KIND_BATCH, 0, 2)) + (group.BATCH_ITEM.pack(len(batch)) + batch) * 2,
            "inside a BATCH",
        ),
        (one, "not a group BATCH"),
    ]:
        with pytest.raises(DecodeError, match=reason):
            group.split_batch(bad)
    with pytest.raises(DecodeError, match="unknown group message kind 0x14"):
        decode_group(batch)  # a batch is split first, never decoded as one message
