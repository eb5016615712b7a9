"""What a flush costs on the wire (docs/design/group.md, "Flush costs").

Four whole daemons (`DaemonNode`), a full mesh of slow links (the FLUSH takes several
retry intervals to get through), one client per daemon in group "g" sending 1 KiB AGREED
messages; one daemon crashes while its messages and everybody's ACKs are still in
flight. The survivors' flush must move about what is unstable: the FLUSH bytes each
survivor sends stay within a small multiple of the AGREED data sent in the old view per
destination, no FLUSH part is sent again (each crossed each link once), and the
survivors' clients still get the same messages in one order.

The engine suite read the FLUSH payloads off the overlay; inside a daemon they are not
observable, so the bounds are read from the engine's counters (`flush_bytes_sent`,
`flush_parts_resent`), which count what it handed to the overlay per destination.
"""

from __future__ import annotations

from functools import partial

import pytest

from meshcast.daemon import DaemonEvent
from meshcast.ids import NodeId
from meshcast.sim.daemon import GroupClients, GroupLink, build_daemon_sim
from meshcast.sim.network import LinkModel
from meshcast.wire.client import ServiceLevel as S

NODES = [NodeId(i) for i in (1, 2, 3, 4)]
SURVIVORS = NODES[:3]
SIZE = 1024  # bytes of payload per message
PER_NODE = 150  # AGREED messages each daemon's client sends
CONNECT = 0.5  # s: the clients connect and join
SETTLE = 1.5  # s: the first view is installed and the joins applied everywhere by then
CRASH_AT = SETTLE + 0.05  # s: while the burst is still on the links
END = SETTLE + 6.0  # s: detection (0.5 s), the flush and the deliveries are over by then


@pytest.mark.parametrize("seed", range(3))
def test_a_flush_moves_about_the_unstable_data_once(seed: int) -> None:
    slow = LinkModel(delay=0.002, jitter=0.001, bandwidth_bps=8e6, queue_bytes=4 << 20)
    links = [GroupLink(a, b, slow) for a in range(1, 5) for b in range(a + 1, 5)]
    dsim = build_daemon_sim(links, seed=seed)
    sim = dsim.sim
    group = GroupClients(dsim, {"g": NODES})
    sim.call_at(CONNECT, group.connect_all)
    sim.run(until=SETTLE)
    for n in NODES:
        assert {m for m, _ in dsim.node(n).sessions.membership.table()["g"]} == {
            f"#c{d}#d{d}" for d in NODES
        }
    for k in range(PER_NODE):
        for n in NODES:
            sim.call_at(SETTLE + k * 0.0002, partial(group.send, n, S.AGREED, ("g",), SIZE - 8))
    sim.call_at(CRASH_AT, partial(sim.crash, NODES[3]))
    sim.run(until=CRASH_AT)
    start_views = {n: _views(dsim.events, n) for n in NODES}
    sim.run(until=END)

    # the flush happened and completed: one more view at every survivor, same deliveries
    for n in SURVIVORS:
        assert _views(dsim.events, n) > start_views[n], f"{n} installed no view after the crash"
        assert not dsim.node(n).engine.flushing
    assert not group.refused
    delivered = {n: group.delivered(group.process(n)) for n in SURVIVORS}
    first = delivered[SURVIVORS[0]]
    assert all(delivered[n] == first for n in SURVIVORS)
    assert len(first) >= 3 * PER_NODE  # every survivor's own messages at least

    # no FLUSH part was sent twice, and no survivor sent more than twice the AGREED data
    # of the whole run to each other survivor (before: every copy again every 250 ms)
    data = 4 * PER_NODE * SIZE
    stats = {n: dsim.node(n).engine.statistics() for n in SURVIVORS}
    assert sum(s.flush_messages_sent for s in stats.values()) > 0
    for n, s in stats.items():
        assert s.flush_parts_resent == 0, (n, s)
        bound = 2 * data * (len(SURVIVORS) - 1)
        assert s.flush_bytes_sent <= bound, f"{n}: {s.flush_bytes_sent} FLUSH bytes for {data}"


def _views(events: list[tuple[NodeId, float, DaemonEvent]], node: NodeId) -> int:
    return sum(1 for n, _, e in events if n == node and e.name == "group_view")
