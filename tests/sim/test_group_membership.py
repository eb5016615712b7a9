"""Seeded group membership: 3-5 daemons, each an OverlayNode + GroupMembership (on a
GroupEngine), wired like `meshcast.sim.group.GroupDaemon`. Clients on several daemons
join and leave groups in a random order; then a daemon crashes.

Invariants: every daemon ends with the same table group -> members, and saw the same
sequence of membership changes; after the crash every survivor reports the crashed
daemon's members gone with cause `network`, and the tables agree again.
"""

from __future__ import annotations

import random
from functools import partial

import pytest

from meshcast.group import GroupEngine
from meshcast.group.membership import GroupMembership, MembershipChanged
from meshcast.ids import NodeId
from meshcast.link import LinkConfig
from meshcast.overlay.node import (
    Neighbour,
    OverlayConfig,
    OverlayNode,
)
from meshcast.sim.group import GroupDaemon
from meshcast.sim.network import LinkModel
from meshcast.sim.simulator import Simulator
from meshcast.wire.client import Cause

SETTLE = 1.5  # s: the daemon view has converged by then
JOINS = 1.0  # s of random joins and leaves
DRAIN = 1.5  # s: every operation is applied everywhere by then
DETECT = 2.0  # s after the crash: failure detected, view installed, states applied
GROUPS = ("alpha", "beta", "gamma")


class MembershipDaemon(GroupDaemon):
    """A SimNode: overlay + membership (+ engine), effects routed between them."""

    def __init__(self, overlay: OverlayNode, membership: GroupMembership) -> None:
        super().__init__(overlay, membership)
        self.membership = membership

    def join(self, member: str, group: str, now: float) -> list[object]:
        return self._route([], list(self.membership.join(member, group, now)), now)

    def leave(self, member: str, group: str, now: float) -> list[object]:
        return self._route([], list(self.membership.leave(member, group, now)), now)


def build(seed: int, n: int, edges: list[tuple[int, int]], loss: float) -> Simulator:
    neighbours: dict[int, dict[NodeId, Neighbour]] = {i: {} for i in range(1, n + 1)}
    for a, b in edges:
        neighbours[a][NodeId(b)] = Neighbour(1.0, 100e6)
        neighbours[b][NodeId(a)] = Neighbour(1.0, 100e6)
    uploads = {NodeId(i): float("inf") for i in range(1, n + 1)}
    link = LinkConfig(heartbeat_interval=0.1, failure_rounds=5)
    sim = Simulator(seed=seed, trace=True)

    def factory(node_id: NodeId, now: float, rng: random.Random) -> MembershipDaemon:
        config = OverlayConfig(neighbours=neighbours[node_id], upload_bps=uploads, link=link)
        overlay = OverlayNode(node_id, config, incarnation=sim.incarnation(node_id) + 1, rng=rng)
        return MembershipDaemon(overlay, GroupMembership(GroupEngine(node_id)))

    def start(node: MembershipDaemon, now: float) -> list[object]:
        return node.start(now)

    for i in range(1, n + 1):
        sim.add_node(NodeId(i), factory, start=start)
    for a, b in edges:
        model = LinkModel(delay=0.002, jitter=0.002, loss=loss, reorder=0.1)
        sim.add_link(NodeId(a), NodeId(b), model)
    return sim


def fail(sim: Simulator, seed: int, message: str) -> None:
    tail = "\n".join(sim.trace_lines()[-10:])
    pytest.fail(f"seed={seed}: {message}\n--- trace tail ---\n{tail}", pytrace=False)


@pytest.mark.parametrize("seed", range(12))
def test_membership_is_replicated_and_survives_a_crash(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(3, 5)
    mesh = [(a, b) for a in range(1, n + 1) for b in range(a + 1, n + 1)]
    loss = rng.choice([0.0, 0.02])
    sim = build(seed, n, mesh, loss)
    changes: dict[NodeId, list[MembershipChanged]] = {NodeId(i): [] for i in range(1, n + 1)}

    def observe(node: NodeId, effect: object, now: float) -> None:
        if isinstance(effect, MembershipChanged):
            changes[node].append(effect)

    sim.observe(observe)
    sim.run(until=SETTLE)
    nodes = [NodeId(i) for i in range(1, n + 1)]

    def daemon(node: NodeId) -> MembershipDaemon:
        return sim.node_as(node, MembershipDaemon)

    for node in nodes:
        view = daemon(node).membership.engine.view
        if view is None or view.members != tuple(nodes):
            fail(sim, seed, f"daemon {node} has no full view at t={SETTLE}")
    # random joins (and a few leaves) from clients on every daemon
    ops: list[tuple[str, NodeId, str, str]] = []
    for node in nodes:
        for c in range(rng.randint(1, 3)):
            member = f"#c{c}#D{node}"
            for group in rng.sample(GROUPS, rng.randint(1, 3)):
                ops.append(("join", node, member, group))
                if rng.random() < 0.2:
                    ops.append(("leave", node, member, group))
    times = sorted(rng.uniform(SETTLE, SETTLE + JOINS) for _ in ops)
    # a leave must come after its join: keep each (member, group)'s order, shuffle the rest
    rng.shuffle(ops)
    ops.sort(key=lambda op: (op[2], op[3], op[0] == "leave"))
    order = list(range(len(ops)))
    rng.shuffle(order)
    pairs = sorted(zip(order, ops, strict=True))
    seen: set[tuple[str, str]] = set()
    scheduled: list[tuple[str, NodeId, str, str]] = []
    for _, op in pairs:
        if op[0] == "leave" and (op[2], op[3]) not in seen:
            continue  # its join is later: drop this leave
        seen.add((op[2], op[3]))
        scheduled.append(op)
    for at, (kind, node, member, group) in zip(times, scheduled, strict=False):

        def act(
            d: MembershipDaemon, now: float, kind: str = kind, m: str = member, g: str = group
        ) -> list[object]:
            return d.join(m, g, now) if kind == "join" else d.leave(m, g, now)

        sim.call_at(at, partial(sim.act, node, act))
    sim.run(until=SETTLE + JOINS + DRAIN)
    tables = {node: daemon(node).membership.table() for node in nodes}
    first = tables[nodes[0]]
    for node in nodes:
        if tables[node] != first:
            fail(sim, seed, f"tables differ: {nodes[0]}: {first} vs {node}: {tables[node]}")
    expected: dict[str, set[str]] = {}
    for kind, _, member, group in scheduled[: len(times)]:
        if kind == "join":
            expected.setdefault(group, set()).add(member)
        else:
            expected[group].discard(member)
    assert {g: {m for m, _ in ms} for g, ms in first.items()} == {
        g: ms for g, ms in expected.items() if ms
    }
    sequences = {
        node: [(c.group, c.view_id, c.members, c.cause, c.who) for c in changes[node]]
        for node in nodes
    }
    for node in nodes:
        if sequences[node] != sequences[nodes[0]]:
            fail(sim, seed, f"daemon {node} saw another sequence of membership changes")
    # crash a daemon that hosts members: every survivor reports them gone (network)
    victim = max(nodes, key=lambda node: sum(d == node for ms in first.values() for _, d in ms))
    lost = {m for ms in first.values() for m, d in ms if d == victim}
    marks = {node: len(changes[node]) for node in nodes}
    sim.crash(victim)
    sim.run(until=SETTLE + JOINS + DRAIN + DETECT)
    survivors = [node for node in nodes if node != victim]
    for node in survivors:
        later = changes[node][marks[node] :]
        network = [c for c in later if c.cause == Cause.NETWORK]
        gone = {m for c in network for m in c.who}
        if gone != lost:
            fail(sim, seed, f"daemon {node}: network changes lost {gone}, expected {lost}")
        table = daemon(node).membership.table()
        if any(d == victim for ms in table.values() for _, d in ms):
            fail(sim, seed, f"daemon {node} still lists members of crashed {victim}")
        if table != daemon(survivors[0]).membership.table():
            fail(sim, seed, "survivors' tables differ after the crash")
        if [(c.group, c.view_id, c.who) for c in later] != [
            (c.group, c.view_id, c.who) for c in changes[survivors[0]][marks[survivors[0]] :]
        ]:
            fail(sim, seed, "survivors saw different changes after the crash")
