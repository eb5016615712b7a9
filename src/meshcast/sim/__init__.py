"""Deterministic discrete-event simulator: virtual clock, emulated links, faults, trace.

The protocol state machines run under it unchanged (docs/design/sim.md)::

    sim = Simulator(seed=7)
    sim.add_node(NodeId(1), factory)
    sim.add_node(NodeId(2), factory)
    sim.add_link(NodeId(1), NodeId(2), LinkModel(delay=0.05, loss=0.01))
    sim.act(NodeId(1), lambda node, now: node.send(b"x", now))
    sim.run(until=10.0)
"""

from meshcast.sim.network import LinkModel, PipeStats
from meshcast.sim.node import NodeFactory, Observer, SimNode, StartHook
from meshcast.sim.simulator import Simulator

__all__ = [
    "LinkModel",
    "NodeFactory",
    "Observer",
    "PipeStats",
    "SimNode",
    "Simulator",
    "StartHook",
]
