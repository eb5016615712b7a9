"""Source pacing in the simulator (seed 000, claim 1): a source held at its tree's
bottleneck rate against one that sends as fast as its window allows.

The network is `meshcast.bench.overlay`'s: the Spread paper's six sites, a full mesh of
overlay links, and every daemon behind its own *access link*, one emulated upload pipe
(drop-tail queue) that all its overlay links share. That shared upload is what makes
pacing matter. Each Hop link paces itself at its own configured bandwidth, so a single
link never overruns its path; but a daemon forwarding to d children runs d such links at
once, and their rates add up at the upload. Only the source's rate, if it is at most the
tree's bottleneck rate, keeps every upload within its capacity (the tree rate accounts
for each upload shared by its fan-out: `a_u / d_u`).

`measure_pacing` streams `messages` reliable 1 KiB messages from one source to all five
other daemons over the `max-throughput` tree, once with source pacing (the default,
`OverlayConfig.rate_share` of the tree's rate) and once without (`source_pacing=False`,
a baseline only), then over the `shortest-path` and `fanout` trees, paced. Per run:

* `goodput_mbps`: the slowest receiver's (messages - 1) x 1 KiB / (last - first delivery),
  payload bits only, as `meshcast bench overlay` measures it;
* `drops`: datagrams refused by a full access queue, summed over the six uploads
  (`pipe_stats(...).dropped_queue`; the wide-area pipes have no rate limit);
* `retransmissions`: Hop retransmissions, summed over every link of every daemon;
* `max_queue_kib`: the fullest any access queue got;
* `latency_ms`: from the moment the source sent a message (not the moment it was queued
  at the source) to its delivery, mean and maximum over all receivers and messages: the
  backlog the network holds;
* `link_failures`: links declared down during the run (heartbeats and NACKs lost in a
  full queue). A failed Hop link takes the messages it had not delivered with it: the
  overlay does no end-to-end repair;
* `delivered_share`: the share of the stream the worst-served receiver got. A run ends
  when every receiver has everything, or when deliveries stop for `STALL_INTERVAL`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from meshcast.bench.overlay import (
    ACCESS_BASE,
    ACCESS_QUEUE_BYTES,
    CONFIGURED_SHARE,
    MESSAGE_SIZE,
    SETTLE_TIME,
    Counters,
    Site,
    SiteDaemon,
    build,
    sites,
)
from meshcast.bench.plot import pyplot
from meshcast.ids import NodeId
from meshcast.overlay.node import NeighbourChanged, OverlayDelivered
from meshcast.sim.simulator import Simulator

DEFAULT_SOURCE = "CNDS"  # the best-connected site: a server-like source
DEFAULT_MESSAGES = 2_000
DEFAULT_SEED = 1
POLICIES = ("max-throughput", "shortest-path", "fanout")
HORIZON = 600.0  # s of virtual time a run may take at most
STALL_INTERVAL = 30.0  # s of virtual time without a delivery: the rest is lost


@dataclass(frozen=True, slots=True)
class StreamResult:
    """What one stream from one source did (see the module docstring)."""

    policy: str
    paced: bool
    tree_rate_mbps: float  # the bottleneck rate of the source's tree, as routing computes it
    goodput_mbps: float  # slowest receiver, payload only
    drops: int
    retransmissions: int
    max_queue_kib: float
    latency_ms_mean: float
    latency_ms_max: float
    link_failures: int
    delivered_share: float  # of the stream, at the receiver that got the least
    duration_s: float  # virtual time from the first send to the last delivery

    def summary(self) -> dict[str, float | int]:
        """The result as JSON numbers (rounded), without the labels."""
        values = asdict(self)
        del values["policy"], values["paced"]
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in values.items()}


@dataclass(slots=True)
class _Recorder:
    """Delivery times per receiver and message, the source's own send times, failures."""

    source: NodeId
    sent_at: dict[int, float] = field(default_factory=dict)  # seq -> when the source sent it
    delivered_at: dict[NodeId, dict[int, float]] = field(default_factory=dict)
    link_failures: int = 0

    def __call__(self, node: NodeId, effect: object, now: float) -> None:
        if isinstance(effect, OverlayDelivered):
            if node == self.source:
                # the source delivers to itself the moment its pacer lets the message go
                self.sent_at[effect.seq] = now
            else:
                self.delivered_at.setdefault(node, {})[effect.seq] = now
        elif isinstance(effect, NeighbourChanged) and not effect.up:
            self.link_failures += 1


def site_named(name: str) -> Site:
    """The site called `name`. Raises ValueError naming the known sites."""
    for site in sites():
        if site.name == name:
            return site
    raise ValueError(f"unknown site {name!r}; sites are {', '.join(s.name for s in sites())}")


def run_stream(
    source: Site, policy: str, *, paced: bool, messages: int, seed: int = DEFAULT_SEED
) -> StreamResult:
    """Stream `messages` 1 KiB messages from `source` to every site over `policy`'s tree.

    Raises RuntimeError if the views do not form.
    """
    return _stream(source, policy, paced=paced, messages=messages, seed=seed)[0]


def _stream(
    source: Site, policy: str, *, paced: bool, messages: int, seed: int
) -> tuple[StreamResult, _Recorder]:
    sim = build(
        policy,
        seed,
        source.node,
        Counters(),
        CONFIGURED_SHARE,
        max_outbox_messages=messages,
        source_pacing=paced,
    )
    recorder = _Recorder(source.node)
    sim.observe(recorder)
    sim.run(until=SETTLE_TIME)
    daemon = sim.node_as(source.node, SiteDaemon).inner
    for site in sites():
        view = sim.node_as(site.node, SiteDaemon).inner.view
        if view is None or len(view.members) != len(sites()):
            raise RuntimeError(f"{site.name} has no full view after {SETTLE_TIME} s")
    tree = daemon.routing.tree(source.node)
    assert tree is not None
    recorder.link_failures = 0
    dests = [site.node for site in sites()]

    def send_all(node: SiteDaemon, now: float) -> list[object]:
        effects: list[object] = []
        for i in range(messages):
            payload = i.to_bytes(4, "big") + bytes(MESSAGE_SIZE - 4)
            effects.extend(node.multicast(dests, payload, now))
        return effects

    sim.act(source.node, send_all)
    _run_until_quiet(sim, recorder, messages)
    return _result(sim, recorder, policy, paced, tree.rate_bps, messages), recorder


def _run_until_quiet(sim: Simulator, recorder: _Recorder, messages: int) -> None:
    """Run until every receiver has every message, or deliveries stop."""
    receivers = [site.node for site in sites() if site.node != recorder.source]
    horizon = sim.now + HORIZON
    progress, progress_at = -1, sim.now
    while sim.now < horizon and sim.now - progress_at < STALL_INTERVAL:
        counts = [len(recorder.delivered_at.get(node, ())) for node in receivers]
        if min(counts) >= messages:
            return
        if sum(counts) > progress:
            progress, progress_at = sum(counts), sim.now
        sim.run(until=sim.now + 1.0)


def _result(
    sim: Simulator,
    recorder: _Recorder,
    policy: str,
    paced: bool,
    tree_rate_bps: float,
    messages: int,
) -> StreamResult:
    goodput = math.inf
    latencies: list[float] = []
    last = 0.0
    receivers = [site.node for site in sites() if site.node != recorder.source]
    for node in receivers:
        times = recorder.delivered_at.get(node, {})
        if len(times) < 2:
            goodput = 0.0
            continue
        first, final = min(times.values()), max(times.values())
        goodput = min(goodput, (len(times) - 1) * MESSAGE_SIZE * 8 / max(final - first, 1e-9))
        latencies.extend(at - recorder.sent_at[seq] for seq, at in times.items())
        last = max(last, final)
    access = [sim.pipe_stats(s.node, NodeId(ACCESS_BASE + s.node)) for s in sites()]
    retransmissions = sum(
        link.statistics().retransmissions
        for s in sites()
        for link in sim.node_as(s.node, SiteDaemon).inner.endpoint
    )
    return StreamResult(
        policy=policy,
        paced=paced,
        tree_rate_mbps=tree_rate_bps / 1e6,
        goodput_mbps=goodput / 1e6,
        drops=sum(stats.dropped_queue for stats in access),
        retransmissions=retransmissions,
        max_queue_kib=max(stats.max_queue_bytes for stats in access) / 1024,
        latency_ms_mean=statistics.fmean(latencies) * 1e3 if latencies else math.nan,
        latency_ms_max=max(latencies, default=math.nan) * 1e3,
        link_failures=recorder.link_failures,
        delivered_share=min(len(recorder.delivered_at.get(n, ())) for n in receivers) / messages,
        duration_s=last - min(recorder.sent_at.values(), default=last),
    )


def measure_pacing(
    source: str = DEFAULT_SOURCE,
    messages: int = DEFAULT_MESSAGES,
    seed: int = DEFAULT_SEED,
    policies: Sequence[str] = POLICIES,
    plot: Path | None = None,
) -> dict[str, object]:
    """Paced against unpaced over the max-throughput tree, and the policies compared.

    Returns ``{"paced": {...}, "unpaced": {...}, "policies": {policy: {"paced": {...},
    "unpaced": {...}}}, "setup": {...}}``, where "paced" and "unpaced" are the
    max-throughput runs and each innermost dict is a `StreamResult.summary()`. With
    `plot`, saves `tree_pacing.png` there (deliveries and latency over time, paced or not).
    Raises ValueError for an unknown source, RuntimeError if the views do not form.
    """
    site = site_named(source)
    recorded = {
        (policy, paced): _stream(site, policy, paced=paced, messages=messages, seed=seed)
        for policy in dict.fromkeys(("max-throughput", *policies))
        for paced in (True, False)
    }
    runs = {key: result for key, (result, _) in recorded.items()}
    if plot is not None:
        _plot(plot, site, {key: recorder for key, (_, recorder) in recorded.items()})
    return {
        "paced": runs["max-throughput", True].summary(),
        "unpaced": runs["max-throughput", False].summary(),
        "policies": {
            policy: {
                "paced": runs[policy, True].summary(),
                "unpaced": runs[policy, False].summary(),
            }
            for policy in policies
        },
        "setup": {
            "source": site.name,
            "sites": {s.name: s.upload_bps / 1e6 for s in sites()},
            "configured_share_of_upload": CONFIGURED_SHARE,
            "access_queue_kib": ACCESS_QUEUE_BYTES // 1024,
            "messages": messages,
            "message_bytes": MESSAGE_SIZE,
            "seed": seed,
            "overlay": "full mesh; link bandwidth = the slower end's configured upload",
            "shortest_path_weights": "the Spread paper's shared tree (bench overlay)",
        },
    }


def _plot(directory: Path, source: Site, runs: dict[tuple[str, bool], _Recorder]) -> None:
    """Top: messages the worst-served receiver has, over time. Bottom: how long each
    message took, from the moment the source sent it until every receiver had it."""
    plt = pyplot()

    directory.mkdir(parents=True, exist_ok=True)
    figure, (count_axes, latency_axes) = plt.subplots(2, 1, figsize=(8, 7))
    for (policy, paced), recorder in runs.items():
        if policy != "max-throughput" and not paced:
            continue
        label = f"{policy}, {'paced' if paced else 'unpaced'}"
        style = "-" if policy == "max-throughput" else ":"
        start = min(recorder.sent_at.values())
        # the receiver with the fewest messages, and of those the one that got them last
        worst = min(recorder.delivered_at.values(), key=lambda t: (len(t), -max(t.values())))
        arrivals = sorted(worst.values())
        count_axes.plot(
            [t - start for t in arrivals], range(1, len(arrivals) + 1), style, label=label
        )
        if policy == "max-throughput":
            everywhere = [
                seq
                for seq in sorted(recorder.sent_at)
                if all(seq in times for times in recorder.delivered_at.values())
            ]
            latency_axes.plot(
                everywhere,
                [
                    max(times[seq] for times in recorder.delivered_at.values())
                    - recorder.sent_at[seq]
                    for seq in everywhere
                ],
                label=label,
            )
    count_axes.set(xlabel="time since the first send (s)", ylabel="messages at the slowest")
    count_axes.set_title(f"{source.name} streams 1 KiB messages to five sites")
    count_axes.legend(fontsize="small")
    count_axes.grid(True, alpha=0.3)
    latency_axes.set(xlabel="message (max-throughput tree)")
    latency_axes.set(ylabel="from sent to delivered everywhere (s)")
    latency_axes.legend(fontsize="small")
    latency_axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(directory / "tree_pacing.png", dpi=120)
    plt.close(figure)
