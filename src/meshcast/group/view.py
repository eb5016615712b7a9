"""The group layer's view: which daemons take part in ordering, and its identity."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from meshcast.ids import NodeId


def view_id(members: Iterable[NodeId], incarnations: Iterable[int] = (), number: int = 0) -> bytes:
    """8-byte identity of a group view: its members, their incarnations and its number.

    Unlike the overlay's view digest it ignores links, weights and rates, so a topology or
    rate change that keeps the same daemons does not restart ordering. `number` 0 names
    the membership alone (what a flush is addressed to); an installed view has the number
    the flush agreed on (one more than any member's count of views installed), so the
    same daemons coming together again get a new id.
    """
    ids = sorted(members)
    incs = list(incarnations) or [0] * len(ids)
    canonical = struct.pack(f"!{len(ids)}I", *ids) + struct.pack(f"!{len(incs)}I", *incs)
    if number:
        canonical += struct.pack("!Q", number)
    return hashlib.sha256(b"meshcast-group-view" + canonical).digest()[:8]


@dataclass(frozen=True, slots=True)
class GroupView:
    view_id: bytes  # with `number`: what messages of the view carry
    members: tuple[NodeId, ...]  # sorted
    index: dict[NodeId, int] = field(compare=False)  # member -> position in `members`
    incarnations: tuple[int, ...] = ()
    number: int = 0  # 0: the membership alone (a flush target)

    @staticmethod
    def of(
        members: Iterable[NodeId], incarnations: Iterable[int] = (), number: int = 0
    ) -> GroupView:
        ordered = tuple(sorted(set(members)))
        incs = tuple(incarnations)
        return GroupView(
            view_id(ordered, incs, number),
            ordered,
            {m: i for i, m in enumerate(ordered)},
            incs,
            number,
        )

    def numbered(self, number: int) -> GroupView:
        """The installed view of this membership with the number a flush agreed on."""
        return GroupView.of(self.members, self.incarnations, number)
