"""What the simulator hosts: any sans-I/O object with the `SimNode` shape."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from meshcast.ids import NodeId


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
