"""Binary packet formats of the Hop link (network byte order, versioned).

Every datagram starts with the same 24-byte header::

    0      2    3    4     5       6          8          12        16              24
    | magic | ver| type| flags| key_id| reserved | sender   | epoch   | seq           |
    | u16   | u8 | u8  | u8   | u8    | u16 (=0) | u32      | u32     | u64           |

* ``sender`` is the daemon id of the sending endpoint, ``epoch`` the incarnation of
  its sending stream (changes on every restart, so old packets are told apart),
  ``seq`` the link sequence number (0 on unsequenced control packets).
* ``flags & FLAG_STATE``: a link-state block follows the header (piggybacked ACK).
* ``flags & FLAG_AUTH``: the last ``TAG_SIZE`` bytes are an AEAD tag over the whole
  datagram, the header being associated data; ``key_id`` names the key. Encryption
  itself is a later layer; the codec only frames the tag.

Link-state block (``STATE_BLOCK``), what the sender knows of the reverse stream::

    ack_epoch u32 | cum_ack u64 | send_high u64 | n_nacks u16 | n_nacks x (first u64, count u32)

Bodies by type: DATA carries fragments (see below); STATE has none (the block is
mandatory); HEARTBEAT is ``kind u8 | stamp u64``; HELLO is ``seen_epoch u32 | mtu u16 | established u8``.

Fragments in a DATA body, one after another, at least one::

    0x00 WHOLE  | length u16 | bytes              a complete message
    0x01 PIECE  | msg_id u32 | total u32 | offset u32 | length u16 | bytes

Decoders are bounds-checked and raise only `DecodeError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from meshcast.errors import DecodeError

MAGIC = 0x4D43  # "MC"
VERSION = 1
PREFIX = bytes((MAGIC >> 8, MAGIC & 0xFF, VERSION))  # the first 3 bytes of every datagram

FLAG_STATE = 0x01
FLAG_AUTH = 0x80
KNOWN_FLAGS = FLAG_STATE | FLAG_AUTH
TAG_SIZE = 16

HEADER = struct.Struct("!HBBBBHIIQ")
STATE_BLOCK = struct.Struct("!IQQH")
NACK_RANGE = struct.Struct("!QI")
HEARTBEAT_BODY = struct.Struct("!BQ")
HELLO_BODY = struct.Struct("!IHB")
WHOLE_HEAD = struct.Struct("!BH")
PIECE_HEAD = struct.Struct("!BIIIH")

HEADER_SIZE = HEADER.size  # 24
UDP_IP_OVERHEAD = 28  # IPv4 + UDP headers, charged by pacers and emulated links
MIN_MTU = 512
MAX_MTU = 65507
MAX_NACK_RANGES = 256
U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF

FRAG_WHOLE = 0x00
FRAG_PIECE = 0x01


class PacketType(IntEnum):
    DATA = 1
    STATE = 2
    HEARTBEAT = 3
    HELLO = 4


_PACKET_TYPES = {int(t): t for t in PacketType}  # a dict lookup is 5x cheaper than PacketType(n)


class HeartbeatKind(IntEnum):
    REQUEST = 0
    REPLY = 1


@dataclass(slots=True)  # per message: not frozen, __init__ written out (GroupData)
class Header:
    ptype: PacketType
    sender: int
    epoch: int
    seq: int = 0
    flags: int = 0
    key_id: int = 0

    def __init__(
        self,
        ptype: PacketType,
        sender: int,
        epoch: int,
        seq: int = 0,
        flags: int = 0,
        key_id: int = 0,
    ) -> None:
        self.ptype = ptype
        self.sender = sender
        self.epoch = epoch
        self.seq = seq
        self.flags = flags
        self.key_id = key_id


@dataclass(slots=True)  # per message: not frozen, __init__ written out (GroupData)
class LinkState:
    """Receiver feedback: cumulative ACK and selective NACK ranges, plus our send head."""

    ack_epoch: int  # epoch of the stream being acknowledged (0 = none yet)
    cum_ack: int  # every seq <= cum_ack of that stream has arrived
    send_high: int  # highest seq the sender of this block has sent on its own stream
    nacks: tuple[tuple[int, int], ...] = ()  # (first missing seq, count)

    def __init__(
        self, ack_epoch: int, cum_ack: int, send_high: int, nacks: tuple[tuple[int, int], ...] = ()
    ) -> None:
        self.ack_epoch = ack_epoch
        self.cum_ack = cum_ack
        self.send_high = send_high
        self.nacks = nacks


@dataclass(frozen=True, slots=True)
class WholeMessage:
    data: bytes


@dataclass(slots=True)  # per message: not frozen, __init__ written out (GroupData)
class MessagePiece:
    msg_id: int
    total: int
    offset: int
    data: bytes

    def __init__(self, msg_id: int, total: int, offset: int, data: bytes) -> None:
        self.msg_id = msg_id
        self.total = total
        self.offset = offset
        self.data = data


Fragment = WholeMessage | MessagePiece


@dataclass(frozen=True, slots=True)
class Heartbeat:
    kind: HeartbeatKind
    stamp: int  # opaque to the receiver; the requester puts its clock in microseconds


@dataclass(frozen=True, slots=True)
class Hello:
    seen_epoch: int  # the peer's epoch as the sender knows it, 0 if unknown
    mtu: int
    established: bool = False  # the sender finished the handshake: no reply needed


Body = tuple[Fragment, ...] | Heartbeat | Hello | None


@dataclass(frozen=True, slots=True)
class Packet:
    header: Header
    state: LinkState | None = None
    body: Body = None
    tag: bytes = b""


# ---------------------------------------------------------------- encoding


def encode_header(
    ptype: PacketType, sender: int, epoch: int, seq: int = 0, flags: int = 0, key_id: int = 0
) -> bytes:
    return HEADER.pack(MAGIC, VERSION, ptype, flags, key_id, 0, sender, epoch, seq)


def encode_state(state: LinkState) -> bytes:
    if len(state.nacks) > MAX_NACK_RANGES:
        raise ValueError(f"too many NACK ranges: {len(state.nacks)} > {MAX_NACK_RANGES}")
    parts = [STATE_BLOCK.pack(state.ack_epoch, state.cum_ack, state.send_high, len(state.nacks))]
    parts.extend(NACK_RANGE.pack(first, count) for first, count in state.nacks)
    return b"".join(parts)


def encode_whole(data: bytes) -> bytes:
    return WHOLE_HEAD.pack(FRAG_WHOLE, len(data)) + data


def encode_piece(msg_id: int, total: int, offset: int, data: bytes | memoryview) -> bytes:
    return PIECE_HEAD.pack(FRAG_PIECE, msg_id, total, offset, len(data)) + bytes(data)


def encode_fragment(fragment: Fragment) -> bytes:
    if isinstance(fragment, WholeMessage):
        return encode_whole(fragment.data)
    return encode_piece(fragment.msg_id, fragment.total, fragment.offset, fragment.data)


def encode(packet: Packet) -> bytes:
    """Encode any packet. The hot path in `meshcast.link` assembles the same bytes directly."""
    h = packet.header
    flags = h.flags & ~(FLAG_STATE | FLAG_AUTH)
    if packet.state is not None:
        flags |= FLAG_STATE
    if packet.tag:
        if len(packet.tag) != TAG_SIZE:
            raise ValueError(f"tag must be {TAG_SIZE} bytes")
        flags |= FLAG_AUTH
    parts = [encode_header(h.ptype, h.sender, h.epoch, h.seq, flags, h.key_id)]
    if packet.state is not None:
        parts.append(encode_state(packet.state))
    body = packet.body
    if isinstance(body, Heartbeat):
        parts.append(HEARTBEAT_BODY.pack(body.kind, body.stamp))
    elif isinstance(body, Hello):
        parts.append(HELLO_BODY.pack(body.seen_epoch, body.mtu, int(body.established)))
    elif isinstance(body, tuple):
        parts.extend(encode_fragment(f) for f in body)
    parts.append(packet.tag)
    return b"".join(parts)


# ---------------------------------------------------------------- decoding


def decode_header(data: bytes | memoryview) -> Header:
    if len(data) < HEADER_SIZE:
        raise DecodeError(f"datagram of {len(data)} bytes is shorter than the header")
    magic, version, ptype, flags, key_id, reserved, sender, epoch, seq = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DecodeError(f"bad magic 0x{magic:04x}")
    if version != VERSION:
        raise DecodeError(f"unsupported version {version}")
    if flags & ~KNOWN_FLAGS:
        raise DecodeError(f"unknown flags 0x{flags:02x}")
    if reserved:
        raise DecodeError("reserved header field is not zero")
    kind = _PACKET_TYPES.get(ptype)
    if kind is None:
        raise DecodeError(f"unknown packet type {ptype}")
    return Header(kind, sender, epoch, seq, flags, key_id)


def _decode_state(data: memoryview, pos: int, end: int) -> tuple[LinkState, int]:
    if end - pos < STATE_BLOCK.size:
        raise DecodeError("truncated link-state block")
    ack_epoch, cum_ack, send_high, n = STATE_BLOCK.unpack_from(data, pos)
    pos += STATE_BLOCK.size
    if n > MAX_NACK_RANGES:
        raise DecodeError(f"{n} NACK ranges exceed the limit of {MAX_NACK_RANGES}")
    if end - pos < n * NACK_RANGE.size:
        raise DecodeError("truncated NACK ranges")
    nacks = []
    for _ in range(n):
        first, count = NACK_RANGE.unpack_from(data, pos)
        pos += NACK_RANGE.size
        if first == 0 or count == 0 or first + count - 1 > U64_MAX:
            raise DecodeError(f"invalid NACK range ({first}, {count})")
        nacks.append((first, count))
    return LinkState(ack_epoch, cum_ack, send_high, tuple(nacks)), pos


def split_fragments(data: memoryview, pos: int, end: int) -> list[bytes | MessagePiece]:
    """The fragments of a DATA body: whole messages as plain bytes (the hot path), pieces
    as `MessagePiece`. Raises `DecodeError`."""
    fragments: list[bytes | MessagePiece] = []
    whole_unpack = WHOLE_HEAD.unpack_from
    while pos < end:
        kind = data[pos]
        if kind == FRAG_WHOLE:
            if end - pos < WHOLE_HEAD.size:
                raise DecodeError("truncated fragment header")
            length = whole_unpack(data, pos)[1]
            pos += WHOLE_HEAD.size
            if end - pos < length:
                raise DecodeError("fragment runs past the end of the datagram")
            fragments.append(bytes(data[pos : pos + length]))
        elif kind == FRAG_PIECE:
            if end - pos < PIECE_HEAD.size:
                raise DecodeError("truncated piece header")
            _, msg_id, total, offset, length = PIECE_HEAD.unpack_from(data, pos)
            pos += PIECE_HEAD.size
            if end - pos < length:
                raise DecodeError("piece runs past the end of the datagram")
            if length == 0 or offset + length > total:
                raise DecodeError(f"piece [{offset}, +{length}) outside message of {total} bytes")
            fragments.append(MessagePiece(msg_id, total, offset, bytes(data[pos : pos + length])))
        else:
            raise DecodeError(f"unknown fragment kind 0x{kind:02x}")
        pos += length
    if not fragments:
        raise DecodeError("data packet without fragments")
    return fragments


def decode_fragments(data: memoryview, pos: int, end: int) -> tuple[Fragment, ...]:
    return tuple(
        WholeMessage(f) if isinstance(f, bytes) else f for f in split_fragments(data, pos, end)
    )


def decode_data(
    datagram: bytes | memoryview, header: Header
) -> tuple[LinkState | None, list[bytes | MessagePiece]]:
    """The rest of an unauthenticated DATA packet whose header is already decoded.

    The link's receive path: same checks as `decode`, without building a `Packet`.
    """
    if header.ptype is not PacketType.DATA or header.flags & FLAG_AUTH:
        raise DecodeError("decode_data takes unauthenticated data packets only")
    if header.seq == 0:
        raise DecodeError("data packet with sequence number 0")
    data = memoryview(datagram)
    pos = HEADER_SIZE
    state = None
    if header.flags & FLAG_STATE:
        state, pos = _decode_state(data, pos, len(data))
    return state, split_fragments(data, pos, len(data))


def decode(datagram: bytes | memoryview) -> Packet:
    """Parse one datagram. Raises `DecodeError` on anything malformed, and nothing else."""
    data = memoryview(datagram)
    header = decode_header(data)
    end = len(data)
    tag = b""
    if header.flags & FLAG_AUTH:
        if end - HEADER_SIZE < TAG_SIZE:
            raise DecodeError("datagram too short for its authentication tag")
        end -= TAG_SIZE
        tag = bytes(data[end:])
    pos = HEADER_SIZE
    state = None
    if header.flags & FLAG_STATE:
        state, pos = _decode_state(data, pos, end)
    body: Body = None
    if header.ptype is PacketType.DATA:
        if header.seq == 0:
            raise DecodeError("data packet with sequence number 0")
        body = decode_fragments(data, pos, end)
        pos = end
    elif header.ptype is PacketType.STATE:
        if state is None:
            raise DecodeError("state packet without a link-state block")
    elif header.ptype is PacketType.HEARTBEAT:
        if end - pos != HEARTBEAT_BODY.size:
            raise DecodeError("heartbeat body has the wrong size")
        kind, stamp = HEARTBEAT_BODY.unpack_from(data, pos)
        if kind not in (HeartbeatKind.REQUEST, HeartbeatKind.REPLY):
            raise DecodeError(f"unknown heartbeat kind {kind}")
        body = Heartbeat(HeartbeatKind(kind), stamp)
        pos = end
    elif header.ptype is PacketType.HELLO:
        if end - pos != HELLO_BODY.size:
            raise DecodeError("hello body has the wrong size")
        seen, mtu, established = HELLO_BODY.unpack_from(data, pos)
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise DecodeError(f"hello announces an invalid MTU {mtu}")
        if established > 1:
            raise DecodeError(f"hello has an invalid established flag {established}")
        body = Hello(seen, mtu, bool(established))
        pos = end
    if pos != end:
        raise DecodeError(f"{end - pos} trailing bytes after the packet body")
    return Packet(header, state, body, tag)
