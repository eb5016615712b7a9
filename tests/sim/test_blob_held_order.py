"""The agreed completion event in the simulator: whole daemons (`DaemonNode`) with
simulated clients. A daemon with no member of group G sends a BLOB_HELD event into G
(the end of a replication to G, fed as its final report) while G's members send AGREED
and SAFE messages; every member of protocol version 6 gets the event exactly once, and
every member sees it at the same place in G's total order. A version-5 member gets the
same messages without it. With a daemon crashing just after the event is sent, the
survivors still agree (virtual synchrony: a SAFE message of a surviving sender reaches
every survivor, at one place in their order).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence
from functools import partial

import pytest

from meshcast.daemon import DaemonNode
from meshcast.ids import NodeId
from meshcast.replicate.engine import RecipientReport, ReplicationReport, ReplicationUpdate
from meshcast.sim.daemon import DaemonSim, GroupLink, SimClient, build_daemon_sim
from meshcast.sim.network import LinkModel
from meshcast.wire.client import BlobHeld, BlobMissing, Join, Message, Multicast
from meshcast.wire.client import ServiceLevel as S

pytestmark = pytest.mark.timeout(300)

HID = struct.Struct("!Q")
GROUP = "G"
RID = 0xABCDEF
D1, D2, D3 = NodeId(1), NodeId(2), NodeId(3)
SETTLE = 1.5  # s: views and joins done
WORKLOAD = (2.0, 3.0)  # s: sends, and the event
END = 6.0
BLOB = -1  # the event's place in a member's sequence


def report(complete: bool) -> ReplicationReport:
    """The final report of a replication from d1 to d2 and d3."""
    c = RecipientReport(D3, "failed", 4096, 0, 0.0, None, "disk full", "")
    if complete:
        c = RecipientReport(D3, "complete", 10_000, 0, 0.0, None, "", "/copy")
    b = RecipientReport(D2, "complete", 10_000, 0, 0.0, None, "", "/copy")
    state = "complete" if complete else "failed"
    return ReplicationReport(RID, "f.bin", 10_000, "ab" * 32, state, 1.0, (b, c))


def expected(complete: bool) -> BlobHeld:
    return BlobHeld(
        group=GROUP,
        rid=f"{RID:016x}",
        name="f.bin",
        size=10_000,
        digest="ab" * 32,
        origin="d1",
        complete=complete,
        held_by=("d1", "d2", "d3") if complete else ("d1", "d2"),
        missing=() if complete else (BlobMissing("d3", 4096, "disk full"),),
    )


def _end_replication(complete: bool, node: DaemonNode, now: float) -> Sequence[object]:
    """At the origin: the engine's final report of a replication to group G."""
    node.replication.watch_group(RID, GROUP, (D2, D3))
    out: list[object] = []
    node.replication.apply([ReplicationUpdate(RID, report(complete), True)], out)  # type: ignore[arg-type]
    return [*out, *node.on_timer(now)]


def sequence(client: SimClient) -> list[int]:
    """The client's total-order messages of G (their ids) with the event among them."""
    seq: list[int] = []
    for frame in client.received:
        if isinstance(frame, BlobHeld):
            seq.append(BLOB)
        elif isinstance(frame, Message) and frame.service in (S.AGREED, S.SAFE):
            seq.append(HID.unpack_from(frame.payload)[0])
    return seq


def scenario(
    seed: int, *, origin_member: bool, complete: bool = True, crash: NodeId | None = None
) -> tuple[DaemonSim, dict[str, SimClient], SimClient]:
    rng = random.Random(seed)
    loss = rng.choice([0.0, 0.01, 0.03])
    links = [
        GroupLink(a, b, LinkModel(delay=rng.uniform(0.001, 0.006), loss=loss))
        for a, b in ((1, 2), (1, 3), (2, 3))
    ]
    dsim = build_daemon_sim(links, seed=seed)
    sim = dsim.sim
    sim.run(until=SETTLE)
    homes = {"m2a": D2, "m2b": D2, "m3": D3}
    if origin_member:
        homes["m1"] = D1
    members = {name: dsim.connect(node, name) for name, node in homes.items()}
    old = dsim.connect(D3, "old", max_version=5)  # a version-5 member: no BLOB_HELD
    for client in (*members.values(), old):
        client.send(Join(GROUP))
    sim.run(until=WORKLOAD[0])
    senders = [*members.values(), old]
    for hid in range(1, rng.randint(30, 60)):
        at = rng.uniform(*WORKLOAD)
        sender = rng.choice(senders)
        service = rng.choice([S.AGREED, S.SAFE])
        sim.call_at(at, partial(_send, sender, hid, service))
    event_at = rng.uniform(*WORKLOAD)
    sim.call_at(event_at, lambda: sim.act(D1, partial(_end_replication, complete)))
    if crash is not None:
        sim.call_at(event_at + rng.uniform(0.0, 0.02), partial(sim.crash, crash))
    sim.run(until=END)
    return dsim, members, old


def _send(client: SimClient, hid: int, service: S) -> None:
    if client.alive:
        client.send(Multicast((GROUP,), HID.pack(hid) + bytes(40), service))


@pytest.mark.parametrize("seed", range(12))
def test_every_member_gets_the_event_once_at_the_same_place(seed: int) -> None:
    complete = seed % 3 != 0
    _, members, old = scenario(seed, origin_member=seed % 2 == 0, complete=complete)
    sequences = {name: sequence(c) for name, c in members.items()}
    for name, client in members.items():
        events = [f for f in client.received if isinstance(f, BlobHeld)]
        assert events == [expected(complete)], (seed, name)
    first = next(iter(sequences.values()))
    assert len(first) > 20
    for name, seq in sequences.items():
        assert seq == first, (seed, name)  # every message of G, the event at one place
    assert not any(isinstance(f, BlobHeld) for f in old.received)
    assert sequence(old) == [h for h in first if h != BLOB]


@pytest.mark.parametrize("seed", range(8))
def test_survivors_agree_when_a_daemon_crashes_after_the_event(seed: int) -> None:
    _, members, _ = scenario(seed, origin_member=True, crash=D2)
    survivors = {name: c for name, c in members.items() if name in ("m1", "m3")}
    sequences = [sequence(c) for c in survivors.values()]
    for client in survivors.values():
        assert [f for f in client.received if isinstance(f, BlobHeld)] == [expected(True)]
    position = [s.index(BLOB) for s in sequences]
    # the same messages before the event at each survivor (virtual synchrony)
    assert sorted(sequences[0][: position[0]]) == sorted(sequences[1][: position[1]]), seed
    common = [h for h in sequences[0] if h in sequences[1]]
    assert [h for h in sequences[1] if h in sequences[0]] == common, seed
