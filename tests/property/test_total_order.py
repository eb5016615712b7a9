"""`TotalOrder` keeps min(heard) as it goes: its ARU is the definition's, whatever order
the streams' messages arrive in."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meshcast.group.total import TotalOrder
from meshcast.ids import NodeId

LOCAL = NodeId(1)
MEMBERS = [NodeId(i) for i in (1, 2, 3, 4)]

# per other member: its stream's timestamps (increasing) and the order they arrive in
streams = st.lists(st.integers(1, 5), min_size=0, max_size=8).map(
    lambda steps: [sum(steps[: i + 1]) for i in range(len(steps))]
)
arrivals = st.tuples(streams, streams, streams).flatmap(
    lambda s: st.tuples(
        st.just(s),
        st.permutations([(k, seq) for k, stream in enumerate(s) for seq in range(len(stream))]),
    )
)


@given(arrivals, st.integers(0, 60))
def test_the_aru_is_the_least_of_the_clock_and_every_member_heard(
    case: tuple[list[list[int]], list[tuple[int, int]]], clock: int
) -> None:
    stamps, order = case
    total: TotalOrder[str] = TotalOrder(LOCAL, MEMBERS)
    others = MEMBERS[1:]
    for k, seq in order:
        source = others[k]
        total.offer(source, seq + 1, stamps[k][seq], 0, f"{source}:{seq}", safe=False)
        assert total.aru(clock) == min([clock, *total.heard.values()])
    for k, stream in enumerate(stamps):
        assert total.heard[others[k]] == (stream[-1] if stream else 0)
        assert total.next_expected(others[k]) == len(stream) + 1
    # what every member has been heard up to, in (timestamp, source) order
    floor = min(s[-1] if s else 0 for s in stamps)
    everything = sorted(
        (ts, others[k], seq) for k, s in enumerate(stamps) for seq, ts in enumerate(s)
    )
    ready = [f"{source}:{seq}" for ts, source, seq in everything if ts <= floor]
    assert total.ready(10**6) == ready
    assert total.held == len(everything) - len(ready)


def test_alone_the_aru_is_the_clock() -> None:
    total: TotalOrder[str] = TotalOrder(LOCAL, [LOCAL])
    assert total.aru(7) == 7
    total.add_own(3, False, "own")
    assert total.ready(7) == ["own"]
