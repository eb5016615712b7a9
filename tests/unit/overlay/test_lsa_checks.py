"""LSAs about daemons or links the cluster config does not know are dropped and counted.

Three overlay nodes in the simulator, in a line 2 - 1 - 3 (`build_overlay` gives them the
cluster's daemons and links, as the daemon's config does). Node 2 forges LSAs on its real
link to node 1: one from a daemon 99 that is not configured, one in its own name claiming
links to 3 and 99 that the config does not have. Node 1 drops both (not stored, not
flooded to 3), counts them, and no view ever holds 99 or the link 2-3.
"""

from __future__ import annotations

from typing import Any

import pytest

from meshcast.errors import ConfigError
from meshcast.ids import NodeId
from meshcast.overlay.node import Neighbour, OverlayConfig, OverlayNode
from meshcast.sim.overlay import OverlayEdge, OverlayRecorder, build_overlay
from meshcast.sim.simulator import Simulator
from meshcast.wire.overlay import Lsa, LsaEntry, encode_lsa

ONE, TWO, THREE, PHANTOM = NodeId(1), NodeId(2), NodeId(3), NodeId(99)
SETTLED = 3.0  # s of virtual time: links up, views installed and agreed


def line() -> tuple[Simulator, OverlayRecorder]:
    sim, recorder = build_overlay([OverlayEdge(1, 2), OverlayEdge(1, 3)], seed=7)
    sim.run(until=SETTLED)
    for node in (ONE, TWO, THREE):
        view = recorder.current_view(node)
        assert view is not None
        assert view.members == (ONE, TWO, THREE)
    return sim, recorder


def forge(sim: Simulator, lsa: Lsa) -> None:
    """Node 2 sends `lsa` to node 1 over its real Hop link, as any overlay message."""

    def send(node: Any, now: float) -> list[object]:
        assert isinstance(node, OverlayNode)
        return list(node.endpoint.link(ONE).send(encode_lsa(lsa), now))

    sim.act(TWO, send)


def stats(sim: Simulator, node: NodeId) -> tuple[int, int]:
    s = sim.node_as(node, OverlayNode).statistics()
    return s.lsas_unknown_dropped, s.lsas_bad_link_dropped


def never_in_a_view(recorder: OverlayRecorder, node: NodeId) -> bool:
    return all(node not in view for history in recorder.views.values() for _, view in history)


def test_lsa_of_an_unknown_daemon_is_dropped_counted_and_not_flooded() -> None:
    sim, recorder = line()
    forge(sim, Lsa(PHANTOM, 1, 1, bytes(8), (LsaEntry(TWO, 1.0, 100e6),)))
    sim.run(until=SETTLED + 2.0)
    assert stats(sim, ONE) == (1, 0)
    assert stats(sim, THREE) == (0, 0)  # node 1 did not flood it on
    assert never_in_a_view(recorder, PHANTOM)


def test_lsa_claiming_links_the_config_lacks_is_dropped_and_counted() -> None:
    sim, recorder = line()
    two = sim.node_as(TWO, OverlayNode)
    claims = (LsaEntry(ONE, 1.0, 100e6), LsaEntry(THREE, 1.0, 100e6), LsaEntry(PHANTOM, 1, 1e6))
    forge(sim, Lsa(TWO, two.incarnation, 1_000_000, bytes(8), claims))
    forge(sim, Lsa(PHANTOM, 1, 1, bytes(8), (LsaEntry(TWO, 1.0, 100e6),)))
    sim.run(until=SETTLED + 2.0)
    assert stats(sim, ONE) == (1, 1)
    assert stats(sim, THREE) == (0, 0)
    assert never_in_a_view(recorder, PHANTOM)
    for node in (ONE, TWO, THREE):
        view = recorder.current_view(node)
        assert view is not None
        assert view.members == (ONE, TWO, THREE)
        assert [(e.a, e.b) for e in view.edges] == [(ONE, TWO), (ONE, THREE)]


def test_without_the_cluster_links_the_same_forgery_puts_a_phantom_in_the_view() -> None:
    # What the check prevents: a node told nothing about the cluster trusts any LSA.
    sim, recorder = build_overlay(
        [OverlayEdge(1, 2), OverlayEdge(1, 3)], seed=7, allowed_links=None
    )
    sim.run(until=SETTLED)
    two = sim.node_as(TWO, OverlayNode)
    claims = (LsaEntry(ONE, 1.0, 100e6), LsaEntry(PHANTOM, 1.0, 100e6))
    forge(sim, Lsa(TWO, two.incarnation, 1_000_000, bytes(8), claims))
    forge(sim, Lsa(PHANTOM, 1, 1, bytes(8), (LsaEntry(TWO, 1.0, 100e6),)))
    sim.run(until=SETTLED + 2.0)
    view = recorder.current_view(THREE)
    assert view is not None
    assert PHANTOM in view


def test_allowed_links_must_join_configured_daemons() -> None:
    uploads = {ONE: 1e6, TWO: 1e6}
    with pytest.raises(ConfigError, match="allowed link") as info:
        OverlayConfig(
            neighbours={TWO: Neighbour(1.0, 1e6)},
            upload_bps=uploads,
            allowed_links=frozenset({(ONE, PHANTOM)}),
        )
    assert info.value.key == "allowed_links"
    with pytest.raises(ConfigError, match="allowed link"):
        OverlayConfig(neighbours={}, upload_bps=uploads, allowed_links=frozenset({(TWO, ONE)}))
