"""A mutable rooted tree under construction or repair: parent pointers, child sets, fan-out."""

from __future__ import annotations

import numpy as np

from meshcast.overlay.tree.instance import NO_PARENT, IntArray


class WorkingTree:
    """Parent pointers over n node slots; a slot not yet attached has no parent.

    Kept consistent by the only mutators (`attach`, `detach`, `reattach`, `move`), so `fanout`
    always equals the size of each child set.
    """

    __slots__ = ("attached", "children", "fanout", "parent", "source")

    def __init__(self, n: int, source: int) -> None:
        self.source = source
        self.parent: IntArray = np.full(n, NO_PARENT, dtype=np.int64)
        self.fanout: IntArray = np.zeros(n, dtype=np.int64)
        self.attached = np.zeros(n, dtype=np.bool_)
        self.attached[source] = True
        self.children: list[set[int]] = [set() for _ in range(n)]

    @classmethod
    def from_parent(cls, parent: IntArray, source: int) -> WorkingTree:
        """The tree a parent array describes; nodes not connected to `source` stay detached."""
        tree = cls(len(parent), source)
        below: list[list[int]] = [[] for _ in range(len(parent))]
        for child in np.flatnonzero(parent != NO_PARENT).tolist():
            below[int(parent[child])].append(child)
        frontier = [source]
        for node in frontier:  # breadth first: every parent is attached before its children
            for child in below[node]:
                tree.attach(child, node)
                frontier.append(child)
        return tree

    def attach(self, child: int, parent: int) -> None:
        assert not self.attached[child], child
        assert self.attached[parent], parent
        self.parent[child] = parent
        self.fanout[parent] += 1
        self.children[parent].add(child)
        self.attached[child] = True

    def detach(self, child: int) -> None:
        """Cut `child` from its parent; its subtree stays hanging below it, unattached."""
        parent = int(self.parent[child])
        self.children[parent].discard(child)
        self.fanout[parent] -= 1
        self.parent[child] = NO_PARENT
        self._mark_subtree(child, attached=False)

    def reattach(self, child: int, parent: int) -> None:
        """Hang a detached subtree rooted at `child` under attached `parent`."""
        assert not self.attached[child], child
        assert self.attached[parent], parent
        self.parent[child] = parent
        self.fanout[parent] += 1
        self.children[parent].add(child)
        self._mark_subtree(child, attached=True)

    def move(self, child: int, new_parent: int) -> None:
        """Re-parent `child` with its subtree. `new_parent` must not be inside that subtree."""
        old = int(self.parent[child])
        self.children[old].discard(child)
        self.fanout[old] -= 1
        self.parent[child] = new_parent
        self.fanout[new_parent] += 1
        self.children[new_parent].add(child)

    def is_ancestor(self, ancestor: int, node: int) -> bool:
        """Whether `ancestor` is `node` or lies on its path to the root."""
        while node != NO_PARENT:
            if node == ancestor:
                return True
            node = int(self.parent[node])
        return False

    def subtree(self, root: int) -> list[int]:
        nodes = [root]
        for node in nodes:
            nodes.extend(self.children[node])
        return nodes

    def _mark_subtree(self, root: int, *, attached: bool) -> None:
        self.attached[self.subtree(root)] = attached
