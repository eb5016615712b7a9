"""Improvement moves: relieve a node that feeds more children than its capacity allows.

Every move lowers the overloaded node's fan-out by one and gives a child only to nodes
with room for it, so no move creates an overload and repeated moves terminate. All use
edges of the reduced graph only, so every tree edge stays at least as wide as the target.

The patent names the move (a "triangular improvement") but does not define it; see
docs/design/tree.md. `Triangular` is our reading: the three triangles an overloaded node
u forms with a child w and one more node. `Splice` and `Chain` are wider moves, tried
after it by the default strategy.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import numpy as np

from meshcast.overlay.tree.instance import NO_PARENT
from meshcast.overlay.tree.reduced import ReducedGraph
from meshcast.overlay.tree.working import WorkingTree


class Improvement(Protocol):
    """A strategy for relieving overloaded nodes."""

    def relieve(self, graph: ReducedGraph, tree: WorkingTree, node: int) -> bool:
        """Lower `node`'s fan-out by one with a valid move; False if none applies."""
        ...


class Preference(Enum):
    """Which new parent a triangular re-attachment picks among those that qualify."""

    MOST_ROOM = "most_room"  # most spare child slots: keeps slack where later moves need it
    WIDEST = "widest"  # widest edge to the moved child


@dataclass(frozen=True, slots=True)
class Triangular:
    """Our reading of the patent's move, for an overloaded u with a child w:

    * (u, v, w): re-attach w to a sibling v that has room and an edge v -> w;
    * (g, u, w): re-attach w to u's parent g, if g has room and an edge g -> w;
    * (g, w, u): if w has room, put w in u's place under g and u under w.

    None of these can create a cycle: v and g lie outside w's subtree.
    """

    preference: Preference = Preference.MOST_ROOM

    def relieve(self, graph: ReducedGraph, tree: WorkingTree, node: int) -> bool:
        grandparent = int(tree.parent[node])
        best: tuple[int, int] | None = None
        best_score = -np.inf
        for child in tree.children[node]:
            senders = graph.senders_into(child)  # widest first
            related = (tree.parent[senders] == node) | (senders == grandparent)
            room = graph.bound[senders] - tree.fanout[senders]
            eligible = np.flatnonzero(related & (room > 0))
            if len(eligible) == 0:
                continue
            # widest first, so index 0 is the widest; otherwise the one with most room
            at = 0 if self.preference is Preference.WIDEST else int(np.argmax(room[eligible]))
            taker = int(senders[eligible[at]])
            if self.preference is Preference.WIDEST:
                score = float(graph.instance.bandwidth_between(taker, child))
            else:
                score = float(room[eligible[at]])
            if score > best_score:
                best, best_score = (child, taker), score
        if best is not None:
            tree.move(*best)
            return True
        return grandparent != NO_PARENT and _splice_at_parent(graph, tree, node)


def _splice_at_parent(graph: ReducedGraph, tree: WorkingTree, node: int) -> bool:
    """The triangle (g, w, u): a child w of u with room takes u's place under g, adopts u."""
    grandparent = int(tree.parent[node])
    into_node = graph.senders_into(node)
    for child in tree.children[node]:
        if tree.fanout[child] >= graph.bound[child] or not np.any(into_node == child):
            continue
        if np.any(graph.senders_into(child) == grandparent):
            tree.move(child, grandparent)
            tree.move(node, child)
            return True
    return False


@dataclass(frozen=True, slots=True)
class Splice:
    """Re-route around an ancestor: u's child w takes the place of an ancestor a of u (u
    itself first) under a's parent p, and a hangs below some x in w's subtree that has
    room (edges p -> w and x -> a needed). u sheds w, p keeps its fan-out, x gains a.
    No cycle: once w leaves a's subtree, nothing below w is below a.

    With a = u and x = w this is the third triangle (p, w, u); otherwise it closes a
    longer loop, which chain-like trees (every bound 1) need.
    """

    levels: int = 64  # how many ancestors of u to try, nearest first

    def relieve(self, graph: ReducedGraph, tree: WorkingTree, node: int) -> bool:
        return _splice_above(graph, tree, node, self.levels)


def _splice_above(graph: ReducedGraph, tree: WorkingTree, node: int, levels: int) -> bool:
    for child in tree.children[node]:
        fed_by = graph.senders_into(child)
        ancestor = node
        for _ in range(levels):
            if ancestor == tree.source:
                break
            above = int(tree.parent[ancestor])
            if np.any(fed_by == above):
                hosts = graph.senders_into(ancestor)
                hosts = hosts[graph.bound[hosts] > tree.fanout[hosts]]
                for host in hosts.tolist():
                    if tree.is_ancestor(child, host):
                        tree.move(child, above)
                        tree.move(ancestor, host)
                        return True
            ancestor = above
    return False


@dataclass(frozen=True, slots=True)
class Chain:
    """A chain of re-attachments (an augmenting path): u's child w1 moves to x1, which is
    full and passes one of its own children w2 on to x2, ... until some x_k has room, or
    makes room by a splice (one of its children with room takes its place and adopts it).
    Any attached x outside the moved child's subtree qualifies, not only siblings. Found
    breadth first, so the shortest chain wins; `max_moves=1` is plain adoption."""

    max_moves: int = 4

    def relieve(self, graph: ReducedGraph, tree: WorkingTree, node: int) -> bool:
        # came_from[x] = (y, w): x is reached by moving y's child w under x
        came_from: dict[int, tuple[int, int]] = {}
        layer = [node]
        for _ in range(self.max_moves):
            next_layer: list[int] = []
            for shedder in layer:
                for child in tree.children[shedder]:
                    senders = graph.senders_into(child)
                    senders = senders[tree.attached[senders] & (senders != shedder)]
                    for taker in senders.tolist():
                        if taker == node or taker in came_from:
                            continue
                        if tree.is_ancestor(child, taker):
                            continue
                        came_from[taker] = (shedder, child)
                        if _make_room(graph, tree, taker, child) and _apply_chain(
                            tree, came_from, taker
                        ):
                            return True
                        next_layer.append(taker)
            layer = next_layer
        return False


def _make_room(graph: ReducedGraph, tree: WorkingTree, taker: int, incoming: int) -> bool:
    """Whether `taker` has room, after splicing one of its children above it if need be
    (the child, with room, takes the taker's place and adopts it)."""
    if tree.fanout[taker] < graph.bound[taker]:
        return True
    if taker == tree.source:
        return False
    above = int(tree.parent[taker])
    if tree.is_ancestor(incoming, above):
        return False
    into_taker = graph.senders_into(taker)
    for child in tree.children[taker]:
        if tree.fanout[child] >= graph.bound[child] or not np.any(into_taker == child):
            continue
        if np.any(graph.senders_into(child) == above):
            tree.move(child, above)
            tree.move(taker, child)
            return True
    return False


def _apply_chain(tree: WorkingTree, came_from: dict[int, tuple[int, int]], end: int) -> bool:
    """Apply the chain ending at `end`, last move first (each frees the slot the one before
    needs). If an earlier move has put a taker inside the child it should adopt, the
    chain is void: undo the moves made and return False."""
    done: list[tuple[int, int]] = []  # (moved child, its old parent)
    taker = end
    while taker in came_from:
        shedder, child = came_from[taker]
        if tree.is_ancestor(child, taker):
            for moved, old_parent in reversed(done):
                tree.move(moved, old_parent)
            return False
        tree.move(child, taker)
        done.append((child, shedder))
        taker = shedder
    return True


@dataclass(frozen=True, slots=True)
class FirstOf:
    """Try each strategy in turn until one applies."""

    strategies: tuple[Improvement, ...]

    def relieve(self, graph: ReducedGraph, tree: WorkingTree, node: int) -> bool:
        return any(strategy.relieve(graph, tree, node) for strategy in self.strategies)


TRIANGULAR = Triangular()
DEFAULT_IMPROVEMENT = FirstOf((Triangular(), Splice(), Chain()))
