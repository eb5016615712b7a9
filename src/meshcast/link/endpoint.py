"""All the links of one daemon behind one datagram socket (or one simulated node)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from meshcast.errors import UsageError
from meshcast.ids import NodeId
from meshcast.link.events import Link, LinkEffect


class LinkEndpoint:
    """Routes each datagram to the link of the neighbour it came from and merges timers.

    Datagrams from a node we have no link to are counted in `foreign_dropped` and ignored.
    The runtime and the simulator drive the same object::

        endpoint = LinkEndpoint(me, {peer: HopLink(me, peer, config, epoch=e) for peer in peers})
        effects = endpoint.start(now)
    """

    __slots__ = ("_links", "foreign_dropped", "local")

    def __init__(self, local: NodeId, links: Mapping[NodeId, Link] | None = None) -> None:
        self.local = local
        self._links: dict[NodeId, Link] = dict(links or {})
        self.foreign_dropped = 0

    # ---------------------------------------------------------------- membership

    def add(self, link: Link, now: float) -> list[LinkEffect]:
        """Add a link to a new neighbour and start it."""
        self._links[link.peer] = link
        return link.start(now)

    def remove(self, peer: NodeId) -> None:
        self._links.pop(peer, None)

    def link(self, peer: NodeId) -> Link:
        try:
            return self._links[peer]
        except KeyError:
            raise UsageError(f"no link to node {peer}") from None

    @property
    def peers(self) -> list[NodeId]:
        return list(self._links)

    def __contains__(self, peer: NodeId) -> bool:
        return peer in self._links

    def __iter__(self) -> Iterator[Link]:
        return iter(list(self._links.values()))

    # ---------------------------------------------------------------- inputs

    def start(self, now: float) -> list[LinkEffect]:
        """Start every link given to the constructor."""
        effects: list[LinkEffect] = []
        for link in self._links.values():
            effects.extend(link.start(now))
        return effects

    def send(
        self, peer: NodeId, payload: bytes, now: float, *, flush: bool = True
    ) -> list[LinkEffect]:
        return self.link(peer).send(payload, now, flush=flush)

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
        earliest: float | None = None
        for link in self._links.values():  # a loop, not min() over a generator: per message
            at = link.next_deadline()
            if at is not None and (earliest is None or at < earliest):
                earliest = at
        return earliest
