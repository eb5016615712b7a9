"""The group layer's view: which daemons take part in ordering, and its identity."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from meshcast.ids import NodeId


def view_id(members: Iterable[NodeId], incarnations: Iterable[int] = ()) -> bytes:
    """8-byte identity of a group view: its members and their incarnations only.

    Unlike the overlay's view digest it ignores links, weights and rates, so a topology or
    rate change that keeps the same daemons does not restart ordering.
    """
    ids = sorted(members)
    incs = list(incarnations) or [0] * len(ids)
    canonical = struct.pack(f"!{len(ids)}I", *ids) + struct.pack(f"!{len(incs)}I", *incs)
    return hashlib.sha256(b"meshcast-group-view" + canonical).digest()[:8]


@dataclass(frozen=True, slots=True)
class GroupView:
    view_id: bytes
    members: tuple[NodeId, ...]  # sorted
    index: dict[NodeId, int] = field(compare=False)  # member -> position in `members`

    @staticmethod
    def of(members: Iterable[NodeId], incarnations: Iterable[int] = ()) -> GroupView:
        ordered = tuple(sorted(set(members)))
        return GroupView(
            view_id(ordered, incarnations), ordered, {m: i for i, m in enumerate(ordered)}
        )
