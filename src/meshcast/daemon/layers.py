"""`DaemonLayers`: the classes of the layers a `DaemonNode` builds.

The daemon builds and wires its layers itself (the engine asks the overlay whether a path
is backlogged; the session table asks the daemon for its status). A test that must make a
layer fail, return an effect of a new kind, or note an input, passes a subclass here
instead of patching a method on a live object: the compiled build's objects take no new
attributes (docs/compiled.md), and a subclass works in both builds.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshcast.group import GroupEngine
from meshcast.group.membership import GroupMembership
from meshcast.group.sessions import SessionTable
from meshcast.overlay.node import OverlayNode


@dataclass(frozen=True, slots=True)
class DaemonLayers:
    overlay: type[OverlayNode] = OverlayNode
    engine: type[GroupEngine] = GroupEngine
    membership: type[GroupMembership] = GroupMembership
    sessions: type[SessionTable] = SessionTable


DAEMON_LAYERS = DaemonLayers()  # the real layers, as every daemon runs them
