"""Where a daemon listens for its clients unless told otherwise.

The convention is shared by the daemon's client server (`meshcast.runtime.sessions`) and
the client library (`meshcast.client.cli.find_daemon`), so it lives below both:
``$XDG_RUNTIME_DIR/meshcast/<daemon>@<cluster>.sock`` when ``XDG_RUNTIME_DIR`` is set, else
``<tempdir>/meshcast-<uid>/<daemon>@<cluster>.sock``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

SOCKET_NAME_SEPARATOR = "@"  # never in a daemon or cluster name: NAME@CLUSTER is unambiguous


def default_socket_dir() -> Path:
    """The directory of the daemons' default client sockets (see the module docstring)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "meshcast"
    return Path(tempfile.gettempdir()) / f"meshcast-{os.getuid()}"


def default_socket_path(daemon_name: str, cluster_name: str) -> Path:
    """Where daemon `daemon_name` of cluster `cluster_name` listens for clients unless told
    otherwise: ``<default_socket_dir()>/NAME@CLUSTER.sock``. The cluster is part of the
    name so that daemons of two clusters that share a daemon name do not collide."""
    return default_socket_dir() / f"{daemon_name}{SOCKET_NAME_SEPARATOR}{cluster_name}.sock"
