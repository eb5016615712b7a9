"""`OverlayNode.backlogged(dest)`: does this daemon still hold a message of ours for
`dest`, not yet sent? The group layer defers repairs to `dest` while it does, so a
message waiting in the outbox must count, and a message for someone else must not."""

from __future__ import annotations

from meshcast.ids import NodeId
from meshcast.overlay.node import OverlayNode
from meshcast.sim.overlay import build_overlay, full_mesh
from meshcast.sim.simulator import Simulator

ONE, TWO, THREE, FOUR = NodeId(1), NodeId(2), NodeId(3), NodeId(4)
WINDOW = 3


def cluster(**options: object) -> Simulator:
    sim, _ = build_overlay(
        full_mesh(4),
        seed=3,
        secure=False,
        window_messages=WINDOW,
        feedback_every=1,
        feedback_interval=0.01,
        **options,
    )
    sim.run(until=1.0)
    return sim


def send(sim: Simulator, dests: list[NodeId]) -> None:
    sim.act(ONE, lambda node, now: node.multicast(dests, b"m", now))


def test_a_message_waiting_in_the_outbox_is_backlogged_for_its_destinations_only() -> None:
    sim = cluster()
    one = sim.node_as(ONE, OverlayNode)
    for other in (TWO, FOUR):
        sim.set_link_up(THREE, other, False)
    sim.set_link_up(ONE, THREE, False)  # 3 hears nothing, so it reports nothing
    for _ in range(WINDOW):
        send(sim, [TWO, THREE])
    send(sim, [TWO])  # waits in the outbox: 3 holds the window closed
    sim.run(until=sim.now + 0.3)  # long enough for every link queue to drain
    assert not one.window_open()
    assert one.backlogged(TWO)
    assert not one.backlogged(FOUR)
    sim.run(until=sim.now + 5.0)  # 3 leaves the view, the window opens, the outbox drains
    assert one.view is not None
    assert THREE not in one.view
    assert not one.backlogged(TWO)


def test_a_message_queued_in_the_first_hops_link_is_backlogged() -> None:
    sim = cluster(coalesce_sends=True)  # a message waits in its link until the link's timer
    one = sim.node_as(ONE, OverlayNode)
    send(sim, [TWO])
    assert one.backlogged(TWO)
    assert not one.backlogged(THREE)
    sim.run(until=sim.now + 0.1)
    assert not one.backlogged(TWO)


def test_a_leaving_daemon_holds_nothing() -> None:
    sim = cluster()
    one = sim.node_as(ONE, OverlayNode)
    sim.set_link_up(ONE, THREE, False)
    sim.set_link_up(TWO, THREE, False)
    sim.set_link_up(FOUR, THREE, False)
    for _ in range(WINDOW + 2):
        send(sim, [TWO, THREE])
    assert one.backlogged(TWO)
    sim.act(ONE, lambda node, now: node.leave(now))  # the outbox is dropped
    assert not one.backlogged(TWO)
