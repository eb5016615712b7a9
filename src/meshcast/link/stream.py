"""Secure bulk streams: one authenticated, encrypted byte stream over one TCP connection.

`SecureStream` is the sans-I/O state machine of one side of a connection between daemon
`local` and daemon `peer` (record format: `meshcast.wire.stream`; design and bounds:
docs/security.md, "Bulk streams"). The driver feeds it the bytes it reads and writes the
bytes it returns; `meshcast.runtime.secure_stream` is the asyncio driver.

Handshake (1 round trip, then data)::

    initiator                                   responder
    HANDSHAKE offer per ring key (newest first) ->
                                <- HANDSHAKE reply, under the key of the first offer it opens
    CONFIRM (first sealed record), DATA ...     ->   responder: Established at CONFIRM
                                <- DATA ...

The reply names the initiator's stream id, so an old reply replayed to a new initiator does
not authenticate; the CONFIRM proves the initiator holds the session keys, so a replayed
offer never yields an established stream at the responder.

Every input returns the effects it caused and never raises on bad peer input: a stream that
breaks the protocol reports `Failed` once and ignores everything after. Before the peer has
authenticated, the machine holds at most one handshake record and fails at the first byte
that cannot start a valid one; after, at most one record of `MAX_RECORD_PAYLOAD` bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, StrEnum, auto

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from meshcast.errors import DecodeError, UsageError
from meshcast.ids import NodeId
from meshcast.wire.keys import ClusterKey, KeyRing
from meshcast.wire.secure import Ephemeral, RandomBytes, hello_aead, nonce, session_keys
from meshcast.wire.stream import (
    HANDSHAKE_HEADER,
    HANDSHAKE_SIZE,
    MAX_OFFERS,
    MAX_RECORD_PAYLOAD,
    PURPOSE,
    RECORD_HEAD,
    U64_MAX,
    HandshakeBody,
    HandshakeHeader,
    RecordType,
    check_record_head,
    decode_handshake_header,
    open_handshake,
    seal_handshake,
    seal_record,
)

logger = logging.getLogger(__name__)

__all__ = [
    "Closed",
    "Established",
    "Failed",
    "FailureCause",
    "Received",
    "SecureStream",
    "StreamEffect",
    "StreamStats",
    "Write",
]


class FailureCause(StrEnum):
    """Why a stream failed; the runtime's `StreamFailed.cause` carries the same strings."""

    MALFORMED = auto()  # bytes that cannot be a record: magic, version, type, length
    UNKNOWN_KEY = auto()  # the handshake's key_id names no key of our ring
    BAD_HANDSHAKE = auto()  # no key of ours opens it (wrong key or tampered), or a replay
    UNEXPECTED_PEER = auto()  # a daemon we do not talk to, or a handshake meant for another
    FORGED = auto()  # a record that does not authenticate: tampered, replayed, reordered, lost
    PROTOCOL = auto()  # an authentic record where the protocol does not allow one
    TRUNCATED = auto()  # the connection ended without the peer's CLOSE
    TIMEOUT = auto()  # the handshake did not finish in time (the driver's timer)
    UNREACHABLE = auto()  # the driver could not connect


@dataclass(frozen=True, slots=True)
class Write:
    """Write these bytes to the connection, in order."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Established:
    """The peer authenticated; `key_fingerprint` names the cluster key the handshake used."""

    peer: NodeId
    key_fingerprint: str


@dataclass(frozen=True, slots=True)
class Received:
    """Authenticated bytes from the peer, in order (record boundaries mean nothing)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Closed:
    """The peer's authenticated CLOSE arrived: its data ended cleanly and completely."""


@dataclass(frozen=True, slots=True)
class Failed:
    """The stream failed and stays failed; the driver closes the connection."""

    cause: FailureCause
    reason: str


StreamEffect = Write | Established | Received | Closed | Failed


@dataclass(frozen=True, slots=True)
class StreamStats:
    """Counters of one stream (a frozen snapshot)."""

    records_sent: int
    records_received: int
    bytes_sent: int  # payload bytes
    bytes_received: int  # payload bytes
    buffered_bytes: int  # received bytes held for an incomplete record


class _State(Enum):
    NEW = auto()  # initiator before start()
    AWAIT_REPLY = auto()  # initiator: offers sent
    AWAIT_OFFER = auto()  # responder: reading offers
    SKIP_OFFERS = auto()  # responder: replied; discarding the initiator's remaining offers
    AWAIT_CONFIRM = auto()  # responder: replied; the next record must be CONFIRM
    OPEN = auto()  # both sides authenticated: DATA and CLOSE records
    PEER_CLOSED = auto()  # the peer's CLOSE arrived; nothing may follow
    FAILED = auto()


class SecureStream:
    """One side of one secure stream. Build with `initiator` or `responder`."""

    def __init__(
        self,
        *,
        local: NodeId,
        ring: KeyRing,
        random_bytes: RandomBytes,
        peer: NodeId | None,
        accept_peer: Callable[[NodeId], bool] | None,
    ) -> None:
        self._local = local
        self._ring = ring
        self._random = random_bytes
        self._peer = peer
        self._accept_peer = accept_peer
        self._state = _State.NEW if peer is not None else _State.AWAIT_OFFER
        self._buffer = bytearray()
        self._key: ClusterKey | None = None
        self._ephemeral: Ephemeral | None = None
        self._stream_id = 0
        self._peer_stream_id = 0
        self._send_aead: AESGCM | None = None
        self._recv_aead: AESGCM | None = None
        self._send_seq = 0  # last sequence number sealed
        self._recv_seq = 0  # last sequence number opened
        self._established = False
        self._local_closed = False
        self._failure: Failed | None = None
        # responder: the offers being read
        self._first_offer: HandshakeHeader | None = None
        self._offers_seen = 0
        self._offers_with_our_key = 0
        self._skip = 0
        self._records_sent = 0
        self._records_received = 0
        self._bytes_sent = 0
        self._bytes_received = 0

    @classmethod
    def initiator(
        cls, local: NodeId, peer: NodeId, ring: KeyRing, random_bytes: RandomBytes
    ) -> SecureStream:
        """The connecting side, which expects to reach `peer`. Call `start` first."""
        if local == peer or not local or not peer:
            raise UsageError(
                f"a stream joins two distinct daemons (non-zero ids), got {local}->{peer}"
            )
        return cls(local=local, ring=ring, random_bytes=random_bytes, peer=peer, accept_peer=None)

    @classmethod
    def responder(
        cls,
        local: NodeId,
        ring: KeyRing,
        accept_peer: Callable[[NodeId], bool],
        random_bytes: RandomBytes,
    ) -> SecureStream:
        """The accepting side; `accept_peer(sender)` says whom it talks to."""
        if not local:
            raise UsageError("node id 0 is reserved")
        return cls(
            local=local, ring=ring, random_bytes=random_bytes, peer=None, accept_peer=accept_peer
        )

    # -- queries -----------------------------------------------------------------------

    @property
    def peer(self) -> NodeId | None:
        """The peer (for a responder: once its offer authenticated)."""
        return self._peer

    @property
    def established(self) -> bool:
        return self._established

    @property
    def failure(self) -> Failed | None:
        return self._failure

    def _failed(self) -> bool:
        # a call, not `self._failure is None` after `self._parse()`, which may set it: mypy
        # keeps an attribute's narrowing across calls, and mypyc compiles it in (TypeError)
        return self._failure is not None

    @property
    def peer_closed(self) -> bool:
        return self._state is _State.PEER_CLOSED

    @property
    def key(self) -> ClusterKey | None:
        """The cluster key the handshake used."""
        return self._key

    def statistics(self) -> StreamStats:
        return StreamStats(
            self._records_sent,
            self._records_received,
            self._bytes_sent,
            self._bytes_received,
            len(self._buffer),
        )

    # -- inputs from the local side ----------------------------------------------------

    def start(self) -> list[StreamEffect]:
        """Initiator: the handshake offers to write. Responder: nothing (it waits)."""
        if self._state is not _State.NEW:
            return []
        assert self._peer is not None
        self._ephemeral = Ephemeral.generate(self._random)
        self._stream_id = self._random_u32()
        hello_nonce = int.from_bytes(self._random(8), "big")
        offers = self._ring.keys[:MAX_OFFERS]
        body = HandshakeBody(self._ephemeral.public, self._peer, 0)
        records = [
            seal_handshake(
                hello_aead(key, self._local, PURPOSE),
                HandshakeHeader(
                    key.key_id, self._local, self._stream_id, hello_nonce, i, len(offers)
                ),
                body,
            )
            for i, key in enumerate(offers)
        ]
        self._state = _State.AWAIT_REPLY
        return [Write(b"".join(records))]

    def send(self, payload: bytes | bytearray | memoryview) -> list[StreamEffect]:
        """Records carrying `payload`, cut into pieces of at most `MAX_RECORD_PAYLOAD` bytes.

        Raises `UsageError` before the stream is established, after `close`, or once failed."""
        aead = self._sendable()
        effects: list[StreamEffect] = []
        view = memoryview(payload).cast("B")
        for start in range(0, len(view), MAX_RECORD_PAYLOAD):
            piece = view[start : start + MAX_RECORD_PAYLOAD]
            effects.append(Write(self._seal(aead, RecordType.DATA, piece)))
            self._bytes_sent += len(piece)
        return effects

    def close(self) -> list[StreamEffect]:
        """The CLOSE record that ends our data (once). Before establishment or after a
        failure there is nothing to send: the driver just closes the connection."""
        if self._local_closed:
            return []
        self._local_closed = True
        if self._send_aead is None or self._failure is not None or not self._established:
            return []
        return [Write(self._seal(self._send_aead, RecordType.CLOSE, b""))]

    def abort(self, cause: FailureCause, reason: str) -> list[StreamEffect]:
        """The driver gives up (handshake timeout, ...): the stream fails with `cause`."""
        return self._fail(cause, reason)

    # -- inputs from the connection ----------------------------------------------------

    def data_received(self, data: bytes | bytearray | memoryview) -> list[StreamEffect]:
        if self._state is _State.FAILED:
            return []
        effects: list[StreamEffect] = []
        buffer = self._buffer
        with memoryview(data) as outer:
            view = outer.cast("B")
            pos, end = 0, len(view)
            # Complete the buffered record from the new bytes, copying no more than it
            # needs; whole records after it are opened in place.
            while buffer and pos < end and not self._failed():
                take = min(self._unit_size() - len(buffer), end - pos)
                buffer += view[pos : pos + take]
                pos += take
                with memoryview(buffer) as held:
                    used = self._parse(held, effects)
                del buffer[:used]
            if pos < end and not self._failed():
                pos += self._parse(view[pos:], effects)
                if not self._failed():
                    buffer += view[pos:]
            view.release()
        if self._failed():
            buffer.clear()
        return effects

    def _unit_size(self) -> int:
        """Bytes of the record (or handshake) that starts the buffer, as far as known."""
        state = self._state
        held = len(self._buffer)
        if state is _State.OPEN or state is _State.AWAIT_CONFIRM:
            if held < RECORD_HEAD.size:
                return RECORD_HEAD.size
            sealed_length: int = RECORD_HEAD.unpack_from(self._buffer)[0]
            return RECORD_HEAD.size + sealed_length
        if state is _State.AWAIT_REPLY or state is _State.AWAIT_OFFER:
            return HANDSHAKE_SIZE
        if state is _State.SKIP_OFFERS:
            return held + self._skip
        return held + 1  # any byte fails the stream

    def eof_received(self) -> list[StreamEffect]:
        """The connection ended (EOF or reset). Clean only after the peer's CLOSE."""
        if self._state in (_State.PEER_CLOSED, _State.FAILED):
            return []
        if self._established:
            reason = f"connection ended without CLOSE after {self._bytes_received} bytes" + (
                f", {len(self._buffer)} of an incomplete record" if self._buffer else ""
            )
        else:
            reason = "connection ended during the handshake"
        return self._fail(FailureCause.TRUNCATED, reason)

    # -- internals -------------------------------------------------------------------

    def _random_u32(self) -> int:
        return int.from_bytes(self._random(4), "big") or 1  # 0 is not a stream id

    def _sendable(self) -> AESGCM:
        if self._failure is not None:
            raise UsageError(f"send on a failed stream ({self._failure.reason})")
        if self._local_closed:
            raise UsageError("send after close")
        if not self._established or self._send_aead is None:
            raise UsageError("send before the stream is established")
        return self._send_aead

    def _seal(self, aead: AESGCM, rtype: RecordType, payload: bytes | memoryview) -> bytes:
        if self._send_seq >= U64_MAX:
            raise UsageError("stream exhausted its 2^64 record numbers")
        self._send_seq += 1
        self._records_sent += 1
        return seal_record(aead, self._stream_id, self._send_seq, rtype, payload)

    def _fail(self, cause: FailureCause, reason: str) -> list[StreamEffect]:
        if self._failure is not None:
            return []
        self._state = _State.FAILED
        self._failure = Failed(cause, reason)
        self._send_aead = self._recv_aead = None
        self._ephemeral = None
        logger.debug("stream %s<->%s failed: %s: %s", self._local, self._peer, cause, reason)
        return [self._failure]

    def _parse(self, view: memoryview, effects: list[StreamEffect]) -> int:
        """Consume whole records from `view`; return the bytes used."""
        pos = 0
        end = len(view)
        while pos < end:
            state = self._state
            if state is _State.OPEN or state is _State.AWAIT_CONFIRM:
                used = self._parse_record(view, pos, end, effects)
            elif state is _State.AWAIT_REPLY or state is _State.AWAIT_OFFER:
                used = self._parse_handshake(view, pos, end, effects)
            elif state is _State.SKIP_OFFERS:
                used = min(self._skip, end - pos)
                self._skip -= used
                if not self._skip:
                    self._state = _State.AWAIT_CONFIRM
            elif state is _State.NEW:
                effects.extend(self._fail(FailureCause.PROTOCOL, "bytes before the handshake"))
                return end
            elif state is _State.PEER_CLOSED:
                effects.extend(self._fail(FailureCause.PROTOCOL, "bytes after the peer's CLOSE"))
                return end
            else:  # FAILED
                return end
            if not used:
                break
            pos += used
        return pos

    def _parse_record(
        self, view: memoryview, pos: int, end: int, effects: list[StreamEffect]
    ) -> int:
        head_size = RECORD_HEAD.size
        if end - pos < head_size:
            return 0
        sealed_length: int
        raw_type: int
        sealed_length, raw_type = RECORD_HEAD.unpack_from(view, pos)
        try:
            rtype = check_record_head(sealed_length, raw_type)
        except DecodeError as exc:
            effects.extend(self._fail(FailureCause.MALFORMED, str(exc)))
            return 0
        # Before CONFIRM the peer has not proven it holds the keys: accept nothing else,
        # and never wait for more than the 21 bytes of a CONFIRM.
        if (self._state is _State.AWAIT_CONFIRM) != (rtype is RecordType.CONFIRM):
            effects.extend(self._fail(FailureCause.PROTOCOL, f"unexpected {rtype.name} record"))
            return 0
        if end - pos - head_size < sealed_length:
            return 0
        aead = self._recv_aead
        assert aead is not None
        seq = self._recv_seq + 1
        body_at = pos + head_size
        try:
            plain = aead.decrypt(
                nonce(self._peer_stream_id, seq),
                view[body_at : body_at + sealed_length],
                view[pos:body_at],
            )
        except InvalidTag:
            effects.extend(
                self._fail(
                    FailureCause.FORGED,
                    f"record {seq} does not authenticate (tampered, replayed, reordered or lost)",
                )
            )
            return 0
        self._recv_seq = seq
        self._records_received += 1
        if rtype is RecordType.DATA:
            if plain:
                self._bytes_received += len(plain)
                effects.append(Received(plain))
        elif rtype is RecordType.CONFIRM:
            self._state = _State.OPEN
            self._established = True
            assert self._peer is not None
            assert self._key is not None
            effects.append(Established(self._peer, self._key.fingerprint))
        else:  # CLOSE
            self._state = _State.PEER_CLOSED
            effects.append(Closed())
        return head_size + sealed_length

    def _parse_handshake(
        self, view: memoryview, pos: int, end: int, effects: list[StreamEffect]
    ) -> int:
        if end - pos < HANDSHAKE_HEADER.size:
            return 0
        try:
            header = decode_handshake_header(view[pos : pos + HANDSHAKE_HEADER.size])
        except DecodeError as exc:
            effects.extend(self._fail(FailureCause.MALFORMED, str(exc)))
            return 0
        problem = self._check_header(header)
        if problem is not None:
            effects.extend(self._fail(*problem))
            return 0
        if end - pos < HANDSHAKE_SIZE:
            return 0
        record = view[pos : pos + HANDSHAKE_SIZE]
        if self._state is _State.AWAIT_REPLY:
            effects.extend(self._on_reply(header, record))
        else:
            effects.extend(self._on_offer(header, record))
        return HANDSHAKE_SIZE

    def _check_header(self, header: HandshakeHeader) -> tuple[FailureCause, str] | None:
        """Checks of a handshake header that need no key: fail before buffering its body."""
        if self._state is _State.AWAIT_REPLY:
            if header.offers != 1:
                return FailureCause.MALFORMED, "a reply is one handshake record"
            if header.sender != self._peer:
                return (
                    FailureCause.UNEXPECTED_PEER,
                    f"reply from {header.sender}, expected {self._peer}",
                )
            return None
        first = self._first_offer
        if first is None:
            if header.offer_index != 0:
                return FailureCause.MALFORMED, f"first offer has index {header.offer_index}"
            sender = NodeId(header.sender)
            if sender == self._local:
                return FailureCause.UNEXPECTED_PEER, f"offer claims our own id {sender}"
            assert self._accept_peer is not None
            if not self._accept_peer(sender):
                return FailureCause.UNEXPECTED_PEER, f"daemon {sender} is not allowed"
            self._first_offer = header
            return None
        if (header.sender, header.stream_id, header.offers, header.hello_nonce) != (
            first.sender,
            first.stream_id,
            first.offers,
            first.hello_nonce,
        ) or header.offer_index != self._offers_seen:
            return FailureCause.MALFORMED, "offers of one handshake disagree"
        return None

    def _on_reply(self, header: HandshakeHeader, record: memoryview) -> list[StreamEffect]:
        assert self._peer is not None
        assert self._ephemeral is not None
        offered = self._ring.keys[:MAX_OFFERS]
        candidates = [key for key in offered if key.key_id == header.key_id]
        if not candidates:
            return self._fail(
                FailureCause.UNKNOWN_KEY, f"reply under key id {header.key_id}, not one we offered"
            )
        for key in candidates:
            body = open_handshake(hello_aead(key, header.sender, PURPOSE), header, record)
            if body is not None:
                break
        else:
            return self._fail(
                FailureCause.BAD_HANDSHAKE, "reply does not authenticate under our keys"
            )
        if body.expected_peer != self._local:
            return self._fail(
                FailureCause.UNEXPECTED_PEER, f"reply meant for daemon {body.expected_peer}"
            )
        if body.peer_stream_id != self._stream_id:
            return self._fail(FailureCause.BAD_HANDSHAKE, "reply to another handshake (replayed?)")
        problem = self._derive_keys(header, body)
        if problem is not None:
            return problem
        self._key = key
        self._state = _State.OPEN
        self._established = True
        assert self._send_aead is not None
        confirm = self._seal(self._send_aead, RecordType.CONFIRM, b"")
        return [Write(confirm), Established(self._peer, key.fingerprint)]

    def _on_offer(self, header: HandshakeHeader, record: memoryview) -> list[StreamEffect]:
        self._offers_seen += 1
        candidates = self._ring.candidates(header.key_id)
        self._offers_with_our_key += bool(candidates)
        for key in candidates:
            body = open_handshake(hello_aead(key, header.sender, PURPOSE), header, record)
            if body is not None:
                return self._accept_offer(key, header, body)
        if self._offers_seen < header.offers:
            return []  # the next offer may be under a key we hold
        if not self._offers_with_our_key:
            return self._fail(FailureCause.UNKNOWN_KEY, "no offer is under a key of our ring")
        return self._fail(FailureCause.BAD_HANDSHAKE, "no offer authenticates under our keys")

    def _accept_offer(
        self, key: ClusterKey, header: HandshakeHeader, body: HandshakeBody
    ) -> list[StreamEffect]:
        peer = NodeId(header.sender)
        if body.expected_peer != self._local:
            return self._fail(
                FailureCause.UNEXPECTED_PEER, f"offer meant for daemon {body.expected_peer}"
            )
        if body.peer_stream_id != 0:
            return self._fail(FailureCause.MALFORMED, "an offer names no peer stream")
        self._peer = peer
        self._ephemeral = Ephemeral.generate(self._random)
        self._stream_id = self._random_u32()
        reply = seal_handshake(
            hello_aead(key, self._local, PURPOSE),
            HandshakeHeader(
                key.key_id, self._local, self._stream_id, int.from_bytes(self._random(8), "big")
            ),
            HandshakeBody(self._ephemeral.public, peer, header.stream_id),
        )
        problem = self._derive_keys(header, body)
        if problem is not None:
            return problem
        self._key = key
        self._skip = (header.offers - self._offers_seen) * HANDSHAKE_SIZE
        self._state = _State.SKIP_OFFERS if self._skip else _State.AWAIT_CONFIRM
        return [Write(reply)]

    def _derive_keys(
        self, header: HandshakeHeader, body: HandshakeBody
    ) -> list[StreamEffect] | None:
        assert self._ephemeral is not None
        try:
            send_key, recv_key = session_keys(
                self._ephemeral,
                body.public_key,
                local=self._local,
                local_epoch=self._stream_id,
                peer=header.sender,
                peer_epoch=header.stream_id,
                purpose=PURPOSE,
            )
        except ValueError as exc:  # a low-order public key: no shared secret
            return self._fail(FailureCause.BAD_HANDSHAKE, f"degenerate public key: {exc}")
        self._peer_stream_id = header.stream_id
        self._send_aead = AESGCM(send_key)
        self._recv_aead = AESGCM(recv_key)
        self._ephemeral = None  # forward secrecy: the private half is no longer needed
        return None
