"""Hand-built datagrams: header layout, limits and typed errors."""

from __future__ import annotations

import struct

import pytest

from meshcast import wire
from meshcast.errors import DecodeError, WireError
from meshcast.wire import Header, LinkState, Packet, PacketType, WholeMessage


def data_packet(*fragments: wire.Fragment, seq: int = 7) -> bytes:
    return wire.encode(Packet(Header(PacketType.DATA, 3, 9, seq), body=fragments))


def test_header_is_24_bytes_in_network_order() -> None:
    datagram = data_packet(WholeMessage(b"hi"))
    assert wire.HEADER_SIZE == 24
    magic, version, ptype, flags, key_id, reserved, sender, epoch, seq = struct.unpack_from(
        "!HBBBBHIIQ", datagram
    )
    assert (magic, version, ptype, flags, key_id, reserved) == (0x4D43, 1, 1, 0, 0, 0)
    assert (sender, epoch, seq) == (3, 9, 7)
    assert datagram[24:] == b"\x00\x00\x02hi"


def test_wire_error_is_the_decode_error() -> None:
    assert WireError is DecodeError


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: b"XX" + d[2:], "bad magic"),
        (lambda d: d[:2] + b"\x09" + d[3:], "unsupported version"),
        (lambda d: d[:3] + b"\x63" + d[4:], "unknown packet type"),
        (lambda d: d[:4] + b"\x40" + d[5:], "unknown flags"),
        (lambda d: d[:6] + b"\x00\x01" + d[8:], "reserved"),
        (lambda d: d[:10], "shorter than the header"),
        (lambda d: d[:24], "without fragments"),
        (lambda d: d + b"\x07", "unknown fragment kind"),
        (lambda d: d[:-1], "past the end"),
        (lambda d: d[:16] + bytes(8) + d[24:], "sequence number 0"),
    ],
)
def test_malformed_data_packets_name_the_fault(mutate: object, message: str) -> None:
    datagram = data_packet(WholeMessage(b"hello"))
    with pytest.raises(DecodeError, match=message):
        wire.decode(mutate(datagram))  # type: ignore[operator]


def test_piece_outside_its_message_is_rejected() -> None:
    datagram = wire.encode_header(PacketType.DATA, 1, 1, 1) + wire.encode_piece(5, 10, 8, b"abc")
    with pytest.raises(DecodeError, match="outside message"):
        wire.decode(datagram)


def test_nack_range_limit_and_validity() -> None:
    too_many = LinkState(1, 0, 0, tuple((i * 2 + 1, 1) for i in range(wire.MAX_NACK_RANGES + 1)))
    with pytest.raises(ValueError, match="too many"):
        wire.encode_state(too_many)
    header = wire.encode_header(PacketType.STATE, 1, 1, flags=wire.FLAG_STATE)
    block = struct.pack("!IQQH", 1, 0, 0, 1) + struct.pack("!QI", 0, 1)
    with pytest.raises(DecodeError, match="invalid NACK range"):
        wire.decode(header + block)


def test_state_packet_requires_its_block() -> None:
    with pytest.raises(DecodeError, match="without a link-state block"):
        wire.decode(wire.encode_header(PacketType.STATE, 1, 1))


def test_auth_tag_is_framed_as_trailer() -> None:
    packet = Packet(Header(PacketType.DATA, 1, 2, 3), body=(WholeMessage(b"x"),), tag=b"T" * 16)
    datagram = wire.encode(packet)
    assert datagram.endswith(b"T" * 16)
    assert datagram[4] & wire.FLAG_AUTH
    assert wire.decode(datagram) == Packet(
        Header(PacketType.DATA, 1, 2, 3, wire.FLAG_AUTH), body=(WholeMessage(b"x"),), tag=b"T" * 16
    )
