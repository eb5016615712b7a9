"""One seed, one trace: byte-identical event traces, and the trace format."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from meshcast.errors import UsageError
from meshcast.ids import NodeId
from meshcast.link.events import Delivered, Transmit
from meshcast.sim import LinkModel, Simulator

NODES = [NodeId(i) for i in range(1, 6)]
MODEL = LinkModel(
    delay=0.02,
    jitter=0.005,
    loss=0.05,
    duplicate=0.02,
    reorder=0.05,
    bandwidth_bps=2e6,
    queue_bytes=8_000,
)


class Gossip:
    """Every ~0.1 s pings a random peer; answers pings with pongs; delivers pongs."""

    def __init__(self, node_id: NodeId, now: float, rng: random.Random) -> None:
        self._me = node_id
        self._rng = rng
        self._peers = [n for n in NODES if n != node_id]
        self._next_at = now + rng.uniform(0.05, 0.15)
        self._count = 0

    def datagram_received(self, src: NodeId, datagram: bytes, now: float) -> list[object]:
        if datagram[:1] == b"?":
            return [Transmit(src, b"!" + datagram[1:])]
        return [Delivered(src, datagram)]

    def on_timer(self, now: float) -> list[object]:
        self._next_at = now + self._rng.uniform(0.05, 0.15)
        self._count += 1
        body = f"?{self._me}:{self._count}".encode() + bytes(self._rng.randrange(0, 600))
        return [Transmit(self._rng.choice(self._peers), body)]

    def next_deadline(self) -> float | None:
        return self._next_at


class Quiet:
    """Delivers every datagram up; no timer."""

    def __init__(self, node_id: NodeId, now: float, rng: random.Random) -> None:
        pass

    def datagram_received(self, src: NodeId, datagram: bytes, now: float) -> list[object]:
        return [Delivered(src, datagram)]

    def on_timer(self, now: float) -> list[object]:
        return []

    def next_deadline(self) -> float | None:
        return None


def scenario(seed: int, trace: bool) -> Simulator:
    sim = Simulator(seed=seed, trace=trace)
    for n in NODES:
        sim.add_node(n, Gossip)
    for i, a in enumerate(NODES):
        for b in NODES[i + 1 :]:
            sim.add_link(a, b, MODEL)

    def on_effect(node_id: NodeId, effect: object, now: float) -> None:
        if isinstance(effect, Delivered):
            sim.trace_event("pong", node=node_id, peer=effect.peer, size=len(effect.payload))

    sim.observe(on_effect)
    sim.call_at(2.0, lambda: sim.partition([NODES[:2], NODES[2:]]))
    sim.call_at(3.0, sim.heal)
    sim.call_at(3.5, lambda: sim.crash(NODES[4]))
    sim.call_at(4.0, lambda: sim.restart(NODES[4]))
    # a fault schedule drawn from the simulator's own rng
    for _ in range(5):
        a, b = sim.rng.sample(NODES, 2)
        at = sim.rng.uniform(0.0, 5.0)
        sim.call_at(at, partial(sim.set_link_up, a, b, False))
        sim.call_at(at + 0.3, partial(sim.set_link_up, a, b, True))
    sim.run(until=6.0)
    return sim


def scenario_digest(seed: int) -> str:
    """Entry point for the cross-process check below."""
    return scenario(seed, trace=True).trace_digest()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_same_seed_gives_a_byte_identical_trace(seed: int) -> None:
    first = scenario(seed, trace=True)
    second = scenario(seed, trace=True)
    assert first.trace_lines() == second.trace_lines()
    assert first.trace_digest() == second.trace_digest()
    kinds = {json.loads(line)["kind"] for line in first.trace_lines()}
    assert {"packet_sent", "packet_delivered", "packet_lost", "packet_duplicated"} <= kinds
    assert {"packet_dropped", "timer_fired", "effect_emitted", "pong"} <= kinds
    assert {"partitioned", "healed", "node_crashed", "node_started", "pipe_flushed"} <= kinds


def test_pipe_counters_are_conserved_under_every_fault() -> None:
    sim = scenario(7, trace=False)
    for a in NODES:
        for b in NODES:
            if a == b:
                continue
            s = sim.pipe_stats(a, b)
            assert s.sent > 0
            assert s.sent + s.duplicated == (
                s.delivered
                + s.lost_random
                + s.dropped_queue
                + s.dropped_down
                + s.dropped_crashed
                + s.in_flight
            )
    total = [sim.pipe_stats(a, b) for a in NODES for b in NODES if a != b]
    assert sum(s.dropped_down for s in total) > 0
    assert sum(s.dropped_crashed for s in total) > 0
    assert sum(s.lost_random for s in total) > 0


def test_different_seeds_give_different_traces() -> None:
    digests = {scenario(seed, trace=True).trace_digest() for seed in range(1, 6)}
    assert len(digests) == 5


def test_untraced_run_keeps_only_non_packet_events_and_is_also_deterministic() -> None:
    quiet = scenario(4, trace=False)
    assert quiet.trace_digest() == scenario(4, trace=False).trace_digest()
    kinds = {json.loads(line)["kind"] for line in quiet.trace_lines()}
    assert not any(kind.startswith(("packet_", "timer_", "effect_")) for kind in kinds)
    assert "pong" in kinds
    traced = scenario(4, trace=True)
    assert [
        line
        for line in traced.trace_lines()
        if not json.loads(line)["kind"].startswith(("packet_", "timer_", "effect_"))
    ] == quiet.trace_lines()


def test_trace_does_not_depend_on_hash_randomisation() -> None:
    here = Path(__file__)
    code = (
        "import runpy, sys; "
        f"ns = runpy.run_path({str(here)!r}); "
        "sys.stdout.write(ns['scenario_digest'](9))"
    )
    outputs = set()
    for hash_seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(done.stdout)
    assert outputs == {scenario_digest(9)}


def test_lines_are_canonical_json() -> None:
    for line in scenario(5, trace=True).trace_lines():
        event = json.loads(line)
        assert isinstance(event["time"], float)
        assert isinstance(event["kind"], str)
        assert json.dumps(event, sort_keys=True, separators=(",", ":")) == line


def test_one_packet_leaves_a_sent_and_a_delivered_event() -> None:
    sim = Simulator(seed=1, trace=True)
    a, b = NodeId(1), NodeId(2)
    for n in (a, b):
        sim.add_node(n, Quiet)
    sim.add_pipe(a, b, LinkModel(delay=0.5))
    sim.act(a, lambda node, now: [Transmit(b, b"!x")])
    sim.run(until=0.75)
    events = [json.loads(line) for line in sim.trace_lines()]
    packets = [e for e in events if e["kind"].startswith("packet_")]
    assert packets == [
        {
            "arrive_at": 0.5,
            "crc": "9398fe12",
            "dst": 2,
            "kind": "packet_sent",
            "size": 2,
            "src": 1,
            "time": 0.0,
        },
        {"crc": "9398fe12", "dst": 2, "kind": "packet_delivered", "size": 2, "src": 1, "time": 0.5},
    ]
    assert {"kind": "effect_emitted", "node": 2, "time": 0.5, "type": "Delivered"} in events


def test_trace_event_records_typed_fields_and_rejects_bad_ones() -> None:
    sim = Simulator()
    sim.run(until=1.5)
    sim.trace_event("view_installed", view=[1, 2, 3], leader=1)
    assert sim.trace_lines()[-1] == '{"kind":"view_installed","leader":1,"time":1.5,"view":[1,2,3]}'
    with pytest.raises(UsageError):
        sim.trace_event("bad", time=3)
    with pytest.raises(UsageError):
        sim.trace_event("bad", value=object())
    with pytest.raises(UsageError):
        sim.trace_event("bad", value=float("nan"))
    with pytest.raises(UsageError):
        sim.trace_event("")


def test_digest_is_sha256_of_the_lines() -> None:
    sim = scenario(6, trace=False)
    text = "".join(line + "\n" for line in sim.trace_lines())
    assert sim.trace_digest() == hashlib.sha256(text.encode()).hexdigest()
