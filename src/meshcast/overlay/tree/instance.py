"""The tree problem's data: nodes with upload capacities, a directed candidate graph, a tree.

Bandwidths and capacities share one unit (a rate, e.g. Mbit/s). Node 0..n-1 are local
indices; the caller maps them to daemon ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from meshcast.errors import UsageError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
NO_PARENT = -1

_Scalar = TypeVar("_Scalar", bound=np.generic)


def _frozen(array: npt.NDArray[_Scalar]) -> npt.NDArray[_Scalar]:
    array.setflags(write=False)  # instances are shared between searches: keep them immutable
    return array


@dataclass(frozen=True, slots=True, eq=False)
class EdgeTable:
    """Directed edges grouped by one endpoint (CSR), each group widest first.

    `peer[start[u]:start[u + 1]]` are u's neighbours in this direction and
    `bandwidth[...]` the matching bandwidths, in non-increasing order, so the edges
    at least as wide as a target form a prefix of each group.
    """

    start: IntArray  # n + 1 offsets into peer/bandwidth
    peer: IntArray
    bandwidth: FloatArray

    def count_at_least(self, target: float) -> IntArray:
        """Per node, how many of its edges have bandwidth >= target (the prefix length)."""
        wide = np.concatenate(([0], np.cumsum(self.bandwidth >= target, dtype=np.int64)))
        counts: IntArray = wide[self.start[1:]] - wide[self.start[:-1]]
        return counts

    def degree(self) -> IntArray:
        return np.diff(self.start)


def _table(n: int, key: IntArray, other: IntArray, bandwidth: FloatArray) -> EdgeTable:
    """Group edges by `key` (the sender or the receiver), widest first within a group."""
    order = np.lexsort((-bandwidth, key))
    start = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(key, minlength=n), out=start[1:])
    return EdgeTable(_frozen(start), _frozen(other[order]), _frozen(bandwidth[order]))


@dataclass(frozen=True, slots=True, eq=False)
class TreeInstance:
    """Upload capacity per node plus the available bandwidth of each candidate edge.

    Build with `from_edges` or `from_matrix`; they check the data and index it.
    """

    capacity: FloatArray  # a_u: what node u can upload in total, shared by its children
    source: int  # the tree's root: the node that originates the stream
    outgoing: EdgeTable  # edges grouped by sender
    incoming: EdgeTable  # the same edges grouped by receiver
    edge_key: IntArray  # sender * n + receiver, sorted: for point look-ups
    edge_key_bandwidth: FloatArray  # bandwidth of edge_key[i]

    @property
    def n(self) -> int:
        return len(self.capacity)

    @property
    def edge_count(self) -> int:
        return len(self.edge_key)

    @classmethod
    def from_edges(
        cls,
        capacity: npt.ArrayLike,
        sender: npt.ArrayLike,
        receiver: npt.ArrayLike,
        bandwidth: npt.ArrayLike,
        source: int = 0,
    ) -> TreeInstance:
        """Index a directed edge list. Raises UsageError on inconsistent data."""
        cap = np.array(capacity, dtype=np.float64)
        snd = np.array(sender, dtype=np.int64)
        rcv = np.array(receiver, dtype=np.int64)
        bw = np.array(bandwidth, dtype=np.float64)
        n = len(cap)
        if cap.ndim != 1 or n == 0:
            raise UsageError("capacity must be a non-empty 1-d array")
        if not (np.all(np.isfinite(cap)) and np.all(cap > 0)):
            raise UsageError("every capacity must be finite and positive")
        if not 0 <= source < n:
            raise UsageError(f"source {source} is not a node index below {n}")
        if not snd.shape == rcv.shape == bw.shape or snd.ndim != 1:
            raise UsageError("sender, receiver and bandwidth must be 1-d and of equal length")
        if len(snd) and (snd.min() < 0 or rcv.min() < 0 or max(snd.max(), rcv.max()) >= n):
            raise UsageError("edge endpoint out of range")
        if np.any(snd == rcv):
            raise UsageError("self-loops are not edges")
        if not (np.all(np.isfinite(bw)) and np.all(bw > 0)):
            raise UsageError("every bandwidth must be finite and positive")
        key = snd * n + rcv
        key_order = np.argsort(key, kind="stable")
        sorted_key = key[key_order]
        if np.any(sorted_key[1:] == sorted_key[:-1]):
            raise UsageError("duplicate edge")
        return cls(
            capacity=_frozen(cap),
            source=source,
            outgoing=_table(n, snd, rcv, bw),
            incoming=_table(n, rcv, snd, bw),
            edge_key=_frozen(sorted_key),
            edge_key_bandwidth=_frozen(bw[key_order]),
        )

    @classmethod
    def from_matrix(
        cls, capacity: npt.ArrayLike, bandwidth: npt.ArrayLike, source: int = 0
    ) -> TreeInstance:
        """`bandwidth[u, v]` is the rate u can send to v; 0 means no edge. Diagonal ignored."""
        bw = np.array(bandwidth, dtype=np.float64)
        if bw.ndim != 2 or bw.shape[0] != bw.shape[1]:
            raise UsageError("bandwidth must be a square matrix")
        np.fill_diagonal(bw, 0.0)
        sender, receiver = np.nonzero(bw)
        return cls.from_edges(capacity, sender, receiver, bw[sender, receiver], source)

    def bandwidth_between(self, sender: npt.ArrayLike, receiver: npt.ArrayLike) -> FloatArray:
        """Bandwidth of each (sender, receiver) pair; 0.0 where there is no edge."""
        key = np.asarray(sender, dtype=np.int64) * self.n + np.asarray(receiver, dtype=np.int64)
        at = np.searchsorted(self.edge_key, key)
        clipped = np.minimum(at, max(self.edge_count - 1, 0))
        found = (at < self.edge_count) & (self.edge_key[clipped] == key)
        if self.edge_count == 0:
            return np.zeros(np.shape(key), dtype=np.float64)
        return np.where(found, self.edge_key_bandwidth[clipped], 0.0)

    def bandwidth_matrix(self) -> FloatArray:
        """Dense n x n copy (0.0 = no edge). Only for small instances."""
        matrix = np.zeros((self.n, self.n), dtype=np.float64)
        matrix[self.edge_key // self.n, self.edge_key % self.n] = self.edge_key_bandwidth
        return matrix

    def restrict(self, nodes: npt.ArrayLike) -> TreeInstance:
        """The instance induced by `nodes` (which must include the source), renumbered 0..k-1
        in the given order."""
        keep = np.asarray(nodes, dtype=np.int64)
        index = np.full(self.n, -1, dtype=np.int64)
        index[keep] = np.arange(len(keep))
        if index[self.source] < 0:
            raise UsageError("a restricted instance must keep the source")
        sender = self.edge_key // self.n
        receiver = self.edge_key % self.n
        inside = (index[sender] >= 0) & (index[receiver] >= 0)
        return TreeInstance.from_edges(
            self.capacity[keep],
            index[sender[inside]],
            index[receiver[inside]],
            self.edge_key_bandwidth[inside],
            int(index[self.source]),
        )


@dataclass(frozen=True, slots=True, eq=False)
class Tree:
    """A spanning tree rooted at the source, as a parent array, and its rate.

    `parent[source] == NO_PARENT`. `rate` is the bottleneck (see `rate.tree_rate`):
    the highest rate the source may send at so that every node keeps up.
    """

    parent: IntArray
    rate: float

    @property
    def n(self) -> int:
        return len(self.parent)

    def children_count(self) -> IntArray:
        has_parent = self.parent != NO_PARENT
        return np.bincount(self.parent[has_parent], minlength=self.n).astype(np.int64)
