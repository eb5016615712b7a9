"""Overlay daemons in the simulator: topologies, and a harness that records what happened."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from meshcast.ids import NodeId
from meshcast.link import LinkConfig
from meshcast.link.secure import LinkSecurity
from meshcast.overlay.node import (
    Neighbour,
    OverlayConfig,
    OverlayDelivered,
    OverlayNode,
    ViewAgreed,
    ViewInstalled,
)
from meshcast.overlay.view import View
from meshcast.sim.network import LinkModel
from meshcast.sim.simulator import Simulator
from meshcast.wire.keys import ClusterKey, KeyRing


@dataclass(frozen=True, slots=True)
class OverlayEdge:
    a: int
    b: int
    delay: float = 0.005  # s one way
    bandwidth_bps: float = 100e6
    weight: float = 1.0
    loss: float = 0.0


class Edge(Protocol):
    """What an overlay config needs of a simulated edge (`OverlayEdge`, `GroupLink`)."""

    @property
    def a(self) -> int: ...
    @property
    def b(self) -> int: ...
    @property
    def weight(self) -> float: ...
    @property
    def bandwidth_bps(self) -> float: ...


def overlay_configs(
    edges: Iterable[Edge],
    *,
    policy: str,
    link: LinkConfig | None = None,
    upload_bps: Mapping[int, float] | None = None,
    **overlay_options: object,
) -> Callable[[NodeId], OverlayConfig]:
    """Each daemon's `OverlayConfig` in a cluster of `edges`, as the daemon builds its own
    from a cluster file: neighbours with the edges' weights and bandwidths, every daemon's
    upload (unbounded unless given), and views that hold configured daemons and links
    only (unless `overlay_options` gives `allowed_links`, None for no check)."""
    edges = list(edges)
    nodes = sorted({n for e in edges for n in (e.a, e.b)})
    neighbours: dict[int, dict[NodeId, Neighbour]] = {n: {} for n in nodes}
    for e in edges:
        neighbours[e.a][NodeId(e.b)] = Neighbour(e.weight, e.bandwidth_bps)
        neighbours[e.b][NodeId(e.a)] = Neighbour(e.weight, e.bandwidth_bps)
    uploads = {NodeId(n): float((upload_bps or {}).get(n, float("inf"))) for n in nodes}
    overlay_options.setdefault(
        "allowed_links",
        frozenset((NodeId(min(e.a, e.b)), NodeId(max(e.a, e.b))) for e in edges),
    )
    link_config = link or LinkConfig(heartbeat_interval=0.1, failure_rounds=5)

    def config_of(node_id: NodeId) -> OverlayConfig:
        return OverlayConfig(
            neighbours=neighbours[node_id],
            upload_bps=uploads,
            link=link_config,
            policy=policy,
            **overlay_options,  # type: ignore[arg-type]
        )

    return config_of


def full_mesh(n: int, **kwargs: float) -> list[OverlayEdge]:
    return [OverlayEdge(a, b, **kwargs) for a in range(1, n + 1) for b in range(a + 1, n + 1)]


def random_graph(n: int, degree: int, rng: random.Random, **kwargs: float) -> list[OverlayEdge]:
    """A connected random graph: a random spanning tree plus random extra edges."""
    order = list(range(1, n + 1))
    rng.shuffle(order)
    pairs = {tuple(sorted((order[i], order[rng.randrange(i)]))) for i in range(1, n)}
    while len(pairs) < min(n * degree // 2, n * (n - 1) // 2):
        a, b = rng.sample(range(1, n + 1), 2)
        pairs.add(tuple(sorted((a, b))))
    return [OverlayEdge(a, b, weight=float(rng.randint(1, 10)), **kwargs) for a, b in sorted(pairs)]


@dataclass
class OverlayRecorder:
    """Everything the daemons of a simulation reported, for invariant checks."""

    delivered: dict[NodeId, list[OverlayDelivered]] = field(default_factory=dict)
    views: dict[NodeId, list[tuple[float, View]]] = field(default_factory=dict)
    agreed: dict[NodeId, list[tuple[float, View]]] = field(default_factory=dict)

    def __call__(self, node: NodeId, effect: object, now: float) -> None:
        if isinstance(effect, OverlayDelivered):
            self.delivered.setdefault(node, []).append(effect)
        elif isinstance(effect, ViewInstalled):
            self.views.setdefault(node, []).append((now, effect.view))
        elif isinstance(effect, ViewAgreed):
            self.agreed.setdefault(node, []).append((now, effect.view))

    def current_view(self, node: NodeId) -> View | None:
        history = self.views.get(node)
        return history[-1][1] if history else None


def cluster_security(seed: int) -> Callable[[random.Random], LinkSecurity]:
    """Encrypted links for a simulated cluster, as a daemon has them: one cluster key made
    from the seed, each node's key pairs from its own seeded generator (runs stay
    reproducible)."""
    ring = KeyRing.of(ClusterKey(random.Random(seed ^ 0x5EC0DE).randbytes(32)))
    return lambda rng: LinkSecurity(ring, rng.randbytes)


def build_overlay(
    edges: Iterable[OverlayEdge],
    *,
    seed: int,
    policy: str = "shortest-path",
    upload_bps: Mapping[int, float] | None = None,
    link: LinkConfig | None = None,
    trace: bool = False,
    secure: bool = True,
    **overlay_options: object,
) -> tuple[Simulator, OverlayRecorder]:
    edges = list(edges)
    nodes = sorted({n for e in edges for n in (e.a, e.b)})
    config_of = overlay_configs(
        edges, policy=policy, link=link, upload_bps=upload_bps, **overlay_options
    )
    sim = Simulator(seed=seed, trace=trace)
    security = cluster_security(seed) if secure else None
    recorder = OverlayRecorder()
    sim.observe(recorder)

    def factory(node_id: NodeId, now: float, rng: random.Random) -> OverlayNode:
        return OverlayNode(
            node_id,
            config_of(node_id),
            incarnation=sim.incarnation(node_id) + 1,
            rng=rng,
            security=None if security is None else security(rng),
        )

    for n in nodes:
        sim.add_node(NodeId(n), factory, start=lambda node, now: node.start(now))
    for e in edges:
        model = LinkModel(delay=e.delay, bandwidth_bps=e.bandwidth_bps, loss=e.loss)
        sim.add_link(NodeId(e.a), NodeId(e.b), model)
    return sim, recorder
