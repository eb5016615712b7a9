"""Seeded group ordering: 3-8 daemons, each an OverlayNode + GroupEngine (GroupDaemon), random
senders, groups and services, over lossy, jittery, reordering links, several topologies and
routing policies, within one stable view. Invariants: docs/design/group.md, "Tests".

MESHCAST_GROUP_SEEDS raises the number of seeds (default 200).
"""

from __future__ import annotations

import os
import random
import struct
from dataclasses import dataclass, field
from functools import partial

import pytest

from meshcast.group import Deliver
from meshcast.ids import NodeId
from meshcast.overlay.node import OverlayDelivered, ViewInstalled
from meshcast.overlay.routing import POLICIES
from meshcast.sim.group import GroupDaemon, GroupLink, build_group_sim
from meshcast.sim.network import LinkModel
from meshcast.sim.simulator import Simulator
from meshcast.wire.client import ServiceLevel as S
from meshcast.wire.group import GroupData, decode_group

SEEDS = int(os.environ.get("MESHCAST_GROUP_SEEDS", "200"))
HID = struct.Struct("!Q")  # the harness's message id, first bytes of every payload
GROUPS = ("g0", "g1", "g2", "g3")
SETTLE = 1.5  # s: views have converged everywhere by then
WORKLOAD = 1.0  # s of random sends
DRAIN = 2.0  # s after the last send: everything is delivered by then
TOTAL = (S.AGREED, S.SAFE)


@dataclass(frozen=True, slots=True)
class Sent:
    hid: int
    source: NodeId
    service: S
    groups: tuple[str, ...]


@dataclass
class Run:
    seed: int
    sim: Simulator
    hosts: dict[str, list[NodeId]]
    nodes: list[NodeId]
    sent: dict[int, Sent] = field(default_factory=dict)
    # (node, kind, hid) in the order things happened; kind: "send", "recv", "deliver"
    events: list[tuple[NodeId, str, int]] = field(default_factory=list)
    view_changes: list[tuple[float, NodeId]] = field(default_factory=list)

    def observe(self, node: NodeId, effect: object, now: float) -> None:
        if isinstance(effect, Deliver):
            self.events.append((node, "deliver", HID.unpack_from(effect.payload)[0]))
        elif isinstance(effect, OverlayDelivered):
            message = decode_group(effect.payload)
            if isinstance(message, GroupData):
                self.events.append((node, "recv", HID.unpack_from(message.payload)[0]))
        elif isinstance(effect, ViewInstalled):
            self.view_changes.append((now, node))

    def submit(self, node: NodeId, service: S, groups: tuple[str, ...], sender: str) -> None:
        hid = len(self.sent) + 1
        self.sent[hid] = Sent(hid, node, service, groups)
        self.events.append((node, "send", hid))
        self.sim.act(
            node,
            lambda d, now: d.submit(groups, HID.pack(hid) + b"data", service, sender, now),
        )

    def hosted(self, node: NodeId, hid: int) -> bool:
        return any(node in self.hosts[g] for g in self.sent[hid].groups)

    def fail(self, message: str) -> None:
        tail = "\n".join(self.sim.trace_lines()[-10:])
        pytest.fail(f"seed={self.seed}: {message}\n--- trace tail ---\n{tail}", pytrace=False)

    def delivered(self, node: NodeId) -> list[int]:
        return [hid for n, kind, hid in self.events if n == node and kind == "deliver"]


def topology(rng: random.Random, n: int) -> list[tuple[int, int]]:
    shape = rng.choice(["mesh", "ring", "line", "random"])
    if shape == "mesh":
        return [(a, b) for a in range(1, n + 1) for b in range(a + 1, n + 1)]
    if shape == "ring":
        return [(i, i % n + 1) for i in range(1, n + 1)] if n > 2 else [(1, 2)]
    if shape == "line":
        return [(i, i + 1) for i in range(1, n)]
    order = list(range(1, n + 1))
    rng.shuffle(order)
    pairs = {tuple(sorted((order[i], order[rng.randrange(i)]))) for i in range(1, n)}
    for _ in range(n // 2):
        a, b = rng.sample(range(1, n + 1), 2)
        pairs.add(tuple(sorted((a, b))))
    return sorted((a, b) for a, b in pairs)


def scenario(seed: int, messages: int = 30) -> Run:
    rng = random.Random(seed)
    n = rng.randint(3, 8)
    nodes = [NodeId(i) for i in range(1, n + 1)]
    loss = rng.choice([0.0, 0.02, 0.05])
    links = [
        GroupLink(
            a,
            b,
            LinkModel(
                delay=rng.uniform(0.001, 0.01),
                jitter=rng.uniform(0.0, 0.005),
                loss=loss,
                reorder=rng.choice([0.0, 0.1]),
            ),
            weight=float(rng.randint(1, 5)),
        )
        for a, b in topology(rng, n)
    ]
    hosts = {g: sorted(rng.sample(nodes, rng.randint(1, n))) for g in GROUPS}
    sim = build_group_sim(links, hosts, seed=seed, policy=rng.choice(POLICIES))
    run = Run(seed, sim, hosts, nodes)
    sim.observe(run.observe)
    sim.run(until=SETTLE)
    for node in nodes:
        view = sim.node_as(node, GroupDaemon).engine.view
        if view is None or view.members != tuple(nodes):
            run.fail(f"daemon {node} has not converged on a full view by t={SETTLE}")
    services = list(S)
    for i in range(messages):
        at = SETTLE + WORKLOAD * i / messages + rng.uniform(0, WORKLOAD / messages)
        node = rng.choice(nodes)
        groups = tuple(sorted(rng.sample(GROUPS, rng.choice([1, 1, 2]))))
        service = rng.choice(services)
        sender = f"#c{rng.randint(1, 3)}#d{node}"
        sim.call_at(at, partial(run.submit, node, service, groups, sender))
    sim.run(until=SETTLE + WORKLOAD + DRAIN)
    late = [(t, v) for t, v in run.view_changes if t >= SETTLE]
    if late:
        run.fail(f"view changed during the workload (out of scope here): {late[:4]}")
    return run


def check_exactly_once_to_hosts(run: Run) -> None:
    """No duplicates, nothing to a daemon hosting none of the groups, everything to every
    daemon hosting one (the view is stable and the overlay reliable within it)."""
    for node in run.nodes:
        got = run.delivered(node)
        if len(got) != len(set(got)):
            run.fail(f"daemon {node} delivered a message twice: {got}")
        for hid in got:
            if not run.hosted(node, hid):
                run.fail(f"daemon {node} delivered {run.sent[hid]} but hosts none of its groups")
        missing = [hid for hid in run.sent if run.hosted(node, hid) and hid not in got]
        if missing:
            run.fail(f"daemon {node} never delivered {[run.sent[h] for h in missing]}")


def check_fifo(run: Run) -> None:
    """FIFO messages of one sending daemon are delivered in the order it sent them."""
    for node in run.nodes:
        last: dict[NodeId, int] = {}
        for hid in run.delivered(node):
            msg = run.sent[hid]
            if msg.service != S.FIFO:
                continue
            if hid < last.get(msg.source, 0):
                run.fail(f"daemon {node}: FIFO message {hid} of {msg.source} after {last}")
            last[msg.source] = hid


def check_causal(run: Run, family: tuple[S, ...]) -> int:
    """If a daemon sent m2 after sending or delivering m1 (transitively), every daemon
    delivering both delivers m1 first. Messages of `family` only. Returns pairs checked."""
    past: dict[NodeId, set[int]] = {n: set() for n in run.nodes}
    deps: dict[int, frozenset[int]] = {}
    position: dict[NodeId, dict[int, int]] = {n: {} for n in run.nodes}
    for node, kind, hid in run.events:
        if run.sent[hid].service not in family:
            continue
        if kind == "send":
            deps[hid] = frozenset(past[node])
            past[node].add(hid)
        elif kind == "deliver":
            past[node] |= deps[hid] | {hid}
            position[node][hid] = len(position[node])
    checked = 0
    for node in run.nodes:
        order = position[node]
        for hid, pos in order.items():
            for dep in deps[hid]:
                if dep in order:
                    checked += 1
                    if order[dep] > pos:
                        run.fail(f"daemon {node} delivered {hid} before its cause {dep}")
    return checked


def check_total_order(run: Run) -> None:
    """AGREED and SAFE messages: any two daemons deliver the ones they share in one order."""
    orders = {n: [h for h in run.delivered(n) if run.sent[h].service in TOTAL] for n in run.nodes}
    for a in run.nodes:
        for b in run.nodes:
            if a < b:
                common = set(orders[a]) & set(orders[b])
                left = [h for h in orders[a] if h in common]
                right = [h for h in orders[b] if h in common]
                if left != right:
                    run.fail(f"daemons {a} and {b} disagree on the total order: {left} {right}")


def check_safe_stability(run: Run) -> None:
    """A SAFE message is delivered only once every daemon of the view has received it."""
    have: dict[int, set[NodeId]] = {}
    for node, kind, hid in run.events:
        if kind in ("send", "recv"):
            have.setdefault(hid, set()).add(node)
        elif run.sent[hid].service == S.SAFE and have.get(hid, set()) != set(run.nodes):
            missing = set(run.nodes) - have.get(hid, set())
            run.fail(f"daemon {node} delivered SAFE {hid} before {sorted(missing)} had it")


@pytest.mark.parametrize("seed", range(SEEDS))
def test_group_ordering_invariants(seed: int) -> None:
    run = scenario(seed)
    check_exactly_once_to_hosts(run)
    check_fifo(run)
    check_causal(run, (S.CAUSAL,))
    check_causal(run, TOTAL)
    check_total_order(run)
    check_safe_stability(run)


def test_the_checks_see_real_ordering_work() -> None:
    """Not vacuous: across a few seeds there are causal chains, shared total-order
    messages and SAFE deliveries to check."""
    causal = total = 0
    for seed in range(5):
        run = scenario(seed, messages=60)
        causal += check_causal(run, (S.CAUSAL,)) + check_causal(run, TOTAL)
        total += sum(1 for _, k, h in run.events if k == "deliver" and run.sent[h].service in TOTAL)
    assert causal > 20
    assert total > 50
