"""Client sessions of one daemon (sans-I/O): decoded client frames in, frames and effects out.

`SessionTable` implements the daemon's side of docs/client-protocol.md on top of
`GroupMembership` (which sits on the `GroupEngine`): the handshake (version, unique
private name, `max_clients`), JOIN/LEAVE/MULTICAST with their checks and typed ERROR
replies, delivery of MESSAGE and MEMBERSHIP frames to the local members of each group,
and the slow-receiver policies. It never touches a socket: the runtime gives each
connection an integer id, feeds it decoded frames, reports when a connection's write
buffer passes its high-water mark (`writing_paused`) or falls back (`writing_resumed`),
and applies the effects:

* `SendBytes(conn, data)`: write encoded frames to that connection;
* `CloseConnection(conn, abort)`: close it (after writing what is queued unless `abort`);
* `Broadcast` (from the engine): `OverlayNode.multicast(dests, payload, now)`;
* `ClientConnected`, `ClientDisconnected`, `MembershipChanged`, `OrderingReset`: for
  the log.

Access control (`meshcast.group.access`): a connection the runtime marks `remote` (it
came in on a TCP port open beyond loopback) must present a valid token in its HELLO; any
token presented must be valid; JOIN and MULTICAST are checked against the access rules
(ERROR ACCESS_DENIED, the session goes on). While rules or remote listeners are in
force, a session must speak version 3, the first that can be told ACCESS_DENIED.

Errors by who is to blame: a check the client failed is its own 2xx code; a full buffer
below (`BufferFull`: back-pressure) is BUSY, or INTERNAL_ERROR "daemon busy" to a session
older than BUSY_VERSION, which cannot decode BUSY; any other engine refusal is a bug,
INTERNAL_ERROR. Each leaves the session open.

A STATUS request is answered with a bounded JSON report (`status`): the table's own part
(daemon name and node id, sessions, the replicated group table, counters) plus what the
injected `status` provider returns for the layers the table cannot see (the daemon's
view, links, tree, uptime), so the table stays sans-I/O.

While a `block` member is over its write limit, its groups are *blocked*
(`blocked_groups`): the runtime takes no local client's MULTICAST to one of them until it
drains (the engine tells the other daemons, whose senders to those groups wait too);
other groups keep flowing. A member that holds senders back for longer than
`SessionConfig.block_timeout` is disconnected with ERROR SLOW_RECEIVER, written after
the frames already handed to its socket (`CloseConnection.last`), and the senders resume.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum

from meshcast.compile_hints import mypyc_attr
from meshcast.errors import BufferFull, ConfigError, DecodeError, UsageError
from meshcast.group.access import AccessPolicy, Operation, Principal
from meshcast.group.events import Deliver, SubmitConfirmed, SubmitLost
from meshcast.group.membership import GroupMembership, MembershipChanged, MembershipEffect
from meshcast.ids import NodeId
from meshcast.wire.client import (
    BLOB_HELD_VERSION,
    BUSY_VERSION,
    HELLO_FRAME_LIMIT,
    LENGTH,
    MAX_BLOB_HELD_FRAME,
    MAX_STATUS_SIZE,
    MAX_UNCONFIRMED,
    MIN_VERSION,
    REPLICATE_VERSION,
    SET_RATE_VERSION,
    TOKEN_VERSION,
    VERSION,
    Cause,
    Confirmed,
    DaemonLimits,
    ErrorCode,
    ErrorReport,
    Frame,
    FrameType,
    Goodbye,
    Hello,
    HelloFlag,
    Join,
    Leave,
    Membership,
    Multicast,
    Ping,
    Pong,
    Replicate,
    ServiceLevel,
    SetRate,
    SlowReceiverPolicy,
    StatusReply,
    StatusRequest,
    Welcome,
    choose_version,
    clip_text,
    decode,
    encode,
    encode_message,
    json_ready,
    private_name,
    split_private_name,
)

log = logging.getLogger(__name__)

# A message a daemon itself sends into a group (`SessionTable.announce`) has the empty
# sender: no client has that name (a client's is "#client#daemon"), so no client can
# forge one. Its msg_type says what it is; the only kind so far:
BLOB_HELD_MSG_TYPE = 0xFFFE  # payload: the body of a BLOB_HELD frame, delivered as one
DAEMON_SENDER = ""


@dataclass(frozen=True, slots=True)
class SessionConfig:
    limits: DaemonLimits = field(default_factory=DaemonLimits)  # announced in WELCOME
    max_clients: int = 1000  # sessions at once; the next HELLO gets DAEMON_FULL
    # bytes: frames a paused (slow) `block` or `drop-unreliable` member may be sent beyond
    # its transport's high-water mark before it is disconnected with SLOW_RECEIVER anyway:
    # the daemon's memory stays bounded whatever the clients do.
    max_backlog: int = 64 * 1024 * 1024
    # s: a `block` member that holds senders back this long without draining is
    # disconnected with SLOW_RECEIVER ([limits] block_timeout)
    block_timeout: float = 30.0
    # a STATUS report lists at most this many groups, and this many members of each; it is
    # cut further (and says "truncated") when it would exceed MAX_STATUS_SIZE bytes
    status_max_groups: int = 100
    status_max_members: int = 100
    # s: a connection must send its HELLO within this long, or it is closed with
    # HANDSHAKE_TIMEOUT (a connection that never says who it is holds no resources long)
    handshake_timeout: float = 5.0
    # connections still waiting for their HELLO at once; the next is refused at once with
    # DAEMON_FULL (max_clients counts sessions only after HELLO)
    max_pending_handshakes: int = 64
    # tokens and per-group rules ([clients] of the cluster file); default: no tokens, no
    # rules, every local session may do everything
    access: AccessPolicy = field(default_factory=AccessPolicy)

    def __post_init__(self) -> None:
        """Raises `ConfigError` naming the field."""
        for key, least in (
            ("max_clients", 1),
            ("max_backlog", 1),
            ("max_pending_handshakes", 1),
            ("status_max_groups", 0),
            ("status_max_members", 0),
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"must be an integer of at least {least}, got {value!r}", key=key)
        for key in ("block_timeout", "handshake_timeout"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"must be a positive number of seconds, got {value!r}", key=key)


@dataclass(slots=True)  # per message: not frozen, __init__ written out (GroupData)
class SendBytes:
    conn: int
    data: bytes

    def __init__(self, conn: int, data: bytes) -> None:
        self.conn = conn
        self.data = data


@dataclass(frozen=True, slots=True)
class CloseConnection:
    conn: int
    # a slow receiver: drop the frames queued but not yet handed to its socket, then
    # write `last` (the ERROR saying why) and close; aborted if the peer never reads it
    abort: bool = False
    last: bytes = b""


@dataclass(frozen=True, slots=True)
class ClientConnected:
    conn: int
    name: str  # private name
    version: int


@dataclass(frozen=True, slots=True)
class ClientDisconnected:
    conn: int
    name: str
    reason: str  # "goodbye", "closed", "slow receiver", "bad frame", "shutting down", ...
    groups: tuple[str, ...]


SessionEffect = (
    MembershipEffect | SendBytes | CloseConnection | ClientConnected | ClientDisconnected
)


@dataclass(slots=True)
class _Counters:
    """The counters of `SessionStats`, bumped in place (`+= 1`, checked by mypy)."""

    sessions_opened: int = 0
    sessions_closed: int = 0
    handshakes_refused: int = 0
    requests_refused: int = 0
    bad_frames: int = 0
    messages_submitted: int = 0
    messages_delivered: int = 0
    unreliable_dropped: int = 0
    slow_disconnected: int = 0
    internal_errors: int = 0
    status_reports: int = 0
    handshake_timeouts: int = 0
    handshake_bad_frames: int = 0
    pending_refused: int = 0
    unauthenticated: int = 0
    access_denied: int = 0
    busy: int = 0
    daemon_events_delivered: int = 0
    daemon_events_dropped: int = 0


@dataclass(frozen=True, slots=True)
class SessionStats:
    """Counters of one session table (a frozen snapshot, `statistics()`)."""

    sessions_opened: int = 0
    sessions_closed: int = 0
    handshakes_refused: int = 0
    requests_refused: int = 0  # 2xx ERRORs
    bad_frames: int = 0
    messages_submitted: int = 0
    messages_delivered: int = 0  # MESSAGE frames queued for clients
    unreliable_dropped: int = 0  # by `drop-unreliable`
    slow_disconnected: int = 0  # by `disconnect`, or past max_backlog
    internal_errors: int = 0
    status_reports: int = 0  # STATUS requests answered
    handshake_timeouts: int = 0  # closed: no HELLO within handshake_timeout
    handshake_bad_frames: int = 0  # a frame before HELLO did not decode (longer than a HELLO, ...)
    pending_refused: int = 0  # connections refused: max_pending_handshakes were waiting
    unauthenticated: int = 0  # handshakes refused: no token where one is needed, or unknown
    access_denied: int = 0  # JOINs and MULTICASTs the access rules refused (in requests_refused)
    busy: int = 0  # requests refused with BUSY: a bounded buffer was full (in requests_refused)
    daemon_events_delivered: int = 0  # BLOB_HELD frames queued for clients
    daemon_events_dropped: int = 0  # daemon messages of an unknown kind, or that do not decode


# What the daemon adds to a STATUS report, given `now`: JSON-ready sections (see `status`).
StatusProvider = Callable[[float], Mapping[str, object]]
STATUS_FORMAT = 1  # the report's "format": bumped when a key changes meaning or goes away
MAX_DECISIONS = 256  # access decisions remembered per session (groups), then forgotten
MAX_CACHED_TARGETS = 1024  # sets of groups whose local members are remembered


class _State(Enum):
    HANDSHAKE = 1
    OPEN = 2
    CLOSED = 3


@dataclass(slots=True)
class _Session:
    conn: int
    state: _State = _State.HANDSHAKE
    name: str = ""
    flags: int = 0  # HelloFlag bits of the HELLO
    version: int = 0  # agreed in the handshake (TRANSITIONAL views from version 2)
    unconfirmed: int = 0  # CONFIRM MULTICASTs not yet answered (<= MAX_UNCONFIRMED)
    groups: dict[str, SlowReceiverPolicy] = field(default_factory=dict)  # requested
    paused: bool = False  # the transport's write buffer is over its high-water mark
    backlog: int = 0  # bytes sent while paused
    blocked_since: float | None = None  # when it began holding senders back
    dropped: dict[str, int] = field(default_factory=dict)  # group -> UNRELIABLE dropped
    remote: bool = False  # came in on a TCP port open beyond loopback: token required
    token: str | None = None  # the name of the token its HELLO presented, if any
    principal: Principal | None = None  # who it is for the access rules (once OPEN)
    # group -> operations allowed, remembered: a MULTICAST checks its groups every time
    decisions: dict[str, frozenset[Operation]] = field(default_factory=dict)


@mypyc_attr(allow_interpreted_subclasses=True)  # DaemonLayers: tests subclass it
class SessionTable:
    """Every client session of one daemon (see the module docstring)."""

    def __init__(
        self,
        daemon_name: str,
        membership: GroupMembership,
        config: SessionConfig | None = None,
        *,
        status: StatusProvider | None = None,
    ) -> None:
        private_name("x", daemon_name)  # ValueError now for a name that cannot be used
        self.daemon_name = daemon_name
        self.membership = membership
        self.config = config or SessionConfig()
        self._status_provider = status
        self._sessions: dict[int, _Session] = {}
        self._by_name: dict[str, _Session] = {}
        # group -> its members on this daemon, as of the effect being routed: one batch of
        # the membership layer's effects can change a group and deliver a message to it,
        # in total order, and each delivery must see the table of its place in that order
        self._local_members: dict[str, tuple[str, ...]] = {}
        # a message's groups -> (local member, its groups among them), sorted by name:
        # worked out once per set of groups until a membership changes
        self._targets: dict[tuple[str, ...], tuple[tuple[str, tuple[str, ...]], ...]] = {}
        self._next_auto = 1
        self._blocking: set[int] = set()  # paused sessions holding local senders back
        # connections before HELLO -> deadline of their handshake, earliest first (the
        # timeout is one constant and inputs come in time order)
        self._pending: dict[int, float] = {}
        self._confirming: dict[int, tuple[int, int]] = {}  # token -> (conn, request id)
        self._next_token = 1
        self._counters = _Counters()
        self._now = 0.0  # time of the latest input

    # ------------------------------------------------------------------ queries

    @property
    def local(self) -> NodeId:
        return self.membership.local

    @property
    def accepting(self) -> bool:
        """False while a slow `block` member holds some senders back (`blocked_groups`)."""
        return not self._blocking

    def blocked_groups(self) -> frozenset[str]:
        """Groups whose senders must wait: those of local members that are over their
        write limit with frames queued, except groups they joined with `disconnect`."""
        groups: set[str] = set()
        for conn in self._blocking:
            s = self._sessions.get(conn)
            if s is not None:
                groups.update(g for g, p in s.groups.items() if p != SlowReceiverPolicy.DISCONNECT)
        return frozenset(groups)

    def session_name(self, conn: int) -> str | None:
        s = self._sessions.get(conn)
        return s.name if s is not None and s.name else None

    def open_sessions(self) -> int:
        return sum(1 for s in self._sessions.values() if s.state is _State.OPEN)

    def pending_handshakes(self) -> int:
        """Connections that have not completed their handshake (nor been closed)."""
        return len(self._pending)

    def handshaking(self, conn: int) -> bool:
        return conn in self._pending

    def session_version(self, conn: int) -> int:
        """The protocol version `conn`'s session agreed on (0: no open session)."""
        s = self._sessions.get(conn)
        return s.version if s is not None and s.state is _State.OPEN else 0

    def frame_limit(self, conn: int) -> int:
        """The largest frame (length field) to read from `conn` now: what a HELLO can need
        before the handshake, the session's frame cap after it."""
        if conn in self._pending:
            return HELLO_FRAME_LIMIT
        return self.config.limits.max_frame_size

    def statistics(self) -> SessionStats:
        c = self._counters
        return SessionStats(
            sessions_opened=c.sessions_opened,
            sessions_closed=c.sessions_closed,
            handshakes_refused=c.handshakes_refused,
            requests_refused=c.requests_refused,
            bad_frames=c.bad_frames,
            messages_submitted=c.messages_submitted,
            messages_delivered=c.messages_delivered,
            unreliable_dropped=c.unreliable_dropped,
            slow_disconnected=c.slow_disconnected,
            internal_errors=c.internal_errors,
            status_reports=c.status_reports,
            handshake_timeouts=c.handshake_timeouts,
            handshake_bad_frames=c.handshake_bad_frames,
            pending_refused=c.pending_refused,
            unauthenticated=c.unauthenticated,
            access_denied=c.access_denied,
            busy=c.busy,
            daemon_events_delivered=c.daemon_events_delivered,
            daemon_events_dropped=c.daemon_events_dropped,
        )

    def next_deadline(self) -> float | None:
        earliest = self.membership.next_deadline()  # a running minimum: asked per message
        for conn in self._blocking:
            since = self._sessions[conn].blocked_since
            if since is not None:
                at = since + self.config.block_timeout
                if earliest is None or at < earliest:
                    earliest = at
        if self._pending:
            at = next(iter(self._pending.values()))
            if earliest is None or at < earliest:
                earliest = at
        return earliest

    def status(
        self, now: float, *, max_groups: int | None = None, max_members: int | None = None
    ) -> dict[str, object]:
        """The status report, JSON-ready (non-finite floats become None).

        Keys: ``format``, ``daemon`` (``name``, ``node``, plus the provider's), the
        provider's other sections (the daemon adds ``view``, ``links``, ``tree``),
        ``sessions`` (``open`` counts the asking session too, ``max_clients``),
        ``groups`` (at most `max_groups`, by name: ``name``, ``view_id``, ``size``,
        ``members`` — at most `max_members` of ``{name, daemon, node}`` — and ``local``),
        ``groups_total``, ``truncated`` (a list was cut) and ``counters`` (``sessions``,
        ``membership``, ``group`` — the engine's — plus the provider's). The provider's
        ``daemon`` and ``counters`` are merged into the table's. Its exceptions propagate.
        """
        group_cap = self.config.status_max_groups if max_groups is None else max_groups
        member_cap = self.config.status_max_members if max_members is None else max_members
        extra = dict(self._status_provider(now)) if self._status_provider is not None else {}
        daemon: dict[str, object] = {"name": self.daemon_name, "node": int(self.local)}
        daemon.update(_section(extra.pop("daemon", None)))
        counters: dict[str, object] = {
            "sessions": asdict(self.statistics()),
            "membership": asdict(self.membership.statistics()),
            "group": asdict(self.membership.engine.statistics()),
        }
        counters.update(_section(extra.pop("counters", None)))
        table = self.membership.table()
        truncated = len(table) > group_cap
        groups: list[dict[str, object]] = []
        for name, members in list(table.items())[: max(0, group_cap)]:
            view_id = self.membership.view_id(name)
            truncated = truncated or len(members) > member_cap
            groups.append(
                {
                    "name": name,
                    "view_id": None if view_id is None else [view_id.counter, view_id.coordinator],
                    "size": len(members),
                    "local": sum(1 for _, host in members if host == self.local),
                    "members": [
                        {"name": m, "daemon": m.rpartition("#")[2], "node": int(host)}
                        for m, host in members[: max(0, member_cap)]
                    ],
                }
            )
        report: dict[str, object] = {"format": STATUS_FORMAT, "daemon": daemon}
        report.update(extra)
        report.update(
            sessions={
                "open": self.open_sessions(),
                "max_clients": self.config.max_clients,
                "handshaking": len(self._pending),
            },
            groups=groups,
            groups_total=len(table),
            truncated=truncated,
            counters=counters,
        )
        ready = json_ready(report)
        assert isinstance(ready, dict)
        return ready

    def status_text(self, now: float) -> str:
        """`status` as compact JSON of at most MAX_STATUS_SIZE bytes: the group and member
        lists are halved until it fits (``truncated`` says so)."""
        groups = self.config.status_max_groups
        members = self.config.status_max_members
        while True:
            report = self.status(now, max_groups=groups, max_members=members)
            text = _compact_json(report)
            if len(text.encode("utf-8")) <= MAX_STATUS_SIZE:
                return text
            if groups == 0 and members == 0:
                break
            groups //= 2
            members //= 2
        daemon = report.get("daemon")
        return _compact_json(
            {
                "format": STATUS_FORMAT,
                "daemon": daemon if isinstance(daemon, dict) else {},
                "truncated": True,
                "error": f"the status report does not fit in {MAX_STATUS_SIZE} bytes",
            }
        )

    # ------------------------------------------------------------------ connection inputs

    def connected(
        self, conn: int, now: float | None = None, *, remote: bool = False
    ) -> list[SessionEffect]:
        """A new connection: it must send HELLO within `handshake_timeout`. Refused at once
        (DAEMON_FULL, then close) while `max_pending_handshakes` others are waiting.
        `remote`: it came in on a TCP port open beyond loopback, so its HELLO must carry a
        valid token (UsageError if no token is configured: the runtime must not open one)."""
        if conn in self._sessions:
            raise UsageError(f"connection {conn} is already open")
        if remote and not self.config.access.has_tokens:
            raise UsageError("a remote connection needs configured tokens")
        now = self._now if now is None else max(self._now, now)
        self._now = now
        s = _Session(conn, remote=remote)
        self._sessions[conn] = s
        limit = self.config.max_pending_handshakes
        if len(self._pending) >= limit:
            self._counters.pending_refused += 1
            text = f"{limit} connections are waiting for their handshake; try again later"
            return self._end(s, ErrorCode.DAEMON_FULL, text, "refused", now)
        self._pending[conn] = now + self.config.handshake_timeout
        return []

    def frame_received(self, conn: int, frame: Frame, now: float) -> list[SessionEffect]:
        self._now = max(self._now, now)
        s = self._sessions.get(conn)
        if s is None or s.state is _State.CLOSED:
            return []
        if s.state is _State.HANDSHAKE:
            return self._handshake(s, frame, now)
        out: list[SessionEffect] = []
        try:
            self._request(s, frame, now, out)
        except BufferFull as exc:  # back-pressure: nobody's fault, the client retries later
            out.append(self._busy(s, str(exc), _request_id(frame)))
        except UsageError as exc:  # the engine refused what the checks let through
            self._counters.internal_errors += 1
            log.warning("daemon %s: request of %s failed: %s", self.local, s.name, exc)
            out.append(self._error(s, ErrorCode.INTERNAL_ERROR, str(exc), _request_id(frame)))
        return out

    def begin_batch(self) -> None:
        """MULTICAST frames of one turn follow (`frame_received`): the group layer orders
        them in one pass; `end_batch` returns the deliveries that pass makes."""
        self.membership.begin_batch()

    def end_batch(self, now: float) -> list[SessionEffect]:
        return self._route(self.membership.end_batch(now))

    def send_denied(self, conn: int, group: str) -> str | None:
        """Why the access rules keep `conn`'s session from sending to `group` (None: they
        do not). A replication to a group ends with a message into it, so asking for one
        needs the right to send there."""
        access = self.config.access
        s = self._sessions.get(conn)
        if not access.rules or s is None or s.principal is None:
            return None
        if Operation.SEND in access.allowed(s.principal, group):
            return None
        self._counters.access_denied += 1
        token = f" (token {s.principal.token!r})" if s.principal.token is not None else ""
        return f"{s.name}{token} may not send to group {group!r}"

    def announce(self, group: str, body: bytes, now: float) -> list[SessionEffect]:
        """The daemon itself tells every member of `group` that a replication to it ended:
        `body` (of a BLOB_HELD frame) goes out as a SAFE message in the group's total
        order (docs/design/replicate.md, "Agreed completion"). Raises what
        `GroupEngine.submit` raises (BufferFull: retry later; UsageError: no view)."""
        self._now = max(self._now, now)
        effects = self.membership.submit(
            (group,), body, ServiceLevel.SAFE, DAEMON_SENDER, now, BLOB_HELD_MSG_TYPE
        )
        return self._route(effects)

    def decode_failed(self, conn: int, reason: str, now: float) -> list[SessionEffect]:
        """The connection's bytes did not decode: ERROR BAD_FRAME, then close."""
        self._now = max(self._now, now)
        s = self._sessions.get(conn)
        if s is None or s.state is _State.CLOSED:
            return []
        self._counters.bad_frames += 1
        if s.state is _State.HANDSHAKE:
            self._counters.handshake_bad_frames += 1
        return self._end(s, ErrorCode.BAD_FRAME, reason, "bad frame", now)

    def connection_lost(self, conn: int, now: float) -> list[SessionEffect]:
        """EOF or reset: the client's groups are left with cause `disconnect`."""
        self._now = max(self._now, now)
        s = self._sessions.get(conn)
        if s is None:
            return []
        if s.state is _State.CLOSED:
            del self._sessions[conn]
            return []
        return self._drop(s, "closed", now, close=False)

    def writing_paused(self, conn: int) -> None:
        s = self._sessions.get(conn)
        if s is not None and s.state is _State.OPEN:
            s.paused = True
            s.backlog = 0

    def writing_resumed(self, conn: int) -> list[SessionEffect]:
        s = self._sessions.get(conn)
        if s is None or s.state is not _State.OPEN:
            return []
        s.paused = False
        s.backlog = 0
        s.blocked_since = None
        self._blocking.discard(conn)
        out: list[SessionEffect] = []
        for group, count in sorted(s.dropped.items()):
            out.append(
                self._error(
                    s,
                    ErrorCode.MESSAGES_DROPPED,
                    f"{count} UNRELIABLE messages of group {group!r} dropped",
                )
            )
        s.dropped.clear()
        return out

    def shutdown(self, now: float) -> list[SessionEffect]:
        """The daemon stops: ERROR SHUTTING_DOWN to every session, then close them."""
        self._now = max(self._now, now)
        out: list[SessionEffect] = []
        for s in list(self._sessions.values()):
            if s.state is not _State.CLOSED:
                out += self._end(
                    s, ErrorCode.SHUTTING_DOWN, "the daemon is stopping", "shutting down", now
                )
        return out

    # ------------------------------------------------------------------ group inputs

    def view_installed(
        self, members: Iterable[NodeId], now: float, incarnations: tuple[int, ...] = ()
    ) -> list[SessionEffect]:
        self._now = max(self._now, now)
        return self._route(self.membership.view_installed(members, now, incarnations))

    def overlay_delivered(self, source: NodeId, payload: bytes, now: float) -> list[SessionEffect]:
        self._now = max(self._now, now)
        return self._route(self.membership.overlay_delivered(source, payload, now))

    def on_timer(self, now: float) -> list[SessionEffect]:
        self._now = max(self._now, now)
        out: list[SessionEffect] = []
        while self._pending:
            conn, deadline = next(iter(self._pending.items()))
            if deadline > now:
                break
            self._counters.handshake_timeouts += 1
            text = f"no HELLO within {self.config.handshake_timeout:g} s"
            out += self._end(
                self._sessions[conn], ErrorCode.HANDSHAKE_TIMEOUT, text, "handshake timeout", now
            )
        timeout = self.config.block_timeout
        for conn in sorted(self._blocking):
            s = self._sessions[conn]
            if s.blocked_since is not None and now >= s.blocked_since + timeout:
                out += self._slow(
                    s, f"held senders back for {timeout:g} s without reading (block_timeout)"
                )
        return out + self._route(self.membership.on_timer(now))

    # ------------------------------------------------------------------ handshake

    def _handshake(self, s: _Session, frame: Frame, now: float) -> list[SessionEffect]:
        if not isinstance(frame, Hello):
            self._counters.handshakes_refused += 1
            return self._end(
                s, ErrorCode.UNEXPECTED_FRAME, f"expected HELLO, got {_kind(frame)}", "refused", now
            )
        version = choose_version(frame)
        code: ErrorCode | None = None
        text = ""
        if version is None:
            code = ErrorCode.UNSUPPORTED_VERSION
            text = (
                f"this daemon speaks versions {MIN_VERSION}..{VERSION}, "
                f"not {frame.min_version}..{frame.max_version}"
            )
        elif (refusal := self._authenticate(s, frame, version)) is not None:
            code, text = refusal
        elif self.open_sessions() >= self.config.max_clients:
            code = ErrorCode.DAEMON_FULL
            text = f"the daemon already serves {self.config.max_clients} clients"
        else:
            name = private_name(frame.name or self._auto_name(), self.daemon_name)
            if name in self._by_name:
                code = ErrorCode.NAME_IN_USE
                text = f"name {frame.name!r} is in use on this daemon"
        if code is not None or version is None:
            self._counters.handshakes_refused += 1
            return self._end(s, code or ErrorCode.UNSUPPORTED_VERSION, text, "refused", now)
        s.state = _State.OPEN
        self._pending.pop(s.conn, None)
        s.name = name
        s.principal = Principal(split_private_name(name)[0], s.token, s.remote)
        s.flags = int(frame.flags)
        s.version = version
        self._by_name[name] = s
        self._counters.sessions_opened += 1
        welcome = Welcome(version, name, self.config.limits)
        return [SendBytes(s.conn, encode(welcome)), ClientConnected(s.conn, name, version)]

    def _authenticate(
        self, s: _Session, hello: Hello, version: int
    ) -> tuple[ErrorCode, str] | None:
        """Check HELLO's token and version against the access policy and note the token's
        name in `s`. The refusal (code, text) if the session may not open."""
        access = self.config.access
        token: str | None = None
        if hello.token is not None:
            token = access.authenticate(hello.token)
            if token is None:
                self._counters.unauthenticated += 1
                return ErrorCode.UNAUTHENTICATED, "unknown token"
        if version < TOKEN_VERSION and (s.remote or access.rules):
            why = "requires a token" if s.remote else "enforces access rules"
            return (
                ErrorCode.UNSUPPORTED_VERSION,
                f"this daemon {why}: connect with a client speaking protocol version "
                f"{TOKEN_VERSION}, not {hello.min_version}..{hello.max_version}",
            )
        if s.remote and token is None:
            self._counters.unauthenticated += 1
            return ErrorCode.UNAUTHENTICATED, "this port requires a token (none was given)"
        s.token = token
        return None

    def _auto_name(self) -> str:
        while True:
            candidate = f"c{self._next_auto:06x}"
            self._next_auto += 1
            if private_name(candidate, self.daemon_name) not in self._by_name:
                return candidate

    # ------------------------------------------------------------------ requests

    def _request(self, s: _Session, frame: Frame, now: float, out: list[SessionEffect]) -> None:
        if isinstance(frame, Multicast):  # most often: no pattern match
            self._multicast(s, frame, now, out)
            return
        limits = self.config.limits
        match frame:
            case Join(group, policy, rid):
                if (fault := self._group_fault(group)) is not None:
                    out.append(self._refuse(s, ErrorCode.GROUP_NAME_TOO_LONG, fault, rid))
                elif group in s.groups:
                    out.append(
                        self._refuse(s, ErrorCode.ALREADY_MEMBER, f"already in {group!r}", rid)
                    )
                elif len(s.groups) >= limits.max_groups_per_client:
                    text = f"a session may be in at most {limits.max_groups_per_client} groups"
                    out.append(self._refuse(s, ErrorCode.TOO_MANY_GROUPS, text, rid))
                elif (denied := self._denied(s, Operation.JOIN, (group,), rid)) is not None:
                    out.append(denied)
                else:
                    out += self._route(self.membership.join(s.name, group, now))
                    s.groups[group] = policy
            case Leave(group, rid):
                if group not in s.groups:
                    out.append(self._refuse(s, ErrorCode.NOT_A_MEMBER, f"not in {group!r}", rid))
                else:
                    out += self._route(self.membership.leave(s.name, group, now))
                    del s.groups[group]
            case StatusRequest(rid):
                out += self._status_reply(s, rid, now)
            case Ping(nonce):
                out.append(SendBytes(s.conn, encode(Pong(nonce))))
            case Pong():
                pass
            case Goodbye():
                out += self._drop(s, "goodbye", now, close=True, last=encode(Goodbye()))
            case Hello():
                out += self._end(s, ErrorCode.UNEXPECTED_FRAME, "a second HELLO", "bad frame", now)
            # the daemon takes these from sessions of their version or later
            case Replicate() | SetRate():
                needs = (
                    REPLICATE_VERSION
                    if isinstance(frame, Replicate) and frame.buddy is None
                    else SET_RATE_VERSION
                )
                what = (
                    "SET_RATE"
                    if isinstance(frame, SetRate)
                    else "REPLICATE"
                    if frame.buddy is None
                    else "REPLICATE with a buddy"
                )
                out += self._end(
                    s,
                    ErrorCode.UNEXPECTED_FRAME,
                    f"{what} needs protocol version {needs}, the session has {s.version}",
                    "bad frame",
                    now,
                )
            case _:
                out += self._end(
                    s,
                    ErrorCode.UNEXPECTED_FRAME,
                    f"{_kind(frame)} is not sent by clients",
                    "bad frame",
                    now,
                )

    def _multicast(
        self, s: _Session, frame: Multicast, now: float, out: list[SessionEffect]
    ) -> None:
        groups, payload, rid = frame.groups, frame.payload, frame.request_id
        limits = self.config.limits
        fault = self._groups_fault(groups)
        if fault is not None:
            out.append(self._refuse(s, ErrorCode.GROUP_NAME_TOO_LONG, fault, rid))
        elif (denied := self._denied(s, Operation.SEND, groups, rid)) is not None:
            out.append(denied)
        elif len(payload) > limits.max_message_size:
            text = f"payload of {len(payload)} bytes, more than {limits.max_message_size}"
            out.append(self._refuse(s, ErrorCode.MESSAGE_TOO_LARGE, text, rid))
        elif frame.confirm and s.unconfirmed >= MAX_UNCONFIRMED:
            text = f"{s.unconfirmed} CONFIRM messages are not confirmed yet"
            out.append(self._refuse(s, ErrorCode.TOO_MANY_UNCONFIRMED, text, rid))
        else:
            token = 0
            if frame.confirm:  # registered first: a RELIABLE one is confirmed at once
                token = self._next_token
                self._next_token += 1
                self._confirming[token] = (s.conn, rid)
                s.unconfirmed += 1
            try:
                effects = self.membership.submit(
                    groups, payload, frame.service, s.name, now, frame.msg_type, token
                )
            except UsageError:  # BufferFull too: answered in `frame_received`
                self._unconfirm(token)
                raise
            self._counters.messages_submitted += 1
            out += self._route(effects)

    def _status_reply(self, s: _Session, rid: int, now: float) -> list[SessionEffect]:
        try:
            text = self.status_text(now)
        except Exception as exc:  # the injected provider failed: answer, do not go silent
            self._counters.internal_errors += 1
            log.exception("daemon %s: status report for %s failed", self.local, s.name)
            return [self._error(s, ErrorCode.INTERNAL_ERROR, f"status report failed: {exc}", rid)]
        self._counters.status_reports += 1
        data = encode(StatusReply(text, rid))
        if s.paused:  # a client that asks and never reads: bounded like any backlog
            s.backlog += len(data)
            if s.backlog > self.config.max_backlog:
                return self._slow(s, f"more than {self.config.max_backlog} bytes queued")
        return [SendBytes(s.conn, data)]

    def _denied(
        self, s: _Session, operation: Operation, groups: tuple[str, ...], rid: int
    ) -> SendBytes | None:
        """ERROR ACCESS_DENIED naming the operation and the first group the rules keep
        `s` from performing it on; None if every group allows it."""
        access = self.config.access
        if not access.rules:
            return None  # no rules: every session past its handshake may do everything
        who = s.principal
        assert who is not None  # set when the session opened; only open sessions ask
        for group in groups:
            allowed = s.decisions.get(group)
            if allowed is None:
                allowed = access.allowed(who, group)
                if len(s.decisions) >= MAX_DECISIONS:
                    s.decisions.clear()
                s.decisions[group] = allowed
            if operation not in allowed:
                self._counters.access_denied += 1
                verb = "join" if operation is Operation.JOIN else "send to"
                token = f" (token {who.token!r})" if who.token is not None else ""
                text = f"{s.name}{token} may not {verb} group {group!r}"
                return self._refuse(s, ErrorCode.ACCESS_DENIED, text, rid)
        return None

    def _group_fault(self, group: str) -> str | None:
        size = len(group.encode("utf-8"))
        limit = self.config.limits.max_group_name
        if size > limit:
            return f"group name of {size} bytes, more than {limit}"
        return None

    def _groups_fault(self, groups: tuple[str, ...]) -> str | None:
        """The first of `groups` whose name is too long (a message's, asked per message:
        a name of at most a quarter of the limit in characters fits in UTF-8)."""
        quarter = self.config.limits.max_group_name // 4
        for g in groups:
            if len(g) > quarter and (fault := self._group_fault(g)) is not None:
                return fault
        return None

    # ------------------------------------------------------------------ effects of the layers below

    def _route(self, effects: Sequence[object]) -> list[SessionEffect]:
        # `effects` are the membership layer's (MembershipEffect), read as objects: an
        # effect of a kind this table does not know goes up as it is, for the daemon's
        # bulkhead to count, where compiled code would refuse it here (docs/compiled.md)
        out: list[SessionEffect] = []
        for effect in effects:
            if isinstance(effect, Deliver):
                out += self._deliver(effect)
            elif isinstance(effect, MembershipChanged):
                local = tuple(
                    m for m, d in zip(effect.members, effect.hosts, strict=True) if d == self.local
                )
                if local:
                    self._local_members[effect.group] = local
                else:
                    self._local_members.pop(effect.group, None)
                self._targets.clear()
                out.append(effect)
                out += self._membership(effect)
            elif isinstance(effect, SubmitConfirmed | SubmitLost):
                out += self._confirmed(effect)
            else:
                out.append(effect)  # type: ignore[arg-type]
        return out

    def _unconfirm(self, token: int) -> tuple[_Session, int] | None:
        """Forget `token`: the session that asked and the request id, if still open."""
        conn, rid = self._confirming.pop(token, (0, 0))
        s = self._sessions.get(conn)
        if s is None:
            return None
        s.unconfirmed -= 1
        return (s, rid) if s.state is _State.OPEN else None

    def _confirmed(self, effect: SubmitConfirmed | SubmitLost) -> list[SessionEffect]:
        asked = self._unconfirm(effect.token)
        if asked is None:
            return []
        s, rid = asked
        if isinstance(effect, SubmitLost):
            text = f"message lost in a view change: {effect.reason}"
            return [self._error(s, ErrorCode.INTERNAL_ERROR, text, rid)]
        return self._send(s, encode(Confirmed(rid)), (), ServiceLevel.SAFE)

    def _membership(self, change: MembershipChanged) -> list[SessionEffect]:
        frame = Membership(change.group, change.view_id, change.members, change.cause, change.who)
        data: bytes | None = None
        out: list[SessionEffect] = []
        names = {*self._local_members.get(change.group, ()), *change.who}
        for name in sorted(names):
            s = self._by_name.get(name)
            if s is None or s.state is not _State.OPEN:
                continue
            own = name in change.who
            if not own and not s.flags & HelloFlag.MEMBERSHIP:
                continue
            if change.cause == Cause.TRANSITIONAL and s.version < 2:
                continue  # a version-1 client does not know the cause
            if not own and name not in change.members:
                continue
            data = data or encode(frame)
            out += self._send(s, data, (change.group,), ServiceLevel.SAFE)
        return out

    def _deliver(self, d: Deliver) -> list[SessionEffect]:
        if d.sender == DAEMON_SENDER:
            return self._daemon_event(d)
        targets = self._targets.get(d.groups)
        if targets is None:
            targets = self._targets_of(d.groups)
        if not targets:
            return []
        data = encode_message(d.sender, d.groups, d.service, d.msg_type, d.payload)
        out: list[SessionEffect] = []
        for name, groups in targets:
            s = self._by_name.get(name)
            if s is not None and s.state is _State.OPEN:
                out += self._send(s, data, groups, d.service, message=True)
        return out

    def _targets_of(self, groups: tuple[str, ...]) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The local members of any of `groups`, each with its groups among them."""
        found: dict[str, list[str]] = {}
        for g in groups:
            for name in self._local_members.get(g, ()):
                found.setdefault(name, []).append(g)
        targets = tuple((name, tuple(found[name])) for name in sorted(found))
        if len(self._targets) >= MAX_CACHED_TARGETS:
            self._targets.clear()
        self._targets[groups] = targets
        return targets

    def _daemon_event(self, d: Deliver) -> list[SessionEffect]:
        """A daemon's message (`announce`): one BLOB_HELD frame, built and checked once,
        to each local member of its group whose session speaks BLOB_HELD_VERSION."""
        if d.msg_type != BLOB_HELD_MSG_TYPE or len(d.groups) != 1:
            self._counters.daemon_events_dropped += 1
            return []
        (group,) = d.groups
        sessions = [
            s
            for name in self._local_members.get(group, ())
            if (s := self._by_name.get(name)) is not None
            and s.state is _State.OPEN
            and s.version >= BLOB_HELD_VERSION
        ]
        if not sessions:
            return []
        data = LENGTH.pack(1 + len(d.payload)) + bytes((FrameType.BLOB_HELD,)) + d.payload
        try:  # another daemon's bytes: checked before any client sees them
            decode(data, max_frame_size=MAX_BLOB_HELD_FRAME, accept=_BLOB_HELD_ONLY)
        except DecodeError as exc:
            self._counters.daemon_events_dropped += 1
            log.warning("daemon %s: BLOB_HELD from %s dropped: %s", self.local, d.source, exc)
            return []
        out: list[SessionEffect] = []
        for s in sessions:
            self._counters.daemon_events_delivered += 1
            out += self._send(s, data, (group,), ServiceLevel.SAFE)
        return out

    def _send(
        self,
        s: _Session,
        data: bytes,
        groups: tuple[str, ...],
        service: ServiceLevel,
        *,
        message: bool = False,
    ) -> list[SessionEffect]:
        """Queue `data` for `s`, applying its slow-receiver policies when it is paused."""
        if s.paused:
            policies = [s.groups.get(g, SlowReceiverPolicy.BLOCK) for g in groups]
            if SlowReceiverPolicy.DISCONNECT in policies:
                return self._slow(s, f"too slow to read group {groups[0]!r}")
            if (
                message
                and service == ServiceLevel.UNRELIABLE
                and all(p == SlowReceiverPolicy.DROP_UNRELIABLE for p in policies)
            ):
                for g in groups:
                    s.dropped[g] = s.dropped.get(g, 0) + 1
                self._counters.unreliable_dropped += 1
                return []
            s.backlog += len(data)
            self._blocking.add(s.conn)
            if s.blocked_since is None:
                s.blocked_since = self._now
            if s.backlog > self.config.max_backlog:
                return self._slow(s, f"more than {self.config.max_backlog} bytes queued")
        if message:
            self._counters.messages_delivered += 1
        return [SendBytes(s.conn, data)]

    def _slow(self, s: _Session, text: str) -> list[SessionEffect]:
        self._counters.slow_disconnected += 1
        return self._end(s, ErrorCode.SLOW_RECEIVER, text, "slow receiver", self._now, abort=True)

    # ------------------------------------------------------------------ ending sessions

    def _busy(self, s: _Session, reason: str, rid: int) -> SendBytes:
        """ERROR BUSY: a bounded buffer below is full. A session older than BUSY_VERSION
        cannot decode 210, so it gets INTERNAL_ERROR with the same text."""
        self._counters.busy += 1
        code = ErrorCode.BUSY if s.version >= BUSY_VERSION else ErrorCode.INTERNAL_ERROR
        return self._refuse(s, code, f"daemon busy, request not taken: {reason}; retry later", rid)

    def _refuse(self, s: _Session, code: ErrorCode, text: str, rid: int) -> SendBytes:
        self._counters.requests_refused += 1
        return self._error(s, code, text, rid)

    def _error(self, s: _Session, code: ErrorCode, text: str, rid: int = 0) -> SendBytes:
        return SendBytes(s.conn, encode(ErrorReport(code, clip_text(text), rid)))

    def _end(
        self,
        s: _Session,
        code: ErrorCode,
        text: str,
        reason: str,
        now: float,
        *,
        abort: bool = False,
    ) -> list[SessionEffect]:
        """ERROR `code` (a 1xx), then close and leave every group."""
        return self._drop(
            s, reason, now, close=True, last=encode(ErrorReport(code, clip_text(text))), abort=abort
        )

    def _drop(
        self,
        s: _Session,
        reason: str,
        now: float,
        *,
        close: bool,
        last: bytes = b"",
        abort: bool = False,
    ) -> list[SessionEffect]:
        out: list[SessionEffect] = []
        was_open = s.state is _State.OPEN
        if abort:
            out.append(CloseConnection(s.conn, abort=True, last=last))
        else:
            if last:
                out.append(SendBytes(s.conn, last))
            if close:
                out.append(CloseConnection(s.conn))
        s.state = _State.CLOSED
        self._pending.pop(s.conn, None)
        if not close:
            del self._sessions[s.conn]
        self._blocking.discard(s.conn)
        if not was_open:
            return out
        self._by_name.pop(s.name, None)
        if s.unconfirmed:
            for token in [t for t, (c, _) in self._confirming.items() if c == s.conn]:
                del self._confirming[token]
            s.unconfirmed = 0
        groups = tuple(s.groups)
        s.groups.clear()
        self._counters.sessions_closed += 1
        out.append(ClientDisconnected(s.conn, s.name, reason, groups))
        try:
            out += self._route(self.membership.disconnect(s.name, groups, now))
        except BufferFull as exc:
            self._counters.internal_errors += 1
            log.error("daemon %s: disconnect of %s not announced: %s", self.local, s.name, exc)
        return out


_BLOB_HELD_ONLY = frozenset({FrameType.BLOB_HELD})


def _section(value: object) -> dict[str, object]:
    """A provider's ``daemon`` or ``counters`` section (anything else counts as empty)."""
    return {str(k): v for k, v in value.items()} if isinstance(value, Mapping) else {}


def _compact_json(report: Mapping[str, object]) -> str:
    return json.dumps(report, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _kind(frame: Frame) -> str:
    return type(frame).__name__.upper()


def _request_id(frame: Frame) -> int:
    return int(getattr(frame, "request_id", 0))


__all__ = [
    "ClientConnected",
    "ClientDisconnected",
    "CloseConnection",
    "SendBytes",
    "SessionConfig",
    "SessionEffect",
    "SessionStats",
    "SessionTable",
    "StatusProvider",
]
