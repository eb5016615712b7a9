"""SessionTable and daemon messages (BLOB_HELD, client protocol v6): a daemon's own SAFE
message into a group becomes one BLOB_HELD frame for each local member of version 6 or
later, the same bytes for all; older members, non-members and malformed or unknown
daemon messages get nothing (counted); and the access rules decide who may ask for a
replication to a group (it ends with a message there)."""

from __future__ import annotations

from meshcast.group import GroupEngine
from meshcast.group.access import AccessPolicy, AccessRule, operations_of
from meshcast.group.events import Deliver
from meshcast.group.membership import GroupMembership
from meshcast.group.sessions import (
    BLOB_HELD_MSG_TYPE,
    DAEMON_SENDER,
    SendBytes,
    SessionConfig,
    SessionTable,
)
from meshcast.ids import NodeId
from meshcast.wire.client import (
    BlobHeld,
    BlobMissing,
    Hello,
    Join,
    Message,
    Multicast,
    ServiceLevel,
    blob_held_body,
)
from tests.unit.group.test_sessions import frames

EVENT = BlobHeld(
    "g",
    "00000000000000ab",
    "f.bin",
    10,
    "ab" * 32,
    "D1",
    False,
    ("D1",),
    (BlobMissing("D2", 4, "x"),),
)


def table(access: AccessPolicy | None = None) -> SessionTable:
    config = SessionConfig() if access is None else SessionConfig(access=access)
    t = SessionTable("D1", GroupMembership(GroupEngine(NodeId(1))), config)
    t.view_installed([NodeId(1)], 0.0)
    return t


def member(t: SessionTable, conn: int, name: str, *, version: int = 6, group: str = "g") -> None:
    t.connected(conn, 0.0)
    t.frame_received(conn, Hello(name, max_version=version), 0.0)
    if group:
        t.frame_received(conn, Join(group), 0.0)


def test_each_version_6_member_gets_the_same_frame_once() -> None:
    t = table()
    member(t, 1, "a")
    member(t, 2, "b")
    member(t, 3, "old", version=5)
    member(t, 4, "other", group="h")
    effects = t.announce("g", blob_held_body(EVENT), 0.0)  # one daemon: SAFE at once
    writes = [e for e in effects if isinstance(e, SendBytes)]
    assert sorted(e.conn for e in writes) == [1, 2]
    assert writes[0].data == writes[1].data  # built once
    assert frames(effects, 1) == [EVENT]
    assert t.statistics().daemon_events_delivered == 2
    # the members' own messages go on around it, as MESSAGE frames
    effects = t.frame_received(3, Multicast(("g",), b"hi", ServiceLevel.SAFE), 0.0)
    assert [type(f) for f in frames(effects, 1)] == [Message]


def test_malformed_and_unknown_daemon_messages_are_dropped_and_counted() -> None:
    t = table()
    member(t, 1, "a")
    bad = Deliver(
        DAEMON_SENDER, ("g",), ServiceLevel.SAFE, BLOB_HELD_MSG_TYPE, b"\x00", NodeId(2), 1
    )
    unknown = Deliver(
        DAEMON_SENDER, ("g",), ServiceLevel.SAFE, 7, blob_held_body(EVENT), NodeId(2), 2
    )
    two_groups = Deliver(
        DAEMON_SENDER, ("g", "h"), ServiceLevel.SAFE, BLOB_HELD_MSG_TYPE, b"", NodeId(2), 3
    )
    for d in (bad, unknown, two_groups):
        assert t._route([d]) == []
    assert t.statistics().daemon_events_dropped == 3
    assert t.statistics().daemon_events_delivered == 0


def test_asking_for_a_replication_to_a_group_needs_the_right_to_send_there() -> None:
    writer, reader = "w" * 24, "r" * 24
    policy = AccessPolicy(
        {"writers": writer, "readers": reader},
        (
            AccessRule(("builds",), operations_of(["join", "send"]), tokens=("writers",)),
            AccessRule(("builds",), operations_of(["read"]), tokens=("readers",)),
        ),
    )
    t = table(policy)
    for conn, token in ((1, writer), (2, reader)):
        t.connected(conn, 0.0)
        t.frame_received(conn, Hello(f"c{conn}", token=token), 0.0)
    assert t.send_denied(1, "builds") is None
    denied = t.send_denied(2, "builds")
    assert denied is not None
    assert "may not send to group 'builds'" in denied
    assert reader not in denied  # a token is never echoed
    assert table().send_denied(1, "builds") is None  # no rules: everyone may


def test_meshcast_user_prints_the_event_as_a_line_and_as_json() -> None:
    from meshcast.client.cli import event_json, event_line

    line = event_line(EVENT)
    assert line.startswith("blob_held g 'f.bin' (10 bytes, digest abababababababab…")
    assert "INCOMPLETE, held by D1; missing: D2 holds 4 bytes: x" in line
    complete = BlobHeld("g", "00000000000000ab", "f", 1, "", "D1", True, ("D1", "D2"))
    assert event_line(complete).endswith(
        "no digest, replication 00000000000000ab from D1): complete, held by D1 D2"
    )
    assert event_json(EVENT)["missing"] == [{"daemon": "D2", "held_bytes": 4, "reason": "x"}]
