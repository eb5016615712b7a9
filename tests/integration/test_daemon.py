"""`meshcast daemon` processes on real loopback sockets (meshcast.runtime.daemon).

Each test writes a cluster file on free ports of 127.0.0.1..N, starts one daemon process
per daemon, and reads what they log (one JSON object per line on stderr). The membership
timers are small (heartbeat 100 ms, failure timeout 500 ms, view settle 50 ms), so a
killed daemon is excluded in about half a second. Every process is stopped by the test.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from meshcast.config import load_config
from meshcast.ids import NodeId
from meshcast.runtime.daemon import OverlayDaemon, run_daemon

from .daemon_helpers import (
    DAEMON_COMMAND,
    FAILURE_TIMEOUT,
    VIEW_SETTLE_INTERVAL,
    DaemonProcess,
    Event,
    cluster_toml,
    free_udp_ports,
    host_of,
    marks,
    members,
    ring,
    running_daemons,
    wait_agreed,
    write_cluster,
    write_key,
)

pytestmark = pytest.mark.timeout(60)

NAMES = ["d1", "d2", "d3", "d4"]
ALL = {1, 2, 3, 4}
VIEW_TIMEOUT = 15.0  # s: startup of four interpreters on a slow machine included
PROBE_INTERVAL = 0.2  # s
PROBE_ARGS = ("--probe-interval", str(PROBE_INTERVAL))
# A killed daemon is out of the survivors' view after the failure timeout and one view
# settle; the slack is for scheduling on a loaded CI machine, not for the protocol.
EXCLUSION_BOUND = FAILURE_TIMEOUT + VIEW_SETTLE_INTERVAL
SLACK = 1.0


def tree_depths(view_installed: Event) -> dict[int, int]:
    """Depth of every member in the tree that `view_installed` logged for its source."""
    tree = view_installed["tree"]
    parent = {child: up for up, child in tree["edges"]}
    depth = {tree["source"]: 0}

    def walk(node: int) -> int:
        if node not in depth:
            depth[node] = walk(parent[node]) + 1
        return depth[node]

    for node in parent:
        walk(node)
    return depth


def sent_at(probe: Event) -> float:
    """Wall-clock time the probe left its source (same host: comparable with "ts")."""
    return float(probe["ts"]) - float(probe["latency_ms"]) / 1000


async def probes_sent_after(
    daemon: DaemonProcess, sources: set[int], since: float, *, count: int = 2
) -> dict[int, list[Event]]:
    """Wait until `daemon` received `count` probes from each source, sent after `since`."""
    got: dict[int, list[Event]] = {s: [] for s in sources}
    index = 0
    while any(len(probes) < count for probes in got.values()):
        index, probe = await daemon.wait_indexed("probe_received", timeout=10, after=index)
        index += 1
        if probe["source"] in got and sent_at(probe) > since:
            got[probe["source"]].append(probe)
    return got


async def check_probes_follow_the_trees(
    daemons: dict[str, DaemonProcess], alive: set[int], agreed: dict[str, Event]
) -> int:
    """Every live daemon gets probes from every other over the source's tree; max hops."""
    since = max(float(e["ts"]) for e in agreed.values())
    digest = next(iter(agreed.values()))["digest"]
    trees = {
        d.started["node"]: tree_depths(
            await d.wait_event("view_installed", lambda e: e["digest"] == digest, timeout=1)
        )
        for d in daemons.values()
        if d.started["node"] in alive
    }
    received = await asyncio.gather(
        *(
            probes_sent_after(d, alive - {d.started["node"]}, since)
            for d in daemons.values()
            if d.started["node"] in alive
        )
    )
    longest = 0
    for got in received:
        for source, probes in got.items():
            for probe in probes:
                me = probe["node"]
                assert probe["hops"] == trees[source][me], probe  # the source's tree, exactly
                assert probe["depth"] == probe["hops"], probe  # and the receiver agrees
                longest = max(longest, probe["hops"])
    return longest


@pytest.mark.asyncio
async def test_four_daemons_on_loopback_form_one_agreed_view(tmp_path: Path) -> None:
    config = write_cluster(tmp_path, 4, ring(4), emulated=[(2, 3)])
    async with running_daemons(config, NAMES) as daemons:
        agreed = await wait_agreed(daemons.values(), ALL, VIEW_TIMEOUT, edges=4)

        (digest,) = {e["digest"] for e in agreed.values()}
        for i, name in enumerate(NAMES, start=1):
            daemon = daemons[name]
            assert daemon.started["host"] == host_of(i)
            installed = await daemon.wait_event(
                "view_installed", lambda e: e["digest"] == digest, timeout=1
            )
            # The view holds the link weights: every configured edge, weight 1, both ends up.
            assert [edge[:3] for edge in installed["edges"]] == [
                [1, 2, 1.0],
                [1, 4, 1.0],
                [2, 3, 1.0],
                [3, 4, 1.0],
            ]
            assert installed["tree"]["source"] == i
            assert installed["tree"]["depth"] == 2  # the far side of a ring of four
            up = {e["neighbour"] for e in daemon.named("neighbour_up")}
            assert up == {e["node"] for e in daemon.started["neighbours"]}
            assert len(up) == 2
        emulated = [n for n in daemons["d2"].started["neighbours"] if n["emulated"]]
        assert [n["name"] for n in emulated] == ["d3"]


@pytest.mark.asyncio
async def test_probes_reach_every_daemon_over_the_source_trees(tmp_path: Path) -> None:
    config = write_cluster(tmp_path, 4, ring(4), emulated=[(2, 3)])
    async with running_daemons(config, NAMES, *PROBE_ARGS) as daemons:
        agreed = await wait_agreed(daemons.values(), ALL, VIEW_TIMEOUT, edges=4)
        longest = await check_probes_follow_the_trees(daemons, ALL, agreed)
        assert longest == 2  # the opposite corner is reached through a forwarding daemon


@pytest.mark.asyncio
async def test_sigkilled_daemon_is_excluded_within_the_failure_timeout(tmp_path: Path) -> None:
    config = write_cluster(tmp_path, 4, ring(4))
    async with running_daemons(config, NAMES, *PROBE_ARGS) as daemons:
        await wait_agreed(daemons.values(), ALL, VIEW_TIMEOUT, edges=4)
        victim = daemons["d2"]
        survivors = [daemons[n] for n in ("d1", "d3", "d4")]
        before = marks(survivors)

        killed_at = victim.send_signal(signal.SIGKILL)
        assert await victim.wait_exit(10) == -signal.SIGKILL

        for daemon in survivors:
            view = await daemon.wait_event(
                "view_installed",
                lambda e: members(e) == {1, 3, 4},
                timeout=EXCLUSION_BOUND + SLACK + 5,
                after=before[daemon.name],
            )
            assert float(view["ts"]) - killed_at <= EXCLUSION_BOUND + SLACK, view
        for name in ("d1", "d3"):  # the neighbours of d2 saw its link go silent
            down = await daemons[name].wait_event(
                "neighbour_down", lambda e: e["neighbour"] == 2, timeout=1, after=before[name]
            )
            assert "no packet" in down["reason"]
            assert float(down["ts"]) - killed_at <= FAILURE_TIMEOUT + SLACK

        agreed = await wait_agreed(survivors, {1, 3, 4}, VIEW_TIMEOUT, after=before)
        alive = {d.name: d for d in survivors}
        longest = await check_probes_follow_the_trees(alive, {1, 3, 4}, agreed)
        assert longest == 2  # d1 and d3 now reach each other only through d4
        for daemon in survivors:
            late = [e for e in daemon.named("probe_received") if e["source"] == 2]
            assert all(sent_at(e) < killed_at for e in late)


@pytest.mark.asyncio
async def test_sigterm_drains_logs_and_exits_zero(tmp_path: Path) -> None:
    config = write_cluster(tmp_path, 3, ring(3))
    async with running_daemons(config, ["d1", "d2", "d3"], *PROBE_ARGS) as daemons:
        await wait_agreed(daemons.values(), {1, 2, 3}, VIEW_TIMEOUT, edges=3)
        leaving = daemons["d3"]
        await daemons["d1"].wait_event("probe_received", lambda e: e["source"] == 3, timeout=10)
        before = marks(daemons.values())
        leaving.send_signal(signal.SIGTERM)
        assert await leaving.wait_exit(10) == 0
        stopping = leaving.named("daemon_stopping")
        stopped = leaving.named("daemon_stopped")
        assert [e["reason"] for e in stopping] == ["SIGTERM"]
        assert stopping[0]["view_members"] == [1, 2, 3]  # the view it leaves
        assert len(stopped) == 1
        assert stopped[0]["drained"] is True
        assert stopped[0]["drain_seconds"] <= 2.0
        stats = stopped[0]["stats"]
        assert stats["internal_errors"] == 0
        assert stats["unknown_effects"] == 0  # every effect of a real run has its case
        assert stats["daemon"]["probes_sent"] > 0
        # After draining, the others may already have dropped it (CI saw [3]).
        assert stats["view_members"] in ([1, 2, 3], [3])
        assert leaving.events[-1]["event"] == "daemon_stopped"
        assert leaving.other_lines == []  # nothing but JSON lines on stderr

        await wait_agreed([daemons["d1"], daemons["d2"]], {1, 2}, VIEW_TIMEOUT, after=before)
        for name in ("d1", "d2"):
            daemon = daemons[name]
            daemon.send_signal(signal.SIGINT if name == "d1" else signal.SIGTERM)
            assert await daemon.wait_exit(10) == 0
            assert daemon.named("daemon_stopped")[0]["stats"]["internal_errors"] == 0


async def run_command(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(30):
            _, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stderr.decode()


@pytest.mark.parametrize(
    ("mistake", "name", "expected"),
    [
        ("port", "d1", "daemons[1].port"),
        ("unknown name", "d9", "unknown daemon 'd9'"),
        ("missing file", "d1", "cannot read the file"),
        ("typo", "d1", "membership"),
    ],
)
@pytest.mark.asyncio
async def test_bad_configuration_exits_2_naming_the_field(
    tmp_path: Path, mistake: str, name: str, expected: str
) -> None:
    ports = free_udp_ports([host_of(1), host_of(2)])
    if mistake == "port":
        ports[1] = 70000
    text = cluster_toml(2, [(1, 2)], ports)
    if mistake == "typo":
        text = text.replace("failure_timeout", "failure_timout")
    path = tmp_path / ("absent.toml" if mistake == "missing file" else "cluster.toml")
    if mistake != "missing file":
        write_key(tmp_path)
        path.write_text(text, encoding="utf-8")

    code, stderr = await run_command(*DAEMON_COMMAND, "--config", str(path), "--name", name)

    assert code == 2, stderr
    assert expected in stderr
    assert str(path) in stderr or mistake == "unknown name"


@pytest.mark.asyncio
async def test_daemon_whose_port_is_taken_exits_1(tmp_path: Path) -> None:
    config = write_cluster(tmp_path, 2, [(1, 2)])
    async with running_daemons(config, ["d1"]):
        code, stderr = await run_command(*DAEMON_COMMAND, "--config", str(config), "--name", "d1")
    assert code == 1
    (failed,) = [line for line in stderr.splitlines() if '"daemon_failed"' in line]
    assert "Address already in use" in failed


@pytest.mark.asyncio
async def test_restarted_daemon_rejoins_the_view(tmp_path: Path) -> None:
    config = write_cluster(tmp_path, 4, ring(4))
    async with running_daemons(config, NAMES, *PROBE_ARGS) as daemons:
        first = await wait_agreed(daemons.values(), ALL, VIEW_TIMEOUT, edges=4)
        old = daemons["d3"]
        survivors = [daemons[n] for n in ("d1", "d2", "d4")]
        before = marks(survivors)
        old.send_signal(signal.SIGKILL)
        assert await old.wait_exit(10) == -signal.SIGKILL
        # Restart only once the others have excluded it (a restart within the failure
        # timeout shows up as "peer restarted" on its neighbours, with no view change).
        await wait_agreed(survivors, {1, 2, 4}, VIEW_TIMEOUT, after=before)
        before = marks(survivors)

        new = await DaemonProcess.start(config, "d3", *PROBE_ARGS)
        daemons["d3"] = new  # stopped by running_daemons from here on
        assert new.started["incarnation"] > old.started["incarnation"]
        assert new.started["port"] == old.started["port"]

        again = await wait_agreed(survivors, ALL, VIEW_TIMEOUT, edges=4, after=before)
        again |= await wait_agreed([new], ALL, VIEW_TIMEOUT, edges=4)
        # The same members and links give the same view as before the crash.
        # One agreed view again, with the same members — but a new digest: the restarted
        # daemon is a new incarnation, so the view is a new one.
        digests = {e["digest"] for e in again.values()}
        assert len(digests) == 1
        assert digests != {first["d1"]["digest"]}
        for name in ("d2", "d4"):
            await daemons[name].wait_event(
                "neighbour_up", lambda e: e["neighbour"] == 3, timeout=1, after=before[name]
            )
        await check_probes_follow_the_trees(daemons, ALL, again)


@pytest.mark.asyncio
async def test_partition_forms_a_view_on_each_side_and_heals_into_one(tmp_path: Path) -> None:
    # d1 - d2 - d3 - d4 - d5: freezing d3 (SIGSTOP) cuts the overlay in two.
    names = ["d1", "d2", "d3", "d4", "d5"]
    config = write_cluster(tmp_path, 5, [(1, 2), (2, 3), (3, 4), (4, 5)])
    async with running_daemons(config, names, *PROBE_ARGS) as daemons:
        everyone = set(range(1, 6))
        await wait_agreed(daemons.values(), everyone, VIEW_TIMEOUT, edges=4)
        bridge = daemons["d3"]
        left = {n: daemons[n] for n in ("d1", "d2")}
        right = {n: daemons[n] for n in ("d4", "d5")}
        before = marks(daemons.values())

        bridge.send_signal(signal.SIGSTOP)
        try:
            sides = await asyncio.gather(
                wait_agreed(left.values(), {1, 2}, VIEW_TIMEOUT, after=before),
                wait_agreed(right.values(), {4, 5}, VIEW_TIMEOUT, after=before),
            )
            # Both sides go on: probes flow inside each of them.
            await check_probes_follow_the_trees(left, {1, 2}, sides[0])
            await check_probes_follow_the_trees(right, {4, 5}, sides[1])
        finally:
            bridge.send_signal(signal.SIGCONT)

        # On waking, d3 learns that its links broke: either it finds them silent (and is
        # alone for a moment) or it first hears its neighbours' new links ("peer restarted").
        await bridge.wait_event("neighbour_down", timeout=VIEW_TIMEOUT, after=before["d3"])
        others = [d for d in daemons.values() if d is not bridge]
        healed = await wait_agreed(others, everyone, VIEW_TIMEOUT, edges=4, after=before)
        (digest,) = {e["digest"] for e in healed.values()}
        longest = await check_probes_follow_the_trees(daemons, everyone, healed)
        assert longest == 4  # d1 to d5 across the whole line
        # d3 may not have left the full view at all (then it logs no new view): either
        # way it now holds the healed one.
        assert bridge.named("view_agreed")[-1]["digest"] == digest


async def wait_until(condition: Callable[[], bool], timeout: float) -> None:  # noqa: ASYNC109 - every wait is bounded
    """Poll `condition` (the daemon object offers no event to wait on; bounded by `timeout`)."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - nothing to wait on but the condition
            await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_datagrams_from_unknown_addresses_are_counted_and_dropped(tmp_path: Path) -> None:
    # In one process: the daemon object itself, next to a run_daemon stopped by an event.
    config = load_config(write_cluster(tmp_path, 2, [(1, 2)]))
    stop = asyncio.Event()
    one = await OverlayDaemon.open(config, "d1")
    try:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(one.serve(stop))
            other = tasks.create_task(run_daemon(config, "d2", stop=stop))
            try:
                await wait_until(
                    lambda: (
                        one.node.overlay.view is not None
                        and len(one.node.overlay.view.members) == 2
                    ),
                    10,
                )
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
                    stranger.bind((host_of(1), 0))
                    stranger.sendto(b"not meshcast", one.address)
                    stranger.sendto(bytes(64), one.address)
                    await wait_until(lambda: one.statistics().foreign_dropped == 2, 10)
            finally:
                stop.set()
        assert other.result() == 0
    finally:
        await one.aclose()
    stats = one.statistics()
    assert (stats.internal_errors, stats.unknown_effects) == (0, 0)
    assert stats.view_members == (1, 2)
    assert stats.links[NodeId(2)].malformed_dropped == 0
