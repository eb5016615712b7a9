"""Seeded group daemons under faults: crashes, restarts, partitions and merges while
clients send with every service. Invariants (docs/design/group.md, "Virtual synchrony"):

* no duplicates, nothing to a daemon hosting none of a message's groups;
* FIFO per sending daemon, causality (CAUSAL among CAUSAL, AGREED/SAFE among themselves),
  one total order for AGREED/SAFE across all daemons and views;
* every daemon delivering a message delivers it in the same view (the one it was sent in);
* virtual synchrony: daemons that install the same view and then the same next view
  deliver the same messages in the first (those of groups both host);
* a daemon never loses its own messages: every one it sent to a group it hosts is
  delivered by it while it lives;
* liveness: once faults stop, every live daemon installs one view with all of them, and
  messages sent then reach every live daemon hosting their groups.

A process is (daemon, incarnation): a restarted daemon is a new process with a new view.
MESHCAST_VS_SEEDS sets the number of seeds (default 200).
"""

from __future__ import annotations

import itertools
import os
import random
import struct
from dataclasses import dataclass, field
from functools import partial

import pytest

from meshcast.errors import BufferFull
from meshcast.group import Deliver, OrderingReset
from meshcast.ids import NodeId
from meshcast.overlay.routing import POLICIES
from meshcast.sim.group import GroupDaemon, GroupLink, build_group_sim
from meshcast.sim.network import LinkModel
from meshcast.sim.simulator import Simulator
from meshcast.wire.client import ServiceLevel as S

SEEDS = int(os.environ.get("MESHCAST_VS_SEEDS", "200"))
HID = struct.Struct("!Q")
GROUPS = ("g0", "g1", "g2")
SETTLE = 1.5  # s: the first views are installed everywhere by then
WORKLOAD = 2.0  # s of random sends and faults
CALM = 3.0  # s after the last fault: views converge and flushes end
FINAL = 1.0  # s of sends in the final view, then as long again to deliver them
TOTAL = (S.AGREED, S.SAFE)
RELIABLE_UP = (S.RELIABLE, S.FIFO, S.CAUSAL, S.AGREED, S.SAFE)

Process = tuple[NodeId, int]  # (daemon, incarnation)


@dataclass(frozen=True, slots=True)
class Sent:
    hid: int
    process: Process
    service: S
    groups: tuple[str, ...]
    final: bool  # sent after the faults stopped


@dataclass
class Run:
    seed: int
    sim: Simulator
    hosts: dict[str, list[NodeId]]
    nodes: list[NodeId]
    links: list[GroupLink]
    sent: dict[int, Sent] = field(default_factory=dict)
    # per process, in order: ("view", view_id) and ("deliver", hid)
    log: dict[Process, list[tuple[str, object]]] = field(default_factory=dict)
    # per process, in order: "send" and "deliver" of hids (for causality)
    history: dict[Process, list[tuple[str, int]]] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)

    def process(self, node: NodeId) -> Process:
        return (node, self.sim.incarnation(node))

    def observe(self, node: NodeId, effect: object, now: float) -> None:
        p = self.process(node)
        if isinstance(effect, OrderingReset):
            self.log.setdefault(p, []).append(("view", effect.new_view_id))
        elif isinstance(effect, Deliver):
            hid = HID.unpack_from(effect.payload)[0]
            self.log.setdefault(p, []).append(("deliver", hid))
            self.history.setdefault(p, []).append(("deliver", hid))

    def submit(
        self, node: NodeId, service: S, groups: tuple[str, ...], final: bool = False
    ) -> None:
        if not self.sim.is_alive(node):
            return
        hid = len(self.sent) + 1
        p = self.process(node)
        payload = HID.pack(hid) + bytes(hid % 200)
        self.sent[hid] = Sent(hid, p, service, groups, final)
        history = self.history.setdefault(p, [])
        history.append(("send", hid))  # before the effects: own deliveries come after
        try:
            self.sim.act(
                node, lambda d, now: d.submit(groups, payload, service, f"#c#d{node}", now)
            )
        except BufferFull:
            del self.sent[hid]
            history.remove(("send", hid))

    def hosted(self, node: NodeId, hid: int) -> bool:
        return any(node in self.hosts[g] for g in self.sent[hid].groups)

    def fail(self, message: str) -> None:
        pytest.fail(f"seed={self.seed} faults={self.faults}: {message}")

    def delivered(self, p: Process) -> list[int]:
        return [int(h) for kind, h in self.log.get(p, []) if kind == "deliver"]  # type: ignore[call-overload]

    def views_of(self, p: Process) -> list[tuple[object, list[int]]]:
        """(view id, messages delivered in it), in order; flush deliveries count for the
        view they complete (they precede the next view's OrderingReset)."""
        out: list[tuple[object, list[int]]] = []
        for kind, value in self.log.get(p, []):
            if kind == "view":
                out.append((value, []))
            elif out:
                out[-1][1].append(int(value))  # type: ignore[call-overload]
            else:
                self.fail(f"process {p} delivered {value} before installing any view")
        return out


def scenario(seed: int) -> Run:
    rng = random.Random(seed)
    n = rng.randint(3, 6)
    nodes = [NodeId(i) for i in range(1, n + 1)]
    loss = rng.choice([0.0, 0.01, 0.03])
    pairs = [(a, b) for a in range(1, n + 1) for b in range(a + 1, n + 1)]
    links = [
        GroupLink(
            a,
            b,
            LinkModel(
                delay=rng.uniform(0.001, 0.008),
                jitter=rng.uniform(0.0, 0.003),
                loss=loss,
                reorder=rng.choice([0.0, 0.1]),
            ),
            weight=float(rng.randint(1, 4)),
        )
        for a, b in pairs
        if rng.random() < 0.8 or b == a + 1  # connected: a chain plus most other pairs
    ]
    hosts = {g: sorted(rng.sample(nodes, rng.randint(1, n))) for g in GROUPS}
    sim = build_group_sim(links, hosts, seed=seed, policy=rng.choice(POLICIES))
    run = Run(seed, sim, hosts, nodes, links)
    sim.observe(run.observe)
    sim.run(until=SETTLE)

    # faults at random times during the workload; at most n - 2 daemons down at once
    t = SETTLE + rng.uniform(0.1, 0.5)
    down_until: dict[NodeId, float] = {}  # crashed daemons: when they come back
    while t < SETTLE + WORKLOAD - 0.3:
        kind = rng.choice(["crash", "crash-restart", "partition"])
        down = [x for x, back in down_until.items() if back >= t]
        if kind.startswith("crash") and len(down) < n - 2:
            victim = rng.choice([x for x in nodes if x not in down])
            sim.call_at(t, partial(sim.crash, victim))
            run.faults.append(f"{t:.2f} crash {victim}")
            down_until[victim] = float("inf")
            if kind == "crash-restart":
                back = t + rng.uniform(0.2, 0.8)
                sim.call_at(back, partial(sim.restart, victim))
                run.faults.append(f"{back:.2f} restart {victim}")
                down_until[victim] = back
        elif kind == "partition":
            side = set(rng.sample(nodes, rng.randint(1, n - 1)))
            other = [x for x in nodes if x not in side]
            sim.call_at(t, partial(sim.partition, [sorted(side), other]))
            heal = t + rng.uniform(0.3, 1.0)
            sim.call_at(heal, sim.heal)
            run.faults.append(f"{t:.2f} partition {sorted(side)}|{other} healed {heal:.2f}")
        t += rng.uniform(0.3, 0.9)

    messages = rng.randint(20, 60)
    for _ in range(messages):
        at = SETTLE + rng.uniform(0.0, WORKLOAD)
        groups = tuple(sorted(rng.sample(GROUPS, rng.choice([1, 1, 2]))))
        service = rng.choice(list(S))
        sim.call_at(at, partial(run.submit, rng.choice(nodes), service, groups))
    calm_at = SETTLE + WORKLOAD + 1.0 + CALM  # the last heal/restart is before +1.0
    for _ in range(10):
        at = calm_at + rng.uniform(0.0, FINAL)
        groups = (rng.choice(GROUPS),)
        service = rng.choice(RELIABLE_UP)
        sim.call_at(at, partial(run.submit, rng.choice(nodes), service, groups, True))
    sim.run(until=calm_at + 2 * FINAL)
    return run


def check_no_duplicates_and_only_hosts(run: Run) -> None:
    for p in run.log:
        got = run.delivered(p)
        if len(got) != len(set(got)):
            run.fail(f"process {p} delivered a message twice")
        for hid in got:
            if not run.hosted(p[0], hid):
                run.fail(f"process {p} delivered {run.sent[hid]} but hosts none of its groups")


def check_fifo(run: Run) -> None:
    for p in run.log:
        last: dict[Process, int] = {}
        for hid in run.delivered(p):
            msg = run.sent[hid]
            if msg.service == S.FIFO:
                if hid < last.get(msg.process, 0):
                    run.fail(f"process {p}: FIFO {hid} of {msg.process} after {last}")
                last[msg.process] = hid


def check_causal(run: Run, family: tuple[S, ...]) -> None:
    """m1 sent or delivered by a process before it sent m2: nobody delivers m2 before m1
    (among messages of `family`). Causes are tracked transitively through deliveries."""
    deps: dict[int, frozenset[int]] = {}
    pending = {p: list(h) for p, h in run.history.items()}
    past: dict[Process, set[int]] = {p: set() for p in pending}
    # replay each process's history; a delivery needs the message's deps known first
    progress = True
    while progress:
        progress = False
        for p, items in pending.items():
            while items:
                kind, hid = items[0]
                if run.sent[hid].service not in family:
                    items.pop(0)
                    continue
                if kind == "send":
                    deps[hid] = frozenset(past[p])
                    past[p].add(hid)
                elif hid in deps:
                    past[p] |= deps[hid] | {hid}
                else:
                    break  # its sender's history has not been replayed that far yet
                items.pop(0)
                progress = True
    for p in run.log:
        order = {h: i for i, h in enumerate(run.delivered(p)) if run.sent[h].service in family}
        for hid, pos in order.items():
            for dep in deps.get(hid, ()):
                if dep in order and order[dep] > pos:
                    run.fail(f"process {p} delivered {hid} before its cause {dep}")


def check_total_order(run: Run) -> None:
    orders = {p: [h for h in run.delivered(p) if run.sent[h].service in TOTAL] for p in run.log}
    procs = sorted(orders)
    for i, a in enumerate(procs):
        for b in procs[i + 1 :]:
            common = set(orders[a]) & set(orders[b])
            left = [h for h in orders[a] if h in common]
            right = [h for h in orders[b] if h in common]
            if left != right:
                run.fail(f"processes {a} and {b} disagree on the total order")


def check_same_view_everywhere(run: Run) -> None:
    """Every process delivering a message delivers it in the same view."""
    seen: dict[int, object] = {}
    for p in run.log:
        for view, hids in run.views_of(p):
            for hid in hids:
                if seen.setdefault(hid, view) != view:
                    run.fail(f"message {run.sent[hid]} delivered in two different views")


def check_virtual_synchrony(run: Run) -> None:
    """Processes installing view V and then the same view V' delivered the same
    messages in V, restricted to the groups both host."""
    transitions: dict[tuple[object, object], list[tuple[Process, set[int]]]] = {}
    for p in run.log:
        views = run.views_of(p)
        for (v, hids), (nxt, _) in itertools.pairwise(views):
            transitions.setdefault((v, nxt), []).append((p, set(hids)))
    for (v, _), members in transitions.items():
        for i, (p, mine) in enumerate(members):
            for q, theirs in members[i + 1 :]:
                both = [
                    h
                    for h in mine ^ theirs
                    if run.hosted(p[0], h)
                    and run.hosted(q[0], h)
                    and run.sent[h].service != S.UNRELIABLE  # no guarantee at all
                ]
                if both:
                    run.fail(
                        f"processes {p} and {q} passed from view {v!r} to the same view "
                        f"but delivered different messages in it: {[run.sent[h] for h in both]}"
                    )


def check_own_messages(run: Run) -> None:
    """A process delivers every message it sent (RELIABLE and up) to a group it hosts,
    unless it crashed first."""
    for hid, msg in run.sent.items():
        p = msg.process
        if msg.service == S.UNRELIABLE or not run.hosted(p[0], hid):
            continue
        alive = run.sim.incarnation(p[0]) == p[1] and run.sim.is_alive(p[0])
        if alive and hid not in run.delivered(p):
            run.fail(f"process {p} never delivered its own message {msg}")


def components(run: Run) -> dict[NodeId, tuple[NodeId, ...]]:
    """Live daemons, each with the live daemons it can reach (its expected view)."""
    live = {n for n in run.nodes if run.sim.is_alive(n)}
    out: dict[NodeId, tuple[NodeId, ...]] = {}
    for start in live:
        seen, stack = {start}, [start]
        while stack:
            a = stack.pop()
            for e in run.links:
                for x, y in ((e.a, e.b), (e.b, e.a)):
                    if x == a and NodeId(y) in live and NodeId(y) not in seen:
                        seen.add(NodeId(y))
                        stack.append(NodeId(y))
        out[start] = tuple(sorted(seen))
    return out


def check_liveness(run: Run) -> None:
    """Faults stopped: each live daemon installed the view of the daemons it reaches, the
    same view as they, and delivered every message sent since by one of them."""
    reach = components(run)
    view_of: dict[tuple[NodeId, ...], set[bytes]] = {}
    for node, members in reach.items():
        engine = run.sim.node_as(node, GroupDaemon).engine
        if engine.flushing or engine.view is None or engine.view.members != members:
            run.fail(f"daemon {node} has not installed the view of the daemons {members}")
        view_of.setdefault(members, set()).add(engine.view.view_id)
    if any(len(ids) != 1 for ids in view_of.values()):
        run.fail(f"daemons that reach each other are in different views: {view_of}")
    for hid, msg in run.sent.items():
        if not msg.final or msg.service == S.UNRELIABLE or msg.process[0] not in reach:
            continue
        for node in reach[msg.process[0]]:
            if run.hosted(node, hid) and hid not in run.delivered(run.process(node)):
                run.fail(f"daemon {node} never delivered {msg}, sent after the faults")


@pytest.mark.parametrize("seed", range(SEEDS))
def test_group_invariants_under_faults(seed: int) -> None:
    run = scenario(seed)
    check_no_duplicates_and_only_hosts(run)
    check_fifo(run)
    check_causal(run, (S.CAUSAL,))
    check_causal(run, TOTAL)
    check_total_order(run)
    check_same_view_everywhere(run)
    check_virtual_synchrony(run)
    check_own_messages(run)
    check_liveness(run)


def test_the_faults_are_real() -> None:
    """Not vacuous: across a few seeds views change during traffic, flushes carry
    messages some daemons lacked, and processes pass between views together."""
    recovered = transitions = 0
    for seed in range(6):
        run = scenario(seed)
        for node in run.nodes:
            if run.sim.is_alive(node):
                stats = run.sim.node_as(node, GroupDaemon).engine.statistics()
                recovered += stats.flush_recovered
        for p in run.log:
            transitions += max(0, len(run.views_of(p)) - 2)
    assert transitions > 10
    assert recovered > 0
