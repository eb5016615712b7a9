"""Group messages a daemon sends in one turn travel as one overlay message (a group
BATCH, `meshcast.wire.group`), and still arrive in order, once, everywhere."""

from __future__ import annotations

import pytest

from meshcast.ids import NodeId
from meshcast.sim.daemon import MESSAGE_ID, GroupClients, GroupLink, build_daemon_sim
from meshcast.sim.network import LinkModel
from meshcast.wire.client import Multicast, encode
from meshcast.wire.client import ServiceLevel as S

NODES = [NodeId(i) for i in (1, 2, 3)]
BURST = 50  # messages the client of daemon 1 writes at once
FIRST_ID = 10_000  # message ids of the burst (GroupClients numbers its own from 1)


@pytest.mark.parametrize("service", [S.RELIABLE, S.FIFO, S.AGREED, S.SAFE])
def test_a_burst_goes_out_in_few_overlay_messages_and_arrives_in_order(service: S) -> None:
    link = LinkModel(delay=0.001, bandwidth_bps=100e6)
    dsim = build_daemon_sim([GroupLink(a, b, link) for a, b in ((1, 2), (1, 3), (2, 3))], seed=1)
    group = GroupClients(dsim, {"g": NODES})
    dsim.sim.call_at(0.5, group.connect_all)
    dsim.sim.run(until=1.5)
    sender = group.clients[NODES[0]]
    before = dsim.node(NODES[0]).overlay.statistics().data_originated
    burst = [
        encode(Multicast(("g",), MESSAGE_ID.pack(FIRST_ID + k) + bytes(200), service))
        for k in range(BURST)
    ]
    sender.send_raw(b"".join(burst))  # one read of the daemon: one input
    dsim.sim.run(until=3.0)

    ids = list(range(FIRST_ID, FIRST_ID + BURST))
    for n in NODES:
        got = [i for i in group.delivered(group.process(n)) if i >= FIRST_ID]
        assert got == ids, f"daemon {n}'s client"
    sent = dsim.node(NODES[0]).overlay.statistics().data_originated - before
    # 64 frames a turn: one batch, plus the ACKs and NULLs of those 1.5 s (without
    # batching: one overlay message per group message, 50 to 53)
    assert sent < BURST // 2, f"{sent} overlay messages for {BURST} group messages"
