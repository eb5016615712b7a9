"""The secure bulk stream machine (meshcast.link.stream), driven directly: no sockets, no loop."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcast.errors import UsageError
from meshcast.ids import NodeId
from meshcast.link.stream import (
    Closed,
    Established,
    Failed,
    FailureCause,
    Received,
    SecureStream,
    StreamEffect,
    Write,
)
from meshcast.wire.keys import ClusterKey, KeyRing
from meshcast.wire.secure import hello_aead
from meshcast.wire.stream import (
    HANDSHAKE_SIZE,
    MAX_RECORD_PAYLOAD,
    PURPOSE,
    RECORD_HEAD,
    HandshakeBody,
    HandshakeHeader,
    RecordType,
    seal_handshake,
)

A = NodeId(1)
B = NodeId(2)
CURRENT = ClusterKey(bytes(range(32)))
NEXT = ClusterKey(bytes(range(100, 132)))
ONE_KEY = KeyRing.of(CURRENT)


def rng_bytes(seed: int) -> random.Random:
    return random.Random(seed)


def same_id_other_key(key: ClusterKey) -> ClusterKey:
    """A different key that has `key`'s key_id (found by a bounded, seeded search)."""
    rng = random.Random(7)
    for _ in range(100_000):
        other = ClusterKey(rng.randbytes(32))
        if other.key_id == key.key_id and other != key:
            return other
    raise AssertionError("no key with the same key id found")


def written(effects: Iterable[StreamEffect]) -> bytes:
    return b"".join(e.data for e in effects if isinstance(e, Write))


def received(effects: Iterable[StreamEffect]) -> bytes:
    return b"".join(e.data for e in effects if isinstance(e, Received))


def failures(effects: Iterable[StreamEffect]) -> list[Failed]:
    return [e for e in effects if isinstance(e, Failed)]


def streams(
    ring_a: KeyRing = ONE_KEY,
    ring_b: KeyRing = ONE_KEY,
    *,
    allowed: Sequence[NodeId] = (A,),
    expect: NodeId = B,
    responder_id: NodeId = B,
    seed: int = 1,
) -> tuple[SecureStream, SecureStream]:
    a = SecureStream.initiator(A, expect, ring_a, rng_bytes(seed).randbytes)
    b = SecureStream.responder(
        responder_id, ring_b, lambda peer: peer in allowed, rng_bytes(seed + 1000).randbytes
    )
    return a, b


def handshake(
    a: SecureStream, b: SecureStream
) -> tuple[list[StreamEffect], list[StreamEffect], list[StreamEffect]]:
    """Offers a->b, reply b->a, CONFIRM a->b: the effects at b, a, b."""
    at_b = b.data_received(written(a.start()))
    at_a = a.data_received(written(at_b))
    at_b2 = b.data_received(written(at_a))
    return at_b, at_a, at_b2


def established_pair(seed: int = 1) -> tuple[SecureStream, SecureStream]:
    a, b = streams(seed=seed)
    _, at_a, at_b = handshake(a, b)
    assert Established(B, CURRENT.fingerprint) in at_a
    assert Established(A, CURRENT.fingerprint) in at_b
    return a, b


def test_round_trip_both_directions_and_clean_close() -> None:
    a, b = established_pair()
    assert a.established
    assert b.established
    assert b.peer == A
    assert received(b.data_received(written(a.send(b"hello ") + a.send(b"B")))) == b"hello B"
    assert received(a.data_received(written(b.send(b"hi A")))) == b"hi A"
    # Half close: A ends its data, B still answers, then B ends.
    assert b.data_received(written(a.close())) == [Closed()]
    assert b.peer_closed
    assert received(a.data_received(written(b.send(b"late reply")))) == b"late reply"
    assert a.data_received(written(b.close())) == [Closed()]
    assert a.eof_received() == []
    assert b.eof_received() == []
    assert a.statistics().bytes_sent == 7
    assert b.statistics().bytes_received == 7
    assert b.statistics().records_received == 4  # CONFIRM, two DATA, CLOSE


def test_large_payload_is_split_into_bounded_records() -> None:
    a, b = established_pair()
    payload = random.Random(3).randbytes(4 * MAX_RECORD_PAYLOAD + 5)
    writes = a.send(payload)
    assert len(writes) == 5
    out = b.data_received(written(writes))
    pieces = [e.data for e in out if isinstance(e, Received)]
    assert b"".join(pieces) == payload
    assert max(len(p) for p in pieces) == MAX_RECORD_PAYLOAD
    assert b.statistics().buffered_bytes == 0


def test_send_is_refused_before_establishment_after_close_and_after_failure() -> None:
    a, b = streams()
    with pytest.raises(UsageError, match="before"):
        a.send(b"x")
    a.start()
    with pytest.raises(UsageError, match="before"):
        a.send(b"x")
    a, b = established_pair()
    a.close()
    with pytest.raises(UsageError, match="after close"):
        a.send(b"x")
    assert a.close() == []  # CLOSE goes out once
    failures(b.data_received(b"\xff" * 5))
    with pytest.raises(UsageError, match="failed"):
        b.send(b"x")
    with pytest.raises(UsageError):
        SecureStream.initiator(A, A, KeyRing.of(CURRENT), random.Random(1).randbytes)


def test_wrong_key_is_refused() -> None:
    other = ClusterKey(bytes(32))
    assert other.key_id != CURRENT.key_id
    a, b = streams(KeyRing.of(other), KeyRing.of(CURRENT))
    at_b = b.data_received(written(a.start()))
    assert failures(at_b)[0].cause is FailureCause.UNKNOWN_KEY
    assert written(at_b) == b""  # no reply, no state: the sender learns nothing
    # A different key that happens to have the same key id: tried, does not open.
    twin = same_id_other_key(CURRENT)
    a, b = streams(KeyRing.of(twin), KeyRing.of(CURRENT))
    at_b = b.data_received(written(a.start()))
    assert failures(at_b)[0].cause is FailureCause.BAD_HANDSHAKE
    assert not b.established


def test_responder_tries_every_key_with_a_matching_id() -> None:
    twin = same_id_other_key(CURRENT)
    a, b = streams(KeyRing.of(CURRENT), KeyRing((twin, CURRENT)))
    _, at_a, at_b = handshake(a, b)
    assert Established(A, CURRENT.fingerprint) in at_b
    assert Established(B, CURRENT.fingerprint) in at_a


@pytest.mark.parametrize(
    ("ring_a", "ring_b", "used"),
    [
        (KeyRing.of(CURRENT, NEXT), KeyRing.of(CURRENT), CURRENT),  # B not rolled yet
        (KeyRing.of(CURRENT, NEXT), KeyRing.of(CURRENT, NEXT), NEXT),  # both rolled: newest
        (KeyRing.of(CURRENT), KeyRing.of(CURRENT, NEXT), CURRENT),  # A not rolled yet
        (KeyRing.of(NEXT), KeyRing.of(CURRENT, NEXT), NEXT),  # A dropped the old key
    ],
)
def test_key_rotation(ring_a: KeyRing, ring_b: KeyRing, used: ClusterKey) -> None:
    a, b = streams(ring_a, ring_b)
    _, at_a, at_b = handshake(a, b)
    assert Established(B, used.fingerprint) in at_a
    assert Established(A, used.fingerprint) in at_b
    assert a.key == used
    assert b.key == used
    assert received(b.data_received(written(a.send(b"rolled")))) == b"rolled"
    assert received(a.data_received(written(b.send(b"ok")))) == b"ok"


def test_initiator_with_only_a_key_the_responder_dropped_fails() -> None:
    a, b = streams(KeyRing.of(NEXT), KeyRing.of(CURRENT))
    assert failures(b.data_received(written(a.start())))[0].cause is FailureCause.UNKNOWN_KEY


def test_unexpected_peers_are_refused() -> None:
    # B talks only to daemon 5: A's offer fails at its header, before any crypto or reply.
    a, b = streams(allowed=(NodeId(5),))
    offers = written(a.start())
    at_b = b.data_received(offers[:24])
    assert failures(at_b)[0].cause is FailureCause.UNEXPECTED_PEER
    assert written(at_b) == b""
    # A means to reach daemon 3 but reached B: B refuses an offer meant for another.
    a, b = streams(expect=NodeId(3))
    at_b = b.data_received(written(a.start()))
    assert failures(at_b)[0].cause is FailureCause.UNEXPECTED_PEER
    assert written(at_b) == b""
    # A means to reach daemon 3, and daemon 2 is there but happens to accept anyone.
    a = SecureStream.initiator(A, NodeId(3), KeyRing.of(CURRENT), random.Random(1).randbytes)
    b3 = SecureStream.responder(NodeId(3), KeyRing.of(CURRENT), lambda p: True, random.randbytes)
    reply = written(b3.data_received(written(a.start())))
    impostor = SecureStream.initiator(A, B, KeyRing.of(CURRENT), random.Random(1).randbytes)
    impostor.start()
    assert failures(impostor.data_received(reply))[0].cause is FailureCause.UNEXPECTED_PEER


def test_replayed_reply_does_not_establish_a_new_initiator() -> None:
    a, b = streams(seed=1)
    reply = written(b.data_received(written(a.start())))
    a2, _ = streams(seed=2)
    a2.start()
    assert failures(a2.data_received(reply))[0].cause is FailureCause.BAD_HANDSHAKE
    assert not a2.established


def test_replayed_offers_never_establish_a_responder() -> None:
    a, b = streams()
    offers = written(a.start())
    b.data_received(offers)  # the real exchange
    replay_at = SecureStream.responder(B, KeyRing.of(CURRENT), lambda p: True, random.randbytes)
    reply = replay_at.data_received(offers)
    assert written(reply)  # the responder answers an authentic-looking offer...
    assert not replay_at.established  # ...but waits for a CONFIRM nobody can forge
    forged_confirm = RECORD_HEAD.pack(16, RecordType.CONFIRM) + bytes(16)
    assert failures(replay_at.data_received(forged_confirm))[0].cause is FailureCause.FORGED
    # Anything but a CONFIRM fails at its 5-byte head, before its body is buffered.
    other = SecureStream.responder(B, KeyRing.of(CURRENT), lambda p: True, random.randbytes)
    other.data_received(offers)
    big = RECORD_HEAD.pack(MAX_RECORD_PAYLOAD + 16, RecordType.DATA)
    assert failures(other.data_received(big))[0].cause is FailureCause.PROTOCOL
    assert other.statistics().buffered_bytes == 0


def transcript_a_to_b() -> tuple[bytes, bytes]:
    """Every byte A writes in a whole exchange (single-key ring: one offer), and B's."""
    a, b = streams()
    out_a = written(a.start())
    out_b = written(b.data_received(out_a))
    tail_a = written(a.data_received(out_b))
    tail_a += written(a.send(b"payload one") + a.send(b"two") + a.close())
    out_b += written(b.data_received(tail_a))
    out_b += written(b.send(b"answer") + b.close())
    return out_a + tail_a, out_b


def test_transcripts_are_what_the_happy_path_delivers() -> None:
    to_b, to_a = transcript_a_to_b()
    a, b = streams()
    a.start()
    at_b = b.data_received(to_b)
    assert received(at_b) == b"payload onetwo"
    assert at_b[-1] == Closed()
    at_a = a.data_received(to_a)
    assert received(at_a) == b"answer"
    assert at_a[-1] == Closed()


def test_a_bit_flip_in_any_byte_fails_the_stream() -> None:
    to_b, to_a = transcript_a_to_b()
    for index in range(len(to_b)):
        for bit in (0, 7):
            a, b = streams()
            a.start()
            damaged = bytearray(to_b)
            damaged[index] ^= 1 << bit
            at_b = b.data_received(bytes(damaged)) + b.eof_received()
            assert failures(at_b), f"flip of bit {bit} in byte {index} to B went unnoticed"
            assert Closed() not in at_b
            # what came before the damage is authentic: a prefix, never altered bytes
            assert b"payload onetwo".startswith(received(at_b))
    for index in range(len(to_a)):
        a, b = streams()
        to_b_handshake = written(a.start())
        b.data_received(to_b_handshake)
        damaged = bytearray(to_a)
        damaged[index] ^= 0x10
        at_a = a.data_received(bytes(damaged)) + a.eof_received()
        assert failures(at_a), f"flip in byte {index} to A went unnoticed"
        assert Closed() not in at_a


def data_records(count: int, seed: int = 1) -> tuple[SecureStream, list[bytes]]:
    """A fresh established responder and `count` DATA records its initiator sent after."""
    a, b = established_pair(seed=seed)
    return b, [written(a.send(f"record {i}".encode())) for i in range(count)]


def test_replayed_reordered_and_dropped_records_fail_the_stream() -> None:
    b, (r1, r2, r3) = data_records(3)
    assert received(b.data_received(r1)) == b"record 0"
    assert failures(b.data_received(r1))[0].cause is FailureCause.FORGED  # replay
    b, (r1, r2, r3) = data_records(3)
    assert failures(b.data_received(r2 + r1))[0].cause is FailureCause.FORGED  # reorder
    b, (r1, r2, r3) = data_records(3)
    at_b = b.data_received(r1 + r3)  # r2 dropped
    assert received(at_b) == b"record 0"
    assert failures(at_b)[0].cause is FailureCause.FORGED
    # a record of another stream between the same daemons, with the same keys
    b, (r1, _, _) = data_records(3)
    _, others = data_records(1, seed=2)  # another stream: other ephemeral keys
    assert failures(b.data_received(others[0]))[0].cause is FailureCause.FORGED


def test_truncation_is_reported_not_a_clean_end() -> None:
    a, b = established_pair()
    records = written(a.send(b"x" * 1000) + a.send(b"y" * 1000))
    at_b = b.data_received(records[:-7])
    assert received(at_b) == b"x" * 1000
    end = b.eof_received()
    assert len(end) == 1
    assert isinstance(end[0], Failed)
    assert end[0].cause is FailureCause.TRUNCATED
    assert "incomplete record" in end[0].reason
    # whole records but no CLOSE: still truncated
    a, b = established_pair()
    b.data_received(written(a.send(b"complete")))
    assert failures(b.eof_received())[0].cause is FailureCause.TRUNCATED
    # cut during the handshake
    a, b = streams()
    b.data_received(written(a.start())[:50])
    assert failures(b.eof_received())[0].cause is FailureCause.TRUNCATED


def test_bytes_after_close_fail_the_stream() -> None:
    a, b = established_pair()
    b.data_received(written(a.close()))
    assert failures(b.data_received(b"\x00"))[0].cause is FailureCause.PROTOCOL


def test_garbage_and_huge_lengths_fail_at_once_without_buffering() -> None:
    a, b = streams()
    at_b = b.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(65536))
    assert failures(at_b)[0].cause is FailureCause.MALFORMED
    assert b.statistics().buffered_bytes == 0
    assert b.data_received(b"more") == []  # a failed stream ignores everything after
    # authenticated peer, then a record head announcing more than the maximum
    a, b = established_pair()
    huge = RECORD_HEAD.pack(2**31, RecordType.DATA)
    assert failures(b.data_received(huge))[0].cause is FailureCause.MALFORMED
    assert b.statistics().buffered_bytes == 0
    # an incomplete record is held, but never more than one maximal record
    a, b = established_pair()
    record = written(a.send(bytes(MAX_RECORD_PAYLOAD)))
    b.data_received(record[:-1])
    assert b.statistics().buffered_bytes == len(record) - 1 == MAX_RECORD_PAYLOAD + 16 + 5 - 1


def test_degenerate_public_key_is_refused() -> None:
    # Only a key holder can build this; a low-order point must still not give a session.
    header = HandshakeHeader(CURRENT.key_id, A, 77, 5)
    offer = seal_handshake(hello_aead(CURRENT, A, PURPOSE), header, HandshakeBody(bytes(32), B, 0))
    assert len(offer) == HANDSHAKE_SIZE
    _, b = streams()
    at_b = b.data_received(offer)
    assert failures(at_b)[0].cause is FailureCause.BAD_HANDSHAKE
    assert written(at_b) == b""


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[i:j] for i, j in itertools.pairwise(points)]


@given(
    cuts_a=st.lists(st.integers(0, 2**20), max_size=40),
    cuts_b=st.lists(st.integers(0, 2**20), max_size=10),
    sizes=st.lists(st.integers(0, 3 * MAX_RECORD_PAYLOAD // 2), max_size=4),
    two_keys=st.booleans(),
)
def test_any_chunking_of_the_byte_streams_gives_the_same_result(
    cuts_a: list[int], cuts_b: list[int], sizes: list[int], two_keys: bool
) -> None:
    ring_a = KeyRing.of(CURRENT, NEXT) if two_keys else KeyRing.of(CURRENT)
    a, b = streams(ring_a, KeyRing.of(CURRENT))
    payloads = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    # A writes its offers; B replies once it has them, however they were cut.
    offers = written(a.start())
    at_b: list[StreamEffect] = []
    for piece in chunked(offers, cuts_a):
        at_b += b.data_received(piece)
    at_a: list[StreamEffect] = []
    for piece in chunked(written(at_b), cuts_b):
        at_a += a.data_received(piece)
    rest = written(at_a)
    for payload in payloads:
        rest += written(a.send(payload))
    rest += written(a.close())
    for piece in chunked(rest, cuts_a):
        at_b += b.data_received(piece)
    assert not failures(at_a + at_b)
    assert Established(A, CURRENT.fingerprint) in at_b
    assert received(at_b) == b"".join(payloads)
    assert at_b[-1] == Closed()
    assert b.statistics().buffered_bytes == 0
