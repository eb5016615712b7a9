"""The simulator's group driver is strict: an effect type it has no case for fails at once
with an AssertionError naming the type (the runtime counts and drops it instead)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from meshcast.group import GroupEngine
from meshcast.group.membership import GroupMembership, MembershipEffect
from meshcast.ids import NodeId
from meshcast.overlay.node import OverlayConfig, OverlayEffect, OverlayNode
from meshcast.sim.group import GroupDaemon
from meshcast.wire.client import ServiceLevel

ONE = NodeId(1)


@dataclass(frozen=True)
class Surprise:
    """An effect no driver knows."""


class SurprisingMembership(GroupMembership):
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
        return [*effects, Surprise()]  # type: ignore[list-item]


class SurprisingOverlay(OverlayNode):
    def start(self, now: float) -> list[OverlayEffect]:
        return [*super().start(now), Surprise()]  # type: ignore[list-item]


def overlay(kind: type[OverlayNode] = OverlayNode) -> OverlayNode:
    config = OverlayConfig(neighbours={}, upload_bps={ONE: 1e9})
    return kind(ONE, config, incarnation=1, rng=random.Random(1))


def test_an_unknown_group_effect_fails_loudly() -> None:
    daemon = GroupDaemon(overlay(), SurprisingMembership(GroupEngine(ONE)))
    daemon.start(0.0)  # the known effects of start and the timers pass
    deadline = daemon.next_deadline()
    for _ in range(100):  # until the one-daemon view is installed
        if daemon.engine.view is not None or deadline is None:
            break
        daemon.on_timer(deadline)
        deadline = daemon.next_deadline()
    assert daemon.engine.view is not None
    with pytest.raises(AssertionError, match=r"unknown group effect .*\.Surprise"):
        daemon.submit(["g"], b"x", ServiceLevel.FIFO, "#a#D1", 1.0)


def test_an_unknown_overlay_effect_fails_loudly() -> None:
    daemon = GroupDaemon(overlay(SurprisingOverlay), GroupMembership(GroupEngine(ONE)))
    with pytest.raises(AssertionError, match=r"unknown overlay effect .*\.Surprise"):
        daemon.start(0.0)
