"""The reduced overlay graph at a target rate: only edges at least that wide, degree bounds."""

from __future__ import annotations

from dataclasses import dataclass

from meshcast.overlay.tree.instance import IntArray, TreeInstance
from meshcast.overlay.tree.rate import degree_bounds


@dataclass(frozen=True, slots=True, eq=False)
class ReducedGraph:
    """The instance seen at one target: edges with b >= target, and each node's child bound.

    Nothing is copied: edge groups are sorted widest first, so the kept edges of a node
    are the first `out_count[u]` (or `in_count[v]`) of its group.
    """

    instance: TreeInstance
    target: float
    out_count: IntArray  # per node, out-edges with b >= target
    in_count: IntArray  # per node, in-edges with b >= target
    bound: IntArray  # per node, most children it may feed: min(floor(a_u / target), out_count)

    @classmethod
    def at(cls, instance: TreeInstance, target: float) -> ReducedGraph:
        out_count = instance.outgoing.count_at_least(target)
        bound = degree_bounds(instance.capacity, target)
        return cls(
            instance=instance,
            target=target,
            out_count=out_count,
            in_count=instance.incoming.count_at_least(target),
            bound=bound.clip(max=out_count),
        )

    def receivers_from(self, node: int) -> IntArray:
        """Nodes `node` may feed at the target, widest edge first."""
        start = int(self.instance.outgoing.start[node])
        peers: IntArray = self.instance.outgoing.peer[start : start + int(self.out_count[node])]
        return peers

    def senders_into(self, node: int) -> IntArray:
        """Nodes that may feed `node` at the target, widest edge first."""
        start = int(self.instance.incoming.start[node])
        peers: IntArray = self.instance.incoming.peer[start : start + int(self.in_count[node])]
        return peers
