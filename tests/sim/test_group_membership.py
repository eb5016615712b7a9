"""Seeded group membership: 3-5 whole daemons (`DaemonNode`: its session table holds
the membership layer, on the group engine), clients on several daemons that join and
leave groups in a random order with JOIN and LEAVE frames; then a daemon crashes.

Invariants: every daemon ends with the same table group -> members, and saw the same
sequence of membership changes (its group_membership events); after the crash every
survivor reports the crashed daemon's members gone with cause `network`, and the tables
agree again.
"""

from __future__ import annotations

import random
from functools import partial

import pytest

from meshcast.ids import NodeId
from meshcast.sim.daemon import DaemonSim, GroupLink, SimClient, build_daemon_sim
from meshcast.sim.network import LinkModel
from meshcast.wire.client import Join, Leave

CONNECT = 0.5  # s: the clients connect
SETTLE = 1.5  # s: the daemon view has converged by then
JOINS = 1.0  # s of random joins and leaves
DRAIN = 1.5  # s: every operation is applied everywhere by then
DETECT = 2.0  # s after the crash: failure detected, view installed, states applied
GROUPS = ("alpha", "beta", "gamma")

Change = tuple[str, tuple[int, int], tuple[str, ...], str, tuple[str, ...]]


def build(seed: int, n: int, loss: float) -> DaemonSim:
    model = LinkModel(delay=0.002, jitter=0.002, loss=loss, reorder=0.1)
    links = [GroupLink(a, b, model) for a in range(1, n + 1) for b in range(a + 1, n + 1)]
    return build_daemon_sim(links, seed=seed)


def fail(seed: int, message: str) -> None:
    pytest.fail(f"seed={seed}: {message}", pytrace=False)


def changes(dsim: DaemonSim, node: NodeId) -> list[Change]:
    """The daemon's membership changes: (group, view id, members, cause, who)."""
    out: list[Change] = []
    for n, _, event in dsim.events:
        if n == node and event.name == "group_membership":
            f = event.fields
            view = f["view"]
            assert isinstance(view, list)
            out.append(
                (
                    str(f["group"]),
                    (int(view[0]), int(view[1])),
                    tuple(f["members"]),  # type: ignore[arg-type]
                    str(f["cause"]),
                    tuple(f["who"]),  # type: ignore[arg-type]
                )
            )
    return out


def send(client: SimClient, kind: str, group: str) -> None:
    client.send(Join(group) if kind == "join" else Leave(group))


@pytest.mark.parametrize("seed", range(12))
def test_membership_is_replicated_and_survives_a_crash(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(3, 5)
    loss = rng.choice([0.0, 0.02])
    dsim = build(seed, n, loss)
    sim = dsim.sim
    nodes = [NodeId(i) for i in range(1, n + 1)]
    clients: dict[str, SimClient] = {}  # private name -> its client

    def connect(node: NodeId, c: int) -> None:
        clients[f"#c{c}#d{node}"] = dsim.connect(node, f"c{c}")

    # clients on every daemon, with random joins (and a few leaves)
    ops: list[tuple[str, NodeId, str, str]] = []
    for node in nodes:
        for c in range(rng.randint(1, 3)):
            sim.call_at(CONNECT, partial(connect, node, c))
            member = f"#c{c}#d{node}"
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
    sim.run(until=SETTLE)
    for node in nodes:
        view = dsim.node(node).engine.view
        if view is None or view.members != tuple(nodes):
            fail(seed, f"daemon {node} has no full view at t={SETTLE}")
    for at, (kind, _, member, group) in zip(times, scheduled, strict=False):
        sim.call_at(at, partial(send, clients[member], kind, group))
    sim.run(until=SETTLE + JOINS + DRAIN)

    def table(node: NodeId) -> dict[str, tuple[tuple[str, NodeId], ...]]:
        return dsim.node(node).sessions.membership.table()

    tables = {node: table(node) for node in nodes}
    first = tables[nodes[0]]
    for node in nodes:
        if tables[node] != first:
            fail(seed, f"tables differ: {nodes[0]}: {first} vs {node}: {tables[node]}")
    expected: dict[str, set[str]] = {}
    for kind, _, member, group in scheduled[: len(times)]:
        if kind == "join":
            expected.setdefault(group, set()).add(member)
        else:
            expected[group].discard(member)
    assert {g: {m for m, _ in ms} for g, ms in first.items()} == {
        g: ms for g, ms in expected.items() if ms
    }
    sequences = {node: changes(dsim, node) for node in nodes}
    for node in nodes:
        if sequences[node] != sequences[nodes[0]]:
            fail(seed, f"daemon {node} saw another sequence of membership changes")
    if not any(c[3] == "join" for c in sequences[nodes[0]]):
        fail(seed, "no join was applied")
    # crash a daemon that hosts members: every survivor reports them gone (network)
    victim = max(nodes, key=lambda node: sum(d == node for ms in first.values() for _, d in ms))
    lost = {m for ms in first.values() for m, d in ms if d == victim}
    marks = {node: len(sequences[node]) for node in nodes}
    sim.crash(victim)
    sim.run(until=SETTLE + JOINS + DRAIN + DETECT)
    survivors = [node for node in nodes if node != victim]
    for node in survivors:
        later = changes(dsim, node)[marks[node] :]
        network = [c for c in later if c[3] == "network"]
        gone = {m for c in network for m in c[4]}
        if gone != lost:
            fail(seed, f"daemon {node}: network changes lost {gone}, expected {lost}")
        now = table(node)
        if any(d == victim for ms in now.values() for _, d in ms):
            fail(seed, f"daemon {node} still lists members of crashed {victim}")
        if now != table(survivors[0]):
            fail(seed, "survivors' tables differ after the crash")
        first_later = changes(dsim, survivors[0])[marks[survivors[0]] :]
        if [(c[0], c[1], c[4]) for c in later] != [(c[0], c[1], c[4]) for c in first_later]:
            fail(seed, "survivors saw different changes after the crash")
