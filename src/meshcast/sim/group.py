"""Group daemons in the simulator: an `OverlayNode` and a `GroupEngine` wired together.

`GroupDaemon` is the small adapter a real daemon also needs: overlay deliveries go up to
the engine, engine broadcasts go down to `OverlayNode.multicast`, view changes go up.
Every effect (Transmit aside) is returned to the simulator, so observers see the
overlay's `OverlayDelivered`/`ViewInstalled` as well as the engine's `Deliver`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import get_args

from meshcast.group import Broadcast, GroupConfig, GroupEffect, GroupEngine
from meshcast.group.membership import GroupMembership, MembershipEffect
from meshcast.ids import NodeId
from meshcast.link import LinkConfig
from meshcast.overlay.node import (
    Neighbour,
    OverlayConfig,
    OverlayDelivered,
    OverlayEffect,
    OverlayNode,
    ViewInstalled,
)
from meshcast.sim.daemon import GroupLink
from meshcast.sim.overlay import cluster_security
from meshcast.sim.simulator import Simulator
from meshcast.wire.client import ServiceLevel


class GroupDaemon:
    """A `SimNode`: one daemon's overlay and group layers, effects routed between them.

    `layer` is the ordering engine alone, or the membership layer on top of it (which
    takes the same inputs and passes the engine's effects through with its own)."""

    def __init__(self, overlay: OverlayNode, layer: GroupEngine | GroupMembership) -> None:
        self.overlay = overlay
        self.layer = layer

    @property
    def engine(self) -> GroupEngine:
        layer = self.layer
        return layer if isinstance(layer, GroupEngine) else layer.engine

    @property
    def local(self) -> NodeId:
        return self.overlay.local

    def start(self, now: float) -> list[object]:
        return self._route(self.overlay.start(now), [], now)

    def datagram_received(self, src: NodeId, datagram: bytes, now: float) -> list[object]:
        return self._route(self.overlay.datagram_received(src, datagram, now), [], now)

    def on_timer(self, now: float) -> list[object]:
        group: list[GroupEffect | MembershipEffect] = []
        deadline = self.layer.next_deadline()
        if deadline is not None and deadline <= now:
            group = list(self.layer.on_timer(now))
        return self._route(self.overlay.on_timer(now), group, now)

    def next_deadline(self) -> float | None:
        deadlines = [
            d for d in (self.overlay.next_deadline(), self.layer.next_deadline()) if d is not None
        ]
        return min(deadlines, default=None)

    def submit(
        self,
        groups: Sequence[str],
        payload: bytes,
        service: ServiceLevel,
        sender: str,
        now: float,
    ) -> list[object]:
        """A local client's message (raises what `GroupEngine.submit` raises)."""
        return self._route([], list(self.layer.submit(groups, payload, service, sender, now)), now)

    def _route(
        self,
        overlay: list[OverlayEffect],
        group: list[GroupEffect | MembershipEffect],
        now: float,
    ) -> list[object]:
        out: list[object] = []
        while overlay or group:
            if overlay:
                effect = overlay.pop(0)
                _check_known(effect, _OVERLAY_EFFECTS, "overlay")
                out.append(effect)
                if isinstance(effect, OverlayDelivered):
                    group.extend(self.layer.overlay_delivered(effect.source, effect.payload, now))
                elif isinstance(effect, ViewInstalled):
                    view = effect.view
                    group.extend(self.layer.view_installed(view.members, now, view.incarnations))
                continue
            g = group.pop(0)
            _check_known(g, _GROUP_EFFECTS, "group")
            if isinstance(g, Broadcast):
                # Strict in the simulator: a full outbox (BufferFull) is a test failure.
                overlay.extend(self.overlay.multicast(g.dests, g.payload, now))
            else:
                out.append(g)
        return out


_OVERLAY_EFFECTS: tuple[type, ...] = get_args(OverlayEffect)
_GROUP_EFFECTS: tuple[type, ...] = get_args(MembershipEffect)  # the engine's and MembershipChanged


def _check_known(effect: object, known: tuple[type, ...], layer: str) -> None:
    """Strict: an effect type this driver has no case for is a bug (the runtime counts and
    drops it, `unknown_effects`; here it fails the test at once)."""
    if not isinstance(effect, known):
        kind = type(effect)
        raise AssertionError(
            f"unknown {layer} effect {kind.__module__}.{kind.__qualname__}: "
            f"GroupDaemon has no case for it"
        )


def build_group_sim(
    links: Sequence[GroupLink],
    hosts: Mapping[str, Sequence[NodeId]],
    *,
    seed: int,
    policy: str = "shortest-path",
    group_config: GroupConfig | None = None,
    link: LinkConfig | None = None,
    trace: bool = False,
    secure: bool = True,
) -> Simulator:
    """A simulator of group daemons over `links`; `hosts` says which daemons host each
    group (given to every engine, as the group membership layer would). Links are
    encrypted, as a daemon's are, unless `secure` is False."""
    nodes = sorted({n for e in links for n in (e.a, e.b)})
    neighbours: dict[int, dict[NodeId, Neighbour]] = {n: {} for n in nodes}
    for e in links:
        neighbours[e.a][NodeId(e.b)] = Neighbour(e.weight, e.bandwidth_bps)
        neighbours[e.b][NodeId(e.a)] = Neighbour(e.weight, e.bandwidth_bps)
    uploads = {NodeId(n): float("inf") for n in nodes}
    # as the daemon's config: views hold configured daemons and links only
    allowed = frozenset((NodeId(min(e.a, e.b)), NodeId(max(e.a, e.b))) for e in links)
    link_config = link or LinkConfig(heartbeat_interval=0.1, failure_rounds=5)
    sim = Simulator(seed=seed, trace=trace)
    security = cluster_security(seed) if secure else None

    def factory(node_id: NodeId, now: float, rng: random.Random) -> GroupDaemon:
        config = OverlayConfig(
            neighbours=neighbours[node_id],
            upload_bps=uploads,
            link=link_config,
            policy=policy,
            allowed_links=allowed,
        )
        overlay = OverlayNode(
            node_id,
            config,
            incarnation=sim.incarnation(node_id) + 1,
            rng=rng,
            security=None if security is None else security(rng),
        )
        engine = GroupEngine(node_id, group_config, backlogged=overlay.backlogged)
        for group, daemons in hosts.items():
            engine.set_group_daemons(group, daemons)
        return GroupDaemon(overlay, engine)

    def start(node: GroupDaemon, now: float) -> list[object]:
        return node.start(now)

    for n in nodes:
        sim.add_node(NodeId(n), factory, start=start)
    for e in links:
        sim.add_link(NodeId(e.a), NodeId(e.b), e.model)
    return sim
