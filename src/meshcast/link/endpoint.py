"""All the links of one daemon behind one datagram socket."""

from __future__ import annotations

from collections.abc import Iterator

from meshcast.ids import NodeId
from meshcast.link.events import Link, LinkEffect


class LinkEndpoint:
    """Routes each datagram to the link of the neighbour it came from and merges timers.

    Datagrams from a node we have no link to are counted in `foreign_dropped` and ignored.
    """

    def __init__(self, local: NodeId) -> None:
        self.local = local
        self._links: dict[NodeId, Link] = {}
        self.foreign_dropped = 0

    def add(self, link: Link, now: float) -> list[LinkEffect]:
        self._links[link.peer] = link
        return link.start(now)

    def remove(self, peer: NodeId) -> None:
        self._links.pop(peer, None)

    def link(self, peer: NodeId) -> Link:
        return self._links[peer]

    def __contains__(self, peer: NodeId) -> bool:
        return peer in self._links

    def __iter__(self) -> Iterator[Link]:
        return iter(list(self._links.values()))

    def datagram_received(self, src: NodeId, datagram: bytes, now: float) -> list[LinkEffect]:
        link = self._links.get(src)
        if link is None:
            self.foreign_dropped += 1
            return []
        return link.datagram_received(datagram, now)

    def on_timer(self, now: float) -> list[LinkEffect]:
        effects: list[LinkEffect] = []
        for link in list(self._links.values()):
            deadline = link.next_deadline()
            if deadline is not None and deadline <= now:
                effects.extend(link.on_timer(now))
        return effects

    def next_deadline(self) -> float | None:
        deadlines = [d for link in self._links.values() if (d := link.next_deadline()) is not None]
        return min(deadlines) if deadlines else None
