"""`OverlayNode.window_open` keeps a set of full windows up to date instead of scanning
every destination per message: it must always agree with the scan it replaced."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshcast.ids import NodeId
from meshcast.overlay.node import OverlayNode
from meshcast.sim.overlay import build_overlay, full_mesh
from meshcast.sim.simulator import Simulator

NODES = (NodeId(1), NodeId(2), NodeId(3), NodeId(4))
WINDOW = 3


def scanned_window_open(node: OverlayNode) -> bool:
    """The definition: every destination of the view has fewer than `window_messages`
    of our messages not yet reported delivered."""
    view = node.view
    if view is None:
        return False
    return all(
        len(in_flight) < node.config.window_messages
        for dest, in_flight in node._in_flight.items()
        if dest in view
    )


def check_all(sim: Simulator) -> int:
    """Compare on every live node; return how many windows are closed now."""
    closed = 0
    for n in NODES:
        if sim.is_alive(n):
            node = sim.node_as(n, OverlayNode)
            assert node.window_open() == scanned_window_open(node)
            closed += not node.window_open()
    return closed


def cluster(seed: int) -> Simulator:
    sim, _ = build_overlay(
        full_mesh(len(NODES)),
        seed=seed,
        secure=False,
        window_messages=WINDOW,
        feedback_every=2,
        feedback_interval=0.02,
    )

    def observer(node_id: NodeId, effect: object, now: float) -> None:
        if sim.is_alive(node_id):  # after every effect of every input
            node = sim.node_as(node_id, OverlayNode)
            assert node.window_open() == scanned_window_open(node)

    sim.observe(observer)
    sim.run(until=1.0)
    return sim


def send(sim: Simulator, source: NodeId, dests: list[NodeId]) -> None:
    if not sim.is_alive(source):
        return
    node = sim.node_as(source, OverlayNode)
    if node.can_multicast():
        sim.act(source, lambda n, now: n.multicast(dests, b"m", now))


actions = st.one_of(
    st.tuples(
        st.just("send"),
        st.sampled_from(NODES),
        st.lists(st.sampled_from(NODES), min_size=1, max_size=4, unique=True),
        st.integers(1, 6),
    ),
    st.tuples(st.just("link"), st.sampled_from(NODES), st.sampled_from(NODES), st.booleans()),
    st.tuples(st.just("crash"), st.sampled_from(NODES)),
    st.tuples(st.just("run"), st.floats(0.0, 0.3)),
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**16), st.lists(actions, min_size=1, max_size=25))
def test_the_kept_window_agrees_with_the_scan(seed: int, steps: list[tuple[object, ...]]) -> None:
    sim = cluster(seed)
    for step in steps:
        match step:
            case ("send", int(source), list(dests), int(times)):
                for _ in range(times):
                    send(sim, NodeId(source), dests)
            case ("link", int(a), int(b), bool(up)) if a != b:
                # silence: a view change after the failure timeout
                sim.set_link_up(NodeId(a), NodeId(b), up)
            case ("crash", int(node_id)):
                n = NodeId(node_id)
                if sim.is_alive(n):
                    sim.crash(n)  # sources forget it; it comes back as a new incarnation
                else:
                    sim.restart(n)
            case ("run", float(dt)):
                sim.run(until=sim.now + dt)
        check_all(sim)
    sim.run(until=sim.now + 2.0)
    check_all(sim)


def test_a_window_closes_on_a_silent_destination_and_opens_when_it_leaves() -> None:
    sim = cluster(7)
    one = sim.node_as(NodeId(1), OverlayNode)
    sim.set_link_up(NodeId(1), NodeId(4), False)
    sim.set_link_up(NodeId(2), NodeId(4), False)
    sim.set_link_up(NodeId(3), NodeId(4), False)
    for _ in range(WINDOW):
        send(sim, NodeId(1), [NodeId(2), NodeId(4)])
    assert not one.window_open()  # 4 reports nothing
    assert check_all(sim) >= 1
    sim.run(until=sim.now + 0.2)
    assert not one.window_open()  # 2's reports do not open it: 4 still owes
    sim.run(until=sim.now + 3.0)  # 4 is out of the view (its links failed)
    assert one.view is not None
    assert NodeId(4) not in one.view
    assert one.window_open()
    assert check_all(sim) == 0
