"""Upload caps per replication and their live change (`Replicator.set_rate`, RATE), and
stall diagnosis (`Replicator.transfers()`), on the ideal streams of `net.Net`: there the
senders' token buckets alone set the pace, on the net's virtual clock."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from meshcast.errors import UsageError
from meshcast.ids import NodeId
from meshcast.replicate.engine import (
    ReplicationRequest,
    Replicator,
    ReplicatorConfig,
    SendControl,
    StreamSend,
)
from meshcast.replicate.messages import Rate, decode_control, encode_control
from meshcast.replicate.plan import Strategy, Variant
from meshcast.sim.replication import SyntheticFile, SyntheticStore

from .net import Net, chunk_index

CHUNK = 1024


def request_to(recipients: list[NodeId], path: str, **kwargs: Any) -> ReplicationRequest:
    return ReplicationRequest(path, tuple(recipients), **kwargs)


def sent_rate(net: Net, sender: int, receiver: int | None, start: float, end: float) -> float:
    """Bytes/s of chunk data `sender` wrote (to `receiver`) within [start, end)."""
    total = sum(
        len(s.data) - 9
        for s in net.sent
        if s.sender == sender
        and (receiver is None or s.receiver == receiver)
        and start <= s.at < end
        and chunk_index(s.data) is not None
    )
    return total / (end - start)


def test_two_replications_with_different_caps_share_one_sender() -> None:
    net = Net(3)
    net.add_file("f", 400 * CHUNK, CHUNK)
    net.add_file("g", 400 * CHUNK, CHUNK, seed=1)
    fast, slow = 40 * CHUNK, 10 * CHUNK  # bytes/s
    net.replicate(request_to([net.ids[1]], "f", strategy=Strategy.FANOUT, rate=fast))
    net.replicate(request_to([net.ids[2]], "g", strategy=Strategy.FANOUT, rate=slow))
    net.run(until=4.0)
    # each honours its own cap (the slower one does not hold back the faster)
    assert sent_rate(net, 0, 1, 0.5, 4.0) == pytest.approx(fast, rel=0.1)
    assert sent_rate(net, 0, 2, 0.5, 4.0) == pytest.approx(slow, rel=0.1)
    rates = {t["name"]: t["rate"] for t in net.engines[0].transfers()}
    assert rates == {"f": fast, "g": slow}


def test_the_daemon_cap_bounds_the_sum_of_its_replications() -> None:
    cap = 20 * CHUNK
    net = Net(3, ReplicatorConfig(rate=cap))
    net.add_file("f", 400 * CHUNK, CHUNK)
    net.add_file("g", 400 * CHUNK, CHUNK, seed=1)
    net.replicate(request_to([net.ids[1]], "f", strategy=Strategy.FANOUT, rate=40 * CHUNK))
    net.replicate(request_to([net.ids[2]], "g", strategy=Strategy.FANOUT, rate=4 * CHUNK))
    net.run(until=4.0)
    assert sent_rate(net, 0, None, 0.5, 4.0) == pytest.approx(cap, rel=0.1)
    # the capped one keeps its cap, the other takes the rest of the daemon's
    assert sent_rate(net, 0, 2, 0.5, 4.0) == pytest.approx(4 * CHUNK, rel=0.15)
    assert sent_rate(net, 0, 1, 0.5, 4.0) == pytest.approx(16 * CHUNK, rel=0.15)


def test_a_rate_change_mid_run_changes_the_send_rate_at_every_sender() -> None:
    """FastReplica to three recipients: each forwards its subfile to the two others under
    the replication's cap. Lowered at 2 s, then lifted at 4 s: every sender follows."""
    net = Net(4)
    f = net.add_file("f", 600 * CHUNK, CHUNK)
    rate = 30 * CHUNK
    rid = net.replicate(request_to(net.ids[1:], "f", rate=rate, max_connections=4))
    net.run(until=2.0)
    before = [sent_rate(net, i, None, 0.5, 2.0) for i in range(4)]
    net.input(0, lambda e: e.set_rate(rid, rate / 3, net.now))
    controls = [e for _, i, e in net.effects if i == 0 and isinstance(e, SendControl)]
    rates = [decode_control(c.payload) for c in controls]
    assert [r for r in rates if isinstance(r, Rate)] == [Rate(rid, rate / 3)] * 3
    net.run(until=4.0)
    after = [sent_rate(net, i, None, 2.2, 4.0) for i in range(4)]
    assert before[0] == pytest.approx(rate, rel=0.1)
    assert after[0] == pytest.approx(rate / 3, rel=0.15)
    for i in range(1, 4):  # a recipient forwards twice what it gets: a third of the origin's
        assert before[i] == pytest.approx(2 * rate / 3, rel=0.15), (i, before)
        assert after[i] <= 1.15 * rate / 3, (i, after)
        assert after[i] < 0.6 * before[i], (i, before, after)
    for engine in net.engines:
        assert [t["rate"] for t in engine.transfers()] == [rate / 3]
    net.input(0, lambda e: e.set_rate(rid, None, net.now))
    report = net.run_until_final(rid, until=4.5)  # uncapped: the rest goes at once
    assert report.state == "complete"
    assert all(s.finalized[f.manifest.digest] == "sim:f" for s in net.stores[1:])


def test_a_rate_set_while_hashing_is_the_plans() -> None:
    net = Net(2)
    net.add_file("f", 200 * CHUNK, CHUNK)
    rid, effects = net.engines[0].request(request_to([net.ids[1]], "f", rate=50 * CHUNK), 0.0)
    assert net.engines[0].runs(rid) == "origin"
    assert net.engines[0].set_rate(rid, 10 * CHUNK, 0.0) == []
    net.apply(0, effects)
    net.run(until=3.0)
    assert sent_rate(net, 0, 1, 0.5, 3.0) == pytest.approx(10 * CHUNK, rel=0.1)


def test_set_rate_refuses_what_it_cannot_do() -> None:
    net = Net(3)
    net.add_file("f", 200 * CHUNK, CHUNK)
    rid = net.replicate(request_to(net.ids[1:], "f", rate=20 * CHUNK))
    net.run(until=0.5)
    origin, recipient = net.engines[0], net.engines[1]
    assert (origin.runs(rid), recipient.runs(rid), origin.runs(rid + 1)) == (
        "origin",
        "recipient",
        None,
    )
    with pytest.raises(UsageError, match="no replication"):
        origin.set_rate(rid + 1, 1e6, net.now)
    with pytest.raises(UsageError, match="not the origin"):
        recipient.set_rate(rid, 1e6, net.now)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(UsageError, match="positive and finite"):
            origin.set_rate(rid, bad, net.now)
    # 120 s to give up on a chunk of 1 KiB: under 2 KiB per 120 s would starve it
    with pytest.raises(UsageError, match="too low"):
        origin.set_rate(rid, 2 * CHUNK / 120 * 0.9, net.now)
    assert [t["rate"] for t in origin.transfers()] == [20 * CHUNK]


def test_a_rate_from_anyone_but_the_origin_is_ignored() -> None:
    net = Net(3)
    net.add_file("f", 200 * CHUNK, CHUNK)
    rid = net.replicate(request_to(net.ids[1:], "f", rate=20 * CHUNK))
    net.run(until=0.5)
    recipient = net.engines[1]
    payload = encode_control(Rate(rid, 1e9))
    assert recipient.control_received(net.ids[2], payload, net.now) == []
    assert recipient.statistics().malformed == 1
    assert [t["rate"] for t in recipient.transfers()] == [20 * CHUNK]


def test_a_rate_that_overtakes_the_first_offer_applies_on_join() -> None:
    f = SyntheticFile("f", 50 * CHUNK, CHUNK)
    store = SyntheticStore({f.manifest.digest: f})
    engine = Replicator(NodeId(2), store, rng=random.Random(1))
    origin = Replicator(NodeId(1), SyntheticStore({f.manifest.digest: f}), rng=random.Random(2))
    rid, _ = origin.request(request_to([NodeId(2)], "f", rate=5e3), 0.0)
    effects = origin.hashed(rid, f.manifest, None, 0.0)
    offer = next(e for e in effects if isinstance(e, StreamSend))
    engine.control_received(NodeId(1), encode_control(Rate(rid, 7e3)), 0.0)
    engine.stream_accepted(1 << 32, NodeId(1), 0.0)
    engine.stream_data(1 << 32, b"".join(offer.parts), 0.0)
    assert [t["rate"] for t in engine.transfers()] == [7e3]


# ---------------------------------------------------------------- stalls


def test_a_silent_recipient_is_named_by_its_feeders_and_the_origin() -> None:
    """Node 2 stops (its writes and reports never arrive) early on: once node 1 holds all
    but node 2's share and nothing came for stall_after, node 1 and the origin say they
    wait on it, and the origin's report says it is stalled."""
    stall_after = 3.0
    net = Net(3, ReplicatorConfig(stall_after=stall_after))
    net.add_file("f", 200 * CHUNK, CHUNK)
    rid = net.replicate(request_to(net.ids[1:], "f", rate=20 * CHUNK))
    net.run(until=1.0)
    for engine in net.engines:
        assert [t["stalled"] for t in engine.transfers()] == [None]
    net.mute.add(2)
    net.run(until=20.0)  # the origin is done sending at 10 s
    stopped = int(net.ids[2])
    one = net.engines[1].transfers(net.now)[0]["stalled"]
    assert isinstance(one, dict)
    assert one["waiting_on"] == [stopped]
    assert one["for"] >= stall_after
    assert "no data from 1 feeders" in str(one["why"])
    origin = net.engines[0].transfers(net.now)[0]["stalled"]
    assert isinstance(origin, dict)
    waiting = origin["waiting_on"]
    assert isinstance(waiting, list)
    assert stopped in waiting
    report = net.engines[0].reports()[0]
    stalled = {r.node: r.stalled for r in report.recipients}[net.ids[2]]
    assert stalled is not None
    assert stalled >= stall_after
    # (what node 2 sent meanwhile is lost: the replication ends by give_up_after)
    report = net.run_until_final(rid, until=400.0)
    assert report.state == "failed"


def test_a_feeder_that_never_opens_its_stream_is_named() -> None:
    """Node 1's only feeder of node 2's subfile is node 2; node 2 never joins (it is mute
    from the start), so node 1 waits on a feeder with no stream at all."""
    net = Net(3, ReplicatorConfig(stall_after=2.0))
    net.add_file("f", 100 * CHUNK, CHUNK)
    net.mute.add(2)
    net.replicate(request_to(net.ids[1:], "f"))
    net.run(until=5.0)
    stalled = net.engines[1].transfers(net.now)[0]["stalled"]
    assert isinstance(stalled, dict)
    assert stalled["waiting_on"] == [int(net.ids[2])]
    assert "have opened no stream" in str(stalled["why"]) or "no data" in str(stalled["why"])


def test_a_copy_fed_only_after_its_feeders_complete_is_not_stalled_while_they_work() -> None:
    """k = 3, variant k: node 4 (the fourth recipient) gets every subfile only once its
    feeders hold theirs (after-complete feeds): its wait is the plan, not a stall."""
    net = Net(5, ReplicatorConfig(stall_after=1.0))
    net.add_file("f", 120 * CHUNK, CHUNK)
    rid = net.replicate(
        request_to(net.ids[1:], "f", variant=Variant.K, max_connections=3, rate=20 * CHUNK)
    )
    net.run(until=3.0)
    waiting = net.engines[4].transfers(net.now)
    assert [t["held_bytes"] for t in waiting] == [0]  # nothing yet, after 3 s ...
    assert [t["stalled"] for t in waiting] == [None]  # ... as planned
    assert net.run_until_final(rid).state == "complete"
