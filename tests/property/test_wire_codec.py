"""Codec round-trips and the decode contract: only DecodeError ever escapes."""

from __future__ import annotations

import contextlib

from hypothesis import given
from hypothesis import strategies as st

from meshcast import wire
from meshcast.errors import DecodeError
from meshcast.wire import (
    Header,
    Heartbeat,
    HeartbeatKind,
    Hello,
    LinkState,
    MessagePiece,
    Packet,
    PacketType,
    WholeMessage,
)

u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)

nack_ranges = st.lists(
    st.tuples(st.integers(1, 2**40), st.integers(1, 0xFFFF_FFFF)), max_size=20
).map(tuple)
link_states = st.builds(LinkState, u32, u64, u64, nack_ranges)


@st.composite
def pieces(draw: st.DrawFn) -> MessagePiece:
    total = draw(st.integers(1, 16 * 1024 * 1024))
    length = draw(st.integers(1, min(total, 300)))
    offset = draw(st.integers(0, total - length))
    return MessagePiece(draw(u32), total, offset, draw(st.binary(min_size=length, max_size=length)))


fragments = st.lists(
    st.one_of(st.builds(WholeMessage, st.binary(max_size=300)), pieces()), min_size=1, max_size=6
).map(tuple)


@st.composite
def packets(draw: st.DrawFn) -> Packet:
    ptype = draw(st.sampled_from(PacketType))
    seq = draw(st.integers(1, 2**64 - 1)) if ptype is PacketType.DATA else draw(u64)
    state = draw(link_states) if ptype is PacketType.STATE else draw(st.none() | link_states)
    body: object
    if ptype is PacketType.DATA:
        body = draw(fragments)
    elif ptype is PacketType.HEARTBEAT:
        body = Heartbeat(draw(st.sampled_from(HeartbeatKind)), draw(u64))
    elif ptype is PacketType.HELLO:
        body = Hello(draw(u32), draw(st.integers(wire.MIN_MTU, wire.MAX_MTU)), draw(st.booleans()))
    else:
        body = None
    tag = draw(st.sampled_from([b"", bytes(range(16))]))
    flags = (wire.FLAG_STATE if state is not None else 0) | (wire.FLAG_AUTH if tag else 0)
    header = Header(ptype, draw(u32), draw(u32), seq, flags, draw(st.integers(0, 255)))
    return Packet(header, state, body, tag)  # type: ignore[arg-type]


@given(packets())
def test_every_packet_round_trips(packet: Packet) -> None:
    assert wire.decode(wire.encode(packet)) == packet


@given(st.binary(max_size=2000))
def test_random_bytes_raise_only_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        wire.decode(data)


@given(packets(), st.data())
def test_mutated_packets_raise_only_decode_error(packet: Packet, data: st.DataObject) -> None:
    encoded = bytearray(wire.encode(packet))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(encoded) - 1))
        encoded[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(encoded)))
    with contextlib.suppress(DecodeError):
        wire.decode(bytes(encoded[:cut]))


@given(packets())
def test_every_truncation_is_rejected(packet: Packet) -> None:
    encoded = wire.encode(packet)
    for cut in range(len(encoded)):
        try:
            decoded = wire.decode(encoded[:cut])
        except DecodeError:
            continue
        if packet.tag:
            continue  # a shifted tag trailer is caught by AEAD verification, not by framing
        # A cut that still parses can only be one that dropped whole trailing fragments.
        assert packet.header.ptype is PacketType.DATA
        assert isinstance(decoded.body, tuple)
        assert len(decoded.body) < len(packet.body)  # type: ignore[arg-type]
