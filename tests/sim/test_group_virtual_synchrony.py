"""Seeded whole daemons (`DaemonNode`, the runtime's object) with one client each
(`GroupClients`) under faults: crashes, restarts, partitions and merges while clients
send with every service. Invariants (docs/design/group.md, "Virtual synchrony"), checked
at the clients:

* no duplicates, nothing of a group the client is not in when it gets it;
* FIFO per sending process, causality (CAUSAL among CAUSAL, AGREED/SAFE among
  themselves), one total order for AGREED/SAFE across all processes and views;
* every process delivering a message delivers it in the same view (the one it was sent
  in; a view is the daemon's group_view event, and a view's flush deliveries precede
  the next one);
* virtual synchrony: processes that install the same view and then the same next view
  deliver the same messages in the first (of the groups both are in: see below);
* a process never loses its own messages: every one its client sent to a group it was
  in is delivered to it while both live;
* liveness: once faults stop, every live daemon installs one view with all of them, and
  messages sent then reach every live client in their groups.

A process is (daemon, incarnation): a restarted daemon is a new process with a new view
whose client is gone; `GroupClients` reconnects it, and it rejoins its groups.

What changed with whole daemons (the engine suite fixed the hosts of each group): hosting
is now dynamic, a client joins in the total order, and a restarted daemon hosts its
groups only once its client's JOIN is applied; after a merge, a daemon learns the other
side's members from their STATE, in the new view. So virtual synchrony compares two
processes' deliveries in view V only for groups both clients were in when V began and
stayed in throughout V (their own MEMBERSHIP frames), and only messages the sender's
daemon addressed to both (its table listed both clients when the client sent); own
messages count for groups the sender's client was in when it sent and stayed in.

MESHCAST_VS_SEEDS sets the number of seeds (default 200).
"""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass, field
from functools import partial

import pytest

from meshcast.ids import NodeId
from meshcast.overlay.routing import POLICIES
from meshcast.sim.daemon import (
    DaemonSim,
    GroupClients,
    GroupLink,
    GroupSend,
    Process,
    ViewSegment,
    build_daemon_sim,
)
from meshcast.sim.network import LinkModel
from meshcast.wire.client import ServiceLevel as S

SEEDS = int(os.environ.get("MESHCAST_VS_SEEDS", "200"))
GROUPS = ("g0", "g1", "g2")
CONNECT = 0.5  # s: the clients connect and join
SETTLE = 1.5  # s: the first views are installed and the joins applied everywhere by then
WORKLOAD = 2.0  # s of random sends and faults
CALM = 3.0  # s after the last fault: views converge and flushes end
FINAL = 1.0  # s of sends in the final view, then as long again to deliver them
TOTAL = (S.AGREED, S.SAFE)
RELIABLE_UP = (S.RELIABLE, S.FIFO, S.CAUSAL, S.AGREED, S.SAFE)


@dataclass
class Run:
    seed: int
    dsim: DaemonSim
    group: GroupClients
    nodes: list[NodeId]
    links: list[GroupLink]
    final: set[int] = field(default_factory=set)  # sent after the faults stopped
    faults: list[str] = field(default_factory=list)

    @property
    def sent(self) -> dict[int, GroupSend]:
        return self.group.sent

    def send(self, node: NodeId, service: S, groups: tuple[str, ...], padding: int) -> None:
        self.group.send(node, service, groups, padding)

    def send_final(self, node: NodeId, service: S, groups: tuple[str, ...]) -> None:
        hid = self.group.send(node, service, groups)
        if hid is not None:
            self.final.add(hid)

    def fail(self, message: str) -> None:
        pytest.fail(f"seed={self.seed} faults={self.faults}: {message}")

    def processes(self) -> list[Process]:
        return sorted(self.group.timeline)

    def delivered(self, p: Process) -> list[int]:
        return self.group.delivered(p)

    def segments(self, p: Process) -> list[ViewSegment]:
        segments = self.group.segments(p)
        if segments and not segments[0].view and segments[0].delivered:
            self.fail(f"process {p} delivered {segments[0].delivered} before any view")
        return [s for s in segments if s.view]

    def addressed(self, hid: int, group: str, *processes: Process) -> bool:
        """Did the sender's daemon list the clients of `processes` in `group`?"""
        members = self.sent[hid].members.get(group, frozenset())
        return all(self.group.names.get(p) in members for p in processes)


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
    dsim = build_daemon_sim(links, seed=seed, policy=rng.choice(POLICIES))
    sim = dsim.sim
    group = GroupClients(dsim, hosts)
    run = Run(seed, dsim, group, nodes, links)
    sim.call_at(CONNECT, group.connect_all)
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
                sim.call_at(back, partial(group.restart, victim))  # and its client returns
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
        sim.call_at(at, partial(run.send, rng.choice(nodes), service, groups, rng.randrange(200)))
    calm_at = SETTLE + WORKLOAD + 1.0 + CALM  # the last heal/restart is before +1.0
    for _ in range(10):
        at = calm_at + rng.uniform(0.0, FINAL)
        groups = (rng.choice(GROUPS),)
        service = rng.choice(RELIABLE_UP)
        sim.call_at(at, partial(run.send_final, rng.choice(nodes), service, groups))
    sim.run(until=calm_at + 2 * FINAL)
    return run


def check_no_duplicates_and_only_groups_joined(run: Run) -> None:
    if run.group.refused:
        run.fail(f"daemons refused messages {sorted(run.group.refused)}")
    for p in run.processes():
        got = run.delivered(p)
        if len(got) != len(set(got)):
            run.fail(f"process {p} delivered a message twice")
        for (kind, hid), member in run.group.member_at(p):
            if kind == "deliver" and not member & set(run.sent[hid].groups):  # type: ignore[index]
                run.fail(f"process {p} delivered {run.sent[hid]} (groups {member})")  # type: ignore[index]


def check_fifo(run: Run) -> None:
    for p in run.processes():
        last: dict[Process, int] = {}
        for hid in run.delivered(p):
            msg = run.sent[hid]
            if msg.service == S.FIFO:
                if hid < last.get(msg.process, 0):
                    run.fail(f"process {p}: FIFO {hid} of {msg.process} after {last}")
                last[msg.process] = hid


def check_causal(run: Run, family: tuple[S, ...]) -> None:
    """m1 sent or got by a client before it sent m2: no client gets m2 before m1 (among
    messages of `family`). Causes are tracked transitively through deliveries."""
    deps = run.group.causal_past(lambda hid: run.sent[hid].service in family)
    for p in run.processes():
        order = {h: i for i, h in enumerate(run.delivered(p)) if run.sent[h].service in family}
        for hid, pos in order.items():
            for dep in deps.get(hid, ()):
                if dep in order and order[dep] > pos:
                    run.fail(f"process {p} delivered {hid} before its cause {dep}")


def check_total_order(run: Run) -> None:
    procs = run.processes()
    orders = {p: [h for h in run.delivered(p) if run.sent[h].service in TOTAL] for p in procs}
    for i, a in enumerate(procs):
        for b in procs[i + 1 :]:
            common = set(orders[a]) & set(orders[b])
            left = [h for h in orders[a] if h in common]
            right = [h for h in orders[b] if h in common]
            if left != right:
                run.fail(f"processes {a} and {b} disagree on the total order")


def check_same_view_everywhere(run: Run) -> None:
    """Every process delivering a message delivers it in the same view."""
    seen: dict[int, str] = {}
    for p in run.processes():
        for segment in run.segments(p):
            for hid in segment.delivered:
                if seen.setdefault(hid, segment.view) != segment.view:
                    run.fail(f"message {run.sent[hid]} delivered in two different views")


def check_virtual_synchrony(run: Run) -> None:
    """Processes installing view V and then the same view V' delivered the same messages
    in V: those of a group both clients were in throughout V, addressed to both."""
    transitions: dict[tuple[str, str], list[tuple[Process, ViewSegment]]] = {}
    for p in run.processes():
        for segment, nxt in itertools.pairwise(run.segments(p)):
            transitions.setdefault((segment.view, nxt.view), []).append((p, segment))
    for (v, _), members in transitions.items():
        for i, (p, mine) in enumerate(members):
            for q, theirs in members[i + 1 :]:
                both = mine.throughout & theirs.throughout
                differ = [
                    h
                    for h in set(mine.delivered) ^ set(theirs.delivered)
                    if run.sent[h].service != S.UNRELIABLE  # no guarantee at all
                    and any(g in both and run.addressed(h, g, p, q) for g in run.sent[h].groups)
                ]
                if differ:
                    run.fail(
                        f"processes {p} and {q} passed from view {v} to the same view "
                        f"but delivered different messages in it: {[run.sent[h] for h in differ]}"
                    )


def check_own_messages(run: Run) -> None:
    """A process delivers every message (RELIABLE and up) its client sent to a group it
    was in then and stayed in, unless the daemon or the client is gone."""
    for p in run.processes():
        client = run.group.clients.get(p[0])
        if client is None or (client.node, client.incarnation) != p or not client.alive:
            continue
        got = set(run.delivered(p))
        timeline = run.group.member_at(p)
        for i, ((kind, hid), member) in enumerate(timeline):
            if kind != "send":
                continue
            msg = run.sent[hid]  # type: ignore[index]
            if msg.service == S.UNRELIABLE or hid in run.group.refused or hid in got:
                continue
            later = {e[1][0] for e, _ in timeline[i:] if e[0] == "member"}  # type: ignore[index]
            if any(g in member and g not in later for g in msg.groups):
                run.fail(f"process {p} never delivered its own message {msg}")


def components(run: Run) -> dict[NodeId, tuple[NodeId, ...]]:
    """Live daemons, each with the live daemons it can reach (its expected view)."""
    sim = run.dsim.sim
    live = {n for n in run.nodes if sim.is_alive(n)}
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
    same view as they, and each client in a group got every message sent to it since by
    a client of one of them."""
    reach = components(run)
    view_of: dict[tuple[NodeId, ...], set[bytes]] = {}
    for node, members in reach.items():
        engine = run.dsim.node(node).engine
        if engine.flushing or engine.view is None or engine.view.members != members:
            run.fail(f"daemon {node} has not installed the view of the daemons {members}")
        view_of.setdefault(members, set()).add(engine.view.view_id)
    if any(len(ids) != 1 for ids in view_of.values()):
        run.fail(f"daemons that reach each other are in different views: {view_of}")
    for hid in sorted(run.final):
        msg = run.sent[hid]
        if msg.process != run.group.process(msg.process[0]) or msg.process[0] not in reach:
            continue
        for node in reach[msg.process[0]]:
            p = run.group.process(node)
            timeline = run.group.member_at(p)
            member = timeline[-1][1] if timeline else frozenset()
            if member & set(msg.groups) and hid not in run.delivered(p):
                run.fail(f"process {p} never delivered {msg}, sent after the faults")


# Seed 120 found a session delivering against the membership table as it stood after a
# whole batch of effects, not at the message's place in the total order (a client got a
# message of a group its own MEMBERSHIP frames said it had just been dropped from):
# tests/unit/group/test_sessions.py reproduces it deterministically.
@pytest.mark.parametrize("seed", range(SEEDS))
def test_group_invariants_under_faults(seed: int) -> None:
    run = scenario(seed)
    check_no_duplicates_and_only_groups_joined(run)
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
    messages some daemons lacked, processes pass between views together, and restarted
    daemons' clients come back and get messages."""
    recovered = transitions = compared = restarted = 0
    for seed in range(6):
        run = scenario(seed)
        for node in run.nodes:
            if run.dsim.sim.is_alive(node):
                recovered += run.dsim.node(node).engine.statistics().flush_recovered
        for p in run.processes():
            segments = run.segments(p)
            transitions += max(0, len(segments) - 2)
            compared += sum(len(s.throughout) for s in segments[:-1])
            if p[1] > 0 and run.delivered(p):
                restarted += 1
    assert transitions > 10
    assert recovered > 0
    assert compared > 10
    assert restarted > 0
