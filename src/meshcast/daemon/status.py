"""What a daemon tells about itself: views and trees for its events, and its part of a
STATUS report (docs/client-protocol.md, "Status reports")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING

from meshcast.ids import NodeId
from meshcast.overlay.node import LinkDrops
from meshcast.overlay.routing import Tree
from meshcast.overlay.view import View

if TYPE_CHECKING:
    from meshcast.daemon.node import DaemonNode


def describe_view(view: View, names: Mapping[NodeId, str]) -> dict[str, object]:
    return {
        "members": [int(m) for m in view.members],
        "names": [names.get(m, "?") for m in view.members],
        "digest": view.digest.hex(),
        "edges": [[int(e.a), int(e.b), e.weight, e.bandwidth_bps] for e in view.edges],
    }


def describe_tree(tree: Tree | None) -> dict[str, object] | None:
    if tree is None:
        return None
    depth = max((tree.depth(node) for node in tree.parent), default=0)
    return {
        "source": int(tree.source),
        "edges": [[int(parent), int(child)] for child, parent in sorted(tree.parent.items())],
        "depth": depth,
        "rate_bps": tree.rate_bps,
    }


def status_sections(daemon: DaemonNode, now: float) -> dict[str, object]:
    """The overlay view, each configured link, the tree of the daemon's own source and
    the overlay's and the daemon layer's counters (the driver adds its own sections)."""
    node = daemon.overlay
    names = daemon.names
    view = node.view
    up = node.neighbours_up
    endpoint = node.endpoint
    links: list[dict[str, object]] = []
    dropped = LinkDrops()
    for peer in sorted(node.config.neighbours):
        link = endpoint.link(peer) if peer in endpoint else None
        stats = None if link is None else link.statistics()
        is_up = peer in up
        drops = node.link_drops(peer)
        dropped += drops
        links.append(
            {
                "node": int(peer),
                "name": names.get(peer, "?"),
                "up": is_up,
                "srtt_ms": round(stats.srtt * 1000, 3) if stats is not None and is_up else None,
                "bandwidth_bps": node.advertised_bandwidth(peer),
                "mtu": getattr(link, "mtu", None),  # Hop links: bytes per datagram
                "weight": node.config.neighbours[peer].weight,
                "emulated": peer in daemon.emulated,
                "retransmissions": 0 if stats is None else stats.retransmissions,
                "queued_messages": 0 if stats is None else stats.queued_messages,
                "dropped": {**asdict(drops), "total": drops.total},
            }
        )
    return {
        "daemon": {"incarnation": node.incarnation},
        "view": None
        if view is None
        else {
            "members": [{"node": int(m), "name": names.get(m, "?")} for m in view.members],
            "links": len(view.edges),
            "digest": view.digest.hex(),
            "agreed": daemon.agreed,
        },
        "links": links,
        "tree": None if view is None else describe_tree(node.routing.tree(daemon.local)),
        "replication": daemon.replication.status(now),
        "counters": {
            "links": {**asdict(dropped), "total": dropped.total},  # drops of every link
            "overlay": asdict(node.statistics()),
            "daemon": asdict(daemon.statistics()),
        },
    }


def merge_sections(ours: Mapping[str, object], theirs: Mapping[str, object]) -> dict[str, object]:
    """`ours` with `theirs` added in: objects present in both are merged key by key, at
    every depth (the driver's ``counters.daemon`` joins the node's), other values of
    `theirs` win."""
    merged = dict(ours)
    for key, value in theirs.items():
        mine = merged.get(key)
        if isinstance(mine, Mapping) and isinstance(value, Mapping):
            merged[key] = merge_sections(mine, value)
        else:
            merged[key] = value
    return merged
