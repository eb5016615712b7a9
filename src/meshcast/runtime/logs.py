"""Logging helpers of the runtime: a node-id prefix and rate limiting for remote faults."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any


class NodeLogAdapter(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every record with the local node id: ``[node 3] ...``."""

    def __init__(self, logger: logging.Logger, node: int) -> None:
        super().__init__(logger, {"node": node})
        self._prefix = f"[node {node}] "

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        return self._prefix + str(msg), kwargs


class RateLimiter:
    """Says whether the n-th occurrence of something deserves a log line.

    The first `burst` occurrences do, then every `every`-th one, so a peer that floods
    garbage costs a few log lines and a counter, not a disk.
    """

    __slots__ = ("_burst", "_every")

    def __init__(self, burst: int = 5, every: int = 1000) -> None:
        self._burst = burst
        self._every = every

    def allows(self, count: int) -> bool:
        return count <= self._burst or count % self._every == 0
