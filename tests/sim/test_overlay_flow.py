"""Seeded overlay flow control: a source is paced at its tree's bottleneck rate, and the
end-to-end window makes a slow destination slow the group instead of growing memory.

Invariants: docs/design/overlay-tests.md. MESHCAST_SIM_SEEDS raises the number of seeds.
Rates here are virtual-time behaviour of the protocol, not the speed of this machine.
"""

from __future__ import annotations

import itertools
import os

import pytest

from meshcast.errors import BufferFull
from meshcast.ids import NodeId
from meshcast.overlay.node import NeighbourChanged, ViewInstalled
from meshcast.overlay.routing import Tree
from meshcast.sim.network import LinkModel
from meshcast.sim.overlay import OverlayEdge, full_mesh
from meshcast.wire import HEADER_SIZE, UDP_IP_OVERHEAD, WHOLE_HEAD
from meshcast.wire.overlay import DATA_HEAD, DEST
from tests.sim.overlay_invariants import (
    LIFE_TIME,
    OverlayHarness,
    check_exactly_once,
    edge,
)

SEEDS = int(os.environ.get("MESHCAST_SIM_SEEDS", "8"))
FLOW_SEEDS = max(SEEDS // 4, 2)

SIZE = 1024  # bytes of payload per message
STATE_BLOCK = 22  # a piggybacked Hop ACK (wire.packet.STATE_BLOCK)
SOURCE = NodeId(1)

# (policy, edges, upload_bps, expected tree rate)
PACED = {
    # Fanout from 1 to its 4 neighbours: 4 Mbit/s upload shared by 4 copies.
    "fanout": ("fanout", full_mesh(5, bandwidth_bps=20e6), {1: 4e6}, 1e6),
    # Shortest path over a tree: daemon 2 forwards to 3 and 4 with 3 Mbit/s upload.
    "shortest-path": (
        "shortest-path",
        [
            OverlayEdge(1, 2, bandwidth_bps=10e6),
            OverlayEdge(2, 3, bandwidth_bps=10e6),
            OverlayEdge(2, 4, bandwidth_bps=10e6),
            OverlayEdge(4, 5, bandwidth_bps=10e6),
        ],
        {2: 3e6},
        1.5e6,
    ),
}


def keep_fed(h: OverlayHarness, source: NodeId, until: float, period: float = 0.01) -> None:
    """An application that always has a message ready: it tops the outbox up until full."""

    def feed() -> None:
        while h.multicast(source, h.nodes, SIZE) is not None:
            pass
        if h.now + period < until:
            h.sim.call_later(period, feed)

    h.sim.call_at(h.now, feed)


def sample_pipes(
    h: OverlayHarness, kids: tuple[NodeId, ...], start: float, stop: float, step: float
) -> list[tuple[float, dict[NodeId, tuple[int, int]]]]:
    """(time, {kid: (datagrams delivered, bytes delivered)}) on the source's pipes."""
    samples = []
    t = start
    while t <= stop + 1e-9:
        h.run(t)
        stats = {k: h.sim.pipe_stats(SOURCE, k) for k in kids}
        samples.append((t, {k: (s.delivered, s.bytes_delivered) for k, s in stats.items()}))
        t += step
    return samples


def source_tree(h: OverlayHarness) -> Tree:
    tree = h.overlay(SOURCE).routing.tree(SOURCE)
    assert tree is not None
    return tree


@pytest.mark.parametrize("seed", range(FLOW_SEEDS))
@pytest.mark.parametrize("case", sorted(PACED))
def test_source_is_paced_at_its_tree_rate(case: str, seed: int) -> None:
    """Over every 1 s window, what the source puts on each of its links carries messages at
    no more than the tree's bottleneck rate (charged as payload + UDP/IP, as the pacer does);
    and the source is not held below it either."""
    policy, edges, upload, expected_rate = PACED[case]
    h = OverlayHarness(edges, seed=seed, policy=policy, upload_bps=upload, max_outbox_messages=32)
    h.run(2.0)
    tree = source_tree(h)
    assert tree.rate_bps == expected_rate
    kids = tree.children[SOURCE]
    keep_fed(h, SOURCE, until=9.0)
    # Each DATA datagram on a source link: Hop header, maybe a piggybacked ACK, fragment
    # head, overlay DATA head and destination list, payload. The pacer charges payload + 28.
    most_dests = len(h.nodes) - 1
    wire_per_message = (
        HEADER_SIZE + STATE_BLOCK + WHOLE_HEAD.size + DATA_HEAD.size + most_dests * DEST.size + SIZE
    )
    charged_per_message = SIZE + UDP_IP_OVERHEAD
    samples = sample_pipes(h, kids, 3.0, 9.0, 0.25)
    window = 4  # samples: 1 s
    for (t0, before), (t1, after) in zip(samples, samples[window:], strict=False):
        for kid in kids:
            sent_bytes = after[kid][1] - before[kid][1]
            # What the pacer allows in the window, in messages, then in pipe bytes.
            allowed_messages = expected_rate * (t1 - t0) / 8 / charged_per_message + 1
            control = 2_000 * (t1 - t0)  # heartbeats, ACKs of feedback: a few per 100 ms
            assert sent_bytes <= allowed_messages * wire_per_message + control, (
                f"seed={seed}: {SOURCE}->{kid} carried {sent_bytes} B in [{t0}, {t1}] "
                f"at tree rate {expected_rate}"
            )
    (t0, first), (t1, last) = samples[0], samples[-1]
    for kid in kids:
        messages = (last[kid][0] - first[kid][0]) * 0.95  # allow for control datagrams
        achieved = messages * charged_per_message * 8 / (t1 - t0)
        assert achieved >= 0.85 * expected_rate, (
            f"seed={seed}: {SOURCE}->{kid} only {achieved:.0f} bit/s of {expected_rate}"
        )
    h.run(9.0 + LIFE_TIME)
    check_exactly_once(h, min_required=100)


@pytest.mark.parametrize("size", [64, SIZE])
def test_source_wire_rate_never_exceeds_tree_rate(size: int) -> None:
    """The bottleneck rate is a wire rate (link bandwidths count every header, UDP/IP
    included): over every 1 s window each source link carries at most rate_bps of it."""
    policy, edges, upload, expected_rate = PACED["fanout"]
    h = OverlayHarness(edges, seed=1, policy=policy, upload_bps=upload, max_outbox_messages=32)
    h.run(2.0)
    kids = source_tree(h).children[SOURCE]

    def feed() -> None:
        while h.multicast(SOURCE, h.nodes, size) is not None:
            pass
        if h.now < 8.0:
            h.sim.call_later(0.01, feed)

    h.sim.call_at(h.now, feed)
    samples = sample_pipes(h, kids, 3.0, 8.0, 1.0)
    for (t0, before), (t1, after) in itertools.pairwise(samples):
        for kid in kids:
            datagrams = after[kid][0] - before[kid][0]
            wire_bits = (after[kid][1] - before[kid][1] + datagrams * UDP_IP_OVERHEAD) * 8
            assert wire_bits <= expected_rate * (t1 - t0) + 1500 * 8, (
                f"{SOURCE}->{kid}: {wire_bits / (t1 - t0):.0f} bit/s on the wire in "
                f"[{t0}, {t1}], tree rate {expected_rate:.0f}"
            )


def slow_star(seed: int, window: int) -> OverlayHarness:
    """Source 1 with four neighbours; the link to 5 is 1 Mbit/s but advertised as 100."""
    edges = [OverlayEdge(1, n, delay=0.005) for n in (2, 3, 4, 5)]
    slow = LinkModel(delay=0.005, bandwidth_bps=1e6)
    return OverlayHarness(
        edges,
        seed=seed,
        physical={edge(1, 5): slow},
        window_messages=window,
        max_outbox_messages=32,
    )


@pytest.mark.parametrize("seed", range(FLOW_SEEDS))
def test_slow_destination_slows_the_group_with_bounded_memory(seed: int) -> None:
    """Daemon 5 drains at 1 Mbit/s though its link claims 100: the window holds the source
    to what 5 absorbs, so the fast destinations never lead 5 by a window, the source's
    link buffers stay within a window, and nothing is dropped by the slow pipe's queue."""
    window = 100
    slow, fast = NodeId(5), (NodeId(2), NodeId(3), NodeId(4))
    h = slow_star(seed, window)
    h.run(2.0)
    keep_fed(h, SOURCE, until=10.0)
    wire_message = SIZE + 100  # payload with every header
    t = 2.0
    while t <= 10.0:
        h.run(t)
        counts = dict.fromkeys(h.nodes, 0)
        for d in h.deliveries:
            counts[d.node] += 1
        lead = max(counts[f] for f in fast) - counts[slow]
        assert lead < window, f"seed={seed} t={t:.1f}: fast daemons lead by {lead}"
        link = h.overlay(SOURCE).endpoint.link(slow).statistics()
        assert link.queued_bytes + link.unacked_packets * wire_message <= 2 * window * (
            wire_message
        ), f"seed={seed} t={t:.1f}: link to {slow} buffers {link}"
        t += 0.1
    pipe = h.sim.pipe_stats(SOURCE, slow)
    assert pipe.dropped_queue == 0
    assert pipe.max_queue_bytes <= window * (wire_message + UDP_IP_OVERHEAD)
    # The group moves at the slow daemon's pace: not faster, and not stalled.
    for n in fast:
        rate = counts[n] * SIZE * 8 / 8.0
        assert 0.6e6 <= rate <= 1e6, f"seed={seed}: daemon {n} got {rate:.0f} bit/s"
    h.run(10.0 + 3.0)
    check_exactly_once(h, min_required=600 * 4)


def test_full_outbox_raises_buffer_full_and_drains() -> None:
    """Window 10, outbox 32: ten messages leave at once, 32 wait, the next raises
    BufferFull; once the slow destination catches up the outbox drains and all arrive."""
    window, outbox = 10, 32
    h = slow_star(1, window)
    h.run(2.0)
    accepted = 0
    while h.multicast(SOURCE, h.nodes, SIZE) is not None:
        accepted += 1
    assert accepted == window + outbox
    node = h.overlay(SOURCE)
    assert not node.can_multicast()
    with pytest.raises(BufferFull):
        h.sim.act(SOURCE, lambda n, now: n.multicast([NodeId(2)], b"refused", now))
    h.run(2.0 + 3.0)
    assert node.can_multicast()
    assert check_exactly_once(h, min_required=accepted * 5) == accepted * 5


def test_quick_restart_of_a_destination_does_not_stall_the_source() -> None:
    h = OverlayHarness(full_mesh(3), seed=1, window_messages=50)
    h.run(2.0)
    h.stream([SOURCE], 2.0, 10.0, 0.01)
    h.run(4.0)  # 200 messages delivered everywhere: more than a window
    h.crash(NodeId(2))
    h.run(4.1)
    h.restart(NodeId(2))
    h.run(10.0 + LIFE_TIME)
    late = [d for d in h.deliveries if d.node == NodeId(3) and d.at > 6.0]
    assert late, "daemon 3, never down, received nothing after daemon 2's restart"
    check_exactly_once(h, min_required=1)


@pytest.mark.parametrize("outage", ["back-at-once", "long"])
def test_messages_lost_with_a_failed_link_do_not_hold_the_window(outage: str) -> None:
    """The link 1-2 is cut while the source streams to all: the window's worth of
    messages it held for daemon 2 die with it (a failed link drops its buffers), so 2
    never delivers them. The window must stop counting them, or it stays closed for good:
    nothing newer could reach 2 to show they are gone.

    back-at-once: the pipe is back the moment 1 sees the link fail; a fresh link comes up
    within `view_settle_interval`, so no view changes (the case no new view can repair).
    long: the pipe is back after a second; 2 is reached through 3 meanwhile (two views)."""
    h = OverlayHarness(full_mesh(3), seed=1, window_messages=50)
    views: list[float] = []
    cut_at = 4.0

    def watch(node: NodeId, effect: object, now: float) -> None:
        if now >= cut_at and isinstance(effect, ViewInstalled):
            views.append(now)
        if (
            outage == "back-at-once"
            and node == SOURCE
            and isinstance(effect, NeighbourChanged)
            and effect.neighbour == NodeId(2)
            and not effect.up
        ):
            h.sim.call_at(now, lambda: h.restore(NodeId(1), NodeId(2)))

    h.sim.observe(watch)
    h.run(2.0)
    h.stream([SOURCE], 2.0, 10.0, 0.01)
    h.run(cut_at)
    h.cut(NodeId(1), NodeId(2))
    if outage == "long":
        h.run(cut_at + 1.0)  # the link failed (5 silent heartbeat rounds of 0.1 s)
        h.restore(NodeId(1), NodeId(2))
    h.run(10.0 + LIFE_TIME)
    if outage == "back-at-once":
        assert not views, f"views installed at {views}: not the case under test"
    else:
        assert len(views) >= 2
    for node in h.nodes:
        late = [d for d in h.deliveries if d.node == node and d.at > 7.0]
        assert len(late) > 250, f"daemon {node} delivered {len(late)} messages after 7 s"
    # Quiet again: the whole window is free, none of it held by the lost messages.
    assert {d: len(q) for d, q in h.overlay(SOURCE)._in_flight.items() if q} == {}
    check_exactly_once(h, min_required=1)
