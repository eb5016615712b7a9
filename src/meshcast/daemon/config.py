"""The cluster file (`meshcast.config.ClusterConfig`) made into one daemon's layer configs:
what `DaemonNode` is built from, by the runtime and by anything else that runs a daemon
of a cluster file."""

from __future__ import annotations

import math
from dataclasses import replace

from meshcast.config import ClusterConfig
from meshcast.daemon.node import DaemonNodeConfig
from meshcast.errors import ConfigError
from meshcast.group.access import AccessPolicy
from meshcast.group.sessions import SessionConfig
from meshcast.ids import NodeId
from meshcast.link.config import LinkConfig
from meshcast.overlay.node import Neighbour, OverlayConfig
from meshcast.overlay.routing import BUILDERS
from meshcast.replicate.engine import ReplicatorConfig
from meshcast.wire.client import DaemonLimits

# bytes: the most a group DATA and overlay DATA header add to a client payload (256 group
# names, 4,096 per-destination numbers and vector entries, 50 overlay destinations)
ENVELOPE_ROOM = 256 * 1024


def membership_link_config(config: ClusterConfig) -> LinkConfig:
    """The Hop parameters of the daemon's overlay links, liveness set by [membership].

    A neighbour is declared down when its link hears nothing for
    ``failure_rounds × heartbeat_interval``. The heartbeat runs at least as often as both
    ``link.heartbeat_interval`` and ``membership.hello_interval`` ask, and the number of
    rounds is chosen so that this silence timeout is ``membership.failure_timeout``
    (rounded up to a whole number of heartbeats).
    """
    membership = config.membership
    heartbeat = min(config.link.heartbeat_interval, membership.hello_interval)
    rounds = max(2, math.ceil(membership.failure_timeout / heartbeat - 1e-9))
    # A client payload of limits.max_message_size travels with the group and overlay
    # headers (sender, groups, per-destination numbers) around it: the links carry both.
    largest = max(config.link.max_message_size, config.limits.max_message_size + ENVELOPE_ROOM)
    return replace(
        config.link,
        heartbeat_interval=heartbeat,
        failure_rounds=rounds,
        max_message_size=largest,
        max_send_queue_bytes=max(config.link.max_send_queue_bytes, largest),
        max_reassembly_bytes=max(config.link.max_reassembly_bytes, largest),
    )


def failure_detection_bound(config: ClusterConfig) -> float:
    """Seconds from a daemon's death to its neighbours declaring it down (see above)."""
    link = membership_link_config(config)
    return link.failure_rounds * link.heartbeat_interval


def overlay_config(config: ClusterConfig, name: str) -> OverlayConfig:
    """The `OverlayConfig` of daemon `name`, as `sim.overlay.build_overlay` builds one.

    Raises `ConfigError` for an unknown name or a routing policy this overlay lacks.
    """
    config.daemon(name)
    if config.routing not in BUILDERS:
        raise ConfigError(
            f"routing policy {config.routing!r} is not available in the overlay yet; "
            f"use one of {', '.join(BUILDERS)}",
            key="cluster.routing",
            source=config.source,
        )
    neighbours = {
        NodeId(spec.node_id): Neighbour(link.weight, link.bandwidth_bps)
        for spec, link in config.neighbours(name)
    }
    ids = {d.name: NodeId(d.node_id) for d in config.daemons}
    allowed = frozenset(
        (min(ids[link.a], ids[link.b]), max(ids[link.a], ids[link.b])) for link in config.links
    )
    return OverlayConfig(
        neighbours=neighbours,
        upload_bps={NodeId(d.node_id): d.upload_bps for d in config.daemons},
        allowed_links=allowed,
        link=membership_link_config(config),
        policy=config.routing,
        view_settle_interval=config.membership.view_settle_interval,
        lsa_refresh_interval=config.membership.lsa_refresh_interval,
        max_dests_per_packet=config.limits.max_dests_per_packet,
        window_messages=config.limits.window_messages,
        coalesce_sends=True,
    )


def session_config(config: ClusterConfig, access: AccessPolicy) -> SessionConfig:
    """The client sessions' limits ([limits], [sessions]) with the access policy of
    [clients] (its token file already read: `ClientsConfig.load_policy`)."""
    limits = config.limits
    return SessionConfig(
        DaemonLimits(limits.max_message_size, limits.max_group_name, limits.max_groups_per_client),
        limits.max_clients,
        handshake_timeout=limits.handshake_timeout,
        max_pending_handshakes=limits.max_pending_handshakes,
        block_timeout=limits.block_timeout,
        max_backlog=config.sessions.max_backlog,
        status_max_groups=config.sessions.status_max_groups,
        status_max_members=config.sessions.status_max_members,
        access=access,
    )


def node_config(
    config: ClusterConfig, name: str, *, probe_interval: float | None = None
) -> DaemonNodeConfig:
    config.daemon(name)
    return DaemonNodeConfig(name, probe_interval=probe_interval)


def daemon_names(config: ClusterConfig) -> dict[NodeId, str]:
    return {NodeId(d.node_id): d.name for d in config.daemons}


def replicator_config(config: ClusterConfig) -> ReplicatorConfig:
    """[replicate] as the replication engine's config (its rate in bytes/s)."""
    section = config.replicate
    return ReplicatorConfig(
        rate=section.rate_bps / 8 if section.rate_bps else None,
        progress_interval=section.progress_interval,
        give_up_after=section.give_up_after,
        stall_after=section.stall_after,
    )


def upload_capacities(config: ClusterConfig) -> dict[NodeId, float]:
    """Each daemon's configured upload, bits/s (for capacity-aware replication plans)."""
    return {NodeId(d.node_id): d.upload_bps for d in config.daemons}
