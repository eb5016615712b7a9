"""Hop delivers every message exactly once, intact, under random loss, duplication, reordering."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from meshcast.link import HopLink, LinkConfig
from tests.unit.link.pair import A, B, Pair


def payload(i: int, size: int) -> bytes:
    head = i.to_bytes(4, "big")
    body = hashlib.sha256(head).digest() * (size // 32 + 1)
    return head + body[: max(size - 4, 0)]


@settings(max_examples=100)
@given(
    seed=st.integers(0, 2**32 - 1),
    loss=st.floats(0.0, 0.3),
    duplicate=st.floats(0.0, 0.2),
    jitter=st.floats(0.0, 0.02),
    sizes=st.lists(st.integers(4, 5000), min_size=30, max_size=150),
    both_ways=st.booleans(),
)
def test_exactly_once_under_faults(
    seed: int, loss: float, duplicate: float, jitter: float, sizes: list[int], both_ways: bool
) -> None:
    config = LinkConfig(rate_bps=20e6, failure_rounds=200)
    pair = Pair(
        HopLink(A, B, config, epoch=5),
        HopLink(B, A, config, epoch=6),
        delay=0.01,
        loss=loss,
        duplicate=duplicate,
        jitter=jitter,
        seed=seed,
    )
    pair.start()
    expected = {A: [], B: []}  # type: dict[object, list[bytes]]
    for i, size in enumerate(sizes):
        pair.send(A, payload(i, size))
        expected[B].append(payload(i, size))
        if both_ways:
            pair.send(B, payload(10_000 + i, size))
            expected[A].append(payload(10_000 + i, size))
        pair.run(pair.now + 0.002)

    def complete() -> bool:
        return all(len(pair.delivered[n]) >= len(expected[n]) for n in (A, B))

    pair.run_until(complete, limit=pair.now + 120)
    pair.run(pair.now + 1)  # linger: late duplicates must not be handed up again
    for node in (A, B):
        assert sorted(pair.delivered[node]) == sorted(expected[node])
    assert not pair.a.failed
    assert not pair.b.failed
