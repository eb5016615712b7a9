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
from meshcast.group.membership import MembershipEffect
from meshcast.ids import NodeId
from meshcast.link import LinkConfig
from meshcast.overlay.node import OverlayConfig, OverlayEffect
from meshcast.sim.daemon import DaemonSim, GroupLink, build_daemon_sim
from meshcast.sim.network import LinkModel
from meshcast.wire.client import Join, Message, Multicast, ServiceLevel

ONE = NodeId(1)


@dataclass(frozen=True)
class Surprise:
    """An effect no driver knows."""


def two_daemons() -> DaemonSim:
    dsim = build_daemon_sim([GroupLink(1, 2, LinkModel(delay=0.001))], seed=1)
    dsim.sim.run(until=1.0)  # the view of both is installed
    return dsim


def test_an_unknown_effect_reaching_the_simulator_fails_loudly() -> None:
    dsim = two_daemons()
    with pytest.raises(AssertionError, match=r"unknown effect .*\.Surprise from daemon 1"):
        dsim.sim.act(ONE, lambda _d, _now: [Surprise()])


def test_an_unknown_group_effect_fails_a_simulated_daemon_loudly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dsim = two_daemons()
    client = dsim.connect(ONE, "c")
    client.send(Join("g"))
    dsim.sim.run(until=1.5)
    client.send(Multicast(("g",), b"known", ServiceLevel.FIFO))
    dsim.sim.run(until=2.0)
    assert [m.payload for m in client.messages()] == [b"known"]  # the known effects pass
    membership = dsim.node(ONE).sessions.membership
    submit = membership.submit

    def surprising(
        groups: Sequence[str], payload: bytes, *args: object, **kwargs: object
    ) -> list[MembershipEffect]:
        return [*submit(groups, payload, *args, **kwargs), Surprise()]  # type: ignore[arg-type,list-item]

    monkeypatch.setattr(membership, "submit", surprising)
    with pytest.raises(AssertionError, match=r"unknown effect .*\.Surprise from the session"):
        client.send(Multicast(("g",), b"x", ServiceLevel.FIFO))
    assert not any(isinstance(f, Message) and f.payload == b"x" for f in client.received)


def lone_daemon(*, contain_bugs: bool) -> DaemonNode:
    return DaemonNode(
        ONE,
        DaemonNodeConfig("d1"),
        OverlayConfig(neighbours={}, upload_bps={ONE: 1e9}, link=LinkConfig()),
        incarnation=1,
        rng=random.Random(1),
        wall_clock=lambda: 0.0,
        contain_bugs=contain_bugs,
    )


def test_an_unknown_overlay_effect_fails_in_strict_mode_and_is_counted_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def surprising_start(now: float) -> list[OverlayEffect]:
        return [Surprise()]  # type: ignore[list-item]

    strict = lone_daemon(contain_bugs=False)
    monkeypatch.setattr(strict.overlay, "start", surprising_start)
    with pytest.raises(AssertionError, match=r"unknown effect .*\.Surprise from the overlay"):
        strict.start(0.0)
    contained = lone_daemon(contain_bugs=True)
    monkeypatch.setattr(contained.overlay, "start", surprising_start)
    effects = contained.start(0.0)
    events = [e for e in effects if isinstance(e, DaemonEvent) and e.name == "unknown_effect"]
    assert [e.fields["from"] for e in events] == ["the overlay"]
    assert contained.statistics().unknown_effects == 1
