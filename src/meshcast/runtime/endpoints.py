"""Where one daemon of a cluster file lives: the address it binds, where its clients
connect, what its incarnation is, and the impairment of its emulated links."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from meshcast.config import ClusterConfig, DaemonSpec, Emulation
from meshcast.group.access import AccessPolicy
from meshcast.ids import NodeId
from meshcast.runtime.gso import SegmentingSender
from meshcast.runtime.impair import ImpairedSender, Impairment
from meshcast.runtime.sessions import check_client_access, socket_group_id
from meshcast.runtime.stats import ImpairmentStats
from meshcast.runtime.udp import Address
from meshcast.wire.packet import U32_MAX

INCARNATION_EPOCH = 1_704_067_200  # 2024-01-01T00:00:00Z: incarnations count from here
LOOPBACK = "127.0.0.1"  # what a configured "localhost" binds to and sends from


@dataclass(frozen=True, slots=True)
class ClientListen:
    """Where a daemon accepts client sessions (docs/design/daemon.md, "Client sessions")."""

    # the Unix socket: None = the default path (`default_socket_path`), "" = no Unix socket
    unix_path: str | None = None
    tcp_port: int | None = None  # None: no TCP; 0: an ephemeral port (logged)
    tcp_host: str = LOOPBACK


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


def daemon_address(spec: DaemonSpec) -> Address:
    """The numeric (host, port) a daemon binds and sends from."""
    host = LOOPBACK if spec.host == "localhost" else spec.host
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


class Neighbours:
    """The configured neighbours' addresses: a datagram in is mapped to the neighbour it
    came from; one out goes to its neighbour's address, through that link's impairment
    shim when the link is emulated (``emulate`` in the cluster file)."""

    def __init__(self, config: ClusterConfig, name: str) -> None:
        local = config.daemon(name).node_id
        self._local = local
        self._addresses: dict[NodeId, Address] = {}
        self._by_address: dict[Address, NodeId] = {}
        self.emulations: dict[NodeId, Emulation] = {}
        for spec, link in config.neighbours(name):
            peer = NodeId(spec.node_id)
            address = daemon_address(spec)
            self._addresses[peer] = address
            self._by_address[address] = peer
            if link.emulation is not None:
                self.emulations[peer] = link.emulation
        self._senders: dict[NodeId, Callable[[bytes, Address], None]] = {}
        self._impaired: dict[NodeId, ImpairedSender] = {}
        self._segmenting: SegmentingSender | None = None

    @property
    def peers(self) -> list[NodeId]:
        return sorted(self._addresses)

    def attach(
        self,
        send: Callable[[bytes, Address], None],
        segmenting: SegmentingSender | None = None,
    ) -> None:
        """Send through `send` (the bound socket's sendto) from now on; runs of datagrams
        to a link that is not emulated through `segmenting` (UDP GSO) when given."""
        self._segmenting = segmenting
        for peer in self._addresses:
            emulation = self.emulations.get(peer)
            if emulation is None:
                self._senders[peer] = send
            else:
                shim = ImpairedSender(impairment_for(emulation, self._local, peer), send)
                self._impaired[peer] = shim
                self._senders[peer] = shim

    def peer_of(self, address: tuple[str | int, ...]) -> NodeId | None:
        return self._by_address.get((str(address[0]), int(address[1])))

    def send(self, peer: NodeId, datagram: bytes) -> bool:
        """Hand `datagram` to `peer`'s address; False if `peer` is no neighbour."""
        send = self._senders.get(peer)
        if send is None:
            return False
        send(datagram, self._addresses[peer])
        return True

    def send_all(self, peer: NodeId, datagrams: list[bytes]) -> bool:
        """Hand `datagrams` to `peer`'s address in this order, runs of equal size in one
        system call where UDP GSO works; False if `peer` is no neighbour."""
        send = self._senders.get(peer)
        if send is None:
            return False
        address = self._addresses[peer]
        segmenting = self._segmenting
        if segmenting is not None and peer not in self._impaired:
            segmenting.send(datagrams, address)
        else:
            for datagram in datagrams:
                send(datagram, address)
        return True

    @property
    def udp_gso(self) -> bool:
        """Whether runs of datagrams go out with UDP GSO (the kernel offers it, not off)."""
        return self._segmenting is not None and self._segmenting.enabled

    @property
    def gso_sends(self) -> int:
        """System calls that sent a run of two or more datagrams with UDP GSO."""
        return 0 if self._segmenting is None else self._segmenting.gso_sends

    @property
    def gso_datagrams(self) -> int:
        """The datagrams those system calls carried."""
        return 0 if self._segmenting is None else self._segmenting.gso_datagrams

    def impairment(self) -> dict[NodeId, ImpairmentStats]:
        return {peer: shim.statistics() for peer, shim in self._impaired.items()}

    def close(self) -> None:
        """Drop what the impairment shims still hold back."""
        for shim in self._impaired.values():
            shim.close()
