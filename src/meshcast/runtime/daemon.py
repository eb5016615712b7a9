"""The daemon as a process: what `meshcast daemon --config FILE --name NAME` runs.

Theory of operation: docs/design/daemon.md. `OverlayDaemon` builds one `DaemonNode`
(meshcast.daemon: the overlay, the group layers and the client sessions, all sans-I/O)
from the cluster file and drives it with a `DaemonPump` (runtime/pump.py: feed an input,
apply the effects, re-arm one timer). Around them it owns what only a process has: the
UDP and client sockets, the key files (SIGHUP reloads them), the life cycle (start,
drain, stop) and the status sections only a process knows (address, pid, uptime).

Events are logged by `meshcast.runtime.logs` (JSON lines or readable lines).
`run_daemon` is the whole life of one daemon: bind, start, serve until SIGTERM or SIGINT
(or `stop`), drain, log the final statistics, return the exit status.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import secrets
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from pathlib import Path

from meshcast.config import ClusterConfig, SecurityConfig
from meshcast.daemon import (
    DaemonNode,
)
from meshcast.daemon.config import (
    daemon_names,
    failure_detection_bound,
    node_config,
    overlay_config,
    replicator_config,
    session_config,
    upload_capacities,
)
from meshcast.errors import ConfigError, MeshcastError, UsageError
from meshcast.group.sessions import SessionTable
from meshcast.ids import NodeId
from meshcast.overlay.node import OverlayConfig
from meshcast.runtime.blob_store import DiskStore
from meshcast.runtime.compiled import compiled
from meshcast.runtime.daemon_keys import DaemonKeys
from meshcast.runtime.datagram import open_endpoint
from meshcast.runtime.endpoints import (
    ClientListen,
    Neighbours,
    check_clients,
    daemon_address,
    incarnation_now,
)
from meshcast.runtime.gso import SegmentingSender, gso_supported, gso_wanted
from meshcast.runtime.keyfile import describe_keyring
from meshcast.runtime.logs import EventLog, NodeLogAdapter
from meshcast.runtime.loop import event_loop_name
from meshcast.runtime.path_mtu import datagram_mtu
from meshcast.runtime.pump import DaemonPump, PumpStats
from meshcast.runtime.replication_io import ReplicationIO
from meshcast.runtime.sessions import (
    ClientServer,
    is_loopback,
)
from meshcast.runtime.stats import DaemonStats
from meshcast.runtime.udp import (
    DEFAULT_SOCKET_BUFFER_BYTES,
    Address,
    link_security,
    open_udp_socket,
)
from meshcast.socket_paths import default_socket_path
from meshcast.wire.keys import KeyRing

log = logging.getLogger(__name__)

DRAIN_TIMEOUT = 2.0  # s: on SIGTERM, wait at most this long for unacknowledged packets
INSECURE_WARNING_INTERVAL = 60.0  # s: how often a daemon without a key says so again


class OverlayDaemon:
    """One daemon on one UDP socket and its client sockets, driven on the running loop.

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
        data_dir: Path | None = None,
    ) -> None:
        """Use `open`: the daemon is not usable before it has a socket. `data_dir`: where
        replicated files land (under `replicas/`); None: no part in replication."""
        if not (math.isfinite(insecure_warning_interval) and insecure_warning_interval > 0):
            raise UsageError(
                "insecure warning interval must be a positive number of seconds, "
                f"got {insecure_warning_interval!r}"
            )
        self.config = config
        self.spec = config.daemon(name)
        self.local = NodeId(self.spec.node_id)
        self.probe_interval = probe_interval
        # SIGHUP reloads the [security] section (the cluster file read again by the
        # daemon command; by default the one the daemon started with)
        self.keys = DaemonKeys(
            config.security,
            config.source,
            reload_security=reload_security or (lambda: config.security),
            install=self._install_keys,
        )
        self.clients = clients if clients is not None else ClientListen()
        # before any socket is bound: the token file must be safe, a client port open
        # beyond loopback needs tokens, a socket group must exist (ConfigError)
        access, self._socket_group = check_clients(config, self.clients)
        self._names = daemon_names(config)
        self.neighbours = Neighbours(config, name)
        try:
            settings = node_config(config, name, probe_interval=probe_interval)
        except ConfigError as exc:
            raise UsageError(f"probe interval {exc}") from None
        # replication needs the cluster key: its streams are authenticated and encrypted
        self.store: DiskStore | None = None
        if data_dir is not None and self.keys.ring is not None:
            self.store = DiskStore(data_dir / "replicas")
        self.node = DaemonNode(
            self.local,
            settings,
            with_path_mtus(overlay_config(config, name), config, name),
            incarnation=incarnation,
            rng=random.Random(secrets.randbits(64)),
            wall_clock=time.time,
            group=config.group,
            sessions=session_config(config, access),
            security=None if self.keys.ring is None else link_security(self.keys.ring),
            names=self._names,
            emulated=frozenset(self.neighbours.emulations),
            status=self._status,
            store=self.store,
            replication=replicator_config(config),
            capacities=upload_capacities(config),
        )
        self.events = EventLog(name, self.local)
        self._log = NodeLogAdapter(log, self.local)
        self.pump = DaemonPump(self.node, self.neighbours, self.events, self._log)
        self.replication: ReplicationIO | None = None
        if self.store is not None:
            self.replication = self.pump.replication = ReplicationIO(
                self.node,
                self.store,
                {NodeId(d.node_id): daemon_address(d) for d in config.daemons},
                lambda: self.keys.ring,
                self.pump.feed,
            )
        self._insecure_warning_interval = insecure_warning_interval
        self.client_server: ClientServer | None = None
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.DatagramTransport | None = None
        self._bound: Address = ("", 0)
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self._failure: str | None = None
        self._stop: asyncio.Event | None = None
        self._stop_reason = "stop requested"
        self._closed = False
        self._opened_at = self._loop.time()

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
        data_dir: Path | None = None,
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
            data_dir=data_dir,
        )
        sock = open_udp_socket(daemon_address(daemon.spec), DEFAULT_SOCKET_BUFFER_BYTES)
        transport, sockname = await open_endpoint(
            daemon._loop,
            sock,
            daemon.pump.datagram_received,
            daemon.pump.socket_error,
            daemon._on_connection_lost,
        )
        daemon._attach(transport, sockname, sock)
        try:
            await daemon._open_clients()
            if daemon.replication is not None:  # TCP on the UDP socket's address and port
                await daemon.replication.start(*daemon.address)
        except BaseException:
            await daemon.aclose()
            raise
        return daemon

    async def _open_clients(self) -> None:
        server = ClientServer(self.pump)
        self.client_server = self.pump.client_server = server
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

    def _attach(
        self,
        transport: asyncio.DatagramTransport,
        sockname: tuple[str, int],
        sock: socket.socket,
    ) -> None:
        self._transport = transport
        self._bound = (sockname[0], sockname[1])
        # The transport works on this very socket (uvloop and asyncio alike): a run sent
        # with `sendmsg` here and the transport's `sendto` share one send queue.
        gso = gso_wanted(os.environ) and gso_supported(sock)
        segmenting = SegmentingSender(sock, transport, enabled=True) if gso else None
        self.neighbours.attach(transport.sendto, segmenting)
        self._log.debug("UDP GSO %s", "on" if gso else "off")

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
        self._log_start()
        self.pump.feed("start", self.node.start)
        warnings = None
        if self.keys.ring is None:
            warnings = asyncio.create_task(self._insecure_loop(self._insecure_warning_interval))
        try:
            await stop.wait()
        finally:
            if warnings is not None:
                warnings.cancel()
        # The view this daemon leaves: by the time it has drained, the others may have
        # dropped it and its own view may be itself alone.
        view = self.node.overlay.view
        self.events.emit(
            "daemon_stopping",
            reason=self._stop_reason,
            view_members=None if view is None else [int(m) for m in view.members],
        )
        started = self._loop.time()
        # ERROR SHUTTING_DOWN to the clients, then tell the other daemons we leave and
        # wait (at most DRAIN_TIMEOUT) until every live link has everything acknowledged
        self.pump.feed("leave", self.node.leave)
        if self.client_server is not None:
            self.client_server.flush()
            await self.client_server.aclose()
        drained = self._failure is None and await self.pump.drained(DRAIN_TIMEOUT)
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

    def _log_start(self) -> None:
        overlay = self.node.overlay.config
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
                    "weight": overlay.neighbours[peer].weight,
                    "bandwidth_bps": overlay.neighbours[peer].bandwidth_bps,
                    "emulated": peer in self.neighbours.emulations,
                }
                for peer in self.neighbours.peers
            ],
            heartbeat_interval=overlay.link.heartbeat_interval,
            failure_timeout=failure_detection_bound(self.config),
            view_settle_interval=overlay.view_settle_interval,
            probe_interval=self.probe_interval,
        )
        self.events.emit("security", mode=self.keys.mode, keys=describe_keyring(self.keys.ring))
        if self.keys.ring is None:
            self.keys.warn_insecure(self.events)
        server = self.client_server
        tcp = None if server is None else server.tcp_address
        self.events.emit(
            "clients_listening",
            unix_path=None if server is None or server.unix_path is None else str(server.unix_path),
            tcp_host=None if tcp is None else tcp[0],
            tcp_port=None if tcp is None else tcp[1],
            max_clients=self.config.limits.max_clients,
            socket_group=self.config.clients.socket_group,
            tcp_tokens_required=tcp is not None and not is_loopback(tcp[0]),
            access_rules=len(self.config.clients.rules),
        )

    def close(self) -> None:
        """Stop at once: cancel the timer, drop held-back datagrams, close the socket."""
        if self._closed:
            return
        self._closed = True
        self.pump.close()
        self.neighbours.close()
        if self._transport is not None:
            self._transport.close()
        elif not self._lost.done():
            self._lost.set_result(None)

    async def aclose(self) -> None:
        """`close`, then wait until the transport has let go of the socket."""
        self.close()
        if self.client_server is not None:
            await self.client_server.aclose()
        if self.replication is not None:
            await self.replication.aclose()
        await asyncio.shield(self._lost)

    def _on_connection_lost(self, exc: Exception | None) -> None:
        if not self._closed:
            self._failure = f"UDP socket closed unexpectedly: {exc}"
            self._log.error("%s", self._failure)
            self.close()
            self.request_stop("socket lost")
        if not self._lost.done():
            self._lost.set_result(None)

    # ------------------------------------------------------------------ keys

    def _install_keys(self, ring: KeyRing) -> None:
        self.node.set_keyring(ring)
        if self.replication is not None:
            self.replication.set_ring(ring)

    @property
    def keyring(self) -> KeyRing | None:
        """The key ring in use; None only when [security] insecure = true."""
        return self.keys.ring

    @property
    def security_mode(self) -> str:
        return self.keys.mode

    def reload_keys(self) -> bool:
        """Read the key files again (what SIGHUP does); True if the new ring is in use."""
        try:
            return self.keys.reload(self.events)
        except Exception:
            self.pump.contain("reload_keys")
            return False

    async def _insecure_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.keys.warn_insecure(self.events)

    # ------------------------------------------------------------------ queries

    @property
    def sessions(self) -> SessionTable:
        return self.node.sessions

    def statistics(self) -> DaemonStats:
        """A snapshot of the daemon's counters, its layers' and each of its links'."""
        node = self.node
        endpoint = node.overlay.endpoint
        view = node.overlay.view
        return DaemonStats(
            **asdict(self._counters()),
            view_members=None if view is None else tuple(int(m) for m in view.members),
            daemon=node.statistics(),
            sessions=node.sessions.statistics(),
            group=node.engine.statistics(),
            membership=node.sessions.membership.statistics(),
            overlay=node.overlay.statistics(),
            links={peer: endpoint.link(peer).statistics() for peer in endpoint.peers},
            impairment=self.neighbours.impairment(),
        )

    def _status(self, now: float) -> Mapping[str, object]:
        """What only the process knows, for a STATUS report (the node adds the rest)."""
        return {
            "security": self.keys.status(),
            "daemon": {
                "uptime_seconds": round(max(0.0, now - self._opened_at), 3),
                "cluster": self.config.name,
                "site": self.spec.site,
                "address": f"{self._bound[0]}:{self._bound[1]}",
                "routing": self.config.routing,
                "pid": os.getpid(),
                "event_loop": event_loop_name(),
                "udp_gso": self.neighbours.udp_gso,
                "compiled": compiled(),  # the mypyc build of the hot modules (docs/compiled.md)
            },
            "counters": {"daemon": asdict(self._counters())},
            "replication": {
                "data_dir": None if self.store is None else str(self.store.root),
                "streams": None if self.replication is None else self.replication.status(),
            },
        }

    def _counters(self) -> PumpStats:
        """The pump's counters, with the bugs the node contained and the effects it had
        no case for added to the pump's own."""
        pump, node = self.pump.statistics(), self.node.statistics()
        return replace(
            pump,
            internal_errors=pump.internal_errors + node.internal_errors,
            unknown_effects=pump.unknown_effects + node.unknown_effects,
        )


# ---------------------------------------------------------------------- entry point


def with_path_mtus(overlay: OverlayConfig, config: ClusterConfig, name: str) -> OverlayConfig:
    """`overlay` with each neighbour's datagram size set from the route to it
    (`runtime.path_mtu`: larger than `[link] mtu` only on loopback and jumbo-frame LANs)."""
    link = overlay.link
    neighbours = {
        NodeId(spec.node_id): replace(
            overlay.neighbours[NodeId(spec.node_id)],
            mtu=datagram_mtu(spec.host, link.mtu, link.max_path_mtu),
        )
        for spec, _ in config.neighbours(name)
    }
    return replace(overlay, neighbours=neighbours)


async def run_daemon(
    config: ClusterConfig,
    name: str,
    *,
    probe_interval: float | None = None,
    stop: asyncio.Event | None = None,
    clients: ClientListen | None = None,
    reload_security: Callable[[], SecurityConfig] | None = None,
    data_dir: Path | None = None,
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
            data_dir=data_dir,
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
