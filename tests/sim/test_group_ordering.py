"""Seeded group ordering: 3-8 whole daemons (`DaemonNode`, the runtime's object), one
client each (`GroupClients`), random senders, groups and services, over lossy, jittery,
reordering links, several topologies and routing policies, within one stable view.
Invariants: docs/design/group.md, "Tests".

"Daemon d hosts group g" is "d's client joined g" (applied everywhere before the
workload: checked); "d sends" is "d's client sends MULTICAST" (a client in none of the
groups too); "d delivers m" is "d's client got MESSAGE m". Everything is checked at the
clients; SAFE stability also needs when each daemon's group layer first had a message,
read from its input (an engine subclass that notes what `submit` and `overlay_delivered`
are given, built by every daemon through `DaemonLayers`).

MESHCAST_GROUP_SEEDS sets the number of seeds (default 200).
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import pytest

from meshcast.daemon import ClientWrite
from meshcast.daemon.layers import DaemonLayers
from meshcast.group import GroupEngine
from meshcast.group.events import GroupEffect
from meshcast.ids import NodeId
from meshcast.overlay.routing import POLICIES
from meshcast.sim.daemon import (
    MESSAGE_ID,
    DaemonSim,
    GroupClients,
    GroupLink,
    Process,
    build_daemon_sim,
)
from meshcast.sim.network import LinkModel
from meshcast.wire.client import ServiceLevel as S
from meshcast.wire.group import GroupData, decode_group, is_batch, split_batch

SEEDS = int(os.environ.get("MESHCAST_GROUP_SEEDS", "200"))
GROUPS = ("g0", "g1", "g2", "g3")
CONNECT = 0.5  # s: the clients connect and join
SETTLE = 1.5  # s: views have converged and the joins are applied everywhere by then
WORKLOAD = 1.0  # s of random sends
DRAIN = 2.0  # s after the last send: everything is delivered by then
TOTAL = (S.AGREED, S.SAFE)


@dataclass
class Run:
    seed: int
    dsim: DaemonSim
    group: GroupClients
    hosts: dict[str, list[NodeId]]
    nodes: list[NodeId]
    # message id -> daemons whose group layer had it (submitted or received), so far
    have: dict[int, set[NodeId]] = field(default_factory=dict)
    safe_early: list[str] = field(default_factory=list)
    _seen: dict[Process, int] = field(default_factory=dict)

    def process(self, node: NodeId) -> Process:
        return self.group.process(node)  # no daemon restarts here: one per daemon

    def hosted(self, node: NodeId, hid: int) -> bool:
        return any(node in self.hosts[g] for g in self.group.sent[hid].groups)

    def fail(self, message: str) -> None:
        tail = "\n".join(self.dsim.sim.trace_lines()[-10:])
        pytest.fail(f"seed={self.seed}: {message}\n--- trace tail ---\n{tail}", pytrace=False)

    def delivered(self, node: NodeId) -> list[int]:
        return self.group.delivered(self.process(node))

    def observe(self, node: NodeId, effect: object, now: float) -> None:
        """After `GroupClients` took the frames: a SAFE message its client just got must
        be held by every daemon of the view already."""
        if not isinstance(effect, ClientWrite):
            return
        p = self.process(node)
        line = self.group.timeline.get(p, [])
        for kind, hid in line[self._seen.get(p, 0) :]:
            if kind == "deliver" and self.group.sent[hid].service == S.SAFE:  # type: ignore[index]
                have = self.have.get(hid, set())  # type: ignore[call-overload]
                if have != set(self.nodes):
                    missing = sorted(set(self.nodes) - have)
                    self.safe_early.append(f"daemon {node} delivered SAFE {hid} before {missing}")
        self._seen[p] = len(line)


def tapping_engine(have: dict[int, set[NodeId]]) -> type[GroupEngine]:
    """An engine that notes in `have` when each daemon's group layer first has each client
    message: submitted there, or handed up by the overlay."""

    class TappingEngine(GroupEngine):
        def note(self, hid: int) -> None:
            have.setdefault(hid, set()).add(self.local)

        def submit(
            self,
            groups: Sequence[str],
            payload: bytes,
            service: S,
            sender: str,
            now: float,
            msg_type: int = 0,
            token: int = 0,
        ) -> list[GroupEffect]:
            if not any(g.startswith("#") for g in groups):
                self.note(MESSAGE_ID.unpack_from(payload)[0])
            return super().submit(groups, payload, service, sender, now, msg_type, token)

        def overlay_delivered(
            self, source: NodeId, payload: bytes, now: float
        ) -> list[GroupEffect]:
            for raw in split_batch(payload) if is_batch(payload) else [payload]:
                message = decode_group(raw)
                if isinstance(message, GroupData) and not message.groups[0].startswith("#"):
                    self.note(MESSAGE_ID.unpack_from(message.payload)[0])
            return super().overlay_delivered(source, payload, now)

    return TappingEngine


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
    have: dict[int, set[NodeId]] = {}
    layers = DaemonLayers(engine=tapping_engine(have))
    dsim = build_daemon_sim(links, seed=seed, policy=rng.choice(POLICIES), layers=layers)
    sim = dsim.sim
    group = GroupClients(dsim, hosts)
    run = Run(seed, dsim, group, hosts, nodes, have)
    sim.observe(run.observe)
    sim.call_at(CONNECT, group.connect_all)
    sim.run(until=SETTLE)
    expected = {g: {f"#c{d}#d{d}" for d in ds} for g, ds in hosts.items()}
    for node in nodes:
        daemon = dsim.node(node)
        view = daemon.engine.view
        if view is None or view.members != tuple(nodes):
            run.fail(f"daemon {node} has not converged on a full view by t={SETTLE}")
        table = {g: {m for m, _ in ms} for g, ms in daemon.sessions.membership.table().items()}
        if table != expected:
            run.fail(f"daemon {node} has not applied every join by t={SETTLE}: {table}")
    services = list(S)
    for i in range(messages):
        at = SETTLE + WORKLOAD * i / messages + rng.uniform(0, WORKLOAD / messages)
        node = rng.choice(nodes)
        groups = tuple(sorted(rng.sample(GROUPS, rng.choice([1, 1, 2]))))
        service = rng.choice(services)
        sim.call_at(at, partial(group.send, node, service, groups, 4))
    sim.run(until=SETTLE + WORKLOAD + DRAIN)
    late = [
        (t, int(node))
        for node, t, e in dsim.events
        if t >= SETTLE and e.name in ("view_installed", "group_view")
    ]
    if late:
        run.fail(f"view changed during the workload (out of scope here): {late[:4]}")
    return run


def check_exactly_once_to_hosts(run: Run) -> None:
    """No duplicates, nothing of a group the client is not in when it gets it, everything
    to every client of a hosting daemon (the view is stable and the overlay reliable)."""
    if run.group.refused:
        run.fail(f"daemons refused messages {sorted(run.group.refused)}")
    for node in run.nodes:
        got = run.delivered(node)
        if len(got) != len(set(got)):
            run.fail(f"daemon {node} delivered a message twice: {got}")
        for (kind, hid), member in run.group.member_at(run.process(node)):
            if kind == "deliver" and not member & set(run.group.sent[hid].groups):  # type: ignore[index]
                run.fail(f"daemon {node} delivered {hid} of groups it is not in ({member})")
        missing = [hid for hid in run.group.sent if run.hosted(node, hid) and hid not in got]
        if missing:
            run.fail(f"daemon {node} never delivered {[run.group.sent[h] for h in missing]}")


def check_fifo(run: Run) -> None:
    """FIFO messages of one sending daemon are delivered in the order it sent them."""
    for node in run.nodes:
        last: dict[Process, int] = {}
        for hid in run.delivered(node):
            msg = run.group.sent[hid]
            if msg.service != S.FIFO:
                continue
            if hid < last.get(msg.process, 0):
                run.fail(f"daemon {node}: FIFO message {hid} of {msg.process} after {last}")
            last[msg.process] = hid


def check_causal(run: Run, family: tuple[S, ...]) -> int:
    """If a client sent m2 after sending or getting m1 (transitively), every client
    getting both gets m1 first. Messages of `family` only. Returns pairs checked."""
    deps = run.group.causal_past(lambda hid: run.group.sent[hid].service in family)
    checked = 0
    for node in run.nodes:
        order = {
            h: i for i, h in enumerate(run.delivered(node)) if run.group.sent[h].service in family
        }
        for hid, pos in order.items():
            for dep in deps.get(hid, ()):
                if dep in order:
                    checked += 1
                    if order[dep] > pos:
                        run.fail(f"daemon {node} delivered {hid} before its cause {dep}")
    return checked


def check_total_order(run: Run) -> None:
    """AGREED and SAFE messages: any two clients get the ones they share in one order."""
    orders = {
        n: [h for h in run.delivered(n) if run.group.sent[h].service in TOTAL] for n in run.nodes
    }
    for a in run.nodes:
        for b in run.nodes:
            if a < b:
                common = set(orders[a]) & set(orders[b])
                left = [h for h in orders[a] if h in common]
                right = [h for h in orders[b] if h in common]
                if left != right:
                    run.fail(f"daemons {a} and {b} disagree on the total order: {left} {right}")


def check_safe_stability(run: Run) -> None:
    """A SAFE message reaches a client only once every daemon of the view has it."""
    if run.safe_early:
        run.fail("; ".join(run.safe_early[:4]))


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
    causal = total = safe = 0
    for seed in range(5):
        run = scenario(seed, messages=60)
        causal += check_causal(run, (S.CAUSAL,)) + check_causal(run, TOTAL)
        for node in run.nodes:
            services = [run.group.sent[h].service for h in run.delivered(node)]
            total += sum(1 for s in services if s in TOTAL)
            safe += services.count(S.SAFE)
    assert causal > 20
    assert total > 50
    assert safe > 10
