"""The simulator's daemon driver is strict: an effect type it has no case for fails at
once with an AssertionError naming the type (the runtime counts and drops it instead).

Two places can meet one: `DaemonSim`'s observer (an effect `DaemonNode` returned that
the simulator cannot apply), and `DaemonNode` itself with `contain_bugs=False` (an
effect a layer below returned that the node cannot route: the overlay's here and the
group layer's through a client's MULTICAST; the session table's is in
tests/unit/daemon/test_node.py).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from meshcast.daemon import DaemonEvent, DaemonNode, DaemonNodeConfig
from meshcast.daemon.layers import DAEMON_LAYERS, DaemonLayers
from meshcast.group.membership import GroupMembership, MembershipEffect
from meshcast.ids import NodeId
from meshcast.link import LinkConfig
from meshcast.overlay.node import OverlayConfig, OverlayEffect, OverlayNode
from meshcast.sim.daemon import DaemonSim, GroupLink, build_daemon_sim
from meshcast.sim.network import LinkModel
from meshcast.wire.client import Join, Message, Multicast, ServiceLevel

ONE = NodeId(1)


@dataclass(frozen=True)
class Surprise:
    """An effect no driver knows."""


class SurprisingMembership(GroupMembership):
    """A membership layer that adds a `Surprise` to what `submit` returns once `surprise`
    is set."""

    surprise = False

    def submit(
        self,
        groups: Sequence[str],
        payload: bytes,
        service: ServiceLevel,
        sender: str,
        now: float,
        msg_type: int = 0,
        token: int = 0,
    ) -> list[MembershipEffect]:
        effects = super().submit(groups, payload, service, sender, now, msg_type, token)
        return [*effects, Surprise()] if self.surprise else effects  # type: ignore[list-item]


class SurprisingOverlay(OverlayNode):
    """An overlay whose `start` returns nothing but a `Surprise`."""

    def start(self, now: float) -> list[OverlayEffect]:
        return [Surprise()]  # type: ignore[list-item]


def two_daemons(layers: DaemonLayers = DAEMON_LAYERS) -> DaemonSim:
    dsim = build_daemon_sim([GroupLink(1, 2, LinkModel(delay=0.001))], seed=1, layers=layers)
    dsim.sim.run(until=1.0)  # the view of both is installed
    return dsim


def test_an_unknown_effect_reaching_the_simulator_fails_loudly() -> None:
    dsim = two_daemons()
    with pytest.raises(AssertionError, match=r"unknown effect .*\.Surprise from daemon 1"):
        dsim.sim.act(ONE, lambda _d, _now: [Surprise()])


def test_an_unknown_group_effect_fails_a_simulated_daemon_loudly() -> None:
    dsim = two_daemons(DaemonLayers(membership=SurprisingMembership))
    client = dsim.connect(ONE, "c")
    client.send(Join("g"))
    dsim.sim.run(until=1.5)
    client.send(Multicast(("g",), b"known", ServiceLevel.FIFO))
    dsim.sim.run(until=2.0)
    assert [m.payload for m in client.messages()] == [b"known"]  # the known effects pass
    membership = dsim.node(ONE).sessions.membership
    assert isinstance(membership, SurprisingMembership)
    membership.surprise = True
    with pytest.raises(AssertionError, match=r"unknown effect .*\.Surprise from the session"):
        client.send(Multicast(("g",), b"x", ServiceLevel.FIFO))
    assert not any(isinstance(f, Message) and f.payload == b"x" for f in client.received)


def lone_daemon(*, contain_bugs: bool, layers: DaemonLayers) -> DaemonNode:
    return DaemonNode(
        ONE,
        DaemonNodeConfig("d1"),
        OverlayConfig(neighbours={}, upload_bps={ONE: 1e9}, link=LinkConfig()),
        incarnation=1,
        rng=random.Random(1),
        wall_clock=lambda: 0.0,
        contain_bugs=contain_bugs,
        layers=layers,
    )


def test_an_unknown_overlay_effect_fails_in_strict_mode_and_is_counted_otherwise() -> None:
    surprising = DaemonLayers(overlay=SurprisingOverlay)
    strict = lone_daemon(contain_bugs=False, layers=surprising)
    with pytest.raises(AssertionError, match=r"unknown effect .*\.Surprise from the overlay"):
        strict.start(0.0)
    contained = lone_daemon(contain_bugs=True, layers=surprising)
    effects = contained.start(0.0)
    events = [e for e in effects if isinstance(e, DaemonEvent) and e.name == "unknown_effect"]
    assert [e.fields["from"] for e in events] == ["the overlay"]
    assert contained.statistics().unknown_effects == 1
