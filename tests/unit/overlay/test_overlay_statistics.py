"""`OverlayNode.statistics()`: a frozen snapshot whose counters follow what the node did."""

from __future__ import annotations

from dataclasses import FrozenInstanceError

import pytest

from meshcast.ids import NodeId
from meshcast.overlay.node import OverlayNode
from meshcast.sim.overlay import OverlayEdge, build_overlay

ONE, TWO, THREE = NodeId(1), NodeId(2), NodeId(3)


def test_statistics_is_a_frozen_snapshot_that_counts() -> None:
    sim, recorder = build_overlay([OverlayEdge(1, 2), OverlayEdge(2, 3)], seed=5)
    nodes = {n: sim.node_as(n, OverlayNode) for n in (ONE, TWO, THREE)}
    sim.run(until=2.0)  # the line 1-2-3 agrees on one view
    before = {n: node.statistics() for n, node in nodes.items()}
    for stats in before.values():
        assert stats.views_installed >= 1
        assert stats.lsas_flooded >= 1
        assert stats.data_originated == stats.data_delivered == 0

    sim.act(ONE, lambda node, now: node.multicast([TWO, THREE], b"counted", now))
    sim.run(until=3.0)
    assert [d.payload for d in recorder.delivered[THREE]] == [b"counted"]
    one, two, three = (nodes[n].statistics() for n in (ONE, TWO, THREE))
    assert one.data_originated == 1
    assert (two.data_delivered, two.data_forwarded) == (1, 1)  # 2 delivers, and forwards to 3
    assert (three.data_delivered, three.data_forwarded) == (1, 0)
    assert one.link_messages_sent > before[ONE].link_messages_sent
    # a snapshot stays as it was taken, and cannot be changed
    assert before[ONE].data_originated == 0
    with pytest.raises(FrozenInstanceError):
        one.data_originated = 0  # type: ignore[misc]
