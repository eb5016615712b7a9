"""GroupEngine driven directly: hand-carried broadcasts in adversarial orders, explicit now."""

from __future__ import annotations

import os
import random
from collections.abc import Iterable

import pytest

from meshcast.errors import BufferFull, ConfigError, UsageError
from meshcast.group import (
    Broadcast,
    Deliver,
    GroupConfig,
    GroupEffect,
    GroupEngine,
    OrderingReset,
    SubmitConfirmed,
    ViewTransition,
)
from meshcast.ids import NodeId
from meshcast.wire.client import ServiceLevel as S
from meshcast.wire.group import GroupNull, encode_group

A, B, C = NodeId(1), NodeId(2), NodeId(3)
Packet = tuple[NodeId, NodeId, bytes]  # (from, to, payload)


class Mesh:
    """Engines of one view; broadcasts are queued per destination, moved by hand."""

    def __init__(self, nodes: Iterable[NodeId], config: GroupConfig | None = None) -> None:
        self.engines = {n: GroupEngine(n, config) for n in nodes}
        self.delivered: dict[NodeId, list[Deliver]] = {n: [] for n in self.engines}
        self.inbox: dict[NodeId, list[tuple[NodeId, bytes]]] = {n: [] for n in self.engines}
        self.other: list[GroupEffect] = []
        self.events: dict[NodeId, list[GroupEffect]] = {n: [] for n in self.engines}
        self.now = 0.0
        for n, engine in self.engines.items():
            self.apply(n, engine.view_installed(self.engines, self.now))
        self.exchange()  # the first view's flush: every engine hears from the others
        assert all(not e.flushing for e in self.engines.values())

    def exchange(self) -> None:
        """Move every queued broadcast, in order, until nothing is left (no timers)."""
        for _ in range(100):
            if not any(self.inbox.values()):
                return
            for n in self.engines:
                self.feed(n, self.take(n))

    def host(self, group: str, daemons: Iterable[NodeId]) -> None:
        members = list(daemons)
        for engine in self.engines.values():
            engine.set_group_daemons(group, members)

    def apply(self, node: NodeId, effects: list[GroupEffect]) -> None:
        for effect in effects:
            if isinstance(effect, Broadcast):
                assert node not in effect.dests
                for d in effect.dests:
                    self.inbox[d].append((node, effect.payload))
            elif isinstance(effect, Deliver):
                self.delivered[node].append(effect)
                self.events[node].append(effect)
            else:
                self.other.append(effect)
                self.events[node].append(effect)

    def send(
        self, node: NodeId, service: S, groups: tuple[str, ...] = ("g",), body: bytes = b"x"
    ) -> None:
        self.apply(node, self.engines[node].submit(groups, body, service, f"#c#{node}", self.now))

    def take(self, node: NodeId) -> list[tuple[NodeId, bytes]]:
        pending, self.inbox[node] = self.inbox[node], []
        return pending

    def feed(self, node: NodeId, packets: Iterable[tuple[NodeId, bytes]]) -> None:
        for source, payload in packets:
            self.apply(node, self.engines[node].overlay_delivered(source, payload, self.now))

    def tick(self, dt: float) -> None:
        self.now += dt
        for n, engine in self.engines.items():
            deadline = engine.next_deadline()
            if deadline is not None and deadline <= self.now:
                self.apply(n, engine.on_timer(self.now))

    def settle(self, rng: random.Random | None = None, rounds: int = 50) -> None:
        """Deliver everything (shuffled per destination if `rng`) and fire timers."""
        for _ in range(rounds):
            moved = False
            for n in self.engines:
                packets = self.take(n)
                if rng is not None:
                    rng.shuffle(packets)
                moved |= bool(packets)
                self.feed(n, packets)
            self.tick(0.011)
            idle = not any(self.inbox.values())
            if not moved and idle and all(e.next_deadline() is None for e in self.engines.values()):
                return

    def bodies(self, node: NodeId) -> list[bytes]:
        return [d.payload for d in self.delivered[node]]


def test_fifo_holds_back_until_the_gap_fills() -> None:
    m = Mesh([A, B])
    m.host("g", [A, B])
    for body in (b"1", b"2", b"3"):
        m.send(A, S.FIFO, body=body)
    assert m.bodies(A) == [b"1", b"2", b"3"]  # the sender's members get it at once
    p1, p2, p3 = m.take(B)
    m.feed(B, [p3])
    assert m.bodies(B) == []
    m.feed(B, [p1])
    assert m.bodies(B) == [b"1"]
    m.feed(B, [p2, p2, p1])
    assert m.bodies(B) == [b"1", b"2", b"3"]
    assert m.engines[B].statistics().duplicates_dropped == 2


def test_fifo_is_numbered_per_destination_so_pruning_leaves_no_gaps() -> None:
    m = Mesh([A, B, C])
    m.host("gb", [B])
    m.host("gbc", [B, C])
    m.send(A, S.FIFO, ("gb",), b"1")
    m.send(A, S.FIFO, ("gbc",), b"2")
    assert len(m.inbox[C]) == 1  # pruned: C never sees message 1
    m.settle(random.Random(1))
    assert m.bodies(B) == [b"1", b"2"]
    assert m.bodies(C) == [b"2"]
    assert m.bodies(A) == []  # A hosts neither group


def test_reliable_delivered_on_arrival_once_and_only_where_hosted() -> None:
    m = Mesh([A, B, C])
    m.host("g", [B])
    m.send(A, S.RELIABLE, body=b"r")
    m.send(A, S.UNRELIABLE, body=b"u")
    assert m.inbox[C] == []
    (r, u) = m.take(B)
    m.feed(B, [u, r, r, u])
    assert m.bodies(B) == [b"u", b"r"]
    assert m.engines[B].statistics().duplicates_dropped == 2


def test_causal_answer_before_question_is_held() -> None:
    m = Mesh([A, B, C])
    m.host("g", [A, B, C])
    m.send(A, S.CAUSAL, body=b"question")
    question_to_c = m.take(C)
    m.feed(B, m.take(B))
    m.send(B, S.CAUSAL, body=b"answer")
    answer_to_c = m.take(C)
    m.feed(C, answer_to_c)
    assert m.bodies(C) == []
    assert m.engines[C].held() == 1
    m.feed(C, question_to_c)
    assert m.bodies(C) == [b"question", b"answer"]
    m.settle()
    assert m.bodies(A) == [b"question", b"answer"]


def test_agreed_waits_for_every_daemons_timestamp_and_idle_nulls_unblock_it() -> None:
    m = Mesh([A, B, C])
    m.host("g", [A, B, C])
    m.send(A, S.AGREED, body=b"m")
    assert m.bodies(A) == []  # B and C not heard with a timestamp >= ts(m) yet
    m.feed(B, m.take(B))
    assert m.bodies(B) == []  # C not heard yet
    assert m.engines[B].next_deadline() is not None  # B owes a NULL
    assert m.engines[C].next_deadline() is None
    m.feed(C, m.take(C))
    m.tick(0.011)
    nulls = [payload for _, payload in m.inbox[A] if payload[0] == 0x11]
    assert len(nulls) == 2  # the NULLs of B and C (and their ACKs)
    m.settle()
    assert m.bodies(A) == m.bodies(B) == m.bodies(C) == [b"m"]
    m.settle()  # NULLs stop: nobody owes one any more
    assert [m.engines[n].statistics().nulls_sent for n in (A, B, C)] == [0, 1, 1]
    assert m.engines[A].statistics().nulls_sent == 0  # the sender never owed one


NULL_KIND = 0x11


def null_count(packets: Iterable[tuple[NodeId, bytes]]) -> int:
    return sum(payload[0] == NULL_KIND for _, payload in packets)


def test_an_idle_daemon_answers_an_ordered_message_at_once() -> None:
    # idle_ts_interval far beyond the test: only the prompt answer can unblock A's
    # messages (and no lead: a NULL covers no timestamp beyond the clock)
    m = Mesh([A, B, C], GroupConfig(idle_ts_interval=60.0, ack_interval=60.0, null_lead=1))
    m.host("g", [A, B, C])
    for burst in ([b"m1"], [b"m2", b"m3"]):  # the second: B and C sent a NULL just before
        for body in burst:
            m.send(A, S.AGREED, body=body)
        for idle in (B, C):
            m.feed(idle, m.take(idle))
            assert m.engines[idle].next_deadline() == m.now  # owes its timestamp: now
        m.tick(0.0)  # no time passes
        m.exchange()
        m.tick(0.0)
        m.exchange()
        assert m.bodies(A)[-1:] == m.bodies(B)[-1:] == m.bodies(C)[-1:] == burst[-1:]
        m.now += 0.001
    m.settle()  # NULLs stop: nobody owes one any more
    assert [m.engines[n].statistics().nulls_sent for n in (A, B, C)] == [0, 2, 2]


def test_one_null_stamped_ahead_covers_the_next_round_trips() -> None:
    m = Mesh([A, B, C], GroupConfig(idle_ts_interval=60.0, ack_interval=60.0))
    m.host("g", [A, B])  # C hosts no member: nothing of its own to send
    m.host("#daemons", [A, B, C])  # the daemons' own groups do not count
    for k in range(20):  # A and B answer each other; C, idle, only orders
        m.send(A if k % 2 == 0 else B, S.AGREED, body=bytes([k]))
        m.exchange()
        m.tick(0.0)
        m.exchange()
        assert len(m.bodies(A)) == len(m.bodies(B)) == k + 1  # delivered at once
    # C's first answer covers them all but B's first message: B, quiet until then,
    # had answered A's first one with a NULL stamped ahead too, so its own next message
    # is stamped above that lead and C answers once more
    assert m.engines[C].statistics().nulls_sent == 2
    assert m.bodies(A) == m.bodies(B)
    m.host("g", [A, B, C])
    m.send(C, S.AGREED, body=b"c")  # C's own message is stamped above its lead
    m.settle()
    assert m.bodies(A)[-1:] == m.bodies(B)[-1:] == m.bodies(C) == [b"c"]
    before = m.engines[A].statistics().delivered
    m.send(A, S.AGREED, body=b"after")  # ...and orders after it: the lead is behind
    m.settle()
    assert m.engines[A].statistics().delivered == before + 1
    assert m.bodies(A)[-2:] == m.bodies(B)[-2:] == [b"c", b"after"]


def test_safe_is_delivered_without_waiting_for_idle_ts_interval() -> None:
    m = Mesh([A, B, C], GroupConfig(idle_ts_interval=60.0, ack_interval=60.0))
    m.host("g", [A, B, C])
    m.send(A, S.SAFE, body=b"s")
    for _ in range(4):  # timestamps, then the ARUs that cover s: a few rounds, no time
        m.exchange()
        m.tick(0.0)
    m.exchange()
    assert m.bodies(A) == m.bodies(B) == m.bodies(C) == [b"s"]
    sent = [m.engines[n].statistics().nulls_sent for n in (A, B, C)]
    m.settle()
    assert [m.engines[n].statistics().nulls_sent for n in (A, B, C)] == sent


def test_one_null_answers_a_whole_batch() -> None:
    m = Mesh([A, B], GroupConfig(idle_ts_interval=60.0, ack_interval=60.0))
    m.host("g", [A, B])
    for _ in range(50):
        m.send(A, S.AGREED)
    m.feed(B, m.take(B))  # one batch of 50 ordered messages
    m.tick(0.0)
    assert null_count(m.take(A)) == 1
    assert m.engines[B].statistics().nulls_sent == 1


def test_prompt_nulls_are_bounded_by_the_batches_under_load() -> None:
    m = Mesh([A, B, C], GroupConfig(idle_ts_interval=60.0, ack_interval=0.02))
    m.host("g", [A, B, C])
    rng = random.Random(7)
    batches = 0
    for _ in range(40):  # A and B load the group; C is idle
        for _ in range(rng.randint(1, 20)):
            m.send(rng.choice([A, B]), S.AGREED)
        for n in (A, B, C):  # each daemon takes what arrived as one batch
            packets = m.take(n)
            batches += n == C and bool(packets)
            m.feed(n, packets)
        m.tick(0.001)
    m.settle()
    c = m.engines[C].statistics()
    assert c.nulls_sent <= batches  # never more than one per batch received
    # the busy senders' own messages carry their timestamps: they owed few NULLs
    sent = sum(m.engines[n].statistics().submitted for n in (A, B))
    assert m.engines[A].statistics().nulls_sent + m.engines[B].statistics().nulls_sent < sent
    assert m.bodies(A) == m.bodies(B) == m.bodies(C)
    assert len(m.bodies(C)) == sent


def test_a_null_is_owed_only_for_new_input() -> None:
    m = Mesh([A, B], GroupConfig(idle_ts_interval=0.5, ack_interval=10.0))
    m.host("g", [A, B])
    m.send(A, S.AGREED)
    m.feed(B, m.take(B))
    engine = m.engines[B]
    engine.on_timer(0.0)
    assert engine.statistics().nulls_sent == 1  # the prompt NULL
    for t in (0.1, 0.6, 1.2):  # nothing new arrived: nothing more owed
        engine.on_timer(t)
    assert engine.statistics().nulls_sent == 1


def test_a_reply_carries_the_timestamp_nobody_else_waits_for() -> None:
    # a round trip between two senders that are not members (bench group's rtt): each
    # group is hosted only where it arrives, so nobody else waits for the receiver's
    # timestamp; the reply carries it, and the next request the requester's: no NULLs
    m = Mesh([A, B], GroupConfig(idle_ts_interval=60.0, ack_interval=60.0))
    m.host("out", [B])
    m.host("back", [A])
    m.send(B, S.AGREED, ("back",), b"")  # B's first stream message of the view
    m.settle()
    nulls = [m.engines[n].statistics().nulls_sent for n in (A, B)]
    for k in range(5):
        m.send(A, S.AGREED, ("out",), bytes([k]))
        m.feed(B, m.take(B))
        assert m.bodies(B)[-1:] == [bytes([k])]  # delivered where it is hosted, at once
        m.tick(0.0)
        assert null_count(m.inbox[A]) == 0  # owed, but not at once
        m.send(B, S.AGREED, ("back",), bytes([k]))
        m.feed(A, m.take(A))
        assert m.bodies(A)[-1:] == [bytes([k])]
        m.tick(0.0)
        m.exchange()
    assert [m.engines[n].statistics().nulls_sent for n in (A, B)] == nulls
    assert len(m.bodies(A)) == 6
    assert len(m.bodies(B)) == 5
    m.tick(60.0)  # the last reply is owed A's timestamp: idle_ts_interval's NULL
    assert m.engines[A].statistics().nulls_sent == nulls[0] + 1


def test_a_slow_request_reply_does_not_make_the_idle_daemon_answer_every_round() -> None:
    # requests and replies slower than idle_ts_interval: the NULLs nobody waited for go
    # out first, stamped at clock + 1, so C's one NULL stamped ahead keeps covering them
    m = Mesh([A, B, C], GroupConfig(ack_interval=60.0))
    m.host("out", [B])
    m.host("back", [A])
    for k in range(21):  # the first round trip: C's first NULL
        for sender, receiver, group in ((A, B, "out"), (B, A, "back")):
            m.send(sender, S.AGREED, (group,), bytes([k]))
            m.feed(receiver, m.take(receiver))
            if k:  # C's timestamp is here already
                assert m.bodies(receiver)[-1:] == [bytes([k])]
            m.exchange()
            m.tick(0.0)
            m.exchange()
            m.tick(0.015)  # the receiver's NULL for it, idle_ts_interval later
            m.exchange()
        if not k:
            nulls = m.engines[C].statistics().nulls_sent
    assert m.engines[C].statistics().nulls_sent == nulls


@pytest.mark.parametrize("hosts", [[B], [B, C]])
def test_a_timestamp_another_daemon_waits_for_is_sent_at_once(hosts: list[NodeId]) -> None:
    # A's message waits at A for B's timestamp when A's client asked for a confirmation
    # (the DATA says so), and at C when C hosts a member
    m = Mesh([A, B, C], GroupConfig(idle_ts_interval=60.0, ack_interval=60.0, null_lead=1))
    m.host("g", hosts)
    confirm = hosts == [B]
    m.apply(A, m.engines[A].submit(("g",), b"m", S.AGREED, "#c#1", m.now, token=int(confirm)))
    for _ in range(3):  # no time passes: only prompt NULLs can unblock it
        m.exchange()
        m.tick(0.0)
    assert m.bodies(B) == [b"m"]
    if confirm:
        assert SubmitConfirmed(1) in m.events[A]
    else:
        assert m.bodies(C) == [b"m"]


def test_concurrent_agreed_messages_get_one_order_everywhere() -> None:
    for seed in range(20):
        rng = random.Random(seed)
        m = Mesh([A, B, C])
        m.host("g", [A, B, C])
        m.host("h", [B, C])
        for i in range(12):
            node = rng.choice([A, B, C])
            m.send(node, rng.choice([S.AGREED, S.SAFE]), (rng.choice(["g", "h"]),), bytes([i]))
            if rng.random() < 0.3:
                m.settle(rng, rounds=1)
        m.settle(rng)
        assert len(m.bodies(B)) == 12
        assert m.bodies(B) == m.bodies(C)
        assert m.bodies(A) == [d.payload for d in m.delivered[B] if "g" in d.groups]


def test_safe_waits_until_every_daemon_has_it() -> None:
    m = Mesh([A, B, C])
    m.host("g", [A, B, C])
    m.send(A, S.SAFE, body=b"s")
    m.feed(B, m.take(B))
    m.tick(0.011)  # B answers with its timestamp (its ARU cannot cover m yet: no C)
    m.feed(A, m.take(A))
    assert m.bodies(A) == []  # C does not have it
    m.feed(C, m.take(C))
    m.tick(0.011)  # C's NULL: timestamp and ARU
    m.feed(A, m.take(A))
    assert m.bodies(A) == []  # B's ARU still does not cover m
    m.feed(B, m.take(B))
    m.tick(0.011)  # B heard C: its ARU rises, it re-advertises it
    m.feed(A, m.take(A))
    assert m.bodies(A) == [b"s"]
    m.settle()
    assert m.bodies(B) == m.bodies(C) == [b"s"]


def test_safe_holds_back_later_agreed_messages() -> None:
    m = Mesh([A, B])
    m.host("g", [A, B])
    m.send(A, S.SAFE, body=b"safe")
    m.send(A, S.AGREED, body=b"agreed")
    m.feed(B, m.take(B))
    m.tick(0.011)
    m.feed(A, m.take(A))
    # A now heard B's ARU, which covers both; B has not heard A's ARU yet
    assert m.bodies(B) == []
    m.settle()
    assert m.bodies(A) == m.bodies(B) == [b"safe", b"agreed"]


def test_single_daemon_view_delivers_at_once() -> None:
    m = Mesh([A])
    m.host("g", [A])
    m.send(A, S.SAFE, body=b"1")
    m.send(A, S.CAUSAL, body=b"2")
    assert m.bodies(A) == [b"1", b"2"]
    assert m.engines[A].next_deadline() is None


def test_at_the_hold_back_limit_out_of_order_is_dropped_and_sent_again() -> None:
    m = Mesh([A, B], GroupConfig(max_held_messages=2))
    m.host("g", [A, B])
    for i in range(5):
        m.send(A, S.FIFO, body=bytes([i]))
    packets = m.take(B)
    engine = m.engines[B]
    m.feed(B, packets[1:4])  # 2 and 3 held, 4 dropped as if lost
    m.feed(B, packets[4:])  # 5 too
    assert (engine.statistics().holdback_overflow, engine.held()) == (2, 2)
    m.feed(B, packets[:1])  # 1 comes in order: taken at the bound, and 2 and 3 go too
    assert m.bodies(B) == [bytes([0]), bytes([1]), bytes([2])]
    assert engine.held() == 0
    for _ in range(300):  # A's repair, repair_after later: the stream goes on
        m.settle()
        m.tick(0.1)
        if len(m.bodies(B)) == 5:
            break
    assert m.bodies(B) == [bytes([i]) for i in range(5)]
    assert engine.statistics().duplicates_dropped == 0


def test_at_the_hold_back_limit_in_order_messages_are_always_taken() -> None:
    m = Mesh([A, B, C], GroupConfig(max_held_messages=2))
    m.host("g", [A, B, C])
    for i in range(3):
        m.send(A, S.FIFO, body=b"a%d" % i)
    from_a = m.take(B)
    m.feed(B, from_a[1:])  # two held: the bound
    m.send(C, S.FIFO, body=b"c")
    m.feed(B, m.take(B))  # in order: taken
    m.feed(B, from_a[:1])  # in order too, and the two held go with it
    assert m.bodies(B) == [b"c", b"a0", b"a1", b"a2"]
    assert m.engines[B].statistics().holdback_overflow == 0


def test_own_ordered_messages_are_refused_at_the_limit() -> None:
    # max_held_messages / (2 x 2 daemons): two of our own may wait for delivery
    m = Mesh([A, B], GroupConfig(max_held_messages=8))
    m.host("g", [A, B])
    m.send(A, S.AGREED)
    m.send(A, S.SAFE)
    assert not m.engines[A].can_submit()  # the daemon stops reading its clients
    with pytest.raises(BufferFull):
        m.send(A, S.AGREED)
    m.settle()
    m.send(A, S.AGREED)  # delivered meanwhile: room again


def test_malformed_and_foreign_messages_are_counted_and_dropped() -> None:
    m = Mesh([A, B])
    engine = m.engines[B]
    assert engine.overlay_delivered(A, b"\x10garbage", 0.0) == []
    assert engine.statistics().malformed_dropped == 1
    stranger = GroupNull(engine.view.view_id if engine.view else b"", 1, 1, 0)
    assert engine.overlay_delivered(NodeId(9), encode_group(stranger), 0.0) == []
    assert engine.statistics().not_member_dropped == 1


def test_messages_for_a_view_not_installed_yet_wait_for_it() -> None:
    m = Mesh([A, B])
    m.host("g", [A, B])
    for n in (A, B):  # B restarted: a new incarnation, a new view, a flush
        m.apply(n, m.engines[n].view_installed([A, B], 0.0, incarnations=(1, 2)))
    m.feed(A, m.take(A))  # A has B's FLUSH: A installs the view and sends in it
    assert not m.engines[A].flushing
    m.send(A, S.RELIABLE, body=b"early")
    flush_of_a, early = m.take(B)
    m.feed(B, [early])
    assert m.bodies(B) == []
    assert m.engines[B].statistics().future_buffered == 1
    m.feed(B, [flush_of_a])  # B installs the view, then takes what waited for it
    assert m.bodies(B) == [b"early"]


def test_a_message_in_flight_at_a_view_change_comes_in_the_flush() -> None:
    m = Mesh([A, B])
    m.host("g", [A, B])
    m.send(A, S.RELIABLE, body=b"in flight")
    late = m.take(B)  # the direct copy is late...
    for n in (A, B):
        m.apply(n, m.engines[n].view_installed([A, B], 0.0, incarnations=(1, 2)))
    m.exchange()  # ...but A's FLUSH carries it
    assert m.bodies(B) == [b"in flight"]
    assert m.engines[B].statistics().flush_recovered == 1
    m.feed(B, late)
    assert m.bodies(B) == [b"in flight"]
    assert m.engines[B].statistics().stale_view_dropped == 1


def crash(m: Mesh, dead: NodeId, survivors: list[NodeId]) -> list[OrderingReset]:
    """`dead` stops: whatever it had not passed on is lost; the survivors flush."""
    m.inbox[dead].clear()
    del m.engines[dead]
    for n in survivors:
        m.inbox[n] = [(src, p) for src, p in m.inbox[n] if src != dead] + [
            (src, p) for src, p in m.inbox[n] if src == dead
        ]
    for n in survivors:
        m.apply(n, m.engines[n].view_installed(survivors, 1.0))
    m.exchange()
    resets = [e for e in m.other if isinstance(e, OrderingReset)]
    assert all(not m.engines[n].flushing for n in survivors)
    return resets[-len(survivors) :]


def test_a_failed_daemons_message_one_survivor_has_is_delivered_by_all() -> None:
    m = Mesh([A, B, C])
    m.host("g", [A, B, C])
    m.send(C, S.AGREED, body=b"from C")
    m.send(C, S.FIFO, body=b"fifo from C")
    m.feed(B, m.take(B))  # only B gets them; then C fails
    m.inbox[A].clear()
    resets = crash(m, C, [A, B])
    assert m.bodies(A) == m.bodies(B)
    assert sorted(m.bodies(A)) == [b"fifo from C", b"from C"]
    assert all(r.undelivered == () for r in resets)
    assert m.engines[A].statistics().flush_recovered == 2


def test_a_stream_is_cut_where_no_survivor_has_it() -> None:
    m = Mesh([A, B, C])
    m.host("g", [A, B, C])
    m.send(C, S.AGREED, body=b"lost")
    m.send(C, S.AGREED, body=b"after the loss")
    _lost, after = m.take(B)
    m.feed(B, [after])  # B holds the second, nobody has the first
    m.inbox[A].clear()
    resets = crash(m, C, [A, B])
    assert m.bodies(A) == m.bodies(B) == []  # delivering it would skip "lost"
    for reset in resets:  # each survivor reports the message it had and discarded
        assert [(r.source, r.service) for r in reset.undelivered] == [(C, S.AGREED)]


def test_own_messages_are_never_lost_by_a_flush() -> None:
    m = Mesh([A, B, C])
    m.host("g", [A, B, C])
    for service in (S.RELIABLE, S.FIFO, S.CAUSAL, S.AGREED, S.SAFE):
        m.send(A, service, body=service.name.encode())
    m.take(B)  # every direct copy to B is lost with the failure
    m.inbox[C].clear()
    crash(m, C, [A, B])
    assert (
        sorted(m.bodies(A))
        == sorted(m.bodies(B))
        == sorted(s.name.encode() for s in (S.RELIABLE, S.FIFO, S.CAUSAL, S.AGREED, S.SAFE))
    )


@pytest.mark.parametrize("seed", range(int(os.environ.get("MESHCAST_FLUSH_SEEDS", "30"))))
def test_survivors_deliver_the_same_messages_in_the_same_order(seed: int) -> None:
    """Random traffic, partial delivery, a crash at a random point: every survivor
    delivers the same set, AGREED/SAFE in one order, and its own messages all."""
    rng = random.Random(seed)
    nodes = [A, B, C, NodeId(4)]
    m = Mesh(nodes)
    m.host("g", nodes)
    sent: dict[NodeId, list[bytes]] = {n: [] for n in nodes}
    for i in range(rng.randint(5, 25)):
        node = rng.choice(nodes)
        service = rng.choice([S.RELIABLE, S.FIFO, S.CAUSAL, S.AGREED, S.SAFE])
        body = f"{service.name}-{i}-{node}".encode()
        m.send(node, service, body=body)
        sent[node].append(body)
        for n in nodes:
            if rng.random() < 0.4:
                packets = m.take(n)
                rng.shuffle(packets)
                keep = [pk for pk in packets if rng.random() < 0.8]
                m.inbox[n] = [pk for pk in packets if pk not in keep]
                m.feed(n, keep)
        if rng.random() < 0.3:
            m.tick(0.011)
    dead = rng.choice(nodes)
    survivors = [n for n in nodes if n != dead]
    crash(m, dead, survivors)
    m.settle(rng)
    reference = m.bodies(survivors[0])
    before = {n: regular_part(m, n, survivors) for n in survivors}
    for n in survivors:
        assert before[n] == before[survivors[0]]  # the same split everywhere
        assert sorted(m.bodies(n)) == sorted(reference)
        ordered = [d.payload for d in m.delivered[n] if d.service in (S.AGREED, S.SAFE)]
        first = [d.payload for d in m.delivered[survivors[0]] if d.service in (S.AGREED, S.SAFE)]
        assert ordered == first
        assert set(sent[n]) <= set(m.bodies(n))
        assert len(set(m.bodies(n))) == len(m.bodies(n))


def regular_part(m: Mesh, node: NodeId, survivors: list[NodeId]) -> set[bytes]:
    """AGREED/SAFE payloads `node` delivered before its transitional configuration began
    (exactly one `ViewTransition`, naming the survivors)."""
    events = m.events[node]
    (at,) = [i for i, e in enumerate(events) if isinstance(e, ViewTransition)]
    transition = events[at]
    assert isinstance(transition, ViewTransition)
    assert transition.survivors == tuple(survivors)
    reset = next(i for i, e in enumerate(events) if i > at and isinstance(e, OrderingReset))
    assert reset > at  # the transitional configuration ends with the new view
    return {
        e.payload for e in events[:at] if isinstance(e, Deliver) and e.service in (S.AGREED, S.SAFE)
    }


def test_safe_not_held_by_a_departed_daemon_is_delivered_in_the_transitional_configuration() -> (
    None
):
    m = Mesh([A, B, C])
    m.host("g", [A, B, C])
    m.send(A, S.AGREED, body=b"everyone")
    m.settle()  # delivered everywhere in the view, with its guarantee
    m.send(A, S.SAFE, body=b"safe")
    m.send(B, S.AGREED, body=b"after")
    m.take(C)  # C never gets them, then fails
    m.feed(B, m.take(B))
    m.feed(A, m.take(A))
    crash(m, C, [A, B])
    for n in (A, B):
        kinds = [
            e.payload if isinstance(e, Deliver) else type(e).__name__
            for e in m.events[n]
            if isinstance(e, Deliver | ViewTransition | OrderingReset)
        ]
        # b"safe" is not safe with respect to C: after the transition, as is what
        # sorts after it
        assert kinds[-5:] == [b"everyone", "ViewTransition", b"safe", b"after", "OrderingReset"]


def test_no_transition_when_every_member_moves_on() -> None:
    m = Mesh([A, B])
    m.host("g", [A, B])
    m.send(A, S.SAFE, body=b"s")
    for n in (A, B):  # the same members, new incarnations: nobody departed
        m.apply(n, m.engines[n].view_installed([A, B], 0.0, incarnations=(1, 2)))
    m.exchange()
    assert not any(isinstance(e, ViewTransition) for e in m.other)


def test_a_token_is_confirmed_once_delivered_here() -> None:
    m = Mesh([A, B])
    m.host("g", [B])  # A does not host g: confirmed all the same
    a = m.engines[A]
    assert SubmitConfirmed(7) in a.submit(("g",), b"r", S.RELIABLE, "#c#1", 0.0, token=7)
    effects = a.submit(("g",), b"s", S.SAFE, "#c#1", 0.0, token=8)
    assert SubmitConfirmed(8) not in effects  # safe: not before B holds it
    m.apply(A, effects)
    m.settle()
    assert SubmitConfirmed(8) in m.events[A]


def test_a_view_change_during_a_flush_starts_another_round() -> None:
    nodes = [A, B, C, NodeId(4)]
    m = Mesh(nodes)
    m.host("g", nodes)
    m.send(C, S.AGREED, body=b"c")
    m.feed(B, m.take(B))
    for n in nodes:
        m.inbox[n].clear()
    del m.engines[NodeId(4)]
    for n in (A, B, C):
        m.apply(n, m.engines[n].view_installed([A, B, C], 1.0))
    m.feed(A, m.take(A))  # A hears B and C, but C fails before the others hear it
    m.inbox[B] = [pk for pk in m.inbox[B] if pk[0] != C]
    crash(m, C, [A, B])
    assert m.bodies(A) == m.bodies(B) == [b"c"]
    assert m.engines[B].statistics().flushes_started == 3  # first view, [A,B,C], [A,B]


def test_same_members_again_change_nothing() -> None:
    m = Mesh([A, B])
    assert m.engines[B].view_installed([B, A], 2.0) == []


def test_submit_is_checked() -> None:
    engine = GroupEngine(A)
    with pytest.raises(UsageError):
        engine.submit(["g"], b"", S.AGREED, "#c#a", 0.0)
    engine.view_installed([A], 0.0)
    with pytest.raises(UsageError):
        engine.submit([], b"", S.AGREED, "#c#a", 0.0)
    with pytest.raises(UsageError):
        engine.submit(["x" * 300], b"", S.AGREED, "#c#a", 0.0)
    with pytest.raises(UsageError):
        engine.view_installed([B], 0.0)


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError):
        GroupConfig(idle_ts_interval=0)
    with pytest.raises(ConfigError):
        GroupConfig(max_held_messages=0)


def test_a_blocked_member_holds_back_senders_to_its_groups_everywhere() -> None:
    m = Mesh([A, B])
    m.host("g", [A, B])
    m.host("h", [A, B])
    assert not m.engines[A].holds_back(["g"])
    m.engines[B].set_blocked(["g"])
    m.tick(0.05)  # B's ACK says BLOCKED for g, though nothing new arrived
    m.feed(A, m.take(A))
    assert m.engines[A].holds_back(["g"])
    assert m.engines[A].holds_back(["h", "g"])
    assert not m.engines[A].holds_back(["h"])  # other groups keep flowing
    assert m.engines[A].can_submit()
    m.engines[B].set_blocked()
    m.tick(0.05)
    m.feed(A, m.take(A))
    assert not m.engines[A].holds_back(["g"])


def test_too_many_blocked_groups_hold_back_every_group() -> None:
    m = Mesh([A, B])
    m.host("g", [A, B])
    m.engines[B].set_blocked([f"g{i}" for i in range(300)])  # more than an ACK names
    m.tick(0.05)
    m.feed(A, m.take(A))
    assert m.engines[A].holds_back(["anything"])
    assert m.engines[B].holds_back(["anything"])


def test_own_messages_not_yet_held_everywhere_close_the_window() -> None:
    m = Mesh([A, B], GroupConfig(max_retained_messages=8))
    m.host("g", [A, B])
    m.send(A, S.RELIABLE)
    m.send(A, S.RELIABLE)  # a quarter of 8: the window is full until B acknowledges
    assert not m.engines[A].can_submit()
    with pytest.raises(BufferFull):
        m.send(A, S.RELIABLE)
    m.settle()  # B receives and acknowledges: the copies are forgotten
    assert m.engines[A].can_submit()
    assert m.engines[A].statistics().repairs_sent == 0


def test_a_message_the_overlay_lost_is_sent_again_by_its_source() -> None:
    m = Mesh([A, B], GroupConfig(repair_after=0.5))
    m.host("g", [A, B])
    m.send(A, S.FIFO, body=b"lost")
    m.send(A, S.FIFO, body=b"second")
    _lost, second = m.take(B)
    m.feed(B, [second])  # held back behind the lost one, which nothing else brings
    for _ in range(80):
        m.tick(0.011)
        m.feed(B, m.take(B))
        m.feed(A, m.take(A))
    assert m.bodies(B) == [b"lost", b"second"]
    assert m.engines[A].statistics().repairs_sent >= 1
