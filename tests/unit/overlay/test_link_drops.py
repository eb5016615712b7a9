"""What a neighbour's links dropped stays counted when a failed link is replaced."""

from __future__ import annotations

from typing import Any

from meshcast.ids import NodeId
from meshcast.overlay.node import LinkDrops, OverlayNode
from meshcast.sim.overlay import OverlayEdge, build_overlay
from meshcast.wire.packet import Header, Heartbeat, HeartbeatKind, Packet, PacketType, encode

ONE, TWO = NodeId(1), NodeId(2)


def test_drops_by_cause_survive_the_replacement_of_a_failed_link() -> None:
    sim, _ = build_overlay([OverlayEdge(1, 2)], seed=3)
    sim.run(until=2.0)
    wrong = encode(
        Packet(Header(PacketType.HEARTBEAT, 7, 1), body=Heartbeat(HeartbeatKind.REQUEST, 0))
    )

    def junk(node: Any, now: float) -> list[object]:
        effects: list[object] = []
        for datagram in (b"junk", b"more junk", wrong):
            effects += node.datagram_received(TWO, datagram, now)
        return effects

    sim.act(ONE, junk)
    one = sim.node_as(ONE, OverlayNode)
    assert one.link_drops(TWO) == LinkDrops(malformed=2, wrong_sender=1)
    sim.crash(TWO)
    sim.run(until=10.0)  # the link to 2 fails and is replaced by a fresh one
    assert TWO not in one.neighbours_up
    assert one.endpoint.link(TWO).statistics().malformed_dropped == 0
    drops = one.link_drops(TWO)
    assert (drops.malformed, drops.wrong_sender, drops.total) == (2, 1, 3)
