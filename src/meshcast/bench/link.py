"""`meshcast bench link`: the Spread paper's link experiments, Hop and TCP side by side.

All but `real` run in the deterministic simulator, so the figures do not depend on how busy
this machine is; `real` pushes messages between two processes over loopback.

* `link_loss_throughput_pct`: one 10 Mbit/s, 50 ms link carrying 10,000 reliable 1024-byte
  messages with uniform loss added in each direction, as % of the same protocol's
  loss-free throughput (the paper's Table 3).
* `tree_loss_throughput_pct`: the same through a 6-site tree of 5 links, throughput of
  the slowest receiver (Table 4). Inner sites forward each message as it is handed up.
* `chain_latency_overhead_pct`: mean one-way latency of a 1 KB message over a 5-link
  chain, relative to "ping" (Figures 3-6).
"""

from __future__ import annotations

import argparse
import logging
import statistics
from collections.abc import Sequence
from functools import partial

from meshcast.bench import plot
from meshcast.ids import NodeId
from meshcast.link import Delivered, LinkConfig, LinkFailed
from meshcast.sim.scenarios import SOURCE, RelayNode, Topology, build
from meshcast.wire import UDP_IP_OVERHEAD

log = logging.getLogger(__name__)

MESSAGE_SIZE = 1024
LOSS_LEVELS = (0.0, 0.05, 0.10, 0.20)
LINK_RATE_BPS = 10e6  # also the Hop pacer's rate: the link is configured at its capacity
LINK_DELAY = 0.050
# The paper's six sites as a shared tree: Mae East feeds two regional hubs.
TREE_EDGES = ((1, 2, 0.010), (1, 3, 0.030), (2, 4, 0.005), (2, 5, 0.015), (3, 6, 0.020))
# A chain of five links with wide-area one-way delays (coast to coast, then regional, LAN).
CHAIN_DELAYS = (0.035, 0.025, 0.012, 0.005, 0.001)
SETTLE_TIME = 1.0  # s of virtual time for handshakes before the measurement starts


def _check_no_failure(node: NodeId, effect: object, now: float) -> None:
    if isinstance(effect, LinkFailed):
        raise RuntimeError(f"link failed at node {node} at t={now:.3f}: {effect.reason}")


def bulk_throughput_mbps(
    topology: Topology, protocol: str, seed: int, messages: int, config: LinkConfig
) -> float:
    """Goodput (Mbit/s) of the slowest receiver for `messages` sent back to back by the source (node 1)."""
    sim = build(topology, protocol, seed, config)
    receivers = [NodeId(n) for n in topology.nodes if n != SOURCE]
    counts = dict.fromkeys(receivers, 0)
    finished_at: dict[NodeId, float] = {}

    def observe(node: NodeId, effect: object, now: float) -> None:
        _check_no_failure(node, effect, now)
        if isinstance(effect, Delivered) and node in counts:
            counts[node] += 1
            if counts[node] == messages:
                finished_at[node] = now

    sim.observe(observe)
    sim.run(until=SETTLE_TIME)
    started = sim.now

    def send_all(relay: RelayNode, now: float) -> list[object]:
        effects: list[object] = []
        for i in range(messages):
            payload = i.to_bytes(4, "big") + bytes(MESSAGE_SIZE - 4)
            effects.extend(relay.originate(payload, now, flush=False))
        return effects

    sim.act(SOURCE, send_all)
    # TCP at 20 % loss moves a few hundred kbit/s: allow for it, the cost is in events.
    horizon = started + 500 * messages * MESSAGE_SIZE * 8 / topology.bandwidth_bps + 60
    while len(finished_at) < len(receivers) and sim.now < horizon:
        sim.run(until=sim.now + 1.0)
    if len(finished_at) < len(receivers):
        raise RuntimeError(f"{protocol}: only {counts} of {messages} delivered by t={sim.now:.1f}")
    elapsed = max(finished_at.values()) - started
    return messages * MESSAGE_SIZE * 8 / elapsed / 1e6


def loss_table(
    edges: Sequence[tuple[int, int, float]], messages: int, seeds: int, protocols: Sequence[str]
) -> dict[str, dict[str, float]]:
    """{protocol: {loss %: throughput as % of the protocol's loss-free run}}."""
    # 15 silent rounds, as Linux's tcp_retries2: at 20 % loss each way TCP's back-off
    # would otherwise give up on a segment that is merely unlucky.
    config = LinkConfig(rate_bps=LINK_RATE_BPS, failure_rounds=15)
    table: dict[str, dict[str, float]] = {}
    for protocol in protocols:
        mbps: dict[float, float] = {}
        for loss in LOSS_LEVELS:
            runs = [
                bulk_throughput_mbps(Topology(edges, loss), protocol, seed, messages, config)
                for seed in range(1, seeds + 1)
            ]
            mbps[loss] = statistics.fmean(runs)
            log.info(
                "%s loss=%.0f%%: %.3f Mbit/s (runs %s)",
                protocol,
                loss * 100,
                mbps[loss],
                ", ".join(f"{r:.3f}" for r in runs),
            )
        table[protocol] = {
            f"{loss * 100:.0f}": round(100 * mbps[loss] / mbps[0.0], 1) for loss in LOSS_LEVELS
        }
        table[protocol]["mbit_per_s_loss_free"] = round(mbps[0.0], 3)
    return table


def _originate(payload: bytes, relay: RelayNode, now: float) -> list[object]:
    return relay.originate(payload, now)


def chain_latency_overhead(
    protocol: str, loss: float, seed: int, messages: int
) -> tuple[float, float]:
    """(mean one-way latency, ping) in seconds over the 5-link chain."""
    edges = [(i, i + 1, delay) for i, delay in enumerate(CHAIN_DELAYS, start=1)]
    topology = Topology(edges, loss)
    # Latency, not throughput: the pacer never holds a lone message back.
    sim = build(topology, protocol, seed, LinkConfig(rate_bps=LINK_RATE_BPS))
    last = NodeId(len(CHAIN_DELAYS) + 1)
    sent_at: dict[int, float] = {}
    latencies: list[float] = []

    def observe(node: NodeId, effect: object, now: float) -> None:
        _check_no_failure(node, effect, now)
        if isinstance(effect, Delivered) and node == last:
            i = int.from_bytes(effect.payload[:4], "big")
            latencies.append(now - sent_at[i])

    sim.observe(observe)
    sim.run(until=SETTLE_TIME)
    gap = 0.25  # s between messages: each one crosses an idle chain
    for i in range(messages):
        sim.run(until=SETTLE_TIME + i * gap)
        sent_at[i] = sim.now
        payload = i.to_bytes(4, "big") + bytes(MESSAGE_SIZE - 4)
        sim.act(SOURCE, partial(_originate, payload))
    sim.run(until=sim.now + 30)
    if len(latencies) != messages:
        raise RuntimeError(f"{protocol}: {len(latencies)} of {messages} latency probes arrived")
    serialisation = (MESSAGE_SIZE + UDP_IP_OVERHEAD) * 8 / LINK_RATE_BPS
    ping = sum(delay + serialisation for delay in CHAIN_DELAYS)
    return statistics.fmean(latencies), ping


def latency_table(
    messages: int, seeds: int, protocols: Sequence[str]
) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for protocol in protocols:
        row: dict[str, float] = {}
        for loss in (0.0, 0.05):
            runs = [
                chain_latency_overhead(protocol, loss, seed, messages)
                for seed in range(1, seeds + 1)
            ]
            mean = statistics.fmean(r[0] for r in runs)
            ping = runs[0][1]
            row[f"{loss * 100:.0f}"] = round(100 * (mean / ping - 1), 1)
            log.info(
                "%s chain loss=%.0f%%: mean %.2f ms vs ping %.2f ms",
                protocol,
                loss * 100,
                mean * 1e3,
                ping * 1e3,
            )
        table[protocol] = row
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--messages",
        type=int,
        default=10_000,
        help="messages per throughput run (default: 10,000 as in the paper)",
    )
    parser.add_argument(
        "--seeds", type=int, default=3, help="seeded runs averaged per figure (default: 3)"
    )
    parser.add_argument(
        "--latency-messages",
        type=int,
        default=200,
        help="latency probes per chain run (default: 200)",
    )
    parser.add_argument(
        "--real-messages",
        type=int,
        default=200_000,
        help="messages for the real loopback run (default: 200,000)",
    )
    parser.add_argument(
        "--skip-real", action="store_true", help="leave out the real-socket measurement"
    )
    plot.add_plot_argument(parser, "throughput-under-loss and chain-latency plots")


def run(args: argparse.Namespace) -> dict[str, object]:
    protocols = ("hop", "tcp")
    link_edges = [(1, 2, LINK_DELAY)]
    result: dict[str, object] = {
        "link_loss_throughput_pct": loss_table(link_edges, args.messages, args.seeds, protocols),
        "tree_loss_throughput_pct": loss_table(TREE_EDGES, args.messages, args.seeds, protocols),
        "chain_latency_overhead_pct": latency_table(args.latency_messages, args.seeds, protocols),
    }
    if not args.skip_real:
        from meshcast.bench.link_real import measure_real

        # Plain and sealed runs alternate, twice each, and each keeps its faster run: the
        # two figures are measured side by side under the same load.
        runs: dict[str, list[dict[str, float]]] = {"real": [], "real_secure": []}
        for _ in range(2):
            runs["real"].append(measure_real(messages=args.real_messages))
            runs["real_secure"].append(measure_real(messages=args.real_messages, secure=True))
        plain, sealed = (max(r, key=lambda x: x["msgs_per_s"]) for r in runs.values())
        result["real"] = plain
        result["real_secure"] = sealed
        result["secure_cost_pct"] = round(100 * (1 - sealed["msgs_per_s"] / plain["msgs_per_s"]), 1)
        result["secure_cpu_cost_pct"] = round(
            100 * (sealed["cpu_s_per_mb"] / plain["cpu_s_per_mb"] - 1), 1
        )
    result["setup"] = {
        "link": f"{LINK_RATE_BPS / 1e6:g} Mbit/s, {LINK_DELAY * 1e3:g} ms one way, "
        f"loss added in each direction, {MESSAGE_SIZE}-byte messages",
        "tree_edges": [list(edge) for edge in TREE_EDGES],
        "chain_delays_ms": [d * 1e3 for d in CHAIN_DELAYS],
        "messages": args.messages,
        "seeds": args.seeds,
    }
    if args.plot is not None:
        plot.link(args.plot, result)
    return result
