"""`DaemonNode`: one daemon as one sans-I/O object.

It owns the overlay node (links, daemon membership, routing, forwarding), the group
layers (`GroupEngine` under `GroupMembership`) and the client session table with the
clients' byte streams (`ClientStreams`), and routes effects between them: what the
overlay delivers goes up to the protocol its DATA header names (`wire.overlay.Upper`),
what the group layer broadcasts goes down to the overlay, what the sessions write goes
out to the clients. The driver (the asyncio runtime, or the simulator) feeds it inputs —
datagrams, client connections and their bytes, socket back-pressure, the timer — and
applies the effects each input returns (`DaemonEffect`: `Transmit`, `ClientWrite`,
`ClientClose`, `ClientReading`, `DaemonEvent`); after every input it re-arms one timer
from `next_deadline()`. Theory of operation: docs/design/daemon.md.

Bulkhead: with `contain_bugs` (the runtime), an exception a layer raises while handling
one input is counted (`internal_errors`), reported as a `bug_contained` event, and the
daemon keeps serving; without it (the simulator), it propagates and fails the test.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from meshcast.daemon.clients import ClientStreams
from meshcast.daemon.effects import ClientClose, DaemonEffect, DaemonEvent
from meshcast.daemon.layers import DAEMON_LAYERS, DaemonLayers
from meshcast.daemon.probes import Probe, decode_probe, encode_probe
from meshcast.daemon.replication import DaemonReplication, RateRefused, ReplicateAsk
from meshcast.daemon.status import (
    describe_tree,
    describe_view,
    merge_sections,
    status_sections,
)
from meshcast.errors import BufferFull, ConfigError, DecodeError, UsageError
from meshcast.group import (
    Broadcast,
    GroupConfig,
    OrderingReset,
    ViewTransition,
)
from meshcast.group.membership import MembershipChanged
from meshcast.group.sessions import (
    ClientConnected,
    ClientDisconnected,
    CloseConnection,
    SendBytes,
    SessionConfig,
    SessionEffect,
)
from meshcast.ids import NodeId
from meshcast.link.events import Transmit
from meshcast.link.secure import LinkSecurity
from meshcast.overlay.node import (
    NeighbourChanged,
    OverlayConfig,
    OverlayDelivered,
    OverlayEffect,
    ViewAgreed,
    ViewInstalled,
)
from meshcast.replicate.engine import ReplicationEffect, Replicator, ReplicatorConfig
from meshcast.replicate.manifest import Manifest
from meshcast.replicate.store import ChunkStore, NoStore
from meshcast.wire.client import (
    REPLICATE_VERSION,
    SET_RATE_VERSION,
    Confirmed,
    ErrorCode,
    ErrorReport,
    Multicast,
    Replicate,
    Replication,
    SetRate,
    clip_text,
    encode,
)
from meshcast.wire.group import MAX_BATCH_MESSAGES, encode_batch
from meshcast.wire.keys import KeyRing
from meshcast.wire.overlay import Upper

DEFAULT_WRITE_CHUNK = 1024 * 1024  # bytes: a client socket's high-water mark
DEFAULT_FRAMES_PER_TURN = 64  # client frames taken from one connection before the next's
# a group BATCH stays within one loopback datagram (and a few on a 1,400-byte path)
MAX_BATCH_BYTES = 60_000
_BATCH_ROUNDS = 8  # batches sent after one input; what sending them delivers may send more


@dataclass(frozen=True, slots=True)
class DaemonNodeConfig:
    """What the daemon layer itself needs (each layer below has its own config)."""

    name: str  # the daemon's name in the cluster
    probe_interval: float | None = None  # s between latency probes; None: no probes
    write_chunk: int = DEFAULT_WRITE_CHUNK  # bytes handed to a slow client at a time
    frames_per_turn: int = DEFAULT_FRAMES_PER_TURN

    def __post_init__(self) -> None:
        if self.probe_interval is not None and not (
            math.isfinite(self.probe_interval) and self.probe_interval > 0
        ):
            raise ConfigError(
                f"must be a positive number of seconds, got {self.probe_interval!r}",
                key="probe_interval",
            )
        if self.write_chunk < 1:
            raise ConfigError(f"must be at least 1, got {self.write_chunk}", key="write_chunk")
        if self.frames_per_turn < 1:
            raise ConfigError(
                f"must be at least 1, got {self.frames_per_turn}", key="frames_per_turn"
            )


@dataclass(frozen=True, slots=True)
class DaemonNodeStats:
    """Counters of the daemon layer (the layers below have their own)."""

    internal_errors: int = 0  # exceptions of a layer contained by the bulkhead
    probes_sent: int = 0  # probes multicast (probe_interval)
    probes_skipped: int = 0  # probes not sent because the overlay outbox was full
    probes_received: int = 0  # probes delivered here
    probes_malformed: int = 0  # probe payloads that did not decode, dropped
    group_delivered: int = 0  # overlay messages for the group layer
    unknown_upper_dropped: int = 0  # overlay messages for a protocol this daemon lacks
    group_broadcasts_lost: int = 0  # group messages the overlay outbox refused
    unknown_effects: int = 0  # effects of a layer the daemon has no case for (a bug)
    client_frames: int = 0  # frames taken from clients
    client_turns: int = 0  # reading turns that stopped at frames_per_turn


E = TypeVar("E")


class DaemonNode:
    """One daemon: overlay, group layers and client sessions (see the module docstring)."""

    def __init__(
        self,
        local: NodeId,
        config: DaemonNodeConfig,
        overlay: OverlayConfig,
        *,
        incarnation: int,
        rng: random.Random,
        wall_clock: Callable[[], float],
        group: GroupConfig | None = None,
        sessions: SessionConfig | None = None,
        security: LinkSecurity | None = None,
        names: Mapping[NodeId, str] | None = None,
        emulated: frozenset[NodeId] = frozenset(),
        status: Callable[[float], Mapping[str, object]] | None = None,
        contain_bugs: bool = True,
        store: ChunkStore | None = None,
        replication: ReplicatorConfig | None = None,
        capacities: Mapping[NodeId, float] | None = None,
        layers: DaemonLayers = DAEMON_LAYERS,
    ) -> None:
        """`wall_clock` stamps probes (the simulator passes its virtual clock); `names`
        are the cluster's daemon names and `emulated` the links the driver impairs, for
        events and status; `status` adds the driver's sections to a STATUS report
        (socket address, pid, keys). `store` holds replicated files (None: this daemon
        takes no part in replication); `capacities` are the daemons' upload bits/s, for
        capacity-aware plans. `layers`: the classes of the layers it builds (tests pass
        subclasses)."""
        self.local = local
        self.config = config
        self.overlay = layers.overlay(
            local, overlay, incarnation=incarnation, rng=rng, security=security
        )
        # the overlay tells the engine when a repair would only duplicate a message still
        # queued on a reliable link (docs/design/group.md, "Flush costs")
        self.engine = layers.engine(local, group, backlogged=self.overlay.backlogged)
        self.sessions = layers.sessions(
            config.name, layers.membership(self.engine), sessions, status=self._status
        )
        self.clients = ClientStreams(write_chunk=config.write_chunk)
        self.names: Mapping[NodeId, str] = names if names is not None else {}
        self.replication = DaemonReplication(
            Replicator(
                local,
                store if store is not None else NoStore(),
                replication,
                rng=random.Random(rng.getrandbits(64)),
                capacities=capacities,
            ),
            self.names,
            send_control=self._send_control,
            write_report=self._write_report,
            announce=self._announce,
            enabled=store is not None,
        )
        self.emulated = emulated  # links the driver impairs on purpose (for status)
        self._extra_status = status
        self._wall_clock = wall_clock
        self._contain_bugs = contain_bugs
        self._now = 0.0
        self._next_probe_at: float | None = None
        self._probe_number = 0
        self._agreed_digest: bytes | None = None  # digest of the latest ViewAgreed
        self._blocking = False  # the engine was last told some groups are blocked
        self._logged_unknown: set[type] = set()
        # group messages to the same destinations, sent as one overlay message (a group
        # BATCH) when this input has been handled or another kind of send comes first
        self._batch: list[bytes] = []
        self._batch_dests: tuple[NodeId, ...] = ()
        self._batch_bytes = 0
        # counters (statistics())
        self._internal_errors = 0
        self._probes_sent = 0
        self._probes_skipped = 0
        self._probes_received = 0
        self._probes_malformed = 0
        self._group_delivered = 0
        self._unknown_upper_dropped = 0
        self._group_broadcasts_lost = 0
        self._unknown_effects = 0
        self._client_frames = 0
        self._client_turns = 0
        # the effects of a run of MULTICAST frames, taken as one batch (`_take_frames`)
        self._client_batch: list[SessionEffect] | None = None

    # ------------------------------------------------------------------ queries

    @property
    def incarnation(self) -> int:
        return self.overlay.incarnation

    @property
    def agreed(self) -> bool:
        """Has every daemon of the current view said it installed the same view?"""
        view = self.overlay.view
        return view is not None and view.digest == self._agreed_digest

    def can_submit(self) -> bool:
        """May local clients' requests be taken now? The overlay outbox has room and our
        messages in flight fit the group window. (A `block` member that is behind holds
        back only messages to its groups: `GroupEngine.holds_back`.)"""
        return self.overlay.can_multicast() and self.engine.can_submit()

    def next_deadline(self) -> float | None:
        """When to call `on_timer` next (absolute, the inputs' clock); None: no timer."""
        if self._runnable():
            return self._now  # client input waits its turn: right away
        deadline = self.overlay.next_deadline()
        for other in (
            self.sessions.next_deadline(),
            self._next_probe_at,
            self.replication.replicator.next_deadline(),
        ):
            if other is not None and (deadline is None or other < deadline):
                deadline = other
        return deadline

    def is_drained(self) -> bool:
        """Has every live link everything acknowledged (nothing queued or in flight)?"""
        endpoint = self.overlay.endpoint
        for peer in self.overlay.neighbours_up:
            if peer in endpoint:
                stats = endpoint.link(peer).statistics()
                if stats.queued_messages or stats.unacked_packets:
                    return False
        return True

    def wants_writing(self, conn: int) -> bool:
        """After `writing_resumed`: call it again while this is True and the socket is
        still not over its high-water mark (the backlog is handed out a chunk a time)."""
        return self.clients.wants_writing(conn)

    def memory(self) -> int:
        """Bytes this daemon holds for others, what its bounds are about: the overlay's
        (outbox, link queues, reassembly), the group layer's retained and held-back
        messages, and the clients' unread input and unwritten output."""
        return (
            self.overlay.memory()
            + self.engine.memory()
            + self.clients.backlog_bytes()
            + self.clients.buffered_bytes()
            + self.replication.replicator.memory()
        )

    def statistics(self) -> DaemonNodeStats:
        return DaemonNodeStats(
            internal_errors=self._internal_errors,
            probes_sent=self._probes_sent,
            probes_skipped=self._probes_skipped,
            probes_received=self._probes_received,
            probes_malformed=self._probes_malformed,
            group_delivered=self._group_delivered,
            unknown_upper_dropped=self._unknown_upper_dropped,
            group_broadcasts_lost=self._group_broadcasts_lost,
            unknown_effects=self._unknown_effects,
            client_frames=self._client_frames,
            client_turns=self._client_turns,
        )

    # ------------------------------------------------------------------ inputs

    def start(self, now: float) -> list[DaemonEffect]:
        self._tick(now)
        if self.config.probe_interval is not None:
            self._next_probe_at = now + self.config.probe_interval
        out: list[DaemonEffect] = []
        self._overlay_input("start", lambda: self.overlay.start(now), out)
        return self._settle(out)

    def leave(self, now: float) -> list[DaemonEffect]:
        """The daemon stops: tell the clients (ERROR SHUTTING_DOWN, close), then the other
        daemons (the overlay leaves its view). Then wait for `is_drained`."""
        self._tick(now)
        self._next_probe_at = None
        out: list[DaemonEffect] = []
        self._session_input("shutdown", lambda: self.sessions.shutdown(now), out)
        self._overlay_input("leave", lambda: self.overlay.leave(now), out)
        return self._settle(out)

    def datagram_received(self, peer: NodeId, data: bytes, now: float) -> list[DaemonEffect]:
        """A datagram from configured neighbour `peer` (the driver maps addresses)."""
        self._tick(now)
        out: list[DaemonEffect] = []
        self._overlay_input(
            "datagram_received", lambda: self.overlay.datagram_received(peer, data, now), out
        )
        return self._settle(out)

    def on_timer(self, now: float) -> list[DaemonEffect]:
        self._tick(now)
        out: list[DaemonEffect] = []
        self._overlay_input("on_timer", lambda: self.overlay.on_timer(now), out)
        deadline = self.sessions.next_deadline()
        if deadline is not None and deadline <= now:
            self._session_input("group on_timer", lambda: self.sessions.on_timer(now), out)
        if self._next_probe_at is not None and self._next_probe_at <= now:
            interval = self.config.probe_interval or 0.0
            self._next_probe_at = max(self._next_probe_at + interval, now)
            self._guard("probe", lambda: self._send_probe(now, out), out)
        deadline = self.replication.replicator.next_deadline()
        if deadline is not None and deadline <= now:
            self._replicate_input(
                "replication on_timer", lambda: self.replication.replicator.on_timer(now), out
            )
        self._read_clients(now, out)
        return self._settle(out)

    def client_connected(
        self, conn: int, now: float, *, remote: bool = False
    ) -> list[DaemonEffect]:
        """A client connected (`remote`: on a TCP port open beyond loopback, so its HELLO
        must carry a token). `conn` is the driver's id for it, unique while it is open."""
        self._tick(now)
        if conn in self.clients:
            raise UsageError(f"client connection {conn} is already open")
        self.clients.open(conn)
        out: list[DaemonEffect] = []
        self._session_input(
            "connected", lambda: self.sessions.connected(conn, now, remote=remote), out
        )
        return self._settle(out)

    def client_data(self, conn: int, data: bytes, now: float) -> list[DaemonEffect]:
        """Bytes the client sent; frames are taken in turn with other connections'."""
        self._tick(now)
        self.clients.feed(conn, data)
        out: list[DaemonEffect] = []
        self._read_clients(now, out, only=conn)
        return self._settle(out)

    def client_lost(self, conn: int, now: float) -> list[DaemonEffect]:
        """The connection is gone (EOF, reset, or closed after a `ClientClose`)."""
        self._tick(now)
        if conn not in self.clients:
            return []
        self.clients.forget(conn)
        self.replication.forget_client(conn)
        out: list[DaemonEffect] = []
        self._session_input(
            "connection_lost", lambda: self.sessions.connection_lost(conn, now), out
        )
        return self._settle(out)

    def writing_paused(self, conn: int) -> None:
        """The connection's socket buffer passed its high-water mark."""
        if self.clients.writing_paused(conn):
            self.sessions.writing_paused(conn)

    def writing_resumed(self, conn: int, now: float) -> list[DaemonEffect]:
        """The socket buffer fell back: the next chunk of the backlog (see
        `wants_writing`); once it is empty, the session is no longer slow."""
        self._tick(now)
        writes, drained = self.clients.writing_resumed(conn)
        out: list[DaemonEffect] = list(writes)
        if drained:
            self._session_input("writing_resumed", lambda: self.sessions.writing_resumed(conn), out)
        return self._settle(out)

    # replication: the driver's streams and file work (ids: `meshcast.replicate.engine`)

    def replication_stream_accepted(
        self, stream: int, peer: NodeId, now: float
    ) -> list[DaemonEffect]:
        """Daemon `peer` opened a replication stream to us (authenticated by the driver)."""
        return self._replication(
            now, "stream_accepted", lambda r: r.stream_accepted(stream, peer, now)
        )

    def replication_stream_data(self, stream: int, data: bytes, now: float) -> list[DaemonEffect]:
        return self._replication(now, "stream_data", lambda r: r.stream_data(stream, data, now))

    def replication_stream_drained(self, stream: int, now: float) -> list[DaemonEffect]:
        """Everything sent on `stream` so far has left the driver's buffer."""
        return self._replication(now, "stream_drained", lambda r: r.stream_drained(stream, now))

    def replication_stream_closed(
        self, stream: int, error: str | None, now: float
    ) -> list[DaemonEffect]:
        return self._replication(
            now, "stream_closed", lambda r: r.stream_closed(stream, error, now)
        )

    def replication_hashed(
        self, rid: int, manifest: Manifest | None, error: str | None, now: float
    ) -> list[DaemonEffect]:
        """The driver hashed the file of `HashFile(rid)` (or could not: `error`)."""
        return self._replication(now, "hashed", lambda r: r.hashed(rid, manifest, error, now))

    def replication_begun(
        self, rid: int, held: set[int] | None, error: str | None, now: float
    ) -> list[DaemonEffect]:
        """The driver carried out `BeginCopy(rid)`: the chunks held already, or `error`."""
        return self._replication(now, "begun", lambda r: r.begun(rid, held, error, now))

    def replication_finalized(
        self, rid: int, path: str | None, error: str | None, now: float
    ) -> list[DaemonEffect]:
        """The driver carried out `Finalize(rid)`: the copy is at `path`, or `error`."""
        return self._replication(now, "finalized", lambda r: r.finalized(rid, path, error, now))

    def set_keyring(self, keyring: KeyRing) -> None:
        """New keys (a reload): established links keep theirs, new handshakes use these."""
        security = self.overlay.security
        if security is not None:
            security.keyring = keyring

    # ------------------------------------------------------------------ routing

    def _overlay_input(
        self, where: str, feed: Callable[[], list[OverlayEffect]], out: list[DaemonEffect]
    ) -> None:
        self._send_batch(out)  # the group's messages go before what this input brings
        effects = self._call(where, feed, out)
        if effects:
            self._apply_overlay(effects, out)

    def _session_input(
        self, where: str, feed: Callable[[], list[SessionEffect]], out: list[DaemonEffect]
    ) -> None:
        effects = self._call(where, feed, out)
        if effects:
            self._apply_sessions(effects, out)

    def _replication(
        self, now: float, where: str, feed: Callable[[Replicator], list[ReplicationEffect]]
    ) -> list[DaemonEffect]:
        self._tick(now)
        out: list[DaemonEffect] = []
        replicator = self.replication.replicator
        self._replicate_input(f"replication {where}", lambda: feed(replicator), out)
        return self._settle(out)

    def _replicate_input(
        self, where: str, feed: Callable[[], list[ReplicationEffect]], out: list[DaemonEffect]
    ) -> None:
        effects = self._call(where, feed, out)
        if effects:
            self._guard(where, lambda: self.replication.apply(effects, out), out)

    def _send_control(self, dest: NodeId, payload: bytes) -> list[DaemonEffect]:
        """One replication control message to daemon `dest`, over the overlay."""
        out: list[DaemonEffect] = []
        effects = self.overlay.multicast([dest], payload, self._now, upper=Upper.REPLICATION)
        self._apply_overlay(effects, out)
        return out

    def _announce(self, group: str, body: bytes) -> list[DaemonEffect]:
        """A BLOB_HELD event into `group`, sent by this daemon (BufferFull: not now)."""
        if self.engine.view is None or not self.can_submit():
            raise BufferFull("the group layer cannot take a message now")
        out: list[DaemonEffect] = []
        self._apply_sessions(self.sessions.announce(group, body, self._now), out)
        return out

    def _write_report(self, conn: int, token: int, final: bool, report: bytes) -> None:
        if conn not in self.clients:
            return
        try:
            frame = encode(Replication(token, final, report.decode()))
        except ValueError as exc:  # a bug: the client must still hear how it ended
            self._internal_errors += 1
            slim = {"rid": "0" * 16, "name": "", "size": 0, "digest": "", "elapsed": 0.0}
            slim |= {"state": "failed" if final else "running", "recipients": []}
            slim["detail"] = f"the daemon could not encode its report: {exc}"[:1000]
            frame = encode(Replication(token, final, json.dumps(slim)))
        self.clients.write(conn, frame)

    def _apply_overlay(self, effects: Iterable[object], out: list[DaemonEffect]) -> None:
        # typed `object`: an effect type the overlay adds without a case here is counted
        for effect in effects:
            if isinstance(effect, Transmit):
                out.append(effect)
                continue
            if isinstance(effect, OverlayDelivered) and effect.upper == Upper.GROUP:
                self._group_delivered += 1
                self._session_input(
                    "overlay_delivered",
                    partial(
                        self.sessions.overlay_delivered, effect.source, effect.payload, self._now
                    ),
                    out,
                )
                continue
            match effect:
                case OverlayDelivered(source, seq, payload, hops, upper):
                    if upper == Upper.REPLICATION:
                        self._replicate_input(
                            "replication control",
                            partial(
                                self.replication.replicator.control_received,
                                source,
                                payload,
                                self._now,
                            ),
                            out,
                        )
                    elif upper == Upper.PROBE:
                        self._probe_received(source, seq, payload, hops, out)
                    else:
                        self._unknown_upper_dropped += 1
                case NeighbourChanged(neighbour, up, reason):
                    out.append(
                        DaemonEvent(
                            "neighbour_up" if up else "neighbour_down",
                            {
                                "neighbour": int(neighbour),
                                "neighbour_name": self.names.get(neighbour, "?"),
                                "reason": reason,
                            },
                        )
                    )
                case ViewInstalled(view):
                    fields = describe_view(view, self.names)
                    fields["tree"] = describe_tree(self.overlay.routing.tree(self.local))
                    out.append(DaemonEvent("view_installed", fields))
                    self._session_input(
                        "view_installed",
                        lambda: self.sessions.view_installed(
                            view.members, self._now, view.incarnations
                        ),
                        out,
                    )
                    # a daemon that left is repaired around in every replication
                    self._replicate_input(
                        "replication view_changed",
                        partial(
                            self.replication.replicator.view_changed,
                            frozenset(view.members),
                            self._now,
                        ),
                        out,
                    )
                case ViewAgreed(view):
                    self._agreed_digest = view.digest
                    out.append(DaemonEvent("view_agreed", describe_view(view, self.names)))
                case _:
                    self._unknown(effect, "the overlay", out)

    def _apply_sessions(self, effects: Iterable[object], out: list[DaemonEffect]) -> None:
        # object, not SessionEffect: compiled code would check each effect's type before
        # the `case _` below could count one of a kind it does not know
        for effect in effects:
            if isinstance(effect, SendBytes):
                self.clients.write(effect.conn, effect.data)
                continue
            if isinstance(effect, Broadcast):
                self._batch_broadcast(effect.dests, effect.payload, out)
                continue
            # what the clients were sent goes out before what follows it (a view's last
            # deliveries before the event of the next view, a reply before a close)
            out.extend(self.clients.flush())
            match effect:
                case CloseConnection(conn, abort, last):
                    self._close(conn, abort, last, out)
                case ClientConnected(conn, name, version):
                    out.append(
                        DaemonEvent(
                            "client_connected", {"conn": conn, "client": name, "version": version}
                        )
                    )
                case ClientDisconnected(conn, name, reason, groups):
                    out.append(
                        DaemonEvent(
                            "client_disconnected",
                            {
                                "conn": conn,
                                "client": name,
                                "reason": reason,
                                "groups": list(groups),
                            },
                        )
                    )
                case MembershipChanged(group, view_id, members, cause, who, hosts):
                    out.append(
                        DaemonEvent(
                            "group_membership",
                            {
                                "group": group,
                                "view": [view_id.counter, view_id.coordinator],
                                "members": list(members),
                                "cause": str(cause),
                                "who": list(who),
                                "hosts": [int(h) for h in hosts],
                            },
                        )
                    )
                case OrderingReset(_, new_view_id, members, undelivered):
                    out.append(
                        DaemonEvent(
                            "group_view",
                            {
                                "view_id": new_view_id.hex(),
                                "members": [int(m) for m in members],
                                "undelivered": len(undelivered),
                            },
                        )
                    )
                case ViewTransition(old_view_id, old_members, survivors):
                    out.append(
                        DaemonEvent(
                            "group_transition",
                            {
                                "view_id": old_view_id.hex(),
                                "survivors": [int(m) for m in survivors],
                                "departed": [int(m) for m in old_members if m not in survivors],
                            },
                        )
                    )
                case _:
                    self._unknown(effect, "the session table", out)

    def _batch_broadcast(
        self, dests: tuple[NodeId, ...], payload: bytes, out: list[DaemonEffect]
    ) -> None:
        """Send a group message with the others this input sends to `dests`: the batch
        goes out when the input has been handled (`_settle`), before the overlay's next
        input, or when a message to other destinations comes, so the order holds."""
        if self._batch and (
            dests != self._batch_dests
            or len(self._batch) >= MAX_BATCH_MESSAGES
            or self._batch_bytes + len(payload) > MAX_BATCH_BYTES
        ):
            self._send_batch(out)
        self._batch_dests = dests
        self._batch.append(payload)
        self._batch_bytes += len(payload)

    def _send_batch(self, out: list[DaemonEffect]) -> None:
        batch = self._batch
        if not batch:
            return
        self._batch = []
        self._batch_bytes = 0
        payload = batch[0] if len(batch) == 1 else encode_batch(batch)
        self._broadcast(self._batch_dests, payload, out)

    def _broadcast(
        self, dests: tuple[NodeId, ...], payload: bytes, out: list[DaemonEffect]
    ) -> None:
        try:
            effects = self.overlay.multicast(dests, payload, self._now, upper=Upper.GROUP)
        except BufferFull:
            # can_submit() keeps clients out while the outbox is full; what still comes
            # (ACKs, flush parts) is repaired by the group layer's retransmissions
            self._group_broadcasts_lost += 1
            return
        except UsageError:  # leaving: the view is going away anyway
            self._group_broadcasts_lost += 1
            return
        self._apply_overlay(effects, out)

    def _close(self, conn: int, abort: bool, last: bytes, out: list[DaemonEffect]) -> None:
        if abort:
            self.clients.drop_writes(conn)
            out.append(ClientClose(conn, abort=True, last=last))
        else:
            out.extend(self.clients.drain_all(conn))
            out.append(ClientClose(conn))
        self.clients.stop_reading(conn)  # what it sends after this is not read

    # ------------------------------------------------------------------ client reading

    def _runnable(self) -> bool:
        """Is some connection's input takeable now?"""
        if not self.clients.has_input():
            return False
        if self.can_submit():
            return any(not self._waits(conn) for conn in self.clients.ready())
        return any(self.sessions.handshaking(conn) for conn in self.clients.ready())

    def _waits(self, conn: int) -> bool:
        """Does `conn`'s next frame wait for a group a slow `block` member holds back?"""
        try:
            frame = self.clients.head(conn)
        except DecodeError:
            return False  # its turn reports it
        return isinstance(frame, Multicast) and self.engine.holds_back(frame.groups)

    def _read_clients(self, now: float, out: list[DaemonEffect], only: int | None = None) -> None:
        """One turn: up to `frames_per_turn` frames from each connection with input (or
        from `only`, the one whose bytes just arrived: the others' turns come with the
        timer, which `next_deadline` sets to now while input waits)."""
        conns = [only] if only is not None else self.clients.ready()
        for conn in conns:
            self._guard("client frames", partial(self._take_frames, conn, now, out), out)
            self.clients.take_turn(conn)

    def _take_frames(self, conn: int, now: float, out: list[DaemonEffect]) -> None:
        try:
            self._take_frames_batched(conn, now, out)
        finally:  # even after a bug: the group layer must not stay in a batch
            self._end_batch(now, out)

    def _take_frames_batched(self, conn: int, now: float, out: list[DaemonEffect]) -> None:
        """Take up to `frames_per_turn` frames; a run of MULTICAST frames is one batch for
        the group layer (`SessionTable.begin_batch`), ended by any other frame."""
        streams, sessions = self.clients, self.sessions
        for _ in range(self.config.frames_per_turn):
            try:
                frame = streams.head(conn)
            except DecodeError as exc:
                self._end_batch(now, out)
                streams.stop_reading(conn)
                self._session_input(
                    "decode_failed", partial(sessions.decode_failed, conn, str(exc), now), out
                )
                return
            if frame is None:
                return  # it needs more bytes
            # the frame stays the connection's head (it is not read meanwhile) while:
            handshaking = sessions.handshaking(conn)
            if not handshaking and not self.can_submit():
                return  # the overlay outbox or the group window is full
            if isinstance(frame, Multicast) and self.engine.holds_back(frame.groups):
                return  # a slow `block` member is in one of its groups
            streams.pop_head(conn)
            self._client_frames += 1
            if isinstance(frame, Multicast) and not handshaking:
                batch = self._client_batch
                if batch is None:
                    batch = self._client_batch = []
                    sessions.begin_batch()
                batch += sessions.frame_received(conn, frame, now)
                continue
            self._end_batch(now, out)
            version = sessions.session_version(conn)
            if (
                isinstance(frame, Replicate)
                and version >= REPLICATE_VERSION
                and (frame.buddy is None or version >= SET_RATE_VERSION)
            ):
                self._guard("replicate", partial(self._replicate, conn, frame, now, out), out)
                continue
            if isinstance(frame, SetRate) and version >= SET_RATE_VERSION:
                self._guard("set_rate", partial(self._set_rate, conn, frame, now, out), out)
                continue
            self._session_input(
                "frame_received", partial(sessions.frame_received, conn, frame, now), out
            )
            streams.set_frame_limit(conn, sessions.frame_limit(conn))
        self._client_turns += 1
        with contextlib.suppress(DecodeError):  # raised again at its next turn
            streams.head(conn)  # decoded now: the connection is paused if one is left

    def _end_batch(self, now: float, out: list[DaemonEffect]) -> None:
        """Apply what a run of MULTICAST frames brought, then what ordering them as one
        batch delivers."""
        batch = self._client_batch
        if batch is None:
            return
        self._client_batch = None
        self._apply_sessions(batch, out)
        self._session_input("end_batch", partial(self.sessions.end_batch, now), out)

    def _replicate(self, conn: int, frame: Replicate, now: float, out: list[DaemonEffect]) -> None:
        """A client's REPLICATE: this daemon is the origin."""
        ask = ReplicateAsk(
            token=frame.token,
            path=frame.path,
            targets=frame.targets,
            dest=frame.dest,
            rate=frame.rate,
            strategy=frame.strategy,
            variant=frame.variant,
            tree=frame.tree,
            max_connections=frame.max_connections,
            capacity_aware=frame.capacity_aware,
            buddy=frame.buddy or "",
        )
        view = self.overlay.view
        table = self.sessions.membership.table()
        self.replication.request(
            conn,
            ask,
            now,
            view=() if view is None else view.members,
            group_hosts=lambda g: (daemon for _, daemon in table.get(g, ())),
            out=out,
            send_denied=partial(self.sessions.send_denied, conn),
        )

    def _set_rate(self, conn: int, frame: SetRate, now: float, out: list[DaemonEffect]) -> None:
        """A client's SET_RATE: CONFIRMED once applied, else an ERROR saying why not."""
        try:
            if not (math.isfinite(frame.rate) and frame.rate >= 0):
                raise RateRefused(
                    ErrorCode.BAD_RATE,
                    f"rate {frame.rate!r} is not a finite number of bytes/s >= 0 (0: no cap)",
                )
            self.replication.set_rate(frame.rid, frame.rate, now, out)
        except RateRefused as refused:
            answer = encode(ErrorReport(refused.code, clip_text(refused.text), frame.token))
        else:
            answer = encode(Confirmed(frame.token))
        if conn in self.clients:
            self.clients.write(conn, answer)

    # ------------------------------------------------------------------ probes

    def _send_probe(self, now: float, out: list[DaemonEffect]) -> None:
        """Multicast one probe to every other member of the current view."""
        view = self.overlay.view
        if view is None:
            return
        dests = [m for m in view.members if m != self.local]
        if not dests:
            return
        if not self.overlay.can_multicast():
            self._probes_skipped += 1
            return
        self._probe_number += 1
        payload = encode_probe(Probe(self._probe_number, self._wall_clock()))
        try:
            effects = self.overlay.multicast(dests, payload, now, upper=Upper.PROBE)
        except BufferFull:
            self._probes_skipped += 1
            return
        self._probes_sent += 1
        self._apply_overlay(effects, out)

    def _probe_received(
        self, source: NodeId, seq: int, payload: bytes, hops: int, out: list[DaemonEffect]
    ) -> None:
        try:
            probe = decode_probe(payload)
        except DecodeError:
            self._probes_malformed += 1
            return
        self._probes_received += 1
        tree = self.overlay.routing.tree(source)
        out.append(
            DaemonEvent(
                "probe_received",
                {
                    "source": int(source),
                    "source_name": self.names.get(source, "?"),
                    "seq": seq,
                    "probe": probe.number,
                    "hops": hops,
                    "depth": tree.depth(self.local)
                    if tree is not None and self.local in tree.parent
                    else None,
                    "latency_ms": round((self._wall_clock() - probe.sent_at) * 1000, 3),
                },
            )
        )

    # ------------------------------------------------------------------ after every input

    def _settle(self, out: list[DaemonEffect]) -> list[DaemonEffect]:
        """Tell the engine which groups slow members block, hand out the coalesced client
        writes, and tell the driver which connections to read."""
        for _ in range(_BATCH_ROUNDS):  # sending may deliver, which may send again
            if not self._batch:
                break
            self._guard("group batch", lambda: self._send_batch(out), out)
        if self._blocking or not self.sessions.accepting:
            # a `block` member behind: the next ACK tells every daemon to hold back
            # senders to its groups (and, once none is, that they may go on)
            self._call("settle", self._update_blocked, out)
        if self.replication.has_backlog():
            self._guard("replication controls", lambda: self.replication.flush(out), out)
        out.extend(self.clients.flush())
        out.extend(self.clients.reading_changes())
        return out

    def _update_blocked(self) -> list[DaemonEffect]:
        groups = self.sessions.blocked_groups()
        self.engine.set_blocked(groups)
        self._blocking = bool(groups)
        return []

    def _status(self, now: float) -> Mapping[str, object]:
        sections = status_sections(self, now)
        if self._extra_status is None:
            return sections
        return merge_sections(sections, self._extra_status(now))

    def _tick(self, now: float) -> None:
        if now > self._now:
            self._now = now

    def _call(self, where: str, feed: Callable[[], list[E]], out: list[DaemonEffect]) -> list[E]:
        """`feed()` in the bulkhead: what it returns, or nothing if it raised."""
        if not self._contain_bugs:
            return feed()
        try:
            return feed()
        except Exception as exc:
            self._bug(where, exc, out)
            return []

    def _guard(self, where: str, run: Callable[[], None], out: list[DaemonEffect]) -> None:
        if not self._contain_bugs:
            run()
            return
        try:
            run()
        except Exception as exc:
            self._bug(where, exc, out)

    def _bug(self, where: str, exc: Exception, out: list[DaemonEffect]) -> None:
        self._internal_errors += 1
        out.append(
            DaemonEvent(
                "bug_contained",
                {
                    "where": where,
                    "error": repr(exc),
                    "count": self._internal_errors,
                    "traceback": traceback.format_exc(limit=8),
                },
                "error",
            )
        )

    def _unknown(self, effect: object, where: str, out: list[DaemonEffect]) -> None:
        kind = type(effect)
        if not self._contain_bugs:
            raise AssertionError(
                f"unknown effect {kind.__module__}.{kind.__qualname__} from {where}: "
                "DaemonNode has no case for it"
            )
        self._unknown_effects += 1
        if kind not in self._logged_unknown:  # bounded by the classes in the program
            self._logged_unknown.add(kind)
            out.append(
                DaemonEvent(
                    "unknown_effect",
                    {"effect": f"{kind.__module__}.{kind.__qualname__}", "from": where},
                    "error",
                )
            )
