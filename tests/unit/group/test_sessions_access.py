"""SessionTable with access control: tokens in HELLO, rules on JOIN and MULTICAST."""

from __future__ import annotations

from meshcast.group import GroupEngine
from meshcast.group.access import AccessPolicy, AccessRule, operations_of
from meshcast.group.membership import GroupMembership
from meshcast.group.sessions import (
    CloseConnection,
    SessionConfig,
    SessionTable,
)
from meshcast.ids import NodeId
from meshcast.wire.client import (
    VERSION,
    ErrorCode,
    ErrorReport,
    Frame,
    Hello,
    Join,
    Membership,
    Message,
    Multicast,
    Welcome,
)
from tests.unit.group.test_sessions import frames

READER = "r" * 24
WRITER = "w" * 24
TOKENS = {"readers": READER, "writers": WRITER}
RULES = (
    AccessRule(("metrics.*",), operations_of(["read"]), tokens=("readers",)),
    AccessRule(("metrics.*",), operations_of(["join", "send"]), tokens=("writers",)),
    AccessRule(("metrics.*",), operations_of(["read"]), clients=("monitor-*",)),
    AccessRule(("secret",), operations_of([])),
)


def table(access: AccessPolicy) -> SessionTable:
    t = SessionTable("D1", GroupMembership(GroupEngine(NodeId(1))), SessionConfig(access=access))
    t.view_installed([NodeId(1)], 0.0)
    return t


def handshake(
    t: SessionTable, conn: int, hello: Hello, *, remote: bool = False
) -> tuple[Frame, bool]:
    """The answer to `hello` and whether the connection was closed."""
    t.connected(conn, 0.0, remote=remote)
    effects = t.frame_received(conn, hello, 0.0)
    (answer,) = frames(effects, conn)
    return answer, CloseConnection(conn) in effects


def refused(answer: Frame, code: ErrorCode) -> bool:
    return isinstance(answer, ErrorReport) and answer.code == code


def test_a_remote_connection_needs_a_known_token() -> None:
    t = table(AccessPolicy(TOKENS))
    answer, closed = handshake(t, 1, Hello("a"), remote=True)
    assert refused(answer, ErrorCode.UNAUTHENTICATED)
    assert closed
    assert "requires a token" in answer.text  # type: ignore[union-attr]
    answer, closed = handshake(t, 2, Hello("b", token="x" * 24), remote=True)
    assert refused(answer, ErrorCode.UNAUTHENTICATED)
    assert closed
    assert "x" * 24 not in answer.text  # type: ignore[union-attr]  # never echoed
    answer, closed = handshake(t, 3, Hello("c", max_version=2), remote=True)
    assert refused(answer, ErrorCode.UNSUPPORTED_VERSION)
    assert closed
    answer, closed = handshake(t, 4, Hello("d", token=READER), remote=True)
    assert isinstance(answer, Welcome)
    assert not closed
    assert answer.version == VERSION
    stats = t.statistics()
    assert (stats.unauthenticated, stats.handshakes_refused, stats.sessions_opened) == (2, 3, 1)


def test_a_wrong_token_is_refused_even_where_none_is_needed() -> None:
    t = table(AccessPolicy(TOKENS))
    answer, closed = handshake(t, 1, Hello("a", token="nope" * 5))
    assert refused(answer, ErrorCode.UNAUTHENTICATED)
    assert closed
    answer, _ = handshake(t, 2, Hello("b"))  # local, no token: fine
    assert isinstance(answer, Welcome)


def test_the_token_is_checked_before_names_and_room_are_revealed() -> None:
    t = table(AccessPolicy(TOKENS))
    assert isinstance(handshake(t, 1, Hello("alice", token=READER), remote=True)[0], Welcome)
    answer, _ = handshake(t, 2, Hello("alice"), remote=True)  # the name is taken
    assert refused(answer, ErrorCode.UNAUTHENTICATED)


def test_old_clients_are_refused_while_rules_are_in_force() -> None:
    t = table(AccessPolicy(TOKENS, RULES))
    answer, closed = handshake(t, 1, Hello("a", max_version=2))
    assert refused(answer, ErrorCode.UNSUPPORTED_VERSION)
    assert closed
    assert "access rules" in answer.text  # type: ignore[union-attr]
    without_rules = table(AccessPolicy(TOKENS))
    assert isinstance(handshake(without_rules, 1, Hello("a", max_version=2))[0], Welcome)


def test_rules_deny_join_and_send_with_typed_errors_and_the_session_goes_on() -> None:
    t = table(AccessPolicy(TOKENS, RULES))
    handshake(t, 1, Hello("reader", token=READER), remote=True)
    handshake(t, 2, Hello("writer", token=WRITER), remote=True)
    handshake(t, 3, Hello("monitor-7"))  # local
    handshake(t, 4, Hello("alice"))  # local, no rule for her but "secret"

    def errors(conn: int, frame: Frame) -> list[tuple[ErrorCode, int, str]]:
        return [
            (f.code, f.request_id, f.text)
            for f in frames(t.frame_received(conn, frame, 0.0), conn)
            if isinstance(f, ErrorReport)
        ]

    assert errors(1, Join("metrics.cpu", request_id=1)) == []  # read = join
    (denied,) = errors(1, Multicast(("metrics.cpu",), b"x", request_id=2))
    assert denied[:2] == (ErrorCode.ACCESS_DENIED, 2)
    assert "may not send to group 'metrics.cpu'" in denied[2]
    assert "token 'readers'" in denied[2]
    (denied,) = errors(1, Join("chat", request_id=3))  # remote: no rule, nothing allowed
    assert denied[:2] == (ErrorCode.ACCESS_DENIED, 3)
    assert "may not join group 'chat'" in denied[2]
    assert errors(2, Join("metrics.cpu", request_id=4)) == []
    effects = t.frame_received(2, Multicast(("metrics.cpu",), b"m", request_id=5), 0.0)
    assert [type(f) for f in frames(effects, 1)] == [Message]  # the reader receives
    assert errors(3, Join("metrics.mem", request_id=6)) == []
    (denied,) = errors(3, Multicast(("chat", "metrics.mem"), b"x", request_id=7))
    assert denied[:2] == (ErrorCode.ACCESS_DENIED, 7)
    assert "'metrics.mem'" in denied[2]  # the first group it may not send to
    assert errors(4, Join("chat", request_id=8)) == []  # local default: everything
    assert errors(4, Multicast(("chat",), b"x", request_id=9)) == []
    assert [e[0] for e in errors(4, Join("secret", request_id=10))] == [ErrorCode.ACCESS_DENIED]
    # the sessions stayed open: the reader still gets messages of its group
    effects = t.frame_received(2, Multicast(("metrics.cpu",), b"again"), 0.0)
    assert [f.payload for f in frames(effects, 1) if isinstance(f, Message)] == [b"again"]
    stats = t.statistics()
    assert stats.access_denied == 4
    assert stats.requests_refused == 4
    assert t.open_sessions() == 4


def test_membership_shows_only_what_was_allowed() -> None:
    t = table(AccessPolicy(TOKENS, RULES))
    handshake(t, 1, Hello("reader", token=READER), remote=True)
    t.frame_received(1, Join("chat"), 0.0)
    assert t.membership.table() == {}
    effects = t.frame_received(1, Join("metrics.a"), 0.0)
    assert [type(f) for f in frames(effects, 1)] == [Membership]
    assert list(t.membership.table()) == ["metrics.a"]
