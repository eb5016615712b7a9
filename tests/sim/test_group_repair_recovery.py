"""A link that fails under load, without a view change: what the overlay lost with it is
repaired at the pace the destination acknowledges the repairs, not a batch per stall
(`meshcast.group.repair`, "recovering")."""

from __future__ import annotations

from meshcast.ids import NodeId
from meshcast.sim.daemon import MESSAGE_ID, GroupClients, GroupLink, build_daemon_sim
from meshcast.sim.network import LinkModel
from meshcast.wire.client import Multicast, encode
from meshcast.wire.client import ServiceLevel as S

NODES = [NodeId(i) for i in (1, 2, 3)]
BURSTS, PER_BURST, EVERY = 60, 100, 0.05  # 6,000 AGREED messages in 3 s from daemon 1
FIRST_ID = 10_000
CUT_AT = 1.5  # s: the link 1-3 fails for good (daemon 3 is still reached through 2)


def test_what_a_failed_link_lost_is_repaired_at_ack_pace() -> None:
    link = LinkModel(delay=0.001, bandwidth_bps=100e6)
    dsim = build_daemon_sim([GroupLink(a, b, link) for a, b in ((1, 2), (1, 3), (2, 3))], seed=1)
    group = GroupClients(dsim, {"g": NODES})
    dsim.sim.call_at(0.5, group.connect_all)
    dsim.sim.run(until=CUT_AT)
    sender = group.clients[NODES[0]]
    dsim.sim.set_link_up(NodeId(1), NodeId(3), False)
    sent = 0

    def burst() -> None:
        nonlocal sent
        frames = [
            encode(Multicast(("g",), MESSAGE_ID.pack(FIRST_ID + sent + i) + bytes(200), S.AGREED))
            for i in range(PER_BURST)
        ]
        sent += PER_BURST
        sender.send_raw(b"".join(frames))

    for i in range(BURSTS):
        dsim.sim.call_at(CUT_AT + i * EVERY, burst)
    # repair_after (1 s) after the stall, the repairs start; with one batch of
    # max_repairs_per_look (256) per stall of repair_after, the ~1,000 lost copies took
    # until 10 s here
    dsim.sim.run(until=6.0)
    ids = list(range(FIRST_ID, FIRST_ID + BURSTS * PER_BURST))
    for n in NODES:
        got = [i for i in group.delivered(group.process(n)) if i >= FIRST_ID]
        assert got == ids, f"daemon {n}'s client has {len(got)} of {len(ids)}"
    repairs = dsim.node(NODES[0]).engine.statistics().repairs_sent
    assert 0 < repairs < 2 * len(ids) // 5  # only what was lost, not everything again
