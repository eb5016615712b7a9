"""GroupMembership driven by hand: engines connected by a shuffling in-memory bus."""

from __future__ import annotations

import random

import pytest

from meshcast.errors import UsageError
from meshcast.group import Broadcast, GroupEngine
from meshcast.group.membership import (
    MEMBERSHIP_GROUP,
    MEMBERSHIP_MSG_TYPE,
    GroupMembership,
    MembershipChanged,
    MembershipEffect,
)
from meshcast.ids import NodeId
from meshcast.wire.client import Cause, ServiceLevel, ViewId


class Bus:
    """Daemons whose broadcasts arrive in a random order (each exactly once)."""

    def __init__(self, ids: list[int], seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.nodes = {NodeId(i): GroupMembership(GroupEngine(NodeId(i))) for i in ids}
        self.queue: list[tuple[NodeId, NodeId, bytes]] = []
        self.changes: dict[NodeId, list[MembershipChanged]] = {n: [] for n in self.nodes}
        self.delivered: dict[NodeId, list[bytes]] = {n: [] for n in self.nodes}
        self.now = 0.0

    def take(self, node: NodeId, effects: list[MembershipEffect]) -> None:
        for e in effects:
            if isinstance(e, Broadcast):
                self.queue += [(node, d, e.payload) for d in e.dests]
            elif isinstance(e, MembershipChanged):
                self.changes[node].append(e)
            elif hasattr(e, "payload"):
                self.delivered[node].append(e.payload)

    def install(self, members: list[int]) -> None:
        view = [NodeId(m) for m in members]
        for n in view:
            self.take(n, self.nodes[n].view_installed(view, self.now))

    def run(self) -> None:
        for _ in range(100_000):
            if self.queue:
                src, dst, payload = self.queue.pop(self.rng.randrange(len(self.queue)))
                self.take(dst, self.nodes[dst].overlay_delivered(src, payload, self.now))
                continue
            deadlines = [
                (d, n) for n, m in self.nodes.items() if (d := m.next_deadline()) is not None
            ]
            if not deadlines:
                return
            self.now = max(self.now, min(deadlines)[0])
            for d, n in deadlines:
                if d <= self.now:
                    self.take(n, self.nodes[n].on_timer(self.now))
        raise AssertionError("bus did not go quiet")


def test_a_malformed_membership_record_is_a_counted_drop() -> None:
    """A daemon (buggy or hostile) orders garbage on #membership: every daemon counts and
    drops it, and the next valid operation still applies everywhere."""
    bus = Bus([1, 2])
    bus.install([1, 2])
    bus.run()
    one = bus.nodes[NodeId(1)]
    applied = {n: m.statistics().operations_applied for n, m in bus.nodes.items()}  # STATEs
    for garbage in (b"MCGM\x09", b"MCGM\x01\x00\x00\x01\x01g", b"not even MCGM"):
        raw = one.engine.submit(
            (MEMBERSHIP_GROUP,), garbage, ServiceLevel.AGREED, "", bus.now, MEMBERSHIP_MSG_TYPE
        )
        bus.take(NodeId(1), raw)  # type: ignore[arg-type]
    bus.run()
    for n, m in bus.nodes.items():
        stats = m.statistics()
        assert (stats.malformed_dropped, stats.operations_applied) == (3, applied[n])
    bus.take(NodeId(1), one.join("#a#D1", "g", bus.now))
    bus.run()
    for node, m in bus.nodes.items():
        assert m.members("g") == ("#a#D1",)
        assert [c.cause for c in bus.changes[node]] == [Cause.JOIN]


def test_bad_names_are_usage_errors_before_anything_is_sent() -> None:
    bus = Bus([1])
    bus.install([1])
    bus.run()
    m = bus.nodes[NodeId(1)]
    with pytest.raises(UsageError, match="bad membership operation"):
        m.join("#a#D1", "g" * 256, bus.now)
    with pytest.raises(UsageError, match="bad membership operation"):
        m.join("", "g", bus.now)
    assert m.statistics().operations_submitted == 0


def test_malformed_operation_is_counted_not_applied() -> None:
    bus = Bus([1, 2])
    bus.install([1, 2])
    bus.run()
    m = bus.nodes[NodeId(1)]
    bus.take(NodeId(1), m.submit(["g"], b"x", ServiceLevel.RELIABLE, "#a#D1", 0.0))
    engine2 = bus.nodes[NodeId(2)].engine
    bus.take(
        NodeId(2),
        bus.nodes[NodeId(2)].overlay_delivered(NodeId(1), b"garbage", 0.0),
    )
    assert engine2.statistics().malformed_dropped == 1
    with pytest.raises(UsageError):
        m.submit([MEMBERSHIP_GROUP], b"x", ServiceLevel.AGREED, "#a#D1", 0.0)


@pytest.mark.parametrize("seed", range(10))
def test_joins_in_any_order_give_one_table_and_one_event_sequence(seed: int) -> None:
    bus = Bus([1, 2, 3], seed)
    bus.install([1, 2, 3])
    bus.run()
    rng = random.Random(seed)
    requests = [(n, f"#c{n}{k}#D{n}", g) for n in (1, 2, 3) for k in range(2) for g in ("a", "b")]
    rng.shuffle(requests)
    for n, member, group in requests:
        bus.take(NodeId(n), bus.nodes[NodeId(n)].join(member, group, bus.now))
    bus.run()
    tables = [m.table() for m in bus.nodes.values()]
    assert tables[0] == tables[1] == tables[2]
    assert len(tables[0]["a"]) == 6
    assert all(d == NodeId(int(name[2])) for name, d in tables[0]["a"])
    # every daemon saw the same changes, in the same order (STATE of the first view is empty)
    seqs = [[(c.group, c.view_id, c.members, c.cause) for c in bus.changes[n]] for n in bus.nodes]
    assert seqs[0] == seqs[1] == seqs[2]
    assert [c.view_id.counter for c in bus.changes[NodeId(1)] if c.group == "a"] == list(
        range(1, 7)
    )
    # the engines prune data to hosting daemons: a RELIABLE message reaches every host
    bus.take(
        NodeId(1), bus.nodes[NodeId(1)].submit(["a"], b"hi", ServiceLevel.RELIABLE, "#x#D1", 0)
    )
    bus.run()
    assert all(b"hi" in bus.delivered[n] for n in bus.nodes)


def test_leave_and_disconnect_causes() -> None:
    bus = Bus([1, 2])
    bus.install([1, 2])
    bus.run()
    n1, n2 = bus.nodes[NodeId(1)], bus.nodes[NodeId(2)]
    bus.take(NodeId(1), n1.join("#a#D1", "g", 0))
    bus.take(NodeId(2), n2.join("#b#D2", "g", 0))
    bus.take(NodeId(2), n2.join("#b#D2", "h", 0))
    bus.run()
    bus.take(NodeId(1), n1.leave("#a#D1", "g", 0))
    bus.take(NodeId(2), n2.disconnect("#b#D2", ["g", "h"], 0))
    bus.run()
    last = [(c.group, c.cause, c.who, c.members) for c in bus.changes[NodeId(1)][-3:]]
    assert last == [
        ("g", Cause.LEAVE, ("#a#D1",), ("#b#D2",)),
        ("g", Cause.DISCONNECT, ("#b#D2",), ()),
        ("h", Cause.DISCONNECT, ("#b#D2",), ()),
    ]
    assert n1.table() == n2.table() == {}


def test_departed_daemon_members_are_removed_with_network_cause() -> None:
    bus = Bus([1, 2, 3])
    bus.install([1, 2, 3])
    bus.run()
    for n in (1, 2, 3):
        bus.take(NodeId(n), bus.nodes[NodeId(n)].join(f"#c#D{n}", "g", 0))
    bus.run()
    bus.install([1, 2])
    bus.run()
    for n in (1, 2):
        c = [c for c in bus.changes[NodeId(n)] if c.cause == Cause.NETWORK]
        assert len(c) == 1
        assert c[0].who == ("#c#D3",)
        assert c[0].view_id == ViewId(4, 1)  # coordinated by the lowest daemon of the view
        assert "#c#D3" not in c[0].members
    assert bus.nodes[NodeId(1)].table() == bus.nodes[NodeId(2)].table()


def test_join_before_any_view_is_queued_then_applied() -> None:
    bus = Bus([1, 2])
    bus.take(NodeId(1), bus.nodes[NodeId(1)].join("#a#D1", "g", 0))
    assert bus.nodes[NodeId(1)].statistics().operations_queued == 1
    bus.install([1, 2])
    bus.run()
    assert bus.nodes[NodeId(2)].members("g") == ("#a#D1",)


def test_newcomer_learns_the_table_from_states() -> None:
    bus = Bus([1, 2, 3])
    bus.install([1, 2])
    bus.run()
    bus.take(NodeId(1), bus.nodes[NodeId(1)].join("#a#D1", "g", 0))
    bus.take(NodeId(2), bus.nodes[NodeId(2)].join("#b#D2", "g", 0))
    bus.run()
    bus.install([1, 2, 3])
    bus.run()
    tables = [m.table() for m in bus.nodes.values()]
    assert tables[0] == tables[1] == tables[2]
    assert bus.nodes[NodeId(3)].view_id("g") == bus.nodes[NodeId(1)].view_id("g")


@pytest.mark.parametrize("seed", range(200))
def test_a_newcomer_that_finishes_its_flush_last_applies_every_operation(seed: int) -> None:
    """Operations of the new view can reach a daemon before it has installed that view:
    they wait, and are applied as soon as it does (they used to be dropped as "not
    hosted": #membership was only marked hosted once this layer saw the reset)."""
    bus = Bus([1, 2, 3], seed)
    bus.install([1, 2])
    bus.run()
    bus.take(NodeId(1), bus.nodes[NodeId(1)].join("#a#D1", "g", 0))
    bus.run()
    bus.install([1, 2, 3])
    bus.take(NodeId(3), bus.nodes[NodeId(3)].join("#c#D3", "g", 0))
    bus.run()
    tables = [m.table() for m in bus.nodes.values()]
    assert tables[0] == tables[1] == tables[2]
    assert set(bus.nodes[NodeId(3)].members("g")) == {"#a#D1", "#c#D3"}


def test_a_daemon_back_from_a_pause_keeps_its_own_members() -> None:
    """D1 is cut off (paused) long enough for the others to remove its member, then comes
    back: D2's STATE, whose table lacks that member and counts more changes, must not
    make D1 drop its own client (D1's STATE came first in the new view)."""
    bus = Bus([1, 2, 3])
    bus.install([1, 2, 3])
    bus.run()
    for n in (1, 2):
        bus.take(NodeId(n), bus.nodes[NodeId(n)].join(f"#c#D{n}", "g", 0))
    bus.run()
    for n in (2, 3):  # D1 paused: only the others change view
        bus.take(NodeId(n), bus.nodes[NodeId(n)].view_installed([NodeId(2), NodeId(3)], 1.0))
    bus.queue = [q for q in bus.queue if NodeId(1) not in (q[0], q[1])]
    bus.run()
    assert bus.nodes[NodeId(2)].members("g") == ("#c#D2",)
    for n in (1, 2, 3):  # D1 sees it was alone, then everyone merges
        bus.take(NodeId(n), bus.nodes[NodeId(n)].view_installed([NodeId(n)], 2.0))
    bus.run()
    bus.install([1, 2, 3])
    bus.run()
    tables = [m.table() for m in bus.nodes.values()]
    assert tables[0] == tables[1] == tables[2]
    assert set(bus.nodes[NodeId(1)].members("g")) == {"#c#D1", "#c#D2"}


def test_a_transitional_view_comes_before_the_network_view() -> None:
    bus = Bus([1, 2, 3])
    bus.install([1, 2, 3])
    bus.run()
    for n in (1, 2, 3):
        bus.take(NodeId(n), bus.nodes[NodeId(n)].join(f"#c#D{n}", "g", 0))
    bus.take(NodeId(1), bus.nodes[NodeId(1)].join("#c#D1", "only-here", 0))
    bus.run()
    seen = {n: len(bus.changes[NodeId(n)]) for n in (1, 2)}
    counter = bus.nodes[NodeId(1)].view_id("g")
    bus.install([1, 2])
    bus.run()
    for n in (1, 2):
        after = [
            (c.group, c.cause, c.members, c.who, c.view_id)
            for c in bus.changes[NodeId(n)][seen[n] :]
        ]
        assert after == [
            # the members that move on together, in the view they had (no new counter)
            ("g", Cause.TRANSITIONAL, ("#c#D1", "#c#D2"), (), counter),
            ("g", Cause.NETWORK, ("#c#D1", "#c#D2"), ("#c#D3",), ViewId(4, 1)),
        ]  # nothing for "only-here": nobody departed from it


def test_a_regular_view_ends_every_transitional_one() -> None:
    """D1 is paused while D2 and D3 go on, then all three merge in one step: at D1 the
    others came from another view (a transitional view of D1's member alone), but the
    table does not change. A regular view (same id) still ends the transitional one."""
    bus = Bus([1, 2, 3])
    bus.install([1, 2, 3])
    bus.run()
    for n in (1, 2):
        bus.take(NodeId(n), bus.nodes[NodeId(n)].join(f"#c#D{n}", "g", 0))
    bus.run()
    before = bus.nodes[NodeId(1)].view_id("g")
    for n in (2, 3):  # D1 paused: only the others change view
        bus.take(NodeId(n), bus.nodes[NodeId(n)].view_installed([NodeId(2), NodeId(3)], 1.0))
    bus.queue = [q for q in bus.queue if NodeId(1) not in (q[0], q[1])]
    bus.run()
    seen = len(bus.changes[NodeId(1)])
    bus.install([1, 2, 3])
    bus.run()
    at_d1 = [(c.cause, c.members, c.view_id) for c in bus.changes[NodeId(1)][seen:]]
    assert at_d1[:2] == [
        (Cause.TRANSITIONAL, ("#c#D1",), before),
        (Cause.NETWORK, ("#c#D1", "#c#D2"), before),
    ]
