"""What the simulator hosts: any sans-I/O object with the `SimNode` shape."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from meshcast.errors import UsageError
from meshcast.ids import NodeId
from meshcast.link.events import Link, LinkEffect


class SimNode(Protocol):
    """A sans-I/O state machine driven by the simulator (and, unchanged, by the runtime).

    Inputs return the effects they caused: `meshcast.link.events.Transmit` goes over the
    emulated network; every other effect is handed to the simulator's observers. After
    every input the simulator re-reads `next_deadline()` and re-arms the node's one timer.
    Parameters are positional-only, so implementations may name them as they like.
    """

    def datagram_received(
        self, src: NodeId, datagram: bytes, now: float, /
    ) -> Sequence[object]: ...
    def on_timer(self, now: float, /) -> Sequence[object]: ...
    def next_deadline(self) -> float | None:
        """Absolute virtual time of the next `on_timer`; None: no timer."""
        ...


NodeFactory = Callable[[NodeId, float, random.Random], SimNode]
"""``factory(node_id, now, rng)``: builds a node at start and again on every restart."""

StartHook = Callable[[Any, float], Sequence[object]]
"""``start(node, now)``: the first input after the factory (e.g. ``link.start(now)``)."""

Observer = Callable[[NodeId, object, float], None]
"""``observer(node_id, effect, now)``: sees every effect that is not a `Transmit`."""


class LinkHost:
    """A `SimNode` hosting one `Link` per neighbour, routing datagrams by their source.

    Lets link state machines (Hop, TCP model) run under the simulator unchanged::

        def factory(node_id, now, rng):
            return LinkHost({peer: HopLink(...) for peer in neighbours[node_id]})

        sim.add_node(NodeId(1), factory, start=lambda host, now: host.start(now))
    """

    __slots__ = ("_links", "unknown_source_dropped")

    def __init__(self, links: Mapping[NodeId, Link]) -> None:
        self._links = dict(links)
        self.unknown_source_dropped = 0  # datagrams from a node with no link here

    def link(self, peer: NodeId) -> Link:
        try:
            return self._links[peer]
        except KeyError:
            raise UsageError(f"no link to node {peer}") from None

    @property
    def peers(self) -> list[NodeId]:
        return list(self._links)

    def start(self, now: float) -> list[LinkEffect]:
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
            self.unknown_source_dropped += 1
            return []
        return link.datagram_received(datagram, now)

    def on_timer(self, now: float) -> list[LinkEffect]:
        effects: list[LinkEffect] = []
        for link in self._links.values():
            at = link.next_deadline()
            if at is not None and at <= now:
                effects.extend(link.on_timer(now))
        return effects

    def next_deadline(self) -> float | None:
        deadlines = [
            at for link in self._links.values() if (at := link.next_deadline()) is not None
        ]
        return min(deadlines, default=None)
