"""Record format of secure bulk streams between daemons (docs/security.md, "Bulk streams").

A stream is one TCP connection. Each side first sends HANDSHAKE records of a fixed size,
then length-prefixed sealed records::

    HANDSHAKE (80 bytes) := header (24, clear, the associated data) | sealed body (56)
      header := magic u16 "MS" | version u8 | type u8 = 1 | offer index u8 | offers u8
                | key_id u8 | reserved u8 = 0 | sender u32 | stream id u32 | hello nonce u64
      body   := X25519 public key (32) | expected peer id u32 | peer's stream id u32
                (0 in the initiator's offers, the initiator's stream id in the reply)
      sealed under hello_aead(key, sender, b"stream"), nonce (stream id, hello nonce)

    RECORD := sealed length u32 | type u8 (both clear, the associated data)
              | AES-256-GCM(payload) with its 16-byte tag (`sealed length` bytes)
      sealed under the sender's direction key, nonce (sender's stream id, sequence number);
      the sequence number starts at 1 on each side and is never sent.

The initiator sends one offer per key of its ring (newest first, at most `MAX_OFFERS`) so a
responder that lacks the newest key still answers, without a second round trip.

Pure functions (sans-I/O); decoders raise only `DecodeError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from meshcast.errors import DecodeError
from meshcast.wire.secure import PUBLIC_KEY_SIZE, TAG_SIZE, nonce

STREAM_MAGIC = 0x4D53  # "MS": not the datagram magic "MC", so neither parses as the other
STREAM_VERSION = 1
PURPOSE = b"stream"  # hello_aead / session_keys purpose: stream keys never equal link keys
MAX_OFFERS = 4  # handshake offers an initiator may send (a ring holds 1 or 2 keys)
MAX_RECORD_PAYLOAD = 64 * 1024  # bytes of payload in one record (a protocol constant)
MAX_SEALED = MAX_RECORD_PAYLOAD + TAG_SIZE
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF

HANDSHAKE_HEADER = struct.Struct("!HBBBBBBIIQ")
HANDSHAKE_BODY = struct.Struct(f"!{PUBLIC_KEY_SIZE}sII")
HANDSHAKE_SIZE = HANDSHAKE_HEADER.size + HANDSHAKE_BODY.size + TAG_SIZE  # 24 + 40 + 16 = 80
RECORD_HEAD = struct.Struct("!IB")  # sealed length, record type


class RecordType(IntEnum):
    HANDSHAKE = 1
    CONFIRM = 2  # the initiator's first sealed record: proves it holds the session keys
    DATA = 3
    CLOSE = 4  # authenticated end of the sender's data: a cut without it is truncation


@dataclass(frozen=True, slots=True)
class HandshakeHeader:
    key_id: int
    sender: int
    stream_id: int  # the sender's random stream id: the epoch of its record nonces
    hello_nonce: int  # random u64: with the stream id, the handshake's unique AEAD nonce
    offer_index: int = 0
    offers: int = 1


@dataclass(frozen=True, slots=True)
class HandshakeBody:
    public_key: bytes
    expected_peer: int  # the daemon the sender means to talk to
    peer_stream_id: int  # 0 in offers; the reply echoes the initiator's stream id


def encode_handshake_header(header: HandshakeHeader) -> bytes:
    return HANDSHAKE_HEADER.pack(
        STREAM_MAGIC,
        STREAM_VERSION,
        RecordType.HANDSHAKE,
        header.offer_index,
        header.offers,
        header.key_id,
        0,
        header.sender,
        header.stream_id,
        header.hello_nonce,
    )


def decode_handshake_header(data: bytes | memoryview) -> HandshakeHeader:
    """The header at the start of `data` (at least 24 bytes); checks framing, not authenticity."""
    if len(data) < HANDSHAKE_HEADER.size:
        raise DecodeError(f"handshake header needs {HANDSHAKE_HEADER.size} bytes")
    magic, version, rtype, index, offers, key_id, reserved, sender, stream_id, hello_nonce = (
        HANDSHAKE_HEADER.unpack_from(data)
    )
    if magic != STREAM_MAGIC:
        raise DecodeError(f"not a meshcast stream (magic {magic:#06x})")
    if version != STREAM_VERSION:
        raise DecodeError(f"stream version {version}, expected {STREAM_VERSION}")
    if rtype != RecordType.HANDSHAKE:
        raise DecodeError(f"record type {rtype} where a handshake was expected")
    if not 1 <= offers <= MAX_OFFERS or index >= offers:
        raise DecodeError(f"offer {index} of {offers} (at most {MAX_OFFERS} offers)")
    if reserved:
        raise DecodeError("reserved handshake byte is not 0")
    if sender == 0 or stream_id == 0:
        raise DecodeError("sender and stream id must not be 0")
    return HandshakeHeader(key_id, sender, stream_id, hello_nonce, index, offers)


def seal_handshake(aead: AESGCM, header: HandshakeHeader, body: HandshakeBody) -> bytes:
    head = encode_handshake_header(header)
    plain = HANDSHAKE_BODY.pack(body.public_key, body.expected_peer, body.peer_stream_id)
    return head + aead.encrypt(nonce(header.stream_id, header.hello_nonce), plain, head)


def open_handshake(
    aead: AESGCM, header: HandshakeHeader, record: bytes | memoryview
) -> HandshakeBody | None:
    """The body of a whole handshake `record` (`HANDSHAKE_SIZE` bytes) whose `header` was
    decoded; None if it does not authenticate under `aead` (wrong key or tampered)."""
    head = record[: HANDSHAKE_HEADER.size]
    try:
        plain = aead.decrypt(
            nonce(header.stream_id, header.hello_nonce), record[HANDSHAKE_HEADER.size :], head
        )
    except InvalidTag:
        return None
    public_key, expected_peer, peer_stream_id = HANDSHAKE_BODY.unpack(plain)
    return HandshakeBody(public_key, expected_peer, peer_stream_id)


def check_record_head(sealed_length: int, rtype: int) -> RecordType:
    """The type of a record head; `DecodeError` for an unknown type or impossible length."""
    if rtype not in (RecordType.CONFIRM, RecordType.DATA, RecordType.CLOSE):
        raise DecodeError(f"record type {rtype} after the handshake")
    if not TAG_SIZE <= sealed_length <= MAX_SEALED:
        raise DecodeError(
            f"sealed record of {sealed_length} bytes (allowed {TAG_SIZE}..{MAX_SEALED})"
        )
    if rtype != RecordType.DATA and sealed_length != TAG_SIZE:
        raise DecodeError(f"{RecordType(rtype).name} record carries a payload")
    return RecordType(rtype)


def seal_record(
    aead: AESGCM, stream_id: int, seq: int, rtype: RecordType, payload: bytes | memoryview
) -> bytes:
    head = RECORD_HEAD.pack(len(payload) + TAG_SIZE, rtype)
    return head + aead.encrypt(nonce(stream_id, seq), payload, head)
