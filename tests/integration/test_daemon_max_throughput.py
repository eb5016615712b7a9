"""`routing = "max-throughput"` in the cluster file, on real daemon processes.

Four `meshcast daemon` processes on 127.0.0.1-4, fully meshed, with heterogeneous uploads:
d1 can upload 20 Mbit/s, the others 100 Mbit/s, so every link of d1 carries 20 Mbit/s
and the others 100 Mbit/s. A star from d1 (what shortest-path routing builds over equal
weights) shares d1's upload three ways: 6.7 Mbit/s. The max-throughput tree sends one copy
to a relay that feeds the other two: 20 Mbit/s. The daemons must agree on the view and
each log, for its own source, the tree the policy builds from that view.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from meshcast.ids import NodeId
from meshcast.overlay.routing import max_throughput_tree
from meshcast.overlay.view import Edge, View

from .daemon_helpers import (
    Event,
    cluster_toml,
    free_udp_ports,
    host_of,
    running_daemons,
    write_key,
)
from .daemon_helpers import wait_agreed as wait_agreed_views

pytestmark = pytest.mark.timeout(60)

NAMES = ["d1", "d2", "d3", "d4"]
ALL = {1, 2, 3, 4}
MESH = list(itertools.combinations(range(1, 5), 2))
UPLOAD_MBIT = {1: 20, 2: 100, 3: 100, 4: 100}
VIEW_TIMEOUT = 15.0  # s: startup of four interpreters on a slow machine included
PROBE_ARGS = ("--probe-interval", "0.2")


def write_max_throughput_cluster(directory: Path) -> Path:
    """The helpers' cluster file, switched to max-throughput with d1's upload narrowed."""
    ports = free_udp_ports([host_of(i) for i in range(1, 5)])
    text = cluster_toml(4, MESH, ports)
    text, switched = re.subn(r'routing = "[^"]*"', 'routing = "max-throughput"', text)
    assert switched == 1
    blocks = text.split("[[daemons]]")
    for i in range(1, 5):
        blocks[i], changed = re.subn(
            r'upload = "[^"]*"', f'upload = "{UPLOAD_MBIT[i]}Mbit"', blocks[i]
        )
        assert changed == 1
    write_key(directory)
    path = directory / "cluster.toml"
    path.write_text("[[daemons]]".join(blocks), encoding="utf-8")
    return path


def logged_view(event: Event) -> View:
    members = tuple(NodeId(m) for m in event["members"])
    edges = tuple(Edge(NodeId(a), NodeId(b), w, bw) for a, b, w, bw in event["edges"])
    return View.of(members, edges)


def logged_parent(event: Event) -> dict[int, int]:
    return {child: up for up, child in event["tree"]["edges"]}


@pytest.mark.asyncio
async def test_daemons_agree_and_log_the_max_throughput_tree(tmp_path: Path) -> None:
    config = write_max_throughput_cluster(tmp_path)
    async with running_daemons(config, NAMES, *PROBE_ARGS) as daemons:
        agreed = await wait_agreed_views(daemons.values(), ALL, VIEW_TIMEOUT, edges=len(MESH))
        (digest,) = {e["digest"] for e in agreed.values()}
        uploads = {NodeId(i): mbit * 1e6 for i, mbit in UPLOAD_MBIT.items()}
        trees: dict[int, dict[int, int]] = {}
        rates: dict[int, float] = {}
        for i, name in enumerate(NAMES, start=1):
            daemon = daemons[name]
            assert daemon.started["policy"] == "max-throughput"
            installed = await daemon.wait_event(
                "view_installed", lambda e: e["digest"] == digest, timeout=1
            )
            view = logged_view(installed)
            assert {(e.a, e.b): e.bandwidth_bps for e in view.edges} == {
                (a, b): min(UPLOAD_MBIT[a], UPLOAD_MBIT[b]) * 1e6 for a, b in MESH
            }
            # the tree it logs is the policy's tree of the agreed view
            expected = max_throughput_tree(view, NodeId(i), uploads)
            assert installed["tree"]["source"] == i
            assert logged_parent(installed) == dict(expected.parent)
            assert installed["tree"]["rate_bps"] == expected.rate_bps
            trees[i] = logged_parent(installed)
            rates[i] = installed["tree"]["rate_bps"]

        # d1 feeds a single relay, which feeds the other two: d1's full 20 Mbit/s
        assert list(trees[1].values()).count(1) == 1
        assert rates[1] == 20e6
        relay = next(child for child, up in trees[1].items() if up == 1)

        # d1's probes sent once the view was agreed travel over that tree: two hops to
        # the daemons behind the relay
        since = max(float(e["ts"]) for e in agreed.values())
        for node in sorted(ALL - {1, relay}):
            probe = await daemons[f"d{node}"].wait_event(
                "probe_received", lambda e: e["source"] == 1 and sent_at(e) > since, timeout=10
            )
            assert probe["hops"] == 2, probe
            assert probe["depth"] == 2, probe


def sent_at(probe: Event) -> float:
    """Wall-clock time the probe left its source (same host: comparable with "ts")."""
    return float(probe["ts"]) - float(probe["latency_ms"]) / 1000
