"""The overlay daemon on a real UDP socket: what `meshcast daemon --config FILE --name NAME` runs.

Theory of operation: docs/design/daemon.md. `OverlayDaemon` drives one `OverlayNode` (Hop
links to the overlay neighbours, link-state membership, views, source trees,
multi-destination forwarding) the way `UdpLinkDriver` drives links: it feeds each input (a
datagram, the timer, a probe) to the node, applies the effects that came back, and re-arms
one timer from `OverlayNode.next_deadline()`. Every input runs inside a bulkhead.

State changes are logged as events: one JSON object per line on stderr once
`configure_logging` has installed `JsonLineFormatter`, or one readable line with
`HumanLineFormatter` (the ``meshcast daemon`` command picks: readable on a terminal). `run_daemon` is the whole life of one daemon: bind, start, serve until SIGTERM or
SIGINT (or `stop`), drain, log the final statistics, return the exit status.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import json
import logging
import math
import os
import random
import secrets
import signal
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from meshcast.config import ClusterConfig, DaemonSpec, Emulation, SecurityConfig
from meshcast.errors import BufferFull, ConfigError, MeshcastError, UsageError
from meshcast.group import (
    Broadcast,
    GroupEngine,
    GroupStats,
    OrderingFault,
    OrderingReset,
    ViewTransition,
)
from meshcast.group.access import AccessPolicy
from meshcast.group.membership import GroupMembership, MembershipChanged, MembershipStats
from meshcast.group.sessions import (
    ClientConnected,
    ClientDisconnected,
    CloseConnection,
    SendBytes,
    SessionConfig,
    SessionEffect,
    SessionStats,
    SessionTable,
)
from meshcast.ids import NodeId
from meshcast.link import LinkConfig, LinkStats, Transmit
from meshcast.overlay.node import (
    LinkDrops,
    Neighbour,
    NeighbourChanged,
    OverlayConfig,
    OverlayDelivered,
    OverlayEffect,
    OverlayNode,
    OverlayStats,
    ViewAgreed,
    ViewInstalled,
)
from meshcast.overlay.routing import BUILDERS, Tree
from meshcast.overlay.view import View
from meshcast.runtime.datagram import open_endpoint
from meshcast.runtime.impair import ImpairedSender, Impairment
from meshcast.runtime.keyfile import describe_keyring, load_keyring
from meshcast.runtime.logs import NodeLogAdapter, RateLimiter
from meshcast.runtime.sessions import (
    ClientServer,
    check_client_access,
    is_loopback,
    socket_group_id,
)
from meshcast.runtime.stats import ImpairmentStats
from meshcast.runtime.timer import DeadlineTimer
from meshcast.runtime.udp import (
    DEFAULT_SOCKET_BUFFER_BYTES,
    Address,
    link_security,
    open_udp_socket,
)
from meshcast.socket_paths import default_socket_path
from meshcast.wire.client import DaemonLimits, json_ready
from meshcast.wire.keys import KeyRing
from meshcast.wire.packet import U32_MAX

log = logging.getLogger(__name__)
EVENTS_LOGGER = "meshcast.daemon"  # state-change events: one JSON object per line
events_log = logging.getLogger(EVENTS_LOGGER)

INCARNATION_EPOCH = 1_704_067_200  # 2024-01-01T00:00:00Z: incarnations count from here
DRAIN_TIMEOUT = 2.0  # s: on SIGTERM, wait at most this long for unacknowledged packets
PROBE_MAGIC = b"MCPROBE1"
_PROBE = struct.Struct("!8sQd")  # magic, probe number, sender's wall clock (s)
_QUARANTINE_INTERVAL = 0.05  # s: timer back-off after the node raised in on_timer
INSECURE_WARNING_INTERVAL = 60.0  # s: how often a daemon without a key says so again
# s: after a group view is installed, when to hand the flush's freed memory back to the
# OS (by then the FLUSH is acknowledged and the old view's copies are gone)
_RELEASE_AFTER_VIEW = 2.0


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_MALLOC_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Collect garbage cycles, then give the heap's free pages back to the OS.

    CPython frees a flush's copies at once, but glibc's malloc keeps the pages for
    reuse, so without this a daemon's RSS stays at its peak after a flush under load
    (docs/design/group.md, "Flush costs")."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


_LOOPBACK = "127.0.0.1"  # what a configured "localhost" binds to and sends from


@dataclass(frozen=True, slots=True)
class ClientListen:
    """Where a daemon accepts client sessions (docs/design/daemon.md, "Client sessions")."""

    # the Unix socket: None = the default path (`default_socket_path`), "" = no Unix socket
    unix_path: str | None = None
    tcp_port: int | None = None  # None: no TCP; 0: an ephemeral port (logged)
    tcp_host: str = _LOOPBACK


# ---------------------------------------------------------------------- configuration


def check_clients(config: ClusterConfig, listen: ClientListen) -> tuple[AccessPolicy, int | None]:
    """`[clients]` made ready for where the daemon will listen: the access policy (the
    token file read now) and the socket group's id.

    Raises `ConfigError` for an unreadable or unsafe token file, a TCP client port open
    beyond loopback without tokens, or a ``socket_group`` that names no group here.
    """
    policy = config.clients.load_policy(config.source)
    tcp_host = listen.tcp_host if listen.tcp_port is not None else None
    check_client_access(tcp_host, policy.has_tokens, source=config.source)
    group = config.clients.socket_group
    return policy, None if group is None else socket_group_id(group, source=config.source)


def incarnation_now(wall_clock: float | None = None) -> int:
    """A u32 that grows with the wall clock (deciseconds since 2024): a restart is newer.

    The link-state database keeps a daemon's newest LSA by (incarnation, seq), so a
    restarted daemon must never come back with a smaller incarnation than before.
    """
    now = time.time() if wall_clock is None else wall_clock
    return max(1, min(int((now - INCARNATION_EPOCH) * 10), U32_MAX))


# bytes: the most a group DATA and overlay DATA header add to a client payload (256 group
# names, 4,096 per-destination numbers and vector entries, 50 overlay destinations)
ENVELOPE_ROOM = 256 * 1024


def membership_link_config(config: ClusterConfig) -> LinkConfig:
    """The Hop parameters of the daemon's overlay links, liveness set by [membership].

    A neighbour is declared down when its link hears nothing for
    ``failure_rounds × heartbeat_interval``. The heartbeat runs at least as often as both
    ``link.heartbeat_interval`` and ``membership.hello_interval`` ask, and the number of
    rounds is chosen so that this silence timeout is ``membership.failure_timeout``
    (rounded up to a whole number of heartbeats).
    """
    membership = config.membership
    heartbeat = min(config.link.heartbeat_interval, membership.hello_interval)
    rounds = max(2, math.ceil(membership.failure_timeout / heartbeat - 1e-9))
    # A client payload of limits.max_message_size travels with the group and overlay
    # headers (sender, groups, per-destination numbers) around it: the links carry both.
    largest = max(config.link.max_message_size, config.limits.max_message_size + ENVELOPE_ROOM)
    return replace(
        config.link,
        heartbeat_interval=heartbeat,
        failure_rounds=rounds,
        max_message_size=largest,
        max_send_queue_bytes=max(config.link.max_send_queue_bytes, largest),
        max_reassembly_bytes=max(config.link.max_reassembly_bytes, largest),
    )


def failure_detection_bound(config: ClusterConfig) -> float:
    """Seconds from a daemon's death to its neighbours declaring it down (see above)."""
    link = membership_link_config(config)
    return link.failure_rounds * link.heartbeat_interval


def overlay_config(config: ClusterConfig, name: str) -> OverlayConfig:
    """The `OverlayConfig` of daemon `name`, as `sim.overlay.build_overlay` builds one.

    Raises `ConfigError` for an unknown name or a routing policy this overlay lacks.
    """
    config.daemon(name)
    if config.routing not in BUILDERS:
        raise ConfigError(
            f"routing policy {config.routing!r} is not available in the overlay yet; "
            f"use one of {', '.join(BUILDERS)}",
            key="cluster.routing",
            source=config.source,
        )
    neighbours = {
        NodeId(spec.node_id): Neighbour(link.weight, link.bandwidth_bps)
        for spec, link in config.neighbours(name)
    }
    ids = {d.name: NodeId(d.node_id) for d in config.daemons}
    allowed = frozenset(
        (min(ids[link.a], ids[link.b]), max(ids[link.a], ids[link.b])) for link in config.links
    )
    return OverlayConfig(
        neighbours=neighbours,
        upload_bps={NodeId(d.node_id): d.upload_bps for d in config.daemons},
        allowed_links=allowed,
        link=membership_link_config(config),
        policy=config.routing,
        view_settle_interval=config.membership.view_settle_interval,
        lsa_refresh_interval=config.membership.lsa_refresh_interval,
        max_dests_per_packet=config.limits.max_dests_per_packet,
        window_messages=config.limits.window_messages,
        coalesce_sends=True,
    )


def daemon_address(spec: DaemonSpec) -> Address:
    """The numeric (host, port) a daemon binds and sends from."""
    host = _LOOPBACK if spec.host == "localhost" else spec.host
    return host, spec.port


def impairment_for(emulation: Emulation, local: int, peer: int) -> Impairment:
    """The shim for one direction of an emulated edge (seeded by its two ends)."""
    return Impairment(
        loss=emulation.loss,
        delay=emulation.delay,
        jitter=emulation.jitter,
        rate_bps=emulation.rate_bps,
        seed=local * 1_000_003 + peer,
    )


# ---------------------------------------------------------------------- structured logging


class JsonLineFormatter(logging.Formatter):
    """Each record as one JSON object on one line.

    Event records (logged by `EventLog`) become ``{"ts", "level", "event", ...fields}``;
    any other record becomes ``{"ts", "level", "event": "log", "logger", "message"}``, with
    ``"traceback"`` when it carries one.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
        }
        event = getattr(record, "event", None)
        fields = getattr(record, "fields", None)
        if isinstance(event, str) and isinstance(fields, dict):
            entry["event"] = event
            entry.update(fields)
        else:
            entry["event"] = "log"
            entry["logger"] = record.name
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(json_ready(entry), default=str, allow_nan=False)


class HumanLineFormatter(logging.Formatter):
    """Each record as one line for a person at a terminal.

    ``12:00:01.234 D1 view_agreed members=[1, 2, 3] ...`` for events (time, daemon, event,
    the other fields as key=value); ``12:00:01.234 WARNING logger: message`` otherwise.
    """

    _TAGS = ("daemon", "node")

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        stamp += f".{int(record.msecs):03d}"
        level = "" if record.levelno == logging.INFO else f" {record.levelname}"
        event = getattr(record, "event", None)
        fields = getattr(record, "fields", None)
        if isinstance(event, str) and isinstance(fields, dict):
            daemon = fields.get("daemon", "")
            rest = " ".join(
                f"{k}={_human_value(v)}" for k, v in fields.items() if k not in self._TAGS
            )
            line = f"{stamp}{level} {daemon} {event}" + (f" {rest}" if rest else "")
        else:
            line = f"{stamp}{level} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _human_value(value: object) -> str:
    value = json_ready(value)
    return value if isinstance(value, str) and value and " " not in value else json.dumps(value)


LOG_FORMATS = ("auto", "human", "json")


def configure_logging(verbosity: int, stream: Any = None, log_format: str = "json") -> None:
    """One line on stderr for every record; events always, other records by `verbosity`.

    0: warnings, 1: info, 2+: debug. `log_format` "json" writes JSON lines
    (`JsonLineFormatter`), "human" readable lines (`HumanLineFormatter`), "auto" human
    lines when the stream is a terminal and JSON lines otherwise (a pipe, a file: what
    programs read). Replaces the formatter of the root logger's handlers (adding a
    stderr handler when there is none), so the whole process logs one format.
    """
    if log_format not in LOG_FORMATS:
        raise UsageError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr if stream is None else stream))
    if log_format == "auto":
        out = stream if stream is not None else sys.stderr
        is_terminal = getattr(out, "isatty", None)
        log_format = "human" if is_terminal is not None and is_terminal() else "json"
    formatter = HumanLineFormatter() if log_format == "human" else JsonLineFormatter()
    for handler in root.handlers:
        handler.setFormatter(formatter)
    root.setLevel({0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG))
    events_log.setLevel(logging.INFO)


class EventLog:
    """State-change events of one daemon, each tagged with its name and node id."""

    def __init__(self, name: str, node: int) -> None:
        self._tags = {"daemon": name, "node": node}

    def emit(self, event: str, /, **fields: object) -> None:
        """Log `event` at INFO with `fields` (JSON-ready values)."""
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, /, **fields: object) -> None:
        """Log `event` at WARNING with `fields`."""
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, /, **fields: object) -> None:
        """Log `event` at ERROR with `fields`."""
        self._log(logging.ERROR, event, fields)

    def _log(self, level: int, event: str, fields: dict[str, object]) -> None:
        events_log.log(level, event, extra={"event": event, "fields": {**self._tags, **fields}})


# ---------------------------------------------------------------------- the daemon


class UnknownEffects:
    """Effects a layer emitted that the daemon does not know how to apply: a bug (a new
    effect type without its case in the driver). Counted, and logged once per type at
    error level, so one forgotten case does not flood the log; the daemon keeps serving.
    (The simulator raises instead: `sim.group.GroupDaemon`.)"""

    def __init__(self, log: logging.Logger | logging.LoggerAdapter[logging.Logger]) -> None:
        self._log = log
        self.count = 0
        self._logged: set[type] = set()  # bounded by the number of classes in the program

    def dropped(self, effect: object, where: str) -> None:
        self.count += 1
        kind = type(effect)
        if kind not in self._logged:
            self._logged.add(kind)
            self._log.error(
                "bug: unknown effect %s.%s from %s dropped (counted in unknown_effects; "
                "logged once per type)",
                kind.__module__,
                kind.__qualname__,
                where,
            )


@dataclass(frozen=True, slots=True)
class DaemonStats:
    """Counters of one daemon (a frozen snapshot, logged with ``daemon_stopped``)."""

    datagrams_received: int = 0  # datagrams read from the socket
    datagrams_sent: int = 0  # datagrams handed to the socket (or to an impairment shim)
    foreign_dropped: int = 0  # from an address that is no configured neighbour's
    unroutable_dropped: int = 0  # transmissions to a node that is not a neighbour
    socket_errors: int = 0  # errors the socket reported (ICMP port unreachable, ...)
    internal_errors: int = 0  # unexpected exceptions contained by the bulkhead
    probes_sent: int = 0  # probes multicast (--probe-interval)
    probes_skipped: int = 0  # probes not sent because the source's outbox was full
    probes_received: int = 0  # probes delivered here
    other_delivered: int = 0  # overlay messages delivered here that are not probes
    group_broadcasts_lost: int = 0  # group messages the overlay outbox refused
    unknown_effects: int = 0  # effects of a layer the daemon has no case for (a bug), dropped
    view_members: tuple[int, ...] | None = None  # members of the current view
    sessions: SessionStats = field(default_factory=SessionStats)
    group: GroupStats = field(default_factory=GroupStats)
    membership: MembershipStats = field(default_factory=MembershipStats)
    overlay: OverlayStats = field(default_factory=OverlayStats)
    links: dict[NodeId, LinkStats] = field(default_factory=dict)  # per neighbour
    impairment: dict[NodeId, ImpairmentStats] = field(default_factory=dict)  # emulated links

    def as_dict(self) -> dict[str, object]:
        """Plain JSON-ready form (peer ids become strings)."""
        data = asdict(self)
        data["links"] = {str(peer): asdict(stats) for peer, stats in self.links.items()}
        data["impairment"] = {str(peer): asdict(stats) for peer, stats in self.impairment.items()}
        return data


class OverlayDaemon:
    """One overlay daemon on one UDP socket, driven on the running event loop.

    Create with `await OverlayDaemon.open(config, name)`; `serve(stop)` runs it until
    `stop` is set, then drains and closes. Datagrams are routed to the node by source
    address; an address that is not a configured neighbour's is a counted drop.
    """

    def __init__(
        self,
        config: ClusterConfig,
        name: str,
        *,
        probe_interval: float | None,
        incarnation: int,
        clients: ClientListen | None = None,
        reload_security: Callable[[], SecurityConfig] | None = None,
        insecure_warning_interval: float = INSECURE_WARNING_INTERVAL,
    ) -> None:
        """Use `open`: the daemon is not usable before it has a socket."""
        if probe_interval is not None and not (
            math.isfinite(probe_interval) and probe_interval > 0
        ):
            raise UsageError(
                f"probe interval must be a positive number of seconds, got {probe_interval!r}"
            )
        if not (math.isfinite(insecure_warning_interval) and insecure_warning_interval > 0):
            raise UsageError(
                "insecure warning interval must be a positive number of seconds, "
                f"got {insecure_warning_interval!r}"
            )
        self.config = config
        self.spec = config.daemon(name)
        self.local = NodeId(self.spec.node_id)
        self.probe_interval = probe_interval
        # The key files are read before anything is bound: a daemon without a usable
        # key (and not insecure) does not start (ConfigError naming the file).
        ring = load_keyring(config.security, config.source)
        self.node = OverlayNode(
            self.local,
            overlay_config(config, name),
            incarnation=incarnation,
            rng=random.Random(secrets.randbits(64)),
            security=None if ring is None else link_security(ring),
        )
        self.events = EventLog(name, self.local)
        self._log = NodeLogAdapter(log, self.local)
        self.keyring: KeyRing | None = None  # None only when [security] insecure = true
        self._install_keyring(ring)
        # What SIGHUP reloads: the [security] section (the cluster file read again by
        # the daemon command; by default the one the daemon started with).
        self._reload_security = reload_security or (lambda: config.security)
        self._insecure_warning_interval = insecure_warning_interval
        self._key_reloads = 0
        self._key_reload_failures = 0
        self.clients = clients if clients is not None else ClientListen()
        # before any socket is bound: the token file must be safe, a client port open
        # beyond loopback needs tokens, a socket group must exist (ConfigError)
        access, self._socket_group = check_clients(config, self.clients)
        limits = config.limits
        self.sessions = SessionTable(
            name,
            # the overlay tells the engine when a repair would only duplicate a message
            # still queued on a reliable link (docs/design/group.md, "Flush costs")
            GroupMembership(GroupEngine(self.local, config.group, backlogged=self.node.backlogged)),
            SessionConfig(
                DaemonLimits(
                    limits.max_message_size, limits.max_group_name, limits.max_groups_per_client
                ),
                limits.max_clients,
                handshake_timeout=limits.handshake_timeout,
                max_pending_handshakes=limits.max_pending_handshakes,
                block_timeout=limits.block_timeout,
                max_backlog=config.sessions.max_backlog,
                status_max_groups=config.sessions.status_max_groups,
                status_max_members=config.sessions.status_max_members,
                access=access,
            ),
            status=self.status_sections,
        )
        self.client_server: ClientServer | None = None
        self._group_broadcasts_lost = 0
        self._loop = asyncio.get_running_loop()
        self._names = {NodeId(d.node_id): d.name for d in config.daemons}
        self._addresses: dict[NodeId, Address] = {}
        self._by_address: dict[Address, NodeId] = {}
        self._emulations: dict[NodeId, Emulation] = {}
        for spec, link in config.neighbours(name):
            peer = NodeId(spec.node_id)
            address = daemon_address(spec)
            self._addresses[peer] = address
            self._by_address[address] = peer
            if link.emulation is not None:
                self._emulations[peer] = link.emulation
        self._senders: dict[NodeId, Callable[[bytes, Address], None]] = {}
        self._impaired: dict[NodeId, ImpairedSender] = {}
        self._transport: asyncio.DatagramTransport | None = None
        self._bound: Address = ("", 0)
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self._failure: str | None = None
        self._stop: asyncio.Event | None = None
        self._stop_reason = "stop requested"
        self._closed = False
        self._clock = 0.0
        self._timer = DeadlineTimer(self._loop, self._on_timer)
        self._release: asyncio.TimerHandle | None = None  # release_free_memory, pending
        self._settle_pending = False
        self._draining = False
        self._drained = asyncio.Event()
        self._opened_at = self._loop.time()
        self._agreed_digest: bytes | None = None  # digest of the latest ViewAgreed
        self._limiter = RateLimiter()
        self._probe_number = 0
        # counters (reported by `statistics()`)
        self._datagrams_received = 0
        self._datagrams_sent = 0
        self._foreign_dropped = 0
        self._unroutable_dropped = 0
        self._socket_errors = 0
        self._internal_errors = 0
        self._probes_sent = 0
        self._probes_skipped = 0
        self._probes_received = 0
        self._other_delivered = 0
        self._unknown_effects = UnknownEffects(self._log)

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def open(
        cls,
        config: ClusterConfig,
        name: str,
        *,
        probe_interval: float | None = None,
        incarnation: int | None = None,
        clients: ClientListen | None = None,
        reload_security: Callable[[], SecurityConfig] | None = None,
        insecure_warning_interval: float = INSECURE_WARNING_INTERVAL,
    ) -> OverlayDaemon:
        """Bind the daemon's configured host:port and its client sockets. Raises
        `ConfigError` (also for a missing or unusable key) or `OSError`.

        `reload_security` gives the [security] section a reload (SIGHUP) reads the key
        files of; by default the one of `config`."""
        daemon = cls(
            config,
            name,
            probe_interval=probe_interval,
            incarnation=incarnation_now() if incarnation is None else incarnation,
            clients=clients,
            reload_security=reload_security,
            insecure_warning_interval=insecure_warning_interval,
        )
        sock = open_udp_socket(daemon_address(daemon.spec), DEFAULT_SOCKET_BUFFER_BYTES)
        transport, sockname = await open_endpoint(
            daemon._loop,
            sock,
            daemon._on_datagram,
            daemon._on_socket_error,
            daemon._on_connection_lost,
        )
        daemon._attach(transport, sockname)
        try:
            await daemon._open_clients()
        except BaseException:
            await daemon.aclose()
            raise
        return daemon

    async def _open_clients(self) -> None:
        server = ClientServer(
            self.sessions,
            self._run_session_input,
            can_submit=self._can_submit,
            holds_back=self.sessions.membership.engine.holds_back,
        )
        self.client_server = server
        listen = self.clients
        if listen.unix_path == "":
            pass
        elif listen.unix_path is None:
            # The default path is a convenience: another daemon of the same name on this
            # machine (a second cluster, a test run) may hold it. Then serve without it.
            path = default_socket_path(self.spec.name, self.config.name)
            try:
                await server.start_unix(path, default_dir=True, group=self._socket_group)
            except OSError as exc:
                self.events.error("clients_unix_unavailable", path=str(path), error=str(exc))
            if self._socket_group is not None:
                self._log.warning(
                    "[clients] socket_group %s: the socket is in %s, a private (0700) "
                    "directory the group cannot reach; give --client-socket a path in a "
                    "directory shared with the group",
                    self.config.clients.socket_group,
                    path.parent,
                )
        else:
            await server.start_unix(
                Path(listen.unix_path), default_dir=False, group=self._socket_group
            )
        if listen.tcp_port is not None:
            await server.start_tcp(listen.tcp_host, listen.tcp_port)

    def _attach(self, transport: asyncio.DatagramTransport, sockname: tuple[str, int]) -> None:
        self._transport = transport
        self._bound = (sockname[0], sockname[1])
        send: Callable[[bytes, Address], None] = transport.sendto
        for peer in self._addresses:
            emulation = self._emulations.get(peer)
            if emulation is None:
                self._senders[peer] = send
            else:
                shim = ImpairedSender(impairment_for(emulation, self.local, peer), send)
                self._impaired[peer] = shim
                self._senders[peer] = shim

    @property
    def address(self) -> Address:
        """The bound (host, port)."""
        return self._bound

    @property
    def failure(self) -> str | None:
        """Why the daemon stopped by itself (its socket went away), else None."""
        return self._failure

    def request_stop(self, reason: str) -> None:
        """Begin a clean stop (what SIGTERM and SIGINT do); idempotent."""
        if self._stop is not None and not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    async def serve(self, stop: asyncio.Event) -> None:
        """Start the node, serve until `stop` is set, then drain and close."""
        self._stop = stop
        self.events.emit(
            "daemon_started",
            host=self._bound[0],
            port=self._bound[1],
            pid=os.getpid(),
            incarnation=self.node.incarnation,
            cluster=self.config.name,
            site=self.spec.site,
            policy=self.config.routing,
            neighbours=[
                {
                    "node": int(peer),
                    "name": self._names[peer],
                    "weight": self.node.config.neighbours[peer].weight,
                    "bandwidth_bps": self.node.config.neighbours[peer].bandwidth_bps,
                    "emulated": peer in self._emulations,
                }
                for peer in sorted(self._addresses)
            ],
            heartbeat_interval=self.node.config.link.heartbeat_interval,
            failure_timeout=failure_detection_bound(self.config),
            view_settle_interval=self.node.config.view_settle_interval,
            probe_interval=self.probe_interval,
        )
        self.events.emit(
            "security",
            mode=self.security_mode,
            keys=describe_keyring(self.keyring),
        )
        if self.keyring is None:
            self._warn_insecure()
        server = self.client_server
        self.events.emit(
            "clients_listening",
            unix_path=None if server is None or server.unix_path is None else str(server.unix_path),
            tcp_host=None
            if server is None or server.tcp_address is None
            else server.tcp_address[0],
            tcp_port=None
            if server is None or server.tcp_address is None
            else server.tcp_address[1],
            max_clients=self.config.limits.max_clients,
            socket_group=self.config.clients.socket_group,
            tcp_tokens_required=server is not None
            and server.tcp_address is not None
            and not is_loopback(server.tcp_address[0]),
            access_rules=len(self.config.clients.rules),
        )
        self._run_input("start", lambda now: self.node.start(now))
        async with asyncio.TaskGroup() as tasks:
            probes = (
                tasks.create_task(self._probe_loop(self.probe_interval))
                if self.probe_interval is not None
                else None
            )
            warnings = (
                tasks.create_task(self._insecure_loop(self._insecure_warning_interval))
                if self.keyring is None
                else None
            )
            await stop.wait()
            for task in (probes, warnings):
                if task is not None:
                    task.cancel()
        # The view this daemon leaves: by the time it has drained, the others may have
        # dropped it and its own view may be itself alone.
        view = self.node.view
        self.events.emit(
            "daemon_stopping",
            reason=self._stop_reason,
            view_members=None if view is None else [int(m) for m in view.members],
        )
        self._run_session_input("shutdown", self.sessions.shutdown)
        if self.client_server is not None:
            await self.client_server.aclose()
        started = self._loop.time()
        drained = self._failure is None and await self._drain(DRAIN_TIMEOUT)
        drain_seconds = self._loop.time() - started
        stats = self.statistics()
        await self.aclose()
        self.events.emit(
            "daemon_stopped",
            reason=self._stop_reason,
            drained=drained,
            drain_seconds=round(drain_seconds, 4),
            stats=stats.as_dict(),
        )

    def close(self) -> None:
        """Stop at once: cancel the timer, drop held-back datagrams, close the socket."""
        if self._closed:
            return
        self._closed = True
        self._timer.cancel()
        if self._release is not None:
            self._release.cancel()
        for shim in self._impaired.values():
            shim.close()
        if self._transport is not None:
            self._transport.close()
        elif not self._lost.done():
            self._lost.set_result(None)

    async def aclose(self) -> None:
        """`close`, then wait until the transport has let go of the socket."""
        self.close()
        if self.client_server is not None:
            await self.client_server.aclose()
        await asyncio.shield(self._lost)

    async def _drain(self, timeout: float) -> bool:  # noqa: ASYNC109 - the bound is the point
        """Tell the others we leave, then wait (at most `timeout` s) until every live link
        has everything acknowledged."""
        self._run_input("leave", lambda now: self.node.leave(now))
        self._draining = True
        if self._is_drained():
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._drained.wait()
        except TimeoutError:
            return False
        return True

    def _is_drained(self) -> bool:
        endpoint = self.node.endpoint
        for peer in self.node.neighbours_up:
            if peer in endpoint:
                stats = endpoint.link(peer).statistics()
                if stats.queued_messages or stats.unacked_packets:
                    return False
        return True

    # ------------------------------------------------------------------ keys

    @property
    def security_mode(self) -> str:
        """The security mode: "encrypted" with a key ring, "INSECURE" without."""
        return "INSECURE" if self.keyring is None else "encrypted"

    def _install_keyring(self, ring: KeyRing | None) -> None:
        """The one place where the daemon's keys change (at start and on reload)."""
        self.keyring = ring
        if ring is not None and self.node.security is not None:
            # Established links keep their session keys; new handshakes use the new ring.
            self.node.security.keyring = ring

    def reload_keys(self) -> bool:
        """Read the key files again (what SIGHUP does); True if the new ring is in use.

        On success the new ring replaces the old (``keys_reloaded``); on any failure the
        daemon keeps the ring it has and goes on (``keys_reload_failed`` with the reason).
        """
        try:
            security = self._reload_security()
            if security.insecure != (self.keyring is None):
                want = "insecure" if security.insecure else "encrypted"
                raise ConfigError(
                    f"the cluster file now asks for {want} mode; switching between "
                    "insecure and encrypted needs a restart"
                )
            ring = load_keyring(security, self.config.source)
        except Exception as exc:
            # A bad file or edit must never stop a running daemon: it keeps its keys.
            self._key_reload_failures += 1
            if not isinstance(exc, ConfigError):
                self._contain("reload_keys")
            self.events.error(
                "keys_reload_failed", reason=str(exc), keys=describe_keyring(self.keyring)
            )
            return False
        self._key_reloads += 1
        self._install_keyring(ring)
        self.events.emit("keys_reloaded", mode=self.security_mode, keys=describe_keyring(ring))
        return True

    def _warn_insecure(self) -> None:
        self.events.warning(
            "insecure_warning",
            message="INSECURE: this daemon neither encrypts nor authenticates its traffic "
            "([security] insecure = true); anyone who can reach its port can read, forge "
            "and inject messages. Create a key with `meshcast keygen FILE` and set "
            '[security] key_file = "FILE" instead.',
        )

    async def _insecure_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self._warn_insecure()

    # ------------------------------------------------------------------ queries

    def statistics(self) -> DaemonStats:
        """A snapshot of the daemon's counters, its node's and each of its links'."""
        endpoint = self.node.endpoint
        view = self.node.view
        return DaemonStats(
            datagrams_received=self._datagrams_received,
            datagrams_sent=self._datagrams_sent,
            foreign_dropped=self._foreign_dropped,
            unroutable_dropped=self._unroutable_dropped,
            socket_errors=self._socket_errors,
            internal_errors=self._internal_errors,
            probes_sent=self._probes_sent,
            probes_skipped=self._probes_skipped,
            probes_received=self._probes_received,
            other_delivered=self._other_delivered,
            group_broadcasts_lost=self._group_broadcasts_lost,
            unknown_effects=self._unknown_effects.count,
            sessions=self.sessions.statistics(),
            group=self.sessions.membership.engine.statistics(),
            membership=self.sessions.membership.statistics(),
            view_members=None if view is None else tuple(int(m) for m in view.members),
            overlay=self.node.statistics(),
            links={peer: endpoint.link(peer).statistics() for peer in endpoint.peers},
            impairment={peer: shim.statistics() for peer, shim in self._impaired.items()},
        )

    def status_sections(self, now: float) -> dict[str, object]:
        """What this daemon adds to a STATUS report (`SessionTable.status`): identity and
        uptime, the overlay view, each configured link, the tree of its own source and
        the overlay's and the daemon's counters (docs/client-protocol.md, "Status reports")."""
        view = self.node.view
        up = self.node.neighbours_up
        endpoint = self.node.endpoint
        links: list[dict[str, object]] = []
        dropped = LinkDrops()
        for peer in sorted(self._addresses):
            stats = endpoint.link(peer).statistics() if peer in endpoint else None
            is_up = peer in up
            drops = self.node.link_drops(peer)
            dropped += drops
            links.append(
                {
                    "node": int(peer),
                    "name": self._names.get(peer, "?"),
                    "up": is_up,
                    "srtt_ms": round(stats.srtt * 1000, 3) if stats is not None and is_up else None,
                    "bandwidth_bps": self.node.advertised_bandwidth(peer),
                    "weight": self.node.config.neighbours[peer].weight,
                    "emulated": peer in self._emulations,
                    "retransmissions": 0 if stats is None else stats.retransmissions,
                    "queued_messages": 0 if stats is None else stats.queued_messages,
                    "dropped": {**asdict(drops), "total": drops.total},
                }
            )
        daemon_stats = self.statistics()
        return {
            "security": {
                "mode": self.security_mode,
                "keys": describe_keyring(self.keyring),
                "key_reloads": self._key_reloads,
                "key_reload_failures": self._key_reload_failures,
            },
            "daemon": {
                "incarnation": self.node.incarnation,
                "uptime_seconds": round(max(0.0, now - self._opened_at), 3),
                "cluster": self.config.name,
                "site": self.spec.site,
                "address": f"{self._bound[0]}:{self._bound[1]}",
                "routing": self.config.routing,
                "pid": os.getpid(),
            },
            "view": None
            if view is None
            else {
                "members": [
                    {"node": int(m), "name": self._names.get(m, "?")} for m in view.members
                ],
                "links": len(view.edges),
                "digest": view.digest.hex(),
                "agreed": view.digest == self._agreed_digest,
            },
            "links": links,
            "tree": None
            if view is None
            else self._describe_tree(self.node.routing.tree(self.local)),
            "counters": {
                "links": {**asdict(dropped), "total": dropped.total},  # drops of every link
                "overlay": asdict(daemon_stats.overlay),
                "daemon": {
                    "datagrams_received": daemon_stats.datagrams_received,
                    "datagrams_sent": daemon_stats.datagrams_sent,
                    "foreign_dropped": daemon_stats.foreign_dropped,
                    "unroutable_dropped": daemon_stats.unroutable_dropped,
                    "socket_errors": daemon_stats.socket_errors,
                    "internal_errors": daemon_stats.internal_errors,
                    "probes_sent": daemon_stats.probes_sent,
                    "probes_received": daemon_stats.probes_received,
                    "group_broadcasts_lost": daemon_stats.group_broadcasts_lost,
                    "unknown_effects": daemon_stats.unknown_effects,
                },
            },
        }

    # ------------------------------------------------------------------ inputs

    def _on_datagram(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._datagrams_received += 1
        if self._closed:
            return
        peer = self._by_address.get((str(addr[0]), int(addr[1])))
        if peer is None:
            self._foreign_dropped += 1
            if self._limiter.allows(self._foreign_dropped):
                self._log.debug(
                    "drop datagram of %d bytes from unknown address %s", len(data), addr
                )
            return
        now = self._now()
        try:
            effects = self.node.datagram_received(peer, data, now)
        except Exception:
            self._contain("datagram_received")
        else:
            self._apply(effects)
        self._settle()

    def _on_timer(self) -> None:
        now = self._now(self._timer.fired_at())
        try:
            effects = self.node.on_timer(now)
        except Exception:
            self._contain("on_timer")
            self._timer.quarantine_until = now + _QUARANTINE_INTERVAL
        else:
            self._apply(effects)
        deadline = self.sessions.next_deadline()
        if deadline is not None and deadline <= now:
            self._run_session_input("group on_timer", self.sessions.on_timer)
        self._settle()

    def _run_input(self, where: str, feed: Callable[[float], list[OverlayEffect]]) -> None:
        try:
            effects = feed(self._now())
        except Exception:
            self._contain(where)
        else:
            self._apply(effects)
        self._settle()

    async def _probe_loop(self, interval: float) -> None:
        next_at = self._loop.time() + interval
        while True:
            await asyncio.sleep(max(0.0, next_at - self._loop.time()))
            next_at = max(next_at + interval, self._loop.time())
            self._send_probe()

    def _send_probe(self) -> None:
        """Multicast one probe to every other member of the current view."""
        view = self.node.view
        if view is None or self._closed:
            return
        dests = [m for m in view.members if m != self.local]
        if not dests:
            return
        if not self.node.can_multicast():
            self._probes_skipped += 1
            return
        self._probe_number += 1
        payload = _PROBE.pack(PROBE_MAGIC, self._probe_number, time.time())
        try:
            effects = self.node.multicast(dests, payload, self._now())
        except BufferFull:
            self._probes_skipped += 1
            return
        except Exception:
            self._contain("multicast")
        else:
            self._probes_sent += 1
            self._apply(effects)
        self._settle()

    def _on_socket_error(self, exc: Exception) -> None:
        # ICMP port unreachable while a neighbour is down: expected, counted, rarely logged.
        self._socket_errors += 1
        if self._limiter.allows(self._socket_errors):
            self._log.debug("socket error: %s", exc)

    def _on_connection_lost(self, exc: Exception | None) -> None:
        if not self._closed:
            self._failure = f"UDP socket closed unexpectedly: {exc}"
            self._log.error("%s", self._failure)
            self.close()
            self.request_stop("socket lost")
        if not self._lost.done():
            self._lost.set_result(None)

    # ------------------------------------------------------------------ effects

    def _apply(self, effects: list[OverlayEffect]) -> None:
        for effect in effects:
            if type(effect) is Transmit:
                send = self._senders.get(effect.to)
                address = self._addresses.get(effect.to)
                if send is None or address is None or self._closed:
                    self._unroutable_dropped += 1
                    continue
                self._datagrams_sent += 1
                send(effect.datagram, address)
            else:
                try:
                    self._on_event(effect)
                except Exception:
                    self._contain(f"logging {type(effect).__name__}")

    def _on_event(self, effect: OverlayEffect) -> None:
        match effect:
            case OverlayDelivered():
                self._on_delivered(effect)
            case NeighbourChanged(neighbour, up, reason):
                self.events.emit(
                    "neighbour_up" if up else "neighbour_down",
                    neighbour=int(neighbour),
                    neighbour_name=self._names.get(neighbour, "?"),
                    reason=reason,
                )
            case ViewInstalled(view):
                self.events.emit(
                    "view_installed",
                    **self._describe_view(view),
                    tree=self._describe_tree(self.node.routing.tree(self.local)),
                )
                self._run_session_input(
                    "view_installed",
                    lambda now: self.sessions.view_installed(view.members, now, view.incarnations),
                    settle=False,
                )
            case ViewAgreed(view):
                self._agreed_digest = view.digest
                self.events.emit("view_agreed", **self._describe_view(view))
            case _:
                self._unknown_effects.dropped(effect, "the overlay")

    def _on_delivered(self, delivered: OverlayDelivered) -> None:
        payload = delivered.payload
        if len(payload) != _PROBE.size or not payload.startswith(PROBE_MAGIC):
            self._other_delivered += 1
            source = delivered.source
            self._run_session_input(
                "overlay_delivered",
                lambda now: self.sessions.overlay_delivered(source, payload, now),
                settle=False,
            )
            return
        _, number, sent_at = _PROBE.unpack(payload)
        self._probes_received += 1
        source = delivered.source
        tree = self.node.routing.tree(source)
        self.events.emit(
            "probe_received",
            source=int(source),
            source_name=self._names.get(source, "?"),
            seq=delivered.seq,
            probe=number,
            hops=delivered.hops,
            depth=tree.depth(self.local)
            if tree is not None and self.local in tree.parent
            else None,
            latency_ms=round((time.time() - sent_at) * 1000, 3),
        )

    def _describe_view(self, view: View) -> dict[str, object]:
        return {
            "members": [int(m) for m in view.members],
            "names": [self._names.get(m, "?") for m in view.members],
            "digest": view.digest.hex(),
            "edges": [[int(e.a), int(e.b), e.weight, e.bandwidth_bps] for e in view.edges],
        }

    def _describe_tree(self, tree: Tree | None) -> dict[str, object] | None:
        if tree is None:
            return None
        depth = max((tree.depth(node) for node in tree.parent), default=0)
        return {
            "source": int(tree.source),
            "edges": [[int(parent), int(child)] for child, parent in sorted(tree.parent.items())],
            "depth": depth,
            "rate_bps": tree.rate_bps,
        }

    # ------------------------------------------------------------------ client sessions

    def _schedule_release(self) -> None:
        """`release_free_memory` once, _RELEASE_AFTER_VIEW after the latest view."""
        if self._release is not None:
            self._release.cancel()
        self._release = self._loop.call_later(_RELEASE_AFTER_VIEW, self._release_now)

    def _release_now(self) -> None:
        self._release = None
        if not self._closed:
            release_free_memory()

    def _can_submit(self) -> bool:
        """May local clients' requests be taken now? The overlay outbox has room and our
        messages in flight fit the group window. (A `block` member that is behind holds
        back only messages to its groups: `GroupEngine.holds_back`.)"""
        return self.node.can_multicast() and self.sessions.membership.engine.can_submit()

    def _run_session_input(
        self,
        where: str,
        feed: Callable[[float], list[SessionEffect]],
        *,
        settle: bool = True,
    ) -> None:
        """One input of the session table / membership / engine, in the bulkhead."""
        if self._closed:
            return
        try:
            effects = feed(self._now())
        except Exception:
            self._contain(where)
        else:
            self._apply_sessions(effects)
        if settle:
            self._settle()

    def _apply_sessions(self, effects: list[SessionEffect]) -> None:
        server = self.client_server
        for effect in effects:
            match effect:
                case Broadcast(dests, payload):
                    try:
                        overlay = self.node.multicast(dests, payload, self._now())
                    except BufferFull:
                        self._group_broadcasts_lost += 1
                        self._log.warning("overlay outbox full: a group message is lost")
                        continue
                    except UsageError as exc:  # leaving: the view is going away anyway
                        self._group_broadcasts_lost += 1
                        self._log.debug("group message not sent: %s", exc)
                        continue
                    self._apply(overlay)
                case SendBytes(conn, data):
                    if server is not None:
                        server.send(conn, data)
                case CloseConnection(conn, abort, last):
                    if server is not None:
                        server.close_connection(conn, abort, last)
                case ClientConnected(conn, name, version):
                    self.events.emit("client_connected", conn=conn, client=name, version=version)
                case ClientDisconnected(conn, name, reason, groups):
                    self.events.emit(
                        "client_disconnected",
                        conn=conn,
                        client=name,
                        reason=reason,
                        groups=list(groups),
                    )
                case MembershipChanged(group, view_id, members, cause, who, hosts):
                    self.events.emit(
                        "group_membership",
                        group=group,
                        view=[view_id.counter, view_id.coordinator],
                        members=list(members),
                        cause=str(cause),
                        who=list(who),
                        hosts=[int(h) for h in hosts],
                    )
                case OrderingReset(_, new_view_id, members, undelivered):
                    self._schedule_release()
                    self.events.emit(
                        "group_view",
                        view_id=new_view_id.hex(),
                        members=[int(m) for m in members],
                        undelivered=len(undelivered),
                    )
                case OrderingFault(source, stream, reason):
                    self.events.error(
                        "group_fault", source=int(source), stream=stream, reason=reason
                    )
                case ViewTransition(old_view_id, old_members, survivors):
                    self.events.emit(
                        "group_transition",
                        view_id=old_view_id.hex(),
                        survivors=[int(m) for m in survivors],
                        departed=[int(m) for m in old_members if m not in survivors],
                    )
                case _:
                    self._unknown_effects.dropped(effect, "the session table")

    # ------------------------------------------------------------------ timer

    def _settle(self) -> None:
        """After an input: settle once the loop has run every callback now ready, so a
        burst of datagrams or client frames costs one deadline scan, not one each."""
        if self._settle_pending or self._closed:
            return
        self._settle_pending = True
        self._loop.call_soon(self._settle_now)

    def _settle_now(self) -> None:
        """Re-arm the one timer; note when a drain has completed; resume client reading."""
        self._settle_pending = False
        if self._closed:
            return
        try:
            # a `block` member behind: the next ACK tells every daemon to hold back
            # senders to its groups
            self.sessions.membership.engine.set_blocked(self.sessions.blocked_groups())
            deadlines = [
                d
                for d in (self.node.next_deadline(), self.sessions.next_deadline())
                if d is not None
            ]
            deadline = min(deadlines, default=None)
        except Exception:
            self._contain("next_deadline")
            deadline = self._now() + _QUARANTINE_INTERVAL
        self._timer.arm(deadline)
        if self._draining and not self._drained.is_set() and self._is_drained():
            self._drained.set()
        if self.client_server is not None:
            self.client_server.settle()

    def _now(self, at_least: float = 0.0) -> float:
        """The loop clock, never going backwards (a timer may pass its deadline as now)."""
        now = max(self._loop.time(), at_least)
        if now > self._clock:
            self._clock = now
        return self._clock

    def _contain(self, where: str) -> None:
        """The bulkhead: log the node's unexpected exception and keep serving."""
        self._internal_errors += 1
        if self._limiter.allows(self._internal_errors):
            self._log.exception(
                "bug contained: overlay node raised in %s (%d so far)", where, self._internal_errors
            )


# ---------------------------------------------------------------------- entry point


async def run_daemon(
    config: ClusterConfig,
    name: str,
    *,
    probe_interval: float | None = None,
    stop: asyncio.Event | None = None,
    clients: ClientListen | None = None,
    reload_security: Callable[[], SecurityConfig] | None = None,
) -> int:
    """Run daemon `name` of `config` until stopped; returns the exit status.

    Without `stop`, SIGTERM and SIGINT stop the daemon (drain, log, return 0) and SIGHUP
    reloads its key files (`OverlayDaemon.reload_keys`, reading the [security] section
    `reload_security` returns). Returns 1 when the socket cannot be bound or goes away.
    Raises `ConfigError` for an unknown name, an unusable configuration or a missing or
    unusable key (before anything is bound).
    """
    loop = asyncio.get_running_loop()
    spec = config.daemon(name)
    overlay_config(config, name)  # every ConfigError before the socket is bound
    events = EventLog(name, spec.node_id)
    try:
        daemon = await OverlayDaemon.open(
            config,
            name,
            probe_interval=probe_interval,
            clients=clients,
            reload_security=reload_security,
        )
    except (OSError, MeshcastError) as exc:
        if isinstance(exc, ConfigError):
            raise
        host, port = daemon_address(spec)
        events.error("daemon_failed", error=f"cannot bind {host}:{port} or client sockets: {exc}")
        return 1
    signals: list[signal.Signals] = []
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, daemon.request_stop, sig.name)
            except (NotImplementedError, RuntimeError):  # not the main thread / no support
                continue
            signals.append(sig)
        try:
            loop.add_signal_handler(signal.SIGHUP, daemon.reload_keys)
        except (NotImplementedError, RuntimeError, AttributeError):  # no SIGHUP here
            pass
        else:
            signals.append(signal.SIGHUP)
    try:
        await daemon.serve(stop)
    finally:
        daemon.close()
        for sig in signals:
            loop.remove_signal_handler(sig)
    if daemon.failure is not None:
        events.error("daemon_failed", error=daemon.failure)
        return 1
    return 0
