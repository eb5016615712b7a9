"""SessionTable answering STATUS on a one-daemon view: the report, its bounds, its failures."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from meshcast.client.status import format_status
from meshcast.group import GroupEngine
from meshcast.group.membership import GroupMembership
from meshcast.group.sessions import (
    CloseConnection,
    SendBytes,
    SessionConfig,
    SessionEffect,
    SessionTable,
    StatusProvider,
)
from meshcast.ids import NodeId
from meshcast.wire.client import (
    FROM_DAEMON,
    MAX_STATUS_SIZE,
    DaemonLimits,
    ErrorCode,
    ErrorReport,
    Frame,
    Hello,
    Join,
    Ping,
    Pong,
    StatusReply,
    StatusRequest,
    Welcome,
    decode,
)


def table(
    status: StatusProvider | None = None,
    *,
    max_groups: int = 100,
    max_members: int = 100,
    max_backlog: int = 10_000,
) -> SessionTable:
    membership = GroupMembership(GroupEngine(NodeId(1)))
    config = SessionConfig(
        DaemonLimits(max_group_name=64),
        max_clients=10,
        max_backlog=max_backlog,
        status_max_groups=max_groups,
        status_max_members=max_members,
    )
    sessions = SessionTable("D1", membership, config, status=status)
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


def hello(t: SessionTable, conn: int, name: str) -> str:
    t.connected(conn)
    (welcome,) = frames(t.frame_received(conn, Hello(name), 0.0), conn)
    assert isinstance(welcome, Welcome)
    return welcome.private_name


def ask(t: SessionTable, conn: int, request_id: int, now: float = 1.0) -> dict[str, Any]:
    (reply,) = frames(t.frame_received(conn, StatusRequest(request_id), now), conn)
    assert isinstance(reply, StatusReply), reply
    assert reply.request_id == request_id
    report = json.loads(reply.report)
    assert isinstance(report, dict)
    return report


def overlay(now: float) -> Mapping[str, object]:
    """What a daemon adds (the runtime's `status_sections` has this shape)."""
    return {
        "daemon": {"incarnation": 7, "uptime_seconds": now},
        "view": {"members": [{"node": 1, "name": "D1"}], "digest": "00ff", "agreed": True},
        "links": [{"node": 2, "name": "D2", "up": False, "srtt_ms": None}],
        "tree": {"source": 1, "edges": [], "depth": 0, "rate_bps": float("inf")},
        "counters": {"overlay": {"views_installed": 1}},
    }


def test_status_reports_the_daemon_its_groups_and_the_providers_sections() -> None:
    t = table(overlay)
    a = hello(t, 1, "alice")
    b = hello(t, 2, "bob")
    hello(t, 3, "watch")  # the status tool: an ordinary session that joins nothing
    t.frame_received(1, Join("chat"), 0.0)
    t.frame_received(2, Join("chat"), 0.0)
    t.frame_received(2, Join("news"), 0.0)
    report = ask(t, 3, 42, now=12.5)
    assert report["format"] == 1
    assert report["daemon"] == {"name": "D1", "node": 1, "incarnation": 7, "uptime_seconds": 12.5}
    assert report["view"]["agreed"] is True
    assert report["links"] == [{"node": 2, "name": "D2", "up": False, "srtt_ms": None}]
    assert report["tree"]["rate_bps"] is None  # infinity: JSON has none
    assert report["sessions"] == {"open": 3, "max_clients": 10, "handshaking": 0}
    assert report["groups_total"] == 2
    assert report["truncated"] is False
    chat, news = report["groups"]
    assert chat["name"] == "chat"
    assert (chat["size"], chat["local"]) == (2, 2)
    assert chat["members"] == [
        {"name": a, "daemon": "D1", "node": 1},
        {"name": b, "daemon": "D1", "node": 1},
    ]
    view_id = t.membership.view_id("chat")
    assert view_id is not None
    assert chat["view_id"] == [view_id.counter, view_id.coordinator]
    assert [m["name"] for m in news["members"]] == [b]
    counters = report["counters"]
    assert set(counters) == {"sessions", "membership", "group", "overlay"}
    assert counters["sessions"]["sessions_opened"] == 3
    assert counters["group"]["delivered"] >= 3  # the three joins, through the engine
    assert t.statistics().status_reports == 1


def test_without_a_provider_the_table_reports_what_it_knows() -> None:
    t = table()
    hello(t, 1, "a")
    report = ask(t, 1, 0)
    assert report["daemon"] == {"name": "D1", "node": 1}
    assert "view" not in report
    assert report["groups"] == []
    assert report["groups_total"] == 0


def test_status_before_the_handshake_is_unexpected() -> None:
    t = table(overlay)
    t.connected(1)
    effects = t.frame_received(1, StatusRequest(5), 0.0)
    (error,) = frames(effects, 1)
    assert isinstance(error, ErrorReport)
    assert error.code == ErrorCode.UNEXPECTED_FRAME
    assert CloseConnection(1) in effects


def test_long_lists_are_capped_and_say_so() -> None:
    t = table(max_groups=2, max_members=1)
    names = [hello(t, conn, f"c{conn}") for conn in (1, 2)]
    for conn in (1, 2):
        for group in ("a", "b", "c"):
            t.frame_received(conn, Join(group), 0.0)
    report = ask(t, 1, 1)
    assert report["truncated"] is True
    assert report["groups_total"] == 3
    assert [g["name"] for g in report["groups"]] == ["a", "b"]
    for group in report["groups"]:
        assert group["size"] == 2
        assert group["members"] == [{"name": names[0], "daemon": "D1", "node": 1}]


def compact(report: Mapping[str, object]) -> int:
    return len(json.dumps(report, ensure_ascii=False, separators=(",", ":")).encode())


def test_the_report_is_cut_until_it_fits_the_frame_limit() -> None:
    extra = {"padding": ""}
    t = table(lambda _now: extra)
    for conn in range(1, 11):
        hello(t, conn, f"client{conn:02d}")
        for group in range(3):
            t.frame_received(conn, Join(f"group-{group:02d}-{'y' * 40}"), 0.0)
    without_groups = compact(t.status(0.0, max_groups=0))
    extra["padding"] = "x" * (MAX_STATUS_SIZE - without_groups - 1_000)  # room for a few
    assert compact(t.status(0.0)) > MAX_STATUS_SIZE
    (reply,) = frames(t.frame_received(1, StatusRequest(3), 0.0), 1)
    assert isinstance(reply, StatusReply)
    assert len(reply.report.encode()) <= MAX_STATUS_SIZE
    report = json.loads(reply.report)
    assert report["truncated"] is True
    assert report["padding"] == extra["padding"]
    assert report["groups_total"] == 3
    assert 0 < sum(len(g["members"]) for g in report["groups"]) < 30


def test_a_report_that_cannot_fit_is_replaced_by_an_error_report() -> None:
    t = table(lambda _now: {"padding": "x" * MAX_STATUS_SIZE})
    hello(t, 1, "a")
    report = ask(t, 1, 9)
    assert report["truncated"] is True
    assert report["daemon"] == {"name": "D1", "node": 1}
    assert "does not fit" in report["error"]


def test_a_failing_provider_gets_an_internal_error_and_the_session_goes_on() -> None:
    def broken(_now: float) -> Mapping[str, object]:
        raise RuntimeError("no overlay yet")

    t = table(broken)
    hello(t, 1, "a")
    (error,) = frames(t.frame_received(1, StatusRequest(11), 0.0), 1)
    assert isinstance(error, ErrorReport)
    assert (error.code, error.request_id) == (ErrorCode.INTERNAL_ERROR, 11)
    assert "no overlay yet" in error.text
    assert t.statistics().internal_errors == 1
    assert frames(t.frame_received(1, Ping(1), 0.0), 1) == [Pong(1)]


def test_a_client_that_asks_and_never_reads_is_bounded_not_blocking() -> None:
    t = table(max_backlog=5_000)
    hello(t, 1, "greedy")
    t.writing_paused(1)
    effects: list[SessionEffect] = []
    for request_id in range(1, 100):
        effects += t.frame_received(1, StatusRequest(request_id), 0.0)
        assert t.accepting  # a status reader never holds local senders back
        if any(isinstance(e, CloseConnection) for e in effects):
            break
    assert any(isinstance(e, CloseConnection) and e.abort and e.last for e in effects)
    assert ErrorCode.SLOW_RECEIVER in [
        f.code for f in frames(effects, 1) if isinstance(f, ErrorReport)
    ]
    assert t.statistics().slow_disconnected == 1


def test_the_table_shows_each_links_drops_by_cause_and_one_line_of_all_drops() -> None:
    dropped = {"malformed": 5, "wrong_sender": 3, "stale_epoch": 2, "out_of_window": 0}
    report = {
        "daemon": {"name": "D1", "node": 1},
        "links": [
            {"node": 2, "name": "D2", "up": False, "dropped": {**dropped, "total": 10}},
            {"node": 3, "name": "D3", "up": True, "dropped": {"total": 0}},
        ],
        "counters": {
            "links": {**dropped, "duplicates": 0, "total": 10},
            "daemon": {"foreign_dropped": 4, "unknown_upper_dropped": 3},
            "overlay": {"lsas_unknown_dropped": 1, "lsas_bad_link_dropped": 0},
            "sessions": {"handshake_timeouts": 2},
        },
    }
    lines = format_status(report).splitlines()
    assert lines[lines.index("links:") + 1].split()[-1] == "dropped"
    assert lines[lines.index("links:") + 2].split()[-1] == "10"
    assert "  dropped from D2 (2): malformed 5, wrong sender 3, stale epoch 2" in lines
    assert not any(line.startswith("  dropped from D3") for line in lines)
    assert (
        "dropped: 10 datagrams on links (malformed 5, wrong sender 3, stale epoch 2); "
        "4 datagrams from unknown addresses; 3 overlay messages for a protocol this daemon "
        "lacks; 1 LSAs of unknown daemons; 2 handshake timeouts"
    ) in lines
    assert "dropped: nothing" in format_status({}).splitlines()


def test_the_table_starts_with_insecure_or_names_the_keys_after_the_daemon() -> None:
    insecure = {"security": {"mode": "INSECURE", "keys": []}, "daemon": {"name": "D1"}}
    lines = format_status(insecure).splitlines()
    assert lines[0].startswith("INSECURE: this daemon neither encrypts nor authenticates")
    keys = [
        {"role": "next", "fingerprint": "00112233aabbccdd", "key_id": 7},
        {"role": "current", "fingerprint": "8a591b2cfa184434", "key_id": 138},
    ]
    lines = format_status({"security": {"mode": "encrypted", "keys": keys}}).splitlines()
    assert lines[0].startswith("daemon ")
    security = "security: encrypted, keys 00112233aabbccdd (next), 8a591b2cfa184434 (current)"
    assert lines[2] == security
    assert not any("INSECURE" in line for line in lines)
    # an older daemon's report has no security section: nothing is made up
    assert not format_status({}).startswith("security")
