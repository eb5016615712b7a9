"""Daemon membership: the link-state database and the view every connected daemon agrees on.

Each daemon floods an LSA listing its live overlay links. The view is the set of daemons
reachable from here over links that *both* ends report, with the reported weights. The
view is a pure function of the database, so daemons holding the same LSAs compute the
same view — and from the same view the same routing trees (Spread §2.2). Each LSA also
carries the digest of the view its origin has installed; when every member reports our
digest, the view is agreed.
"""

from __future__ import annotations

import hashlib
import struct
from collections import deque
from dataclasses import dataclass, field

from meshcast.ids import NodeId
from meshcast.wire.overlay import Lsa, LsaEntry

NO_DIGEST = bytes(8)


@dataclass(frozen=True, slots=True)
class Edge:
    a: NodeId  # a < b
    b: NodeId
    weight: float
    bandwidth_bps: float


@dataclass(frozen=True, slots=True)
class View:
    members: tuple[NodeId, ...]  # sorted
    edges: tuple[Edge, ...]  # sorted by (a, b)
    digest: bytes = field(default=NO_DIGEST)
    incarnations: tuple[int, ...] = ()  # of each member, in the order of `members`

    @staticmethod
    def of(
        members: tuple[NodeId, ...], edges: tuple[Edge, ...], incarnations: tuple[int, ...] = ()
    ) -> View:
        """A view and its digest. A daemon that restarted is a new member: its incarnation
        is part of the digest, so even a restart too quick to break a link changes the view."""
        incarnations = incarnations or (0,) * len(members)
        canonical = (
            struct.pack(f"!{len(members)}I", *members)
            + struct.pack(f"!{len(members)}I", *incarnations)
            + b"".join(struct.pack("!IIdd", e.a, e.b, e.weight, e.bandwidth_bps) for e in edges)
        )
        return View(members, edges, hashlib.sha256(canonical).digest()[:8], incarnations)

    def adjacency(self) -> dict[NodeId, list[tuple[NodeId, float, float]]]:
        """node -> [(neighbour, weight, bandwidth)] sorted by neighbour id."""
        adjacent: dict[NodeId, list[tuple[NodeId, float, float]]] = {m: [] for m in self.members}
        for e in self.edges:
            adjacent[e.a].append((e.b, e.weight, e.bandwidth_bps))
            adjacent[e.b].append((e.a, e.weight, e.bandwidth_bps))
        for neighbours in adjacent.values():
            neighbours.sort()
        return adjacent

    def __contains__(self, node: object) -> bool:
        return node in self.members


class LinkStateDatabase:
    """The newest LSA of every daemon heard of, and this daemon's own."""

    def __init__(self, local: NodeId, incarnation: int) -> None:
        self.local = local
        self.incarnation = incarnation
        self._own_seq = 0
        self._lsas: dict[NodeId, Lsa] = {}

    def originate(self, entries: tuple[LsaEntry, ...], view_digest: bytes) -> Lsa:
        """Replace our own LSA; returns it for flooding."""
        self._own_seq += 1
        lsa = Lsa(self.local, self.incarnation, self._own_seq, view_digest, entries)
        self._lsas[self.local] = lsa
        return lsa

    def consider(self, lsa: Lsa) -> bool:
        """Store `lsa` if it is newer than what we hold; True means flood it on."""
        if lsa.origin == self.local:
            # Our own LSA from an earlier incarnation (or a stale copy): never adopt it.
            # A newer incarnation of ours cannot exist while we run.
            return False
        current = self._lsas.get(NodeId(lsa.origin))
        if current is not None and (current.incarnation, current.seq) >= (lsa.incarnation, lsa.seq):
            return False
        self._lsas[NodeId(lsa.origin)] = lsa
        return True

    def lsas(self) -> list[Lsa]:
        return [self._lsas[k] for k in sorted(self._lsas)]

    def get(self, origin: NodeId) -> Lsa | None:
        return self._lsas.get(origin)

    def compute_view(self) -> View:
        reported: dict[tuple[int, int], tuple[float, float]] = {}
        for lsa in self._lsas.values():
            for entry in lsa.entries:
                reported[(lsa.origin, entry.neighbour)] = (entry.weight, entry.bandwidth_bps)
        seen = {self.local}
        queue = deque([self.local])
        adjacent: dict[int, list[int]] = {}
        for u, v in reported:
            if (v, u) in reported:
                adjacent.setdefault(u, []).append(v)
        while queue:
            u = queue.popleft()
            for v in adjacent.get(u, ()):
                if v not in seen:
                    seen.add(NodeId(v))
                    queue.append(NodeId(v))
        members = tuple(sorted(seen))
        edges = []
        for (u, v), (weight, bandwidth) in reported.items():
            if u < v and u in seen and (v, u) in reported:
                back_weight, back_bandwidth = reported[(v, u)]
                edges.append(
                    Edge(
                        NodeId(u),
                        NodeId(v),
                        max(weight, back_weight),
                        min(bandwidth, back_bandwidth),
                    )
                )
        edges.sort(key=lambda e: (e.a, e.b))
        incarnations = tuple(
            self.incarnation if m == self.local else self._lsas[m].incarnation for m in members
        )
        return View.of(members, tuple(edges), incarnations)

    def forget(self, origins: set[NodeId]) -> None:
        """Drop LSAs of daemons that left the view long ago (bounded memory)."""
        for origin in origins:
            if origin != self.local:
                self._lsas.pop(origin, None)

    def agreed(self, view: View) -> bool:
        """Every member has installed this very view."""
        for member in view.members:
            lsa = self._lsas.get(member)
            if lsa is None or lsa.view_digest != view.digest:
                return False
        return True
