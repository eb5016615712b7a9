"""The daemon builds its layers' configs from the cluster file: [group] is its ordering
engine's GroupConfig, [sessions] (with [limits]) its SessionConfig, and
[membership] lsa_refresh_interval its overlay's refresh timer. In-process, no socket is
opened (a daemon binds only in `open`)."""

from __future__ import annotations

import pytest

from meshcast.config import parse_config
from meshcast.daemon.config import overlay_config
from meshcast.group import GroupConfig
from meshcast.runtime.daemon import OverlayDaemon
from meshcast.runtime.endpoints import ClientListen

CLUSTER = """
[[sites]]
name = "s"
[[daemons]]
name = "A"
id = 1
host = "127.0.0.1"
port = 5001
site = "s"
upload = "1Gbit"
download = "1Gbit"
[membership]
lsa_refresh_interval = "2s"
[limits]
max_clients = 7
block_timeout = "3s"
[group]
idle_ts_interval = "4ms"
repair_after = "500ms"
max_retained_bytes = "8MiB"
[sessions]
max_backlog = "2MiB"
status_max_groups = 5
status_max_members = 6
[security]
insecure = true
"""


@pytest.mark.asyncio
async def test_the_daemon_uses_the_files_group_sessions_and_membership_values() -> None:
    config = parse_config(CLUSTER)
    assert overlay_config(config, "A").lsa_refresh_interval == 2.0
    daemon = OverlayDaemon(
        config, "A", probe_interval=None, incarnation=1, clients=ClientListen(unix_path="")
    )
    engine = daemon.sessions.membership.engine
    assert engine.config == GroupConfig(
        idle_ts_interval=0.004, repair_after=0.5, max_retained_bytes=8 * 2**20
    )
    sessions = daemon.sessions.config
    assert (sessions.max_backlog, sessions.status_max_groups, sessions.status_max_members) == (
        2 * 2**20,
        5,
        6,
    )
    assert (sessions.max_clients, sessions.block_timeout) == (7, 3.0)  # from [limits]
    assert daemon.node.overlay.config.lsa_refresh_interval == 2.0
