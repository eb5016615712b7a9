"""Named groups over the overlay: ordering, virtual synchrony, membership, sessions
(docs/design/group.md)."""

from meshcast.group.config import (
    FlushConfig,
    GroupConfig,
    OrderingConfig,
    RepairConfig,
    StabilityConfig,
    StackConfig,
    split_config,
)
from meshcast.group.engine import GroupEngine, GroupStats, StackStats
from meshcast.group.events import (
    Broadcast,
    Deliver,
    GroupEffect,
    MessageRef,
    OrderingReset,
    SubmitConfirmed,
    SubmitLost,
    ViewTransition,
)
from meshcast.group.flush import Flush, FlushStats
from meshcast.group.ordering import Ordering, OrderingStats
from meshcast.group.repair import Repair, RepairStats
from meshcast.group.stability import Stability, StabilityStats
from meshcast.group.view import GroupView, view_id

__all__ = [
    "Broadcast",
    "Deliver",
    "Flush",
    "FlushConfig",
    "FlushStats",
    "GroupConfig",
    "GroupEffect",
    "GroupEngine",
    "GroupStats",
    "GroupView",
    "MessageRef",
    "Ordering",
    "OrderingConfig",
    "OrderingReset",
    "OrderingStats",
    "Repair",
    "RepairConfig",
    "RepairStats",
    "Stability",
    "StabilityConfig",
    "StabilityStats",
    "StackConfig",
    "StackStats",
    "SubmitConfirmed",
    "SubmitLost",
    "ViewTransition",
    "split_config",
    "view_id",
]
