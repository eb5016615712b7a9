"""Maximum-throughput distribution trees (patent claims 5-11): construction, baselines,
dynamic membership. Theory of operation: docs/design/tree.md.

The exact solver (`meshcast.overlay.tree.exact`) needs scipy and is imported on its own.
"""

from meshcast.overlay.tree.baselines import (
    random_tree,
    shortest_path_tree,
    star_tree,
    widest_path_tree,
)
from meshcast.overlay.tree.construct import (
    DEFAULT_SEARCH,
    SearchConfig,
    max_throughput_tree,
    tree_at_target,
)
from meshcast.overlay.tree.dynamic import DynamicConfig, DynamicTree, MembershipChanged
from meshcast.overlay.tree.improvement import (
    DEFAULT_IMPROVEMENT,
    TRIANGULAR,
    Chain,
    FirstOf,
    Improvement,
    Preference,
    Splice,
    Triangular,
)
from meshcast.overlay.tree.instance import NO_PARENT, EdgeTable, Tree, TreeInstance
from meshcast.overlay.tree.random_instances import InstanceModel, dense_instance, sparse_instance
from meshcast.overlay.tree.rate import degree_bounds, rate_candidates, tree_rate, tree_violations

__all__ = [
    "DEFAULT_IMPROVEMENT",
    "DEFAULT_SEARCH",
    "NO_PARENT",
    "TRIANGULAR",
    "Chain",
    "DynamicConfig",
    "DynamicTree",
    "EdgeTable",
    "FirstOf",
    "Improvement",
    "InstanceModel",
    "MembershipChanged",
    "Preference",
    "SearchConfig",
    "Splice",
    "Tree",
    "TreeInstance",
    "Triangular",
    "degree_bounds",
    "dense_instance",
    "max_throughput_tree",
    "random_tree",
    "rate_candidates",
    "shortest_path_tree",
    "sparse_instance",
    "star_tree",
    "tree_at_target",
    "tree_rate",
    "tree_violations",
    "widest_path_tree",
]
