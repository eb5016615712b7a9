"""Named groups over the overlay: ordering, virtual synchrony, membership, sessions
(docs/design/group.md)."""

from meshcast.group.config import GroupConfig
from meshcast.group.events import (
    Broadcast,
    Deliver,
    GroupEffect,
    MessageRef,
    OrderingFault,
    OrderingReset,
    SubmitConfirmed,
    SubmitLost,
    ViewTransition,
)
from meshcast.group.ordering import GroupEngine, GroupStats
from meshcast.group.view import GroupView, view_id

__all__ = [
    "Broadcast",
    "Deliver",
    "GroupConfig",
    "GroupEffect",
    "GroupEngine",
    "GroupStats",
    "GroupView",
    "MessageRef",
    "OrderingFault",
    "OrderingReset",
    "SubmitConfirmed",
    "SubmitLost",
    "ViewTransition",
    "view_id",
]
