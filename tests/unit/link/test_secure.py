"""SecureLink driven directly: handshake, sealing, and every attack dropped and counted."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcast.link import LinkConfig
from meshcast.link.replay import ReplayWindow
from meshcast.link.secure import RECORD_OVERHEAD, LinkSecurity, SecureLink
from meshcast.wire.keys import ClusterKey, KeyRing
from meshcast.wire.packet import FLAG_AUTH, HEADER, HEADER_SIZE, PacketType, encode_header
from tests.unit.link.pair import A, B, Pair

CONFIG = LinkConfig(rate_bps=10e6)
KEY = ClusterKey(bytes(range(32)))
OTHER_KEY = ClusterKey(bytes(range(1, 33)))


def security(ring: KeyRing, seed: int) -> LinkSecurity:
    rng = random.Random(seed)
    return LinkSecurity(ring, rng.randbytes)


def secure(local: int, peer: int, epoch: int, sec: LinkSecurity) -> SecureLink:
    return SecureLink(local, peer, CONFIG, epoch=epoch, security=sec)  # type: ignore[arg-type]


RING = KeyRing.of(KEY)


def make_pair(ring_a: KeyRing = RING, ring_b: KeyRing = RING, **kwargs: object) -> Pair:
    pair = Pair(
        secure(A, B, 101, security(ring_a, 1)),
        secure(B, A, 202, security(ring_b, 2)),
        **kwargs,  # type: ignore[arg-type]
    )
    pair.start()
    pair.run(0.5)
    return pair


def captured(pair: Pair, src: int, ptype: PacketType) -> list[bytes]:
    """Datagrams `src` sent of type `ptype` (recorded through the pair's filter)."""
    return [d for s, d in pair.log if s == src and d[3] == ptype]  # type: ignore[attr-defined]


def recording(**kwargs: object) -> Pair:
    log: list[tuple[int, bytes]] = []

    def keep(src: int, datagram: bytes) -> bool:
        log.append((src, datagram))
        return True

    pair = make_pair(filter=keep, **kwargs)
    pair.log = log  # type: ignore[attr-defined]
    return pair


def stats(pair: Pair, node: int) -> dict[str, int]:
    s = pair.link(node).statistics()  # type: ignore[arg-type]
    return {
        "forged": s.forged_dropped,
        "replayed": s.replayed_dropped,
        "cleartext": s.cleartext_dropped,
        "truncated": s.truncated_dropped,
        "unknown_key": s.unknown_key_dropped,
        "no_session": s.no_session_dropped,
    }


def test_handshake_and_messages_both_ways() -> None:
    pair = make_pair()
    assert pair.a.established
    assert pair.b.established
    for i in range(50):
        pair.send(A, b"a%d" % i + bytes(3000))  # fragmented: larger than a datagram
        pair.send(B, b"b%d" % i)
    pair.run(pair.now + 2)
    assert pair.delivered[B] == [b"a%d" % i + bytes(3000) for i in range(50)]
    assert pair.delivered[A] == [b"b%d" % i for i in range(50)]
    assert set(stats(pair, A).values()) == {0}
    assert set(stats(pair, B).values()) == {0}


def test_nothing_but_the_header_is_in_the_clear() -> None:
    pair = recording()
    secret = b"the launch code is 0000" * 10
    pair.send(A, secret)
    pair.run(pair.now + 1)
    assert pair.delivered[B] == [secret]
    for _, datagram in pair.log:  # type: ignore[attr-defined]
        assert datagram[4] & FLAG_AUTH
        assert b"launch" not in datagram
        assert len(datagram) <= CONFIG.mtu
    data = captured(pair, A, PacketType.DATA)
    assert data
    assert all(len(d) <= CONFIG.mtu for d in data)
    assert RECORD_OVERHEAD == 24


def test_lossy_reordering_link_delivers_everything_once() -> None:
    pair = make_pair(loss=0.2, duplicate=0.1, jitter=0.02, seed=7)
    for i in range(300):
        pair.send(A, b"%d" % i)
    pair.run_until(lambda: len(pair.delivered[B]) == 300, limit=60)
    assert sorted(pair.delivered[B], key=int) == [b"%d" % i for i in range(300)]
    assert len(pair.delivered[B]) == 300
    assert stats(pair, B)["forged"] == 0


def test_replayed_record_and_hello_are_dropped() -> None:
    pair = recording()
    pair.send(A, b"once")
    pair.run(pair.now + 1)
    (data,) = list(captured(pair, A, PacketType.DATA))
    hello = captured(pair, A, PacketType.HELLO)[0]
    pair.inject(B, data)
    pair.inject(B, hello)
    pair.run(pair.now + 1)
    assert pair.delivered[B] == [b"once"]
    assert stats(pair, B)["replayed"] == 2


def test_hello_of_a_previous_epoch_cannot_reset_the_link() -> None:
    pair = recording()
    old_hello = captured(pair, A, PacketType.HELLO)[0]
    # A restarts: a new link object with a new epoch, sharing its daemon's LinkSecurity.
    restarted_security = pair.a._security  # type: ignore[attr-defined]
    pair.a = secure(A, B, 555, restarted_security)
    pair.apply(A, pair.a.start(pair.now))
    pair.run(pair.now + 2)
    assert pair.a.established
    assert pair.b.established
    pair.send(A, b"after restart")
    pair.run(pair.now + 1)
    assert pair.delivered[B][-1] == b"after restart"
    replayed_before = stats(pair, B)["replayed"]
    pair.inject(B, old_hello)  # the old epoch's HELLO, recorded by an attacker
    pair.run(pair.now + 1)
    assert stats(pair, B)["replayed"] == replayed_before + 1
    pair.send(A, b"still fine")
    pair.run(pair.now + 1)
    assert pair.delivered[B][-1] == b"still fine"


@pytest.mark.parametrize("offset", [0, 3, 5, 12, 23, 24, 30, -1])
def test_a_flipped_bit_anywhere_is_dropped(offset: int) -> None:
    pair = recording()
    pair.send(A, b"x" * 100)
    pair.run(pair.now + 1)
    data = bytearray(captured(pair, A, PacketType.DATA)[0])
    data[offset] ^= 0x01
    delivered = len(pair.delivered[B])
    before = stats(pair, B)
    pair.inject(B, bytes(data))
    assert len(pair.delivered[B]) == delivered
    after = stats(pair, B)
    assert after != before or pair.b.statistics().malformed_dropped  # counted somewhere


def test_a_daemon_without_the_key_gets_nothing_through() -> None:
    pair = make_pair(ring_b=KeyRing.of(OTHER_KEY))
    assert not pair.a.established
    assert not pair.b.established
    pair.send(A, b"secret")
    pair.run(pair.now + 1)
    assert pair.delivered[B] == []
    assert pair.delivered[A] == []
    assert stats(pair, A)["unknown_key"] + stats(pair, A)["forged"] > 0


def test_cleartext_and_truncated_datagrams_are_counted() -> None:
    pair = make_pair()
    plain = encode_header(PacketType.HELLO, B, 999) + bytes(7)
    pair.inject(A, plain)
    pair.inject(A, encode_header(PacketType.DATA, B, 202, 5, flags=FLAG_AUTH) + bytes(10))
    pair.inject(A, plain[:10])
    s = stats(pair, A)
    assert s["cleartext"] == 1
    assert s["truncated"] == 1
    assert pair.a.statistics().malformed_dropped == 1  # not even a header


def test_forged_record_with_a_guessed_counter_does_not_move_the_window() -> None:
    pair = recording()
    data = captured(pair, B, PacketType.STATE) or captured(pair, B, PacketType.HEARTBEAT)
    real = data[-1]
    magic, version, ptype, flags, key_id, r, sender, epoch, _ = HEADER.unpack_from(real)
    forged = HEADER.pack(magic, version, ptype, flags, key_id, r, sender, epoch, 10**9)
    pair.inject(A, forged + real[HEADER_SIZE:])
    assert stats(pair, A)["forged"] == 1
    pair.send(B, b"next")
    pair.run(pair.now + 1)
    assert pair.delivered[A] == [b"next"]


def test_rotation_a_daemon_with_the_next_key_talks_to_one_without_it() -> None:
    pair = make_pair(ring_a=KeyRing.of(KEY, OTHER_KEY), ring_b=KeyRing.of(KEY))
    assert pair.a.established
    assert pair.b.established
    pair.send(A, b"during rollout")
    pair.run(pair.now + 1)
    assert pair.delivered[B] == [b"during rollout"]


def test_rotation_both_on_the_new_key() -> None:
    pair = make_pair(ring_a=KeyRing.of(KEY, OTHER_KEY), ring_b=KeyRing.of(OTHER_KEY))
    assert pair.a.established
    assert pair.b.established


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 5000), max_size=300))
def test_replay_window_accepts_each_counter_once(counters: list[int]) -> None:
    window = ReplayWindow(64)
    accepted: set[int] = set()
    highest = 0
    for counter in counters:
        if window.check(counter):
            assert counter not in accepted
            assert counter > highest - 64
            window.accept(counter)
            accepted.add(counter)
            highest = max(highest, counter)
        else:
            assert counter in accepted or counter <= highest - 64
