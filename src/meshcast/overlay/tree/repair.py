"""Local repair: make an existing tree respect the reduced graph of a (higher) target.

Used to lift a tree to the next rate (dynamic membership, and the construction's second
attempt at a target, which starts from the best tree found so far instead of from scratch)
and to attach a detached subtree where it fits.
"""

from __future__ import annotations

import numpy as np

from meshcast.overlay.tree.improvement import Improvement
from meshcast.overlay.tree.instance import NO_PARENT
from meshcast.overlay.tree.reduced import ReducedGraph
from meshcast.overlay.tree.working import WorkingTree


def place_subtree(
    graph: ReducedGraph,
    tree: WorkingTree,
    root: int,
    improvement: Improvement,
    candidates: int,
) -> bool:
    """Attach the detached subtree at `root` over an edge of the graph: below a member with
    room (widest edge first), else below one of the `candidates` widest full members that
    an improvement move can relieve. False, with the tree unchanged, if neither works."""
    senders = graph.senders_into(root)
    senders = senders[tree.attached[senders]]
    with_room = senders[graph.bound[senders] > tree.fanout[senders]]
    if len(with_room):
        tree.reattach(root, int(with_room[0]))
        return True
    for parent in senders[:candidates].tolist():
        tree.reattach(root, parent)
        if improvement.relieve(graph, tree, parent):
            return True
        assert tree.parent[root] == parent  # a failed move leaves the overload in place
        tree.detach(root)
    return False


def repair_to_target(
    graph: ReducedGraph, tree: WorkingTree, improvement: Improvement, candidates: int
) -> bool:
    """Detach every subtree hanging from an edge narrower than the target, relieve every
    node over its bound, then re-attach the detached subtrees (sweeping until none moves,
    as one may need another placed first). False if some step fails; the tree is then
    consistent but only partly repaired, so callers keep a copy to go back to."""
    instance = graph.instance
    child = np.flatnonzero(tree.parent != NO_PARENT)
    narrow = child[instance.bandwidth_between(tree.parent[child], child) < graph.target]
    for root in narrow.tolist():
        tree.detach(root)
    for node in np.flatnonzero(tree.attached & (tree.fanout > graph.bound)).tolist():
        while tree.fanout[node] > graph.bound[node]:
            if not improvement.relieve(graph, tree, node):
                return False
    roots = narrow.tolist()
    while roots:
        left = [r for r in roots if not place_subtree(graph, tree, r, improvement, candidates)]
        if len(left) == len(roots):
            return False
        roots = left
    return True
