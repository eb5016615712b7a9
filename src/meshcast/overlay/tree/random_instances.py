"""Seeded random instances with heterogeneous capacities, for tests and benchmarks.

Model: every node's upload capacity a_u is log-uniform over `decades` decades, and a share
of nodes sit behind a narrow uplink, `narrow_factor` times slower. Each ordered pair has
a path bandwidth, log-uniform over the same range (cross traffic in the core). The
bandwidth available from u to v is the narrower of the two: min(a_u, path_uv).

Downloads are not modelled: access links are asymmetric (download >= upload), and a
narrow download would cap every single-rate tree at that value whatever its shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meshcast.errors import ConfigError
from meshcast.overlay.tree.instance import FloatArray, IntArray, TreeInstance


@dataclass(frozen=True, slots=True)
class InstanceModel:
    low: float = 1.0  # rate units: lower end of capacities and core bandwidths
    decades: float = 2.0  # capacities span low .. low * 10**decades, log-uniform
    narrow_share: float = 0.2  # fraction of nodes behind a narrow uplink
    narrow_factor: float = 0.1  # such a node uploads this much slower
    source_uplink: float | None = None  # the source's a_u in rate units; None: drawn as any node

    def __post_init__(self) -> None:
        if not self.low > 0:
            raise ConfigError("must be positive", key="tree.instance.low")
        if not self.decades >= 0:
            raise ConfigError("must not be negative", key="tree.instance.decades")
        if not 0 <= self.narrow_share <= 1:
            raise ConfigError("must be within [0, 1]", key="tree.instance.narrow_share")
        if not 0 < self.narrow_factor <= 1:
            raise ConfigError("must be within (0, 1]", key="tree.instance.narrow_factor")
        if self.source_uplink is not None and not self.source_uplink > 0:
            raise ConfigError("must be positive", key="tree.instance.source_uplink")

    def _log_uniform(self, rng: np.random.Generator, size: int | tuple[int, ...]) -> FloatArray:
        values: FloatArray = self.low * 10.0 ** rng.uniform(0.0, self.decades, size)
        return values

    def upload_capacity(self, n: int, source: int, rng: np.random.Generator) -> FloatArray:
        """a_u per node, narrow uplinks applied."""
        narrow = rng.random(n) < self.narrow_share
        scale: FloatArray = np.where(narrow, self.narrow_factor, 1.0)
        capacity = self._log_uniform(rng, n) * scale
        if self.source_uplink is not None:
            capacity[source] = self.source_uplink
        return capacity

    def path_bandwidth(self, rng: np.random.Generator, size: int | tuple[int, ...]) -> FloatArray:
        return self._log_uniform(rng, size)


def dense_instance(
    n: int, rng: np.random.Generator, model: InstanceModel | None = None, source: int = 0
) -> TreeInstance:
    """A fully connected overlay of n nodes: every ordered pair is a candidate edge."""
    model = model or InstanceModel()
    capacity = model.upload_capacity(n, source, rng)
    bandwidth = np.minimum(capacity[:, None], model.path_bandwidth(rng, (n, n)))
    return TreeInstance.from_matrix(capacity, bandwidth, source)


def sparse_instance(
    n: int,
    peers: int,
    rng: np.random.Generator,
    model: InstanceModel | None = None,
    source: int = 0,
) -> TreeInstance:
    """Each node measured `peers` random others in each direction: n * peers candidate
    edges per direction (duplicates merged), plus a random ring so the graph is connected."""
    model = model or InstanceModel()
    capacity = model.upload_capacity(n, source, rng)
    peers = min(peers, n - 1)
    node = np.repeat(np.arange(n, dtype=np.int64), peers)
    # a random offset in 1..n-1 never points a node at itself
    other = (node + rng.integers(1, n, size=n * peers)) % n
    ring = rng.permutation(n).astype(np.int64)
    sender: IntArray = np.concatenate((node, other, ring, np.roll(ring, 1)))
    receiver: IntArray = np.concatenate((other, node, np.roll(ring, 1), ring))
    key = np.unique(sender * n + receiver)
    sender, receiver = key // n, key % n
    keep = sender != receiver
    sender, receiver = sender[keep], receiver[keep]
    bandwidth = np.minimum(capacity[sender], model.path_bandwidth(rng, len(sender)))
    return TreeInstance.from_edges(capacity, sender, receiver, bandwidth, source)
