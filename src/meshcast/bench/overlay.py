"""`meshcast bench overlay`: the Spread paper's Table 1 (fanout vs tree) in the simulator.

Six sites, one daemon each, named as in the paper, with a full mesh of overlay links and
heterogeneous access (upload) bandwidth: CNDS is well connected, Rutgers and UCSB are
constrained. Every site's upload is a real shared bottleneck in the simulation: each daemon
sends through an *access hop* (a relay node behind one emulated pipe at the site's upload
rate) that then fans packets out over the wide-area pipes, so a source with five direct
links shares its upload five ways, as on the Internet. Docs: docs/design/overlay-tests.md.

* `table1`: for each source site, the goodput (Mbit/s) of the slowest of the five receivers
  for a stream of reliable 1 KiB messages, over `fanout` trees (the source sends straight
  to everyone) and `tree` (`shortest-path` over link weights that make the paper's shared
  tree, Figure 1: Mae East is the hub, Hopkins hangs off CNDS).
* `packets_per_delivery`: data-carrying datagrams put on the wide-area wire (first
  transmissions of Hop DATA packets carrying overlay DATA, on every link; ACKs, heartbeats,
  LSAs and feedback not counted) per message delivered at a remote site, each site
  multicasting in turn to all six over the shared tree, with one copy per destination
  (`unicast`) and with multi-destination packets split per next hop (`multidest`).
  `packets_per_delivery_with_retransmissions` counts Hop retransmissions too.
* `source_sends_per_message`: the DATA packets the source itself sends per message, same
  runs: 5 copies with unicast, one per next hop with multi-destination packets.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

from meshcast import wire
from meshcast.argtypes import integer
from meshcast.bench import plot
from meshcast.errors import DecodeError
from meshcast.ids import NodeId
from meshcast.link import LinkConfig, Transmit
from meshcast.overlay.node import Neighbour, OverlayConfig, OverlayDelivered, OverlayNode
from meshcast.sim.network import LinkModel
from meshcast.sim.simulator import Simulator
from meshcast.wire.overlay import KIND_DATA

log = logging.getLogger(__name__)

MESSAGE_SIZE = 1024
SETTLE_TIME = 3.0  # s of virtual time for links and views before a run starts
PACKET_GAP = 0.05  # s between messages in the packets-per-delivery runs

# id, name, upload capacity (bit/s). CNDS sits on a fat campus uplink; Rutgers and UCSB
# are constrained; Mae East is a backbone site whose upload is shared by the tree's hub.
SITES: tuple[tuple[int, str, float], ...] = (
    (1, "Mae East", 2.3e6),
    (2, "CNDS", 4.5e6),
    (3, "Hopkins", 2.0e6),
    (4, "Rutgers", 1.0e6),
    (5, "OSU", 2.0e6),
    (6, "UCSB", 1.7e6),
)
PAPER_SOURCES = ("Mae East", "CNDS", "Rutgers", "UCSB")

# One-way wide-area delays (s): east-coast sites a few ms apart, UCSB ~50 ms away (the
# paper's Table 2 measures 104 ms round trip Mae East-UCSB).
DELAYS: dict[tuple[int, int], float] = {
    (1, 2): 0.003,
    (1, 3): 0.003,
    (1, 4): 0.005,
    (1, 5): 0.009,
    (1, 6): 0.050,
    (2, 3): 0.0005,
    (2, 4): 0.006,
    (2, 5): 0.011,
    (2, 6): 0.052,
    (3, 4): 0.006,
    (3, 5): 0.011,
    (3, 6): 0.052,
    (4, 5): 0.012,
    (4, 6): 0.055,
    (5, 6): 0.040,
}
# The paper's shared tree (Figure 1), made the shortest-path tree from every site by the
# link weights, as Spread's operators did: tree links weigh 1, every other link 10.
TREE_LINKS = frozenset({(1, 2), (1, 4), (1, 5), (1, 6), (2, 3)})
TREE_WEIGHT, OTHER_WEIGHT = 1.0, 10.0

ACCESS_BASE = 100  # site i's access relay is node 100 + i
ACCESS_QUEUE_BYTES = 1024 * 1024  # drop-tail buffer in front of each upload
# Daemons are configured with this share of their site's physical upload: Hop has no
# congestion control, so configured rates must leave room for headers and control traffic.
CONFIGURED_SHARE = 0.9
TAG = struct.Struct("!I")  # the access relay's routing tag: the wide-area destination


@dataclass(frozen=True, slots=True)
class Site:
    node: NodeId
    name: str
    upload_bps: float


def sites() -> list[Site]:
    return [Site(NodeId(i), name, up) for i, name, up in SITES]


def _pair(a: int, b: int) -> tuple[int, int]:
    return (min(a, b), max(a, b))


def data_packet_id(datagram: bytes) -> tuple[int, int] | None:
    """(Hop epoch, sequence number) of a datagram carrying (the start of) an overlay DATA
    message; None for every other datagram."""
    try:
        header = wire.decode_header(datagram)
        if header.ptype is not wire.PacketType.DATA:
            return None
        _, fragments = wire.decode_data(datagram, header)
    except DecodeError:
        return None
    for fragment in fragments:
        first = fragment if isinstance(fragment, bytes) else fragment.data
        if (isinstance(fragment, bytes) or fragment.offset == 0) and first[:1] == bytes(
            (KIND_DATA,)
        ):
            return (header.epoch, header.seq)
    return None


@dataclass(slots=True)
class Counters:
    data_packets: int = 0  # datagrams carrying overlay DATA on any link, retransmissions too
    first_sends: set[tuple[NodeId, NodeId, int, int]] = field(default_factory=set)
    source_packets: int = 0  # first sends by the source
    deliveries: int = 0  # OverlayDelivered at sites other than the source
    delivered_at: dict[NodeId, list[float]] = field(default_factory=dict)

    def reset_packets(self) -> None:
        self.data_packets = self.source_packets = 0
        self.first_sends.clear()


class SiteDaemon:
    """A `SimNode`: one overlay daemon whose every datagram leaves through its access relay."""

    def __init__(self, inner: OverlayNode, counters: Counters, source: NodeId) -> None:
        self.inner = inner
        self._counters = counters
        self._source = source
        self._relay = NodeId(ACCESS_BASE + inner.local)

    def _out(self, effects: Sequence[object]) -> list[object]:
        out: list[object] = []
        for effect in effects:
            if isinstance(effect, Transmit):
                packet = data_packet_id(effect.datagram)
                if packet is not None:
                    counters = self._counters
                    counters.data_packets += 1
                    key = (self.inner.local, effect.to, *packet)
                    if key not in counters.first_sends:
                        counters.first_sends.add(key)
                        counters.source_packets += self.inner.local == self._source
                out.append(Transmit(self._relay, TAG.pack(effect.to) + effect.datagram))
            else:
                out.append(effect)
        return out

    def start(self, now: float) -> list[object]:
        return self._out(self.inner.start(now))

    def datagram_received(self, src: NodeId, datagram: bytes, now: float) -> list[object]:
        origin = NodeId(src - ACCESS_BASE)  # it came through the sender's access relay
        return self._out(self.inner.datagram_received(origin, datagram, now))

    def on_timer(self, now: float) -> list[object]:
        return self._out(self.inner.on_timer(now))

    def next_deadline(self) -> float | None:
        return self.inner.next_deadline()

    def multicast(self, dests: Sequence[NodeId], payload: bytes, now: float) -> list[object]:
        return self._out(self.inner.multicast(dests, payload, now))


class AccessRelay:
    """A `SimNode` behind a site's upload pipe: forwards each datagram to its destination."""

    def datagram_received(self, src: NodeId, datagram: bytes, now: float) -> list[object]:
        (to,) = TAG.unpack_from(datagram)
        return [Transmit(NodeId(to), datagram[TAG.size :])]

    def on_timer(self, now: float) -> list[object]:
        return []

    def next_deadline(self) -> float | None:
        return None


def build(
    policy: str,
    seed: int,
    source: NodeId,
    counters: Counters,
    share: float = CONFIGURED_SHARE,
    **options: object,
) -> Simulator:
    """Six sites with access relays; daemons are configured with `share` of their upload;
    `options` go to every daemon's `OverlayConfig`."""
    all_sites = sites()
    upload = {s.node: s.upload_bps * share for s in all_sites}
    sim = Simulator(seed=seed)

    def factory(node_id: NodeId, now: float, rng: random.Random) -> SiteDaemon:
        neighbours = {
            s.node: Neighbour(
                TREE_WEIGHT if _pair(node_id, s.node) in TREE_LINKS else OTHER_WEIGHT,
                # A link can carry at most what the slower end can upload.
                min(upload[node_id], upload[s.node]),
            )
            for s in all_sites
            if s.node != node_id
        }
        config = OverlayConfig(
            neighbours=neighbours,
            upload_bps=upload,
            link=LinkConfig(),
            policy=policy,
            **options,  # type: ignore[arg-type]
        )
        node = OverlayNode(node_id, config, incarnation=sim.incarnation(node_id) + 1, rng=rng)
        return SiteDaemon(node, counters, source)

    for s in all_sites:
        sim.add_node(s.node, factory, start=lambda node, now: node.start(now))
        sim.add_node(NodeId(ACCESS_BASE + s.node), lambda _id, _now, _rng: AccessRelay())
    for s in all_sites:
        relay = NodeId(ACCESS_BASE + s.node)
        sim.add_pipe(
            s.node,
            relay,
            LinkModel(bandwidth_bps=s.upload_bps, queue_bytes=ACCESS_QUEUE_BYTES),
        )
        for other in all_sites:
            if other.node != s.node:
                delay = DELAYS[_pair(s.node, other.node)]
                sim.add_pipe(relay, other.node, LinkModel(delay=delay))

    def observe(node: NodeId, effect: object, now: float) -> None:
        if isinstance(effect, OverlayDelivered) and node != source:
            counters.deliveries += 1
            counters.delivered_at.setdefault(node, []).append(now)

    sim.observe(observe)
    return sim


def _settle(sim: Simulator) -> None:
    sim.run(until=SETTLE_TIME)
    for s in sites():
        view = sim.node_as(s.node, SiteDaemon).inner.view
        if view is None or len(view.members) != len(SITES):
            raise RuntimeError(f"site {s.name} has no full view after {SETTLE_TIME} s")


def _send_all(sim: Simulator, source: NodeId, messages: int) -> None:
    dests = [s.node for s in sites()]

    def send(daemon: SiteDaemon, now: float) -> list[object]:
        effects: list[object] = []
        for i in range(messages):
            payload = i.to_bytes(4, "big") + bytes(MESSAGE_SIZE - 4)
            effects.extend(daemon.multicast(dests, payload, now))
        return effects

    sim.act(source, send)


def _run_until_delivered(sim: Simulator, counters: Counters, messages: int, label: str) -> None:
    receivers = len(SITES) - 1
    horizon = sim.now + 600.0
    while counters.deliveries < receivers * messages and sim.now < horizon:
        sim.run(until=sim.now + 1.0)
    if counters.deliveries < receivers * messages:
        got = {n: len(t) for n, t in counters.delivered_at.items()}
        raise RuntimeError(f"{label}: only {got} of {messages} delivered by t={sim.now:.0f}")


def slowest_receiver_mbps(
    source: Site, policy: str, seed: int, messages: int, share: float = CONFIGURED_SHARE
) -> float:
    """Goodput (Mbit/s) of the slowest receiver: messages x 1 KiB over first-to-last delivery."""
    counters = Counters()
    sim = build(policy, seed, source.node, counters, share, max_outbox_messages=messages)
    _settle(sim)
    tree = sim.node_as(source.node, SiteDaemon).inner.routing.tree(source.node)
    _send_all(sim, source.node, messages)
    _run_until_delivered(sim, counters, messages, f"{source.name}/{policy}")
    rates = {}
    for node, times in counters.delivered_at.items():
        if times[-1] <= times[0]:
            raise RuntimeError(f"{source.name}/{policy}: no time elapsed at {node}")
        rates[node] = (len(times) - 1) * MESSAGE_SIZE * 8 / (times[-1] - times[0])
    slowest = min(rates.values())
    log.info(
        "%s %s: tree rate %.3f Mbit/s, slowest receiver %.3f Mbit/s (fastest %.3f)",
        source.name,
        policy,
        (tree.rate_bps if tree is not None else math.inf) / 1e6,
        slowest / 1e6,
        max(rates.values()) / 1e6,
    )
    return slowest / 1e6


def packets_per_delivery(seed: int, messages: int, multi_destination: bool) -> dict[str, float]:
    """Each site in turn multicasts `messages` to all six over the shared tree, one every
    PACKET_GAP (so no queue builds up and the count shows the forwarding structure)."""
    first = total = source = deliveries = 0
    dests = [s.node for s in sites()]
    for site in sites():
        counters = Counters()
        sim = build("shortest-path", seed, site.node, counters, multi_destination=multi_destination)
        _settle(sim)
        counters.reset_packets()
        for i in range(messages):
            payload = i.to_bytes(4, "big") + bytes(MESSAGE_SIZE - 4)
            sim.call_at(
                sim.now + i * PACKET_GAP,
                partial(sim.act, site.node, partial(_multicast, dests, payload)),
            )
        _run_until_delivered(sim, counters, messages, f"{site.name} packets")
        first += len(counters.first_sends)
        total += counters.data_packets
        source += counters.source_packets
        deliveries += counters.deliveries
    return {
        "packets_per_delivery": first / deliveries,
        "with_retransmissions": total / deliveries,
        "source_sends_per_message": source / (messages * len(SITES)),
    }


def _multicast(
    dests: Sequence[NodeId], payload: bytes, daemon: SiteDaemon, now: float
) -> list[object]:
    return daemon.multicast(dests, payload, now)


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--messages",
        type=integer(10),
        default=2_000,
        help="1 KiB messages per throughput run (the paper used 10,000; default 2,000)",
    )
    parser.add_argument(
        "--packet-messages",
        type=integer(1),
        default=200,
        help="messages per source for the packets-per-delivery runs (default 200)",
    )
    parser.add_argument("--seed", type=int, default=1, help="simulator seed (default 1)")
    parser.add_argument(
        "--share",
        type=_share,
        default=CONFIGURED_SHARE,
        help="share of each site's physical upload its daemon is configured with "
        f"(default {CONFIGURED_SHARE}; at 1.0 headers and ACKs overrun the uploads and "
        "their queues fill)",
    )
    parser.add_argument(
        "--paper-sources-only",
        action="store_true",
        help="measure only the paper's four sources (Mae East, CNDS, Rutgers, UCSB)",
    )
    plot.add_plot_argument(parser, "fanout-vs-tree and packets-per-delivery plots")


def table1(
    seed: int, messages: int, names: Sequence[str], share: float = CONFIGURED_SHARE
) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for site in sites():
        if site.name in names:
            table[site.name] = {
                key: round(slowest_receiver_mbps(site, policy, seed, messages, share), 3)
                for key, policy in (("fanout", "fanout"), ("tree", "shortest-path"))
            }
    return table


def setup(args: argparse.Namespace) -> dict[str, object]:
    names = {s.node: s.name for s in sites()}
    return {
        "sites": {s.name: {"upload_mbit_per_s": s.upload_bps / 1e6} for s in sites()},
        "one_way_delay_ms": {
            f"{names[NodeId(a)]}-{names[NodeId(b)]}": d * 1e3 for (a, b), d in DELAYS.items()
        },
        "overlay": "full mesh of Hop links; link bandwidth = the slower end's configured upload",
        "configured_share_of_upload": args.share,
        "tree_links": sorted(f"{names[NodeId(a)]}-{names[NodeId(b)]}" for a, b in TREE_LINKS),
        "weights": f"tree links {TREE_WEIGHT:g}, other links {OTHER_WEIGHT:g}",
        "access": (
            "each daemon sends through its own upload pipe (drop-tail "
            f"{ACCESS_QUEUE_BYTES // 1024} KiB) shared by all its links; downloads unlimited"
        ),
        "message_bytes": MESSAGE_SIZE,
        "messages": args.messages,
        "packet_messages": args.packet_messages,
        "seed": args.seed,
        "throughput": "slowest of 5 receivers: (N-1) x 1 KiB / (last - first delivery)",
        "packets_counted": (
            "datagrams carrying overlay DATA on every wide-area link, first transmissions "
            "(Hop retransmissions in packets_per_delivery_with_retransmissions), per "
            f"delivery at a remote site; every site sources in turn, one message per "
            f"{PACKET_GAP * 1e3:g} ms"
        ),
    }


def run(args: argparse.Namespace) -> dict[str, object]:
    names = PAPER_SOURCES if args.paper_sources_only else tuple(s.name for s in sites())
    unicast = packets_per_delivery(args.seed, args.packet_messages, multi_destination=False)
    multidest = packets_per_delivery(args.seed, args.packet_messages, multi_destination=True)
    result: dict[str, object] = {
        "table1": table1(args.seed, args.messages, names, args.share),
        "packets_per_delivery": {
            "unicast": round(unicast["packets_per_delivery"], 3),
            "multidest": round(multidest["packets_per_delivery"], 3),
        },
        "source_sends_per_message": {
            "unicast": round(unicast["source_sends_per_message"], 3),
            "multidest": round(multidest["source_sends_per_message"], 3),
        },
        "packets_per_delivery_with_retransmissions": {
            "unicast": round(unicast["with_retransmissions"], 3),
            "multidest": round(multidest["with_retransmissions"], 3),
        },
        "setup": setup(args),
    }
    if args.plot is not None:
        plot.overlay(args.plot, result)
    return result
