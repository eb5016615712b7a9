"""Seeded whole daemons (`DaemonNode`, the object the runtime drives) with simulated
clients, under faults: daemon crashes and restarts, partitions, client crashes and
reconnections, slow receivers of every policy. Checked at the clients, frame by frame:

* no client gets a message twice, nor one of a group it never joined;
* per sending client: FIFO among FIFO, CAUSAL among CAUSAL, AGREED/SAFE among themselves; one order of AGREED/SAFE messages at all clients;
* back-pressure loses nothing: two clients of one daemon in the same group all along get
  the same RELIABLE-and-up messages of it, however slowly one reads, unless it was cut
  off — and then with ERROR SLOW_RECEIVER (`disconnect` past its socket, `block` past
  block_timeout); a `drop-unreliable` member loses only UNRELIABLE ones;
* liveness: once faults stop, messages sent reach every connected member;
* memory: every daemon stays under a bound throughout, and once faults stop and the
  messages are stable, it is back within 20 % of its level before the faults (plus one
  link window of slack for heartbeats in flight).

MESHCAST_DAEMON_SEEDS sets the number of seeds (default 200).
"""

from __future__ import annotations

import os
import random
import struct
from dataclasses import dataclass, field
from functools import partial

import pytest

from meshcast.group.sessions import SessionConfig
from meshcast.ids import NodeId
from meshcast.overlay.routing import POLICIES
from meshcast.sim.daemon import DaemonSim, GroupLink, SimClient, build_daemon_sim
from meshcast.sim.network import LinkModel
from meshcast.wire.client import (
    ErrorCode,
    Join,
    Multicast,
    SlowReceiverPolicy,
)
from meshcast.wire.client import ServiceLevel as S

SEEDS = int(os.environ.get("MESHCAST_DAEMON_SEEDS", "200"))
HID = struct.Struct("!Q")
GROUPS = ("g0", "g1")
HIGH_WATER = 16 * 1024  # a simulated client's socket
MAX_BACKLOG = 96 * 1024
BLOCK_TIMEOUT = 1.0
SETTLE = 1.5  # s: views and joins done
WORKLOAD = (2.0, 3.5)  # s: sends, slow readers, faults
CALM = 5.5  # s: no fault after this
FINAL = 6.0  # s: every connected member sends once
END = 8.0
MEMORY_BOUND = 4 * 1024 * 1024  # bytes per daemon, at any time
MEMORY_SLACK = 8 * 1024  # bytes: heartbeats and ACKs in flight at any instant
FIFO_UP = (S.FIFO, S.CAUSAL, S.AGREED, S.SAFE)
FAMILY = {S.FIFO: 1, S.CAUSAL: 2, S.AGREED: 3, S.SAFE: 3}  # ordered among themselves
TOTAL = (S.AGREED, S.SAFE)


@dataclass
class Member:
    client: SimClient
    groups: dict[str, SlowReceiverPolicy]
    joined_at: float
    slow: bool = False


@dataclass
class Run:
    seed: int
    dsim: DaemonSim
    nodes: list[NodeId]
    members: list[Member] = field(default_factory=list)
    sent: dict[int, tuple[str, S, tuple[str, ...], float]] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)
    memory_before: dict[NodeId, int] = field(default_factory=dict)
    memory_peak: dict[NodeId, int] = field(default_factory=dict)

    def fail(self, message: str) -> None:
        pytest.fail(f"seed={self.seed} faults={self.faults}: {message}")

    def connect(self, node: NodeId, rng: random.Random, *, slow: bool = False) -> None:
        if not self.dsim.sim.is_alive(node):
            return
        name = f"c{len(self.members)}"
        client = self.dsim.connect(node, name)
        groups = {
            g: rng.choice(list(SlowReceiverPolicy))
            for g in rng.sample(GROUPS, rng.randint(1, len(GROUPS)))
        }
        for group, policy in groups.items():
            client.send(Join(group, policy))
        self.members.append(Member(client, groups, self.dsim.sim.now, slow))

    def send(self, member: Member, service: S, groups: tuple[str, ...], size: int) -> None:
        client = member.client
        if not client.alive or client.send_paused:
            return
        hid = len(self.sent) + 1
        self.sent[hid] = (client.name, service, groups, self.dsim.sim.now)
        client.send(Multicast(groups, HID.pack(hid) + bytes(size), service))

    def sample_memory(self) -> None:
        for node in self.nodes:
            if self.dsim.sim.is_alive(node):
                used = self.dsim.node(node).memory()
                self.memory_peak[node] = max(self.memory_peak.get(node, 0), used)
                if used > MEMORY_BOUND:
                    self.fail(f"daemon {node} holds {used} bytes (bound {MEMORY_BOUND})")


def scenario(seed: int) -> Run:
    rng = random.Random(seed)
    n = rng.randint(3, 4)
    nodes = [NodeId(i) for i in range(1, n + 1)]
    loss = rng.choice([0.0, 0.01, 0.03])
    links = [
        GroupLink(a, b, LinkModel(delay=rng.uniform(0.001, 0.006), loss=loss))
        for a in range(1, n + 1)
        for b in range(a + 1, n + 1)
        if b == a + 1 or rng.random() < 0.6
    ]
    dsim = build_daemon_sim(
        links,
        seed=seed,
        policy=rng.choice(POLICIES),
        session_config=SessionConfig(max_backlog=MAX_BACKLOG, block_timeout=BLOCK_TIMEOUT),
        high_water=HIGH_WATER,
    )
    sim = dsim.sim
    run = Run(seed, dsim, nodes)
    sim.run(until=SETTLE)
    for node in nodes:
        for _ in range(rng.randint(1, 2)):
            run.connect(node, rng)
    slow = rng.choice(run.members)
    sim.run(until=WORKLOAD[0] - 0.1)
    for node in nodes:
        run.memory_before[node] = dsim.node(node).memory()

    # a slow reader: stops reading for a while (maybe for good)
    slow.slow = True
    slow.client.reading = False
    resume = WORKLOAD[0] + rng.uniform(0.3, 1.5)
    if rng.random() < 0.8:
        sim.call_at(resume, partial(_read_again, slow.client))
        run.faults.append(f"{slow.client.name} slow until {resume:.2f}")
    else:
        run.faults.append(f"{slow.client.name} never reads")
    # a client crash and a new client in its place
    victim = rng.choice([m for m in run.members if m is not slow])
    crash_at = rng.uniform(*WORKLOAD)
    sim.call_at(crash_at, victim.client.crash)
    sim.call_at(crash_at + 0.2, partial(run.connect, victim.client.node, rng))
    run.faults.append(f"{crash_at:.2f} client {victim.client.name} crashes")
    # daemon faults
    if rng.random() < 0.5:
        node = rng.choice(nodes)
        at = rng.uniform(*WORKLOAD)
        back = at + rng.uniform(0.3, 0.8)
        sim.call_at(at, partial(sim.crash, node))
        sim.call_at(back, partial(sim.restart, node))
        sim.call_at(back + 0.3, partial(run.connect, node, rng))
        run.faults.append(f"{at:.2f} daemon {node} crashes, back {back:.2f}")
    if rng.random() < 0.5:
        side = sorted(rng.sample(nodes, rng.randint(1, n - 1)))
        at = rng.uniform(*WORKLOAD)
        heal = at + rng.uniform(0.3, 1.0)
        sim.call_at(at, partial(sim.partition, [side, [x for x in nodes if x not in side]]))
        sim.call_at(heal, sim.heal)
        run.faults.append(f"{at:.2f} partition {side} healed {heal:.2f}")

    for _ in range(rng.randint(40, 80)):
        at = rng.uniform(*WORKLOAD)
        groups = tuple(sorted(rng.sample(GROUPS, rng.choice([1, 1, 2]))))
        size = rng.choice([16, 200, 1500, 4000])
        sim.call_at(
            at,
            partial(_send_from_any, run, rng, rng.choice(list(S)), groups, size, exclude_slow=True),
        )
    t = sim.now
    while t < END:
        sim.call_at(t, run.sample_memory)
        t += 0.05
    sim.call_at(CALM - 0.01, partial(_everyone_reads, run))
    sim.call_at(FINAL, partial(_final_round, run))
    sim.run(until=END)
    return run


def _read_again(client: SimClient) -> None:
    client.reading = True
    client.read()


def _everyone_reads(run: Run) -> None:
    for member in run.members:
        if member.client.alive and not member.client.reading and member.slow:
            _read_again(member.client)


def _send_from_any(
    run: Run,
    rng: random.Random,
    service: S,
    groups: tuple[str, ...],
    size: int,
    *,
    exclude_slow: bool,
) -> None:
    senders = [m for m in run.members if m.client.alive and not (exclude_slow and m.slow)]
    if senders:
        run.send(rng.choice(senders), service, groups, size)


def _final_round(run: Run) -> None:
    for member in run.members:
        if member.client.alive:
            group = sorted(member.groups)[0]
            run.send(member, S.AGREED, (group,), 32)


def hids(member: Member) -> list[int]:
    return [HID.unpack_from(m.payload)[0] for m in member.client.messages()]


def check_messages(run: Run) -> None:
    for member in run.members:
        got = hids(member)
        if len(got) != len(set(got)):
            run.fail(f"{member.client.name} got a message twice: {got}")
        for message in member.client.messages():
            if not set(message.groups) & set(member.groups):
                run.fail(f"{member.client.name} got a message of {message.groups}")
        # per sender, in send order within each family (FIFO; CAUSAL; AGREED with SAFE)
        last: dict[tuple[str, int], int] = {}
        for hid in got:
            sender, service, _, _ = run.sent[hid]
            family = FAMILY.get(service)
            if family is not None:
                if hid < last.get((sender, family), 0):
                    run.fail(f"{member.client.name}: {service.name} order of {sender}: {got}")
                last[(sender, family)] = hid


def check_total_order(run: Run) -> None:
    orders = [[h for h in hids(member) if run.sent[h][1] in TOTAL] for member in run.members]
    position = [{h: i for i, h in enumerate(order)} for order in orders]
    for i in range(len(orders)):
        for j in range(i + 1, len(orders)):
            common = [h for h in orders[i] if h in position[j]]
            if [position[j][h] for h in common] != sorted(position[j][h] for h in common):
                run.fail(
                    f"{run.members[i].client.name} and {run.members[j].client.name} "
                    f"disagree on the total order: {common}"
                )


def check_back_pressure(run: Run) -> None:
    """Two members of one daemon, in group g all along: the same reliable messages of g,
    unless one was cut off as a slow receiver."""
    for member in run.members:
        client = member.client
        if client.close_error is not None:
            if client.close_error.code != ErrorCode.SLOW_RECEIVER:
                run.fail(f"{client.name} closed with {client.close_error}")
            if not member.slow:
                run.fail(f"{client.name} read everything but was cut off as slow")
    for a in run.members:
        for b in run.members:
            if (
                a is b
                or a.client.node != b.client.node
                or a.client.incarnation != b.client.incarnation
            ):
                continue
            if not (a.client.alive and b.client.alive) or b.slow:
                continue
            for group, policy in a.groups.items():
                if group not in b.groups:
                    continue
                since = max(a.joined_at, b.joined_at) + 0.5  # both joins applied
                lossless = (S.RELIABLE, *FIFO_UP) + (
                    () if policy == SlowReceiverPolicy.DROP_UNRELIABLE else (S.UNRELIABLE,)
                )

                got_a = _of_group(run, a, group, lossless, since)
                got_b = _of_group(run, b, group, lossless, since)
                if a.slow and not got_b <= got_a:
                    missing = sorted(got_b - got_a)
                    run.fail(f"slow {a.client.name} lost {missing} of {group} ({policy})")


def _of_group(
    run: Run, member: Member, group: str, services: tuple[S, ...], since: float
) -> set[int]:
    return {
        h
        for h in hids(member)
        if group in run.sent[h][2] and run.sent[h][1] in services and run.sent[h][3] >= since
    }


def check_liveness(run: Run) -> None:
    for hid, (sender, _, groups, at) in run.sent.items():
        if at < FINAL:
            continue
        for member in run.members:
            if member.client.alive and set(groups) & set(member.groups) and hid not in hids(member):
                run.fail(f"{member.client.name} never got final message {hid} of {sender}")


def check_memory(run: Run) -> None:
    for node in run.nodes:
        if not run.dsim.sim.is_alive(node):
            continue
        after = run.dsim.node(node).memory()
        before = run.memory_before.get(node, 0)
        if after > before * 1.2 + MEMORY_SLACK:
            run.fail(
                f"daemon {node} holds {after} bytes after the faults, {before} before "
                f"(peak {run.memory_peak.get(node)})"
            )


@pytest.mark.parametrize("seed", range(SEEDS))
def test_daemons_with_clients_under_faults(seed: int) -> None:
    run = scenario(seed)
    check_messages(run)
    check_total_order(run)
    check_back_pressure(run)
    check_liveness(run)
    check_memory(run)
