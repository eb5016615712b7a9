"""Whole daemons in the simulator: `DaemonNode`s — the object the asyncio runtime drives —
with simulated clients that speak the client protocol in frames.

`build_daemon_sim` wires daemons over emulated links (`GroupLink`); `DaemonSim` connects
clients to them. A `SimClient` is the client side of one connection: it encodes frames into the
node (`client_data`), decodes what the node writes (`ClientWrite`) into `received`, and
models its socket: bytes it has not read count against `high_water`, past which the node
is told `writing_paused` (as asyncio's transport does), and `read()` makes room again
(`writing_resumed`, a chunk at a time, as the runtime pump does). A client that does not
read is a slow receiver; `ClientReading` pauses and resumes its sending; a
`ClientClose` ends it. Nothing here bypasses the node: what the runtime would do with an
effect, the harness does in virtual time.
"""

from __future__ import annotations

import itertools
import random
import struct
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from meshcast.daemon import (
    ClientClose,
    ClientReading,
    ClientWrite,
    DaemonEvent,
    DaemonNode,
    DaemonNodeConfig,
)
from meshcast.daemon.layers import DAEMON_LAYERS, DaemonLayers
from meshcast.errors import DecodeError
from meshcast.group import GroupConfig
from meshcast.group.sessions import SessionConfig
from meshcast.ids import NodeId
from meshcast.link import LinkConfig
from meshcast.sim.network import LinkModel
from meshcast.sim.overlay import cluster_security, overlay_configs
from meshcast.sim.simulator import Simulator
from meshcast.wire.client import (
    VERSION,
    ClientFrame,
    ErrorReport,
    Frame,
    FrameDecoder,
    Hello,
    Join,
    Membership,
    Message,
    Multicast,
    ServiceLevel,
    Welcome,
    encode,
)

DEFAULT_HIGH_WATER = 64 * 1024  # bytes a simulated client's socket holds unread


@dataclass(frozen=True, slots=True)
class GroupLink:
    """A link between daemons `a` and `b` in a simulated cluster."""

    a: int
    b: int
    model: LinkModel  # the emulated network between them (loss, delay, jitter, reorder)
    weight: float = 1.0
    bandwidth_bps: float = 100e6  # what the daemons advertise


@dataclass(eq=False)
class SimClient:
    """The client end of one simulated connection (see the module docstring)."""

    dsim: DaemonSim
    node: NodeId
    conn: int
    incarnation: int  # of the daemon it connected to
    name: str
    reading: bool = True  # does the application read what arrives?
    received: list[Frame] = field(default_factory=list)
    unread: int = 0  # bytes in its socket not yet read
    write_paused: bool = False  # the daemon was told its socket is full
    send_paused: bool = False  # the daemon stopped reading it (ClientReading)
    waiting: deque[bytes] = field(default_factory=deque)  # frames not yet taken
    closed: bool = False
    close_error: ErrorReport | None = None  # the ERROR the daemon closed it with
    _decoder: FrameDecoder = field(default_factory=FrameDecoder)
    _buffer: deque[bytes] = field(default_factory=deque)

    @property
    def alive(self) -> bool:
        return not self.closed and self.dsim.daemon_alive(self.node, self.incarnation)

    def send(self, frame: ClientFrame) -> None:
        """Write one frame (it waits while the daemon does not read this connection)."""
        self.send_raw(encode(frame))

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (a broken client)."""
        if not self.alive:
            return
        if self.send_paused or self.waiting:
            self.waiting.append(data)
            return
        self._write(data)

    def crash(self) -> None:
        """The client process dies: the daemon sees the connection reset."""
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._lost()

    def read(self, limit: int | None = None) -> int:
        """Read up to `limit` unread bytes (all by default); returns how many."""
        taken = 0
        while self._buffer and (limit is None or taken < limit):
            data = self._buffer.popleft()
            if limit is not None and taken + len(data) > limit:
                keep = limit - taken
                self._buffer.appendleft(data[keep:])
                data = data[:keep]
            taken += len(data)
            self._decode(data)
        self.unread -= taken
        if self.write_paused and self.unread <= self.dsim.high_water // 4 and self.alive:
            self.write_paused = False
            self.dsim.sim.call_later(0.0, lambda: self.dsim.resume_writing(self))
        return taken

    def messages(self) -> list[Message]:
        return [f for f in self.received if isinstance(f, Message)]

    # ------------------------------------------------------------------ from the node

    def _written(self, data: bytes) -> None:
        if self.closed:
            return
        self._buffer.append(data)
        self.unread += len(data)
        if self.reading:
            self.read()
        elif self.unread > self.dsim.high_water and not self.write_paused:
            self.write_paused = True
            node = self.dsim.live_node(self.node, self.incarnation)
            if node is not None:
                node.writing_paused(self.conn)

    def _reading(self, paused: bool) -> None:
        self.send_paused = paused
        if not paused and self.waiting:
            self.dsim.sim.call_later(0.0, self._send_waiting)

    def _send_waiting(self) -> None:
        while self.waiting and not self.send_paused and self.alive:
            self._write(self.waiting.popleft())

    def _write(self, data: bytes) -> None:
        self.dsim.sim.act(self.node, lambda d, now: d.client_data(self.conn, data, now))

    def _closed_by_daemon(self, abort: bool, last: bytes) -> None:
        if self.closed:
            return
        if not abort:
            self.read()  # a graceful close: everything written before it arrives
        elif last:
            self._decode(last)
        self.closed = True
        self.dsim.sim.call_later(0.0, self._lost)

    def _lost(self) -> None:
        if self.dsim.daemon_alive(self.node, self.incarnation):
            self.dsim.sim.act(self.node, lambda d, now: d.client_lost(self.conn, now))

    def _decode(self, data: bytes) -> None:
        self._decoder.feed(data)
        while True:
            try:
                frame = self._decoder.next_frame()
            except DecodeError as exc:
                raise AssertionError(f"the daemon wrote a bad frame: {exc}") from None
            if frame is None:
                return
            self.received.append(frame)
            if isinstance(frame, ErrorReport) and 100 <= frame.code < 200:
                self.close_error = frame


class DaemonSim:
    """A `Simulator` of `DaemonNode`s with the clients connected to them."""

    def __init__(self, sim: Simulator, high_water: int = DEFAULT_HIGH_WATER) -> None:
        self.sim = sim
        self.high_water = high_water
        self.events: list[tuple[NodeId, float, DaemonEvent]] = []
        self._clients: dict[tuple[NodeId, int], SimClient] = {}
        self._conn_ids = itertools.count(1)
        sim.observe(self._observe)

    def node(self, node_id: NodeId) -> DaemonNode:
        return self.sim.node_as(node_id, DaemonNode)

    def daemon_alive(self, node_id: NodeId, incarnation: int) -> bool:
        return self.sim.is_alive(node_id) and self.sim.incarnation(node_id) == incarnation

    def live_node(self, node_id: NodeId, incarnation: int) -> DaemonNode | None:
        return self.node(node_id) if self.daemon_alive(node_id, incarnation) else None

    def clients(self, node_id: NodeId | None = None) -> list[SimClient]:
        return [c for c in self._clients.values() if node_id is None or c.node == node_id]

    def connect(
        self, node_id: NodeId, name: str, *, reading: bool = True, max_version: int = VERSION
    ) -> SimClient:
        """A new client of daemon `node_id`: it connects and sends its HELLO (speaking
        protocol versions up to `max_version`: an older client)."""
        conn = next(self._conn_ids)
        client = SimClient(self, node_id, conn, self.sim.incarnation(node_id), name, reading)
        self._clients[(node_id, conn)] = client
        self.sim.act(node_id, lambda d, now: d.client_connected(conn, now))
        client.send(Hello(name, max_version=max_version))
        return client

    def resume_writing(self, client: SimClient) -> None:
        """The client's socket has room: hand it the backlog a chunk at a time, while it
        keeps room (what the runtime pump does on asyncio's resume_writing)."""
        node = self.live_node(client.node, client.incarnation)
        while node is not None and not client.write_paused and not client.closed:
            self.sim.act(client.node, lambda d, now: d.writing_resumed(client.conn, now))
            if not node.wants_writing(client.conn):
                return

    def _observe(self, node_id: NodeId, effect: object, now: float) -> None:
        match effect:
            case ClientWrite(conn, data):
                self._client(node_id, conn)._written(data)
            case ClientReading(conn, paused):
                self._client(node_id, conn)._reading(paused)
            case ClientClose(conn, abort, last):
                self._client(node_id, conn)._closed_by_daemon(abort, last)
            case DaemonEvent():
                self.events.append((node_id, now, effect))
            case _:
                kind = type(effect)
                raise AssertionError(
                    f"unknown effect {kind.__module__}.{kind.__qualname__} from daemon "
                    f"{node_id}: the simulator has no case for it"
                )

    def _client(self, node_id: NodeId, conn: int) -> SimClient:
        client = self._clients.get((node_id, conn))
        if client is None:
            raise AssertionError(f"daemon {node_id} wrote to connection {conn}, never opened")
        return client


def build_daemon_sim(
    links: Sequence[GroupLink],
    *,
    seed: int,
    policy: str = "shortest-path",
    group_config: GroupConfig | None = None,
    session_config: SessionConfig | None = None,
    link: LinkConfig | None = None,
    high_water: int = DEFAULT_HIGH_WATER,
    probe_interval: float | None = None,
    secure: bool = True,
    layers: DaemonLayers = DAEMON_LAYERS,
) -> DaemonSim:
    """Daemons over `links`, each a `DaemonNode` named ``d<id>``; links are encrypted, as
    a daemon's are, unless `secure` is False. Bugs are not contained: an exception inside
    a daemon fails the run. `layers`: the classes of each daemon's layers (a test's
    subclasses: `DaemonLayers`)."""
    nodes = sorted({n for e in links for n in (e.a, e.b)})
    config_of = overlay_configs(links, policy=policy, link=link)
    names = {NodeId(n): f"d{n}" for n in nodes}
    sim = Simulator(seed=seed)
    security = cluster_security(seed) if secure else None

    def factory(node_id: NodeId, now: float, rng: random.Random) -> DaemonNode:
        return DaemonNode(
            node_id,
            DaemonNodeConfig(names[node_id], probe_interval, write_chunk=high_water),
            config_of(node_id),
            incarnation=sim.incarnation(node_id) + 1,
            rng=rng,
            wall_clock=lambda: sim.now,
            group=group_config,
            sessions=session_config,
            security=None if security is None else security(rng),
            names=names,
            contain_bugs=False,
            layers=layers,
        )

    def start(node: DaemonNode, now: float) -> list[object]:
        return list(node.start(now))

    for n in nodes:
        sim.add_node(NodeId(n), factory, start=start)
    for e in links:
        sim.add_link(NodeId(e.a), NodeId(e.b), e.model)
    return DaemonSim(sim, high_water)


Process = tuple[NodeId, int]  # a daemon process: (daemon, incarnation); a restart is a new one
MESSAGE_ID = struct.Struct("!Q")  # `GroupClients`' message id: the first bytes of each payload
# A timeline entry of `GroupClients`, in the order the process's client saw or did it:
# ("view", view id hex) from the daemon's group_view event, ("deliver", id) a MESSAGE,
# ("member", (group, in?)) a MEMBERSHIP frame about the client itself, ("send", id).
Entry = tuple[str, object]


@dataclass(frozen=True, slots=True)
class GroupSend:
    """A MULTICAST a `GroupClients` client sent."""

    hid: int
    process: Process  # the sender's daemon process
    service: ServiceLevel
    groups: tuple[str, ...]
    at: float
    # the members of each of `groups` in the sender daemon's table when it was sent: the
    # daemons it is addressed to (unless that table changes before the daemon takes it)
    members: Mapping[str, frozenset[str]]


@dataclass(frozen=True, slots=True)
class ViewSegment:
    """What a process's client saw during one group view (`GroupClients.segments`)."""

    view: str  # the view id (hex); "" before the first view
    delivered: tuple[int, ...]  # in order; flush deliveries precede the next view's event
    joined: frozenset[str]  # groups the client was in when the view began
    throughout: frozenset[str]  # ...and stayed in, without any change, until the next view


class GroupClients:
    """One client per daemon ("c<d>"), joined to the groups `hosts` gives that daemon:
    "daemon d hosts g" is "a client of d joined g". A restarted daemon is a new process
    whose clients are gone: `restart` reconnects its client (and rejoins) after
    `reconnect_after` seconds, as a real deployment would. Every client reads at once.

    `timeline` records per process what its client saw, in true order (client writes that
    precede an event in the node are emitted before it): see `Entry`. `send` makes a
    client of a daemon multicast a payload that starts with its id (`MESSAGE_ID`); a send
    the daemon refuses (ERROR with its request id) is listed in `refused`."""

    def __init__(
        self,
        dsim: DaemonSim,
        hosts: Mapping[str, Sequence[NodeId]],
        *,
        reconnect_after: float = 0.05,
    ) -> None:
        self.dsim = dsim
        self.hosts = {g: frozenset(daemons) for g, daemons in hosts.items()}
        self.reconnect_after = reconnect_after
        self.clients: dict[NodeId, SimClient] = {}  # the current client of each daemon
        self.names: dict[Process, str] = {}  # private name of each process's client
        self.timeline: dict[Process, list[Entry]] = {}
        self.sent: dict[int, GroupSend] = {}
        self.refused: set[int] = set()
        self._by_conn: dict[tuple[NodeId, int], SimClient] = {}
        self._taken: dict[int, int] = {}  # conn -> frames of its client already in a timeline
        self._ids = itertools.count(1)
        dsim.sim.observe(self._observe)

    def process(self, node: NodeId) -> Process:
        return (node, self.dsim.sim.incarnation(node))

    def connect_all(self) -> None:
        for node in self.dsim.sim.node_ids():
            self.connect(node)

    def connect(self, node: NodeId) -> SimClient | None:
        """Connect daemon `node`'s client and join its groups (None: the daemon is down)."""
        sim = self.dsim.sim
        if not sim.is_alive(node):
            return None
        client = self.dsim.connect(node, f"c{node}")
        self._by_conn[(node, client.conn)] = client
        self.timeline.setdefault((node, client.incarnation), [])
        self.clients[node] = client
        for group in sorted(g for g, daemons in self.hosts.items() if node in daemons):
            client.send(Join(group))
        return client

    def restart(self, node: NodeId) -> None:
        """Restart crashed daemon `node`; its new client connects `reconnect_after` later."""
        sim = self.dsim.sim
        sim.restart(node)
        incarnation = sim.incarnation(node)

        def reconnect() -> None:
            if self.dsim.daemon_alive(node, incarnation):
                self.connect(node)

        sim.call_later(self.reconnect_after, reconnect)

    def send(
        self, node: NodeId, service: ServiceLevel, groups: tuple[str, ...], padding: int = 0
    ) -> int | None:
        """Daemon `node`'s client multicasts; returns the message id (None: it is gone)."""
        client = self.clients.get(node)
        if client is None or not client.alive:
            return None
        hid = next(self._ids)
        process = (client.node, client.incarnation)
        table = self.dsim.node(node).sessions.membership.table()
        members = {g: frozenset(m for m, _ in table.get(g, ())) for g in groups}
        now = self.dsim.sim.now
        self.sent[hid] = GroupSend(hid, process, service, groups, now, members)
        self.timeline[process].append(("send", hid))  # its own delivery comes after
        payload = MESSAGE_ID.pack(hid) + bytes(padding)
        client.send(Multicast(groups, payload, service, request_id=hid))
        return hid

    # ------------------------------------------------------------------ queries

    def delivered(self, process: Process) -> list[int]:
        return [_id(v) for k, v in self.timeline.get(process, ()) if k == "deliver"]

    def segments(self, process: Process) -> list[ViewSegment]:
        """The process's views in order, with what its client delivered in each."""
        out: list[ViewSegment] = []
        view, delivered = "", list[int]()
        member: set[str] = set()
        joined: frozenset[str] = frozenset()
        changed: set[str] = set()
        for kind, value in self.timeline.get(process, ()):
            if kind == "view":
                if view or delivered:
                    out.append(ViewSegment(view, tuple(delivered), joined, joined - changed))
                view, delivered = str(value), []
                joined, changed = frozenset(member), set()
            elif kind == "deliver":
                delivered.append(_id(value))
            elif kind == "member":
                group, inside = _change(value)
                changed.add(group)
                if inside:
                    member.add(group)
                else:
                    member.discard(group)
        if view or delivered:
            out.append(ViewSegment(view, tuple(delivered), joined, joined - changed))
        return out

    def member_at(self, process: Process) -> list[tuple[Entry, frozenset[str]]]:
        """Each entry of the process's timeline with the groups its client was in then."""
        member: set[str] = set()
        out: list[tuple[Entry, frozenset[str]]] = []
        for entry in self.timeline.get(process, ()):
            kind, value = entry
            if kind == "member":
                group, inside = _change(value)
                if inside:
                    member.add(group)
                else:
                    member.discard(group)
            out.append((entry, frozenset(member)))
        return out

    def causal_past(self, counts: Callable[[int], bool]) -> dict[int, frozenset[int]]:
        """Each sent message's causal past among those `counts` accepts: what its client
        had sent or got before sending it, transitively through the pasts of those."""
        past_of: dict[int, frozenset[int]] = {}
        pending = {
            p: deque((k, _id(v)) for k, v in line if k in ("send", "deliver") and counts(_id(v)))
            for p, line in self.timeline.items()
        }
        past: dict[Process, set[int]] = {p: set() for p in pending}
        progress = True
        while progress:  # a delivery needs its message's past known first
            progress = False
            for p, items in pending.items():
                while items:
                    kind, hid = items[0]
                    if kind == "send":
                        past_of[hid] = frozenset(past[p])
                        past[p].add(hid)
                    elif hid in past_of:
                        past[p] |= past_of[hid] | {hid}
                    else:
                        break  # its sender's timeline is not replayed that far yet
                    items.popleft()
                    progress = True
        return past_of

    # ------------------------------------------------------------------ observing

    def _observe(self, node_id: NodeId, effect: object, now: float) -> None:
        if isinstance(effect, ClientWrite | ClientClose):
            client = self._by_conn.get((node_id, effect.conn))
            if client is not None:
                self._take(client)
        elif isinstance(effect, DaemonEvent) and effect.name == "group_view":
            process = self.process(node_id)
            self.timeline.setdefault(process, []).append(("view", effect.fields["view_id"]))

    def _take(self, client: SimClient) -> None:
        """The frames the client decoded since the last time, into its timeline."""
        process = (client.node, client.incarnation)
        line = self.timeline.setdefault(process, [])
        start = self._taken.get(client.conn, 0)
        for frame in client.received[start:]:
            match frame:
                case Welcome(_, private):
                    self.names[process] = private
                case Message(_, _, _, _, payload):
                    line.append(("deliver", MESSAGE_ID.unpack_from(payload)[0]))
                case Membership(group, _, members, _, who):
                    own = self.names.get(process)
                    if own in who:
                        line.append(("member", (group, own in members)))
                case ErrorReport(_, _, request_id) if request_id in self.sent:
                    self.refused.add(request_id)
        self._taken[client.conn] = len(client.received)


def _id(value: object) -> int:
    assert isinstance(value, int)
    return value


def _change(value: object) -> tuple[str, bool]:
    assert isinstance(value, tuple)
    group, inside = value
    assert isinstance(group, str)
    return group, bool(inside)
