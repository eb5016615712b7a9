"""SessionTable driven by hand on a one-daemon view: frames in, frames and effects out."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError, asdict

import pytest

from meshcast.group import GroupConfig, GroupEngine
from meshcast.group.events import Deliver
from meshcast.group.membership import GroupMembership, MembershipChanged, MembershipEffect
from meshcast.group.sessions import (
    ClientConnected,
    ClientDisconnected,
    CloseConnection,
    SendBytes,
    SessionConfig,
    SessionEffect,
    SessionTable,
)
from meshcast.ids import NodeId
from meshcast.wire.client import (
    BUSY_VERSION,
    FROM_DAEMON,
    HELLO_FRAME_LIMIT,
    MAX_UNCONFIRMED,
    VERSION,
    Cause,
    Confirmed,
    DaemonLimits,
    ErrorCode,
    ErrorReport,
    Frame,
    Goodbye,
    Hello,
    HelloFlag,
    Join,
    Leave,
    Membership,
    Message,
    Multicast,
    Ping,
    Pong,
    ServiceLevel,
    SlowReceiverPolicy,
    StatusReply,
    StatusRequest,
    ViewId,
    Welcome,
    decode,
)

LIMITS = DaemonLimits(max_message_size=100, max_group_name=8, max_groups_per_client=2)


class ScriptedMembership(GroupMembership):
    """A membership layer whose next overlay delivery yields `script` when one is set."""

    script: list[MembershipEffect] | None = None

    def overlay_delivered(
        self, source: NodeId, payload: bytes, now: float
    ) -> list[MembershipEffect]:
        if self.script is None:
            return super().overlay_delivered(source, payload, now)
        return self.script


def table(
    max_clients: int = 3,
    max_backlog: int = 10_000,
    block_timeout: float = 30.0,
    membership_layer: type[GroupMembership] = GroupMembership,
) -> SessionTable:
    membership = membership_layer(GroupEngine(NodeId(1)))
    config = SessionConfig(LIMITS, max_clients, max_backlog, block_timeout=block_timeout)
    sessions = SessionTable("D1", membership, config)
    sessions.view_installed([NodeId(1)], 0.0)
    return sessions


def frames(effects: list[SessionEffect], conn: int) -> list[Frame]:
    """Frames written to `conn`, including the last one a closing effect carries."""
    return [
        decode(e.data if isinstance(e, SendBytes) else e.last, accept=FROM_DAEMON)
        for e in effects
        if (isinstance(e, SendBytes) or (isinstance(e, CloseConnection) and e.last))
        and e.conn == conn
    ]


def aborted(effects: list[SessionEffect], conn: int) -> bool:
    return any(isinstance(e, CloseConnection) and e.conn == conn and e.abort for e in effects)


def hello(
    t: SessionTable, conn: int, name: str = "", flags: HelloFlag = HelloFlag.MEMBERSHIP
) -> str:
    t.connected(conn)
    effects = t.frame_received(conn, Hello(name, flags=flags), 0.0)
    (welcome,) = frames(effects, conn)
    assert isinstance(welcome, Welcome)
    assert welcome.limits == LIMITS
    assert any(isinstance(e, ClientConnected) for e in effects)
    return welcome.private_name


def test_handshake_names_and_refusals() -> None:
    t = table(max_clients=2)
    assert hello(t, 1, "alice") == "#alice#D1"
    assert hello(t, 2).startswith("#c")
    t.connected(3)
    (err,) = frames(t.frame_received(3, Hello("bob"), 0.0), 3)
    assert isinstance(err, ErrorReport)
    assert err.code == ErrorCode.DAEMON_FULL
    t = table()
    hello(t, 1, "alice")
    t.connected(2)
    effects = t.frame_received(2, Hello("alice"), 0.0)
    assert [f.code for f in frames(effects, 2)] == [ErrorCode.NAME_IN_USE]  # type: ignore[union-attr]
    assert CloseConnection(2) in effects
    t.connected(3)
    effects = t.frame_received(3, Hello("x", min_version=VERSION + 1, max_version=VERSION + 2), 0.0)
    assert [f.code for f in frames(effects, 3)] == [ErrorCode.UNSUPPORTED_VERSION]  # type: ignore[union-attr]
    t.connected(4)
    effects = t.frame_received(4, Join("g"), 0.0)
    assert [f.code for f in frames(effects, 4)] == [ErrorCode.UNEXPECTED_FRAME]  # type: ignore[union-attr]


def test_handshakes_are_bounded_in_number_in_time_and_in_frame_size() -> None:
    membership = GroupMembership(GroupEngine(NodeId(1)))
    config = SessionConfig(LIMITS, 10, handshake_timeout=5.0, max_pending_handshakes=2)
    t = SessionTable("D1", membership, config)
    t.view_installed([NodeId(1)], 0.0)
    assert t.connected(1, 10.0) == []
    assert t.frame_limit(1) == HELLO_FRAME_LIMIT  # a HELLO, nothing bigger, before WELCOME
    assert t.connected(2, 11.0) == []
    assert t.next_deadline() == 15.0
    refused = t.connected(3, 12.0)  # a third stranger: refused at once
    assert [f.code for f in frames(refused, 3)] == [ErrorCode.DAEMON_FULL]  # type: ignore[union-attr]
    assert CloseConnection(3) in refused
    assert t.connection_lost(3, 12.0) == []
    welcome = frames(t.frame_received(2, Hello("bob"), 12.0), 2)
    assert [type(f) for f in welcome] == [Welcome]
    assert not t.handshaking(2)
    assert t.frame_limit(2) == LIMITS.max_frame_size
    assert t.connected(4, 13.0) == []  # bob's slot is free again
    assert t.on_timer(14.9) == []
    expired = t.on_timer(15.0)  # connection 1 never said HELLO
    assert [f.code for f in frames(expired, 1)] == [ErrorCode.HANDSHAKE_TIMEOUT]  # type: ignore[union-attr]
    assert CloseConnection(1) in expired
    assert t.next_deadline() == 18.0
    bad = t.decode_failed(4, "frame length 16777216 exceeds the limit of 44 bytes", 13.5)
    assert [f.code for f in frames(bad, 4)] == [ErrorCode.BAD_FRAME]  # type: ignore[union-attr]
    assert t.pending_handshakes() == 0
    assert t.next_deadline() is None
    stats = t.statistics()
    assert (stats.pending_refused, stats.handshake_timeouts, stats.handshake_bad_frames) == (
        1,
        1,
        1,
    )
    assert stats.sessions_opened == 1
    assert t.status(20.0)["sessions"] == {"open": 1, "max_clients": 10, "handshaking": 0}


def test_requests_are_checked_with_typed_errors() -> None:
    t = table()
    hello(t, 1, "a")

    def codes(frame: Frame) -> list[object]:
        return [
            (f.code, f.request_id)
            for f in frames(t.frame_received(1, frame, 0.0), 1)
            if isinstance(f, ErrorReport)
        ]

    assert codes(Join("toolonggroup", request_id=1)) == [(ErrorCode.GROUP_NAME_TOO_LONG, 1)]
    assert codes(Join("g", request_id=2)) == []
    assert codes(Join("g", request_id=3)) == [(ErrorCode.ALREADY_MEMBER, 3)]
    assert codes(Join("h", request_id=4)) == []
    assert codes(Join("i", request_id=5)) == [(ErrorCode.TOO_MANY_GROUPS, 5)]
    assert codes(Leave("i", request_id=6)) == [(ErrorCode.NOT_A_MEMBER, 6)]
    assert codes(Multicast(("g",), b"x" * 101, request_id=7)) == [(ErrorCode.MESSAGE_TOO_LARGE, 7)]
    assert codes(Multicast(("g", "toolonggroup"), b"x", request_id=8)) == [
        (ErrorCode.GROUP_NAME_TOO_LONG, 8)
    ]
    assert frames(t.frame_received(1, Ping(7), 0.0), 1) == [Pong(7)]


def test_join_multicast_leave_and_disconnect() -> None:
    t = table()
    a = hello(t, 1, "a")
    b = hello(t, 2, "b")
    (m,) = frames(t.frame_received(1, Join("g"), 0.0), 1)
    assert m == Membership("g", m.view_id, (a,), Cause.JOIN, (a,))  # type: ignore[union-attr]
    effects = t.frame_received(2, Join("g"), 0.0)
    assert [f.members for f in frames(effects, 1)] == [(a, b)]  # type: ignore[union-attr]
    assert [f.cause for f in frames(effects, 2)] == [Cause.JOIN]  # type: ignore[union-attr]
    for service in ServiceLevel:
        effects = t.frame_received(1, Multicast(("g",), b"hi", service, msg_type=9), 0.0)
        expected = Message(a, ("g",), service, 9, b"hi")
        assert frames(effects, 1) == [expected]
        assert frames(effects, 2) == [expected]
    effects = t.frame_received(1, Leave("g"), 0.0)
    assert [(f.cause, f.members) for f in frames(effects, 1)] == [(Cause.LEAVE, (b,))]  # type: ignore[union-attr]
    assert frames(t.frame_received(2, Multicast(("g",), b"x"), 0.0), 1) == []
    effects = t.connection_lost(2, 0.0)
    assert any(isinstance(e, ClientDisconnected) and e.groups == ("g",) for e in effects)
    assert t.membership.table() == {}
    effects = t.frame_received(1, Goodbye(), 0.0)
    assert frames(effects, 1) == [Goodbye()]
    assert CloseConnection(1) in effects


def test_bad_frame_gets_an_error_and_the_session_ends() -> None:
    t = table()
    a = hello(t, 1, "a")
    t.frame_received(1, Join("g"), 0.0)
    effects = t.decode_failed(1, "JOIN frame: truncated", 0.0)
    assert [f.code for f in frames(effects, 1)] == [ErrorCode.BAD_FRAME]  # type: ignore[union-attr]
    assert CloseConnection(1) in effects
    assert any(isinstance(e, ClientDisconnected) and e.name == a for e in effects)
    assert t.connection_lost(1, 0.0) == []


def accepting(t: SessionTable) -> bool:
    return t.accepting


def slow_pair(policy: SlowReceiverPolicy, max_backlog: int = 10_000) -> SessionTable:
    t = table(max_backlog=max_backlog)
    hello(t, 1, "sender")
    hello(t, 2, "slow")
    t.frame_received(2, Join("g", policy), 0.0)
    t.writing_paused(2)
    return t


def test_disconnect_policy_drops_the_slow_member() -> None:
    t = slow_pair(SlowReceiverPolicy.DISCONNECT)
    effects = t.frame_received(1, Multicast(("g",), b"x"), 0.0)
    assert [f.code for f in frames(effects, 2)] == [ErrorCode.SLOW_RECEIVER]  # type: ignore[union-attr]
    assert aborted(effects, 2)
    assert t.statistics().slow_disconnected == 1
    assert t.membership.members("g") == ()


def test_drop_unreliable_policy_sheds_and_reports() -> None:
    t = slow_pair(SlowReceiverPolicy.DROP_UNRELIABLE)
    for _ in range(3):
        effects = t.frame_received(1, Multicast(("g",), b"x", ServiceLevel.UNRELIABLE), 0.0)
        assert frames(effects, 2) == []
    effects = t.frame_received(1, Multicast(("g",), b"y", ServiceLevel.RELIABLE), 0.0)
    assert len(frames(effects, 2)) == 1  # reliable: never dropped (it blocks instead)
    assert not accepting(t)
    (report,) = frames(t.writing_resumed(2), 2)
    assert isinstance(report, ErrorReport)
    assert report.code == ErrorCode.MESSAGES_DROPPED
    assert "3" in report.text
    assert t.statistics().unreliable_dropped == 3
    assert accepting(t)


def test_block_policy_stops_local_senders_and_bounds_the_backlog() -> None:
    t = slow_pair(SlowReceiverPolicy.BLOCK, max_backlog=200)
    t.frame_received(1, Multicast(("g",), b"x" * 50), 0.0)
    assert not accepting(t)
    effects: list[SessionEffect] = []
    for _ in range(5):
        effects += t.frame_received(1, Multicast(("g",), b"x" * 50), 0.0)
    assert t.statistics().slow_disconnected == 1
    assert aborted(effects, 2)
    assert accepting(t)
    assert t.membership.members("g") == ()


def test_shutdown_tells_every_session() -> None:
    t = table()
    hello(t, 1, "a")
    hello(t, 2, "b")
    effects = t.shutdown(0.0)
    for conn in (1, 2):
        assert [f.code for f in frames(effects, conn)] == [ErrorCode.SHUTTING_DOWN]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "frame", [Welcome(1, "#x#D1"), Message("#x#D1", ("g",), ServiceLevel.RELIABLE, 0, b"")]
)
def test_daemon_frames_from_a_client_are_unexpected(frame: Frame) -> None:
    t = table()
    hello(t, 1, "a")
    effects = t.frame_received(1, frame, 0.0)
    assert [f.code for f in frames(effects, 1)] == [ErrorCode.UNEXPECTED_FRAME]  # type: ignore[union-attr]


def test_block_holds_back_only_the_slow_members_groups() -> None:
    t = table()
    hello(t, 1, "sender")
    hello(t, 2, "slow")
    t.frame_received(2, Join("g"), 0.0)
    t.frame_received(2, Join("q", SlowReceiverPolicy.DISCONNECT), 0.0)
    hello(t, 3, "other")
    t.frame_received(3, Join("o"), 0.0)
    t.writing_paused(2)
    assert t.blocked_groups() == frozenset()  # paused, but nothing waits for it yet
    t.frame_received(1, Multicast(("g",), b"x"), 0.0)  # queued for the paused member
    assert t.blocked_groups() == {"g"}  # not "q": a message there disconnects it instead
    engine = t.membership.engine
    engine.set_blocked(t.blocked_groups())
    assert engine.holds_back(["g"])
    assert engine.holds_back(["o", "g"])
    assert not engine.holds_back(["o"])
    assert engine.can_submit()
    effects = t.frame_received(1, Multicast(("o",), b"y"), 0.0)  # other groups flow
    assert [type(f) for f in frames(effects, 3)] == [Message]
    t.writing_resumed(2)
    assert t.blocked_groups() == frozenset()


def test_block_timeout_disconnects_the_slow_member_with_a_reason() -> None:
    t = table(block_timeout=2.0)
    hello(t, 1, "sender")
    hello(t, 2, "slow")
    t.frame_received(2, Join("g"), 0.0)
    t.writing_paused(2)
    assert t.next_deadline() is None
    t.frame_received(1, Multicast(("g",), b"x"), 10.0)  # now it holds senders back
    assert t.next_deadline() == 12.0
    assert not aborted(t.on_timer(11.9), 2)
    effects = t.on_timer(12.0)
    assert aborted(effects, 2)
    (error,) = frames(effects, 2)  # written after what its socket already has, then closed
    assert isinstance(error, ErrorReport)
    assert error.code == ErrorCode.SLOW_RECEIVER
    assert "block_timeout" in error.text
    assert t.blocked_groups() == frozenset()
    assert t.next_deadline() is None
    assert t.membership.members("g") == ()
    assert t.statistics().slow_disconnected == 1


def test_a_member_that_drains_in_time_is_not_disconnected() -> None:
    t = table(block_timeout=2.0)
    hello(t, 1, "sender")
    hello(t, 2, "slow")
    t.frame_received(2, Join("g"), 0.0)
    t.writing_paused(2)
    t.frame_received(1, Multicast(("g",), b"x"), 10.0)
    t.writing_resumed(2)
    t.writing_paused(2)
    t.frame_received(1, Multicast(("g",), b"x"), 11.5)  # a new slow period: a new clock
    assert t.next_deadline() == 13.5
    assert not aborted(t.on_timer(12.0), 2)


def test_confirm_is_answered_once_delivered_and_bounded() -> None:
    t = table()
    hello(t, 1, "sender")
    effects = t.frame_received(1, Multicast(("g",), b"x", request_id=5, confirm=True), 0.0)
    assert frames(effects, 1) == [Confirmed(5)]  # one daemon: delivered at once
    effects = t.frame_received(1, Multicast(("g",), b"x", request_id=6), 0.0)
    assert frames(effects, 1) == []  # not asked for


def test_too_many_unconfirmed_messages_are_refused() -> None:
    membership = GroupMembership(GroupEngine(NodeId(1)))
    t = SessionTable("D1", membership, SessionConfig(LIMITS))
    t.view_installed([NodeId(1), NodeId(2)], 0.0)  # D2's FLUSH never comes: all wait
    hello(t, 1, "sender")
    for rid in range(1, MAX_UNCONFIRMED + 1):
        waiting = Multicast(("g",), b"", request_id=rid, confirm=True)
        assert frames(t.frame_received(1, waiting, 0.0), 1) == []
    (refusal,) = frames(
        t.frame_received(1, Multicast(("g",), b"", request_id=9999, confirm=True), 0.0), 1
    )
    assert isinstance(refusal, ErrorReport)
    assert refusal.code == ErrorCode.TOO_MANY_UNCONFIRMED
    assert refusal.request_id == 9999


def busy_table() -> SessionTable:
    """A table whose engine takes one message during a flush that never ends (D2's FLUSH
    never comes): the next ones hit BufferFull."""
    engine = GroupEngine(NodeId(1), GroupConfig(max_held_messages=2))  # flush queue: 1
    t = SessionTable("D1", GroupMembership(engine), SessionConfig(LIMITS))
    t.view_installed([NodeId(1), NodeId(2)], 0.0)
    return t


def test_a_full_buffer_is_busy_not_an_internal_error() -> None:
    t = busy_table()
    hello(t, 1, "sender")
    assert frames(t.frame_received(1, Multicast(("g",), b"a", request_id=1), 0.0), 1) == []
    effects = t.frame_received(1, Multicast(("g",), b"b", request_id=2, confirm=True), 0.0)
    (refusal,) = frames(effects, 1)
    assert isinstance(refusal, ErrorReport)
    assert (refusal.code, refusal.request_id) == (ErrorCode.BUSY, 2)
    assert not refusal.code.ends_session
    assert "retry later" in refusal.text
    assert not any(isinstance(e, CloseConnection) for e in effects)
    # the session goes on: it still answers, and the refused CONFIRM is not awaited
    assert frames(t.frame_received(1, Ping(3), 0.0), 1) == [Pong(3)]
    stats = t.statistics()
    assert (stats.busy, stats.requests_refused, stats.internal_errors) == (1, 1, 0)
    assert (stats.messages_submitted, stats.sessions_closed) == (1, 0)
    report = t.status(0.0)["counters"]
    assert report["sessions"]["busy"] == 1  # type: ignore[index]


def test_a_session_older_than_busy_is_told_internal_error() -> None:
    t = busy_table()
    t.connected(1)
    (welcome,) = frames(t.frame_received(1, Hello("old", max_version=BUSY_VERSION - 1), 0.0), 1)
    assert isinstance(welcome, Welcome)
    assert welcome.version == BUSY_VERSION - 1
    t.frame_received(1, Multicast(("g",), b"a", request_id=1), 0.0)
    (refusal,) = frames(t.frame_received(1, Multicast(("g",), b"b", request_id=2), 0.0), 1)
    assert isinstance(refusal, ErrorReport)
    assert (refusal.code, refusal.request_id) == (ErrorCode.INTERNAL_ERROR, 2)
    assert refusal.text.startswith("daemon busy")  # it could not decode 210
    assert t.statistics().busy == 1


def test_statistics_are_frozen_snapshots_that_count() -> None:
    t = table()
    a = hello(t, 1, "a")
    hello(t, 2, "b")
    before, members_before = t.statistics(), t.membership.statistics()
    assert (before.sessions_opened, before.messages_submitted) == (2, 0)
    t.frame_received(1, Join("g"), 0.0)
    t.frame_received(2, Join("g"), 0.0)
    effects = t.frame_received(1, Multicast(("g",), b"hi"), 0.0)
    assert frames(effects, 2) == [Message(a, ("g",), ServiceLevel.RELIABLE, 0, b"hi")]
    t.decode_failed(2, "JOIN frame: truncated", 0.0)
    (reply,) = frames(t.frame_received(1, StatusRequest(7), 0.0), 1)
    assert isinstance(reply, StatusReply)
    after = t.statistics()
    assert (after.messages_submitted, after.messages_delivered) == (1, 2)  # to a and to b
    assert (after.bad_frames, after.sessions_closed, after.status_reports) == (1, 1, 1)
    members = t.membership.statistics()
    # a's and b's JOIN and b's leave: submitted, applied and each a change
    assert (members.operations_submitted, members.changes) == (3, 3)
    assert members.operations_applied - members_before.operations_applied == 3
    # the status report carries the same counters, under the same names
    counters = json.loads(reply.report)["counters"]
    assert counters["sessions"] == {**asdict(after), "status_reports": 0}  # counted after
    assert counters["membership"].keys() == asdict(members).keys()
    # a snapshot stays as it was taken, and cannot be changed
    assert (before.messages_submitted, members_before.changes) == (0, 0)
    with pytest.raises(FrozenInstanceError):
        after.busy = 0  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        members.changes = 0  # type: ignore[misc]


def test_each_delivery_sees_the_membership_of_its_place_in_the_total_order() -> None:
    """One batch of the membership layer drops a local member from g (a merge's STATE
    catch-up), delivers a message to g, then adds the member back: the member gets the
    two MEMBERSHIP frames and not the message, as its own frames say it was out (found by
    the virtual synchrony suite, seed 120: it used to get the message in between)."""
    t = table(membership_layer=ScriptedMembership)
    assert isinstance(t.membership, ScriptedMembership)
    name = hello(t, 1, "alice")
    t.frame_received(1, Join("g"), 0.0)
    assert t.membership.local_members("g") == (name,)
    view = ViewId(9, 1)
    out = MembershipChanged("g", view, (), Cause.NETWORK, (name,), ())
    back = MembershipChanged("g", ViewId(10, 1), (name,), Cause.NETWORK, (name,), (NodeId(1),))
    message = Deliver("#bob#D2", ("g",), ServiceLevel.AGREED, 0, b"m44", NodeId(2), 44)
    t.membership.script = [out, message, back]
    got = frames(t.overlay_delivered(NodeId(2), b"", 1.0), 1)
    assert [type(f) for f in got] == [Membership, Membership]
    message_after = Deliver("#bob#D2", ("g",), ServiceLevel.AGREED, 0, b"m45", NodeId(2), 45)
    t.membership.script = [message_after]
    assert frames(t.overlay_delivered(NodeId(2), b"", 1.0), 1) == [
        Message("#bob#D2", ("g",), ServiceLevel.AGREED, 0, b"m45")
    ]
