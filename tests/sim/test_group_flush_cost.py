"""What a flush costs on the wire (docs/design/group.md, "Flush costs").

Four group daemons, a full mesh of slow links (the FLUSH takes several retry intervals
to get through), every daemon sending 1 KiB AGREED messages; one crashes while its
messages and everybody's ACKs are still in flight. The survivors' flush must move about
what is unstable: the FLUSH bytes on every link stay within a small multiple of the
AGREED data sent in the old view, no FLUSH part is sent twice while the first is still
on its way, and the survivors still deliver the same messages in one order.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from functools import partial

import pytest

from meshcast.group import Deliver, OrderingReset
from meshcast.ids import NodeId
from meshcast.overlay.node import OverlayDelivered
from meshcast.sim.group import GroupDaemon, GroupLink, build_group_sim
from meshcast.sim.network import LinkModel
from meshcast.wire.client import ServiceLevel as S
from meshcast.wire.group import GroupFlush, decode_group

NODES = [NodeId(i) for i in (1, 2, 3, 4)]
SURVIVORS = NODES[:3]
SIZE = 1024  # bytes of payload per message
PER_NODE = 150  # AGREED messages each daemon sends
SETTLE = 1.5  # s: the first view is installed everywhere by then
CRASH_AT = SETTLE + 0.05  # s: while the burst is still on the links
END = SETTLE + 6.0  # s: detection (0.5 s), the flush and the deliveries are over by then
HID = struct.Struct("!Q")


@pytest.mark.parametrize("seed", range(3))
def test_a_flush_moves_about_the_unstable_data_once(seed: int) -> None:
    slow = LinkModel(delay=0.002, jitter=0.001, bandwidth_bps=8e6, queue_bytes=4 << 20)
    links = [GroupLink(a, b, slow) for a in range(1, 5) for b in range(a + 1, 5)]
    sim = build_group_sim(links, {"g": NODES}, seed=seed)
    flush_bytes: dict[tuple[NodeId, NodeId], int] = defaultdict(int)
    flush_parts: dict[tuple[NodeId, NodeId, int, int], int] = defaultdict(int)
    delivered: dict[NodeId, list[int]] = defaultdict(list)
    views: dict[NodeId, int] = defaultdict(int)

    def observe(node: NodeId, effect: object, now: float) -> None:
        if isinstance(effect, OverlayDelivered):
            message = decode_group(effect.payload)
            if isinstance(message, GroupFlush):
                flush_bytes[effect.source, node] += len(effect.payload)
                if not message.retry:
                    flush_parts[effect.source, node, message.round, message.part] += 1
        elif isinstance(effect, Deliver):
            delivered[node].append(HID.unpack_from(effect.payload)[0])
        elif isinstance(effect, OrderingReset):
            views[node] += 1

    sim.observe(observe)
    sim.run(until=SETTLE)
    sent = 0
    for k in range(PER_NODE):
        for n in NODES:
            hid = sent = sent + 1
            payload = HID.pack(hid) + bytes(SIZE - HID.size)
            at = SETTLE + k * 0.0002

            def submit(n: NodeId = n, payload: bytes = payload) -> None:
                if sim.is_alive(n):
                    sim.act(n, lambda d, now: d.submit(("g",), payload, S.AGREED, "#c", now))

            sim.call_at(at, submit)
    sim.call_at(CRASH_AT, partial(sim.crash, NODES[3]))
    start_views = dict(views)
    sim.run(until=END)

    # the flush happened and completed: one more view at every survivor, same deliveries
    for n in SURVIVORS:
        assert views[n] > start_views[n], f"{n} installed no view after the crash"
        assert not sim.node_as(n, GroupDaemon).engine.flushing
    first = delivered[SURVIVORS[0]]
    assert all(delivered[n] == first for n in SURVIVORS)
    assert len(first) >= 3 * PER_NODE  # every survivor's own messages at least

    # each FLUSH part crossed each link once, and no link carried more than twice the
    # AGREED data of the whole run (before: every copy again every 250 ms)
    assert flush_parts
    assert max(flush_parts.values()) == 1, flush_parts
    data = 4 * PER_NODE * SIZE
    for (src, dst), size in flush_bytes.items():
        if src in SURVIVORS and dst in SURVIVORS:
            assert size <= 2 * data, f"{src}->{dst}: {size} FLUSH bytes for {data} of data"
    for n in SURVIVORS:
        stats = sim.node_as(n, GroupDaemon).engine.statistics()
        assert stats.flush_parts_resent == 0
