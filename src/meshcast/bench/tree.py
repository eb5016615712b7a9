"""`meshcast bench tree`: the maximum-throughput tree's quality, speed and churn behaviour.

* `quality`: on seeded random instances of 5-9 nodes (fully connected, heterogeneous
  capacities, see `meshcast.overlay.tree.random_instances`), each method's rate as a ratio
  to the exact optimum (MILP): mean, minimum and share of instances solved optimally.
  `triangular_only` is the construction with the patent's triangular moves alone. The
  MILP needs scipy (the `bench` extra); without it `quality` is null and
  `quality_skipped` says why, and the rest of the suite runs.
* `build_seconds`: wall time of `max_throughput_tree` for n = 1,000 (fully connected,
  ~10^6 edges) and n = 10,000 (each node measures 64 random peers, both directions),
  median over `--repeats` seeded instances (`build_seconds_max`: the slowest).
* `dynamic`: `--events` random joins and leaves on a universe of 300 nodes; after each
  event the kept rate as a ratio to a rebuild from scratch, and the members re-parented.
  `claims_only` repeats the run without the local rate-raising repair.
* `pacing`: in the simulator, over real overlay daemons (`meshcast.bench.pacing`): one
  source streams `--pacing-messages` reliable 1 KiB messages over its max-throughput
  tree to five daemons behind shared access links, with the source paced at the tree's
  rate (`paced`) and not (`unpaced`): slowest receiver's goodput, access-queue drops,
  link retransmissions, queue high-water mark, latency.
* `policies`: the same stream over the `max-throughput`, `shortest-path` and `fanout`
  trees, each paced and unpaced.
* `pacing_by_source`: with `--pacing-source all`, both of the above for every source.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from meshcast.bench import plot
from meshcast.bench.overlay import sites
from meshcast.bench.pacing import DEFAULT_MESSAGES, DEFAULT_SOURCE, measure_pacing
from meshcast.overlay.tree import (
    DynamicConfig,
    DynamicTree,
    InstanceModel,
    Tree,
    TreeInstance,
    dense_instance,
    max_throughput_tree,
    random_tree,
    shortest_path_tree,
    sparse_instance,
    star_tree,
    tree_violations,
    widest_path_tree,
)
from meshcast.overlay.tree.construct import SearchConfig
from meshcast.overlay.tree.improvement import TRIANGULAR

log = logging.getLogger(__name__)

QUALITY_SKIPPED = (
    "quality skipped: scipy is not installed; for the exact (MILP) ground truth "
    f"{plot.INSTALL_BENCH}"
)

QUALITY_SIZES = (5, 9)  # n drawn uniformly from this inclusive range
SCALE_DENSE_N = 1_000
SCALE_SPARSE_N = 10_000
SCALE_SPARSE_PEERS = 64
DYNAMIC_UNIVERSE = 300
DYNAMIC_INITIAL = 150
DYNAMIC_MIN_MEMBERS = 10
RATE_VS_N_SIZES = (10, 30, 100, 300, 1000)
OPTIMAL_TOLERANCE = 1e-9
RANDOM_SOURCE = InstanceModel()
# a server-like source: the top of the uplink range, so the tree, not the source, sets the rate
SERVER_SOURCE = InstanceModel(source_uplink=RANDOM_SOURCE.low * 10**RANDOM_SOURCE.decades)
QUICK_PACING_MESSAGES = 1_000

# the patent's construction alone: one growth per target, triangular moves only
PATENT_ONLY = SearchConfig(improvement=TRIANGULAR, warm_start_candidates=0, source_alternatives=0)
Method = Callable[[TreeInstance, np.random.Generator], Tree]
METHODS: dict[str, Method] = {
    "max_throughput": lambda instance, rng: max_throughput_tree(instance),
    "triangular_only": lambda instance, rng: max_throughput_tree(instance, PATENT_ONLY),
    "shortest_path": lambda instance, rng: shortest_path_tree(instance),
    "star": lambda instance, rng: star_tree(instance),
    "random": random_tree,
    "widest_path": lambda instance, rng: widest_path_tree(instance),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instances", type=int, default=500, help="small instances for quality")
    parser.add_argument("--events", type=int, default=1000, help="joins and leaves for dynamic")
    parser.add_argument("--repeats", type=int, default=3, help="seeded instances per scale size")
    parser.add_argument("--seed", type=int, default=0, help="base seed of every instance")
    parser.add_argument(
        "--quick", action="store_true", help="100 instances, 200 events, 1 repeat (smoke run)"
    )
    parser.add_argument(
        "--server-source",
        action="store_true",
        help="quality instances get a server-like source (always used for scale and dynamic)",
    )
    plot.add_plot_argument(parser, "quality, rate-vs-n, churn and pacing plots")
    parser.add_argument(
        "--pacing-messages",
        type=_messages,
        default=DEFAULT_MESSAGES,
        help=f"1 KiB messages per pacing run (default {DEFAULT_MESSAGES}; "
        f"{QUICK_PACING_MESSAGES} with --quick)",
    )
    parser.add_argument(
        "--pacing-source",
        default=DEFAULT_SOURCE,
        choices=[*(s.name for s in sites()), "all"],
        help=f"source site of the pacing runs (default {DEFAULT_SOURCE}); 'all' also "
        "measures every site as the source (pacing_by_source)",
    )


def _messages(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, got {value}")
    return value


def run(args: argparse.Namespace) -> dict[str, object]:
    instances, events, repeats = args.instances, args.events, args.repeats
    pacing_messages = args.pacing_messages
    if args.quick:
        instances, events, repeats = min(instances, 100), min(events, 200), 1
        pacing_messages = min(pacing_messages, QUICK_PACING_MESSAGES)
    quality_model = SERVER_SOURCE if args.server_source else RANDOM_SOURCE
    exact = _exact_solver()
    if exact is None:
        log.warning("%s", QUALITY_SKIPPED)
        quality, tight_share = None, None
    else:
        quality, tight_share = _quality(exact, instances, args.seed, quality_model)
    build, build_max = _build_seconds(repeats, args.seed)
    dynamic, trace = _dynamic(events, args.seed, DynamicConfig())
    claims_only, claims_trace = _dynamic(events, args.seed, DynamicConfig(raise_attempts=0))
    dynamic["claims_only"] = claims_only
    if args.plot is not None:
        _plot(args.plot, args.seed, trace, claims_trace)
        if quality is not None:
            plot.tree_quality(args.plot, quality)
    everywhere = args.pacing_source == "all"
    headline = DEFAULT_SOURCE if everywhere else args.pacing_source
    pacing = measure_pacing(headline, pacing_messages, plot=args.plot)
    result: dict[str, object] = {
        "quality": quality,
        **({} if exact is not None else {"quality_skipped": QUALITY_SKIPPED}),
        "build_seconds": build,
        "dynamic": dynamic,
        "pacing": {"paced": pacing["paced"], "unpaced": pacing["unpaced"]},
        "policies": pacing["policies"],
    }
    if everywhere:
        by_source: dict[str, object] = {}
        for site in sites():
            measured = (
                pacing if site.name == headline else measure_pacing(site.name, pacing_messages)
            )
            by_source[site.name] = {k: v for k, v in measured.items() if k != "setup"}
        result["pacing_by_source"] = by_source
    return result | {
        "setup": {
            "quality_instances": instances,
            "quality_n": list(QUALITY_SIZES),
            "quality_share_at_trivial_bound": tight_share,
            "quality_model": _describe(quality_model),
            "scale_and_dynamic_model": _describe(SERVER_SOURCE),
            "build_seconds_max": build_max,
            "sparse_peers": SCALE_SPARSE_PEERS,
            "dynamic_universe": DYNAMIC_UNIVERSE,
            "dynamic_events": events,
            "pacing": pacing["setup"],
        },
    }


def _describe(model: InstanceModel) -> dict[str, float | None]:
    return {
        "low": model.low,
        "decades": model.decades,
        "narrow_share": model.narrow_share,
        "narrow_factor": model.narrow_factor,
        "source_uplink": model.source_uplink,
    }


ExactSolver = Callable[[TreeInstance, Tree | None], Tree]  # instance, a known tree


def _exact_solver() -> ExactSolver | None:
    """The MILP solver, or None when scipy (not a dependency of a plain install) is missing."""
    try:
        from meshcast.overlay.tree.exact import exact_max_throughput_tree
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "scipy":
            raise
        return None
    return exact_max_throughput_tree


def _quality(
    exact: ExactSolver, count: int, seed: int, model: InstanceModel
) -> tuple[dict[str, dict[str, float]], float]:
    """Ratio of each method's rate to the exact optimum, over `count` seeded instances."""
    ratios: dict[str, list[float]] = {name: [] for name in METHODS}
    at_bound = 0
    for index in range(count):
        rng = np.random.default_rng([seed, 1, index])
        n = int(rng.integers(QUALITY_SIZES[0], QUALITY_SIZES[1] + 1))
        instance = dense_instance(n, rng, model)
        trees = {name: method(instance, rng) for name, method in METHODS.items()}
        for name, tree in trees.items():
            problems = tree_violations(instance, tree.parent)
            if problems:
                raise RuntimeError(f"{name} built an invalid tree on instance {index}: {problems}")
        optimum = exact(instance, trees["max_throughput"]).rate
        at_bound += optimum == _trivial_bound(instance)
        for name, tree in trees.items():
            ratios[name].append(tree.rate / optimum)
        if (index + 1) % 100 == 0:
            log.info("quality: %d/%d instances", index + 1, count)
    summary = {
        name: {
            "mean": statistics.fmean(values),
            "min": min(values),
            "share_optimal": sum(v >= 1 - OPTIMAL_TOLERANCE for v in values) / len(values),
        }
        for name, values in ratios.items()
    }
    return summary, at_bound / count


def _trivial_bound(instance: TreeInstance) -> float:
    """min(a_source, min over receivers of their widest in-edge): no tree can beat it."""
    matrix = instance.bandwidth_matrix()
    widest_in = np.delete(matrix.max(axis=0), instance.source)
    return float(min(instance.capacity[instance.source], widest_in.min()))


def _build_seconds(repeats: int, seed: int) -> tuple[dict[str, float], dict[str, float]]:
    timings: dict[str, list[float]] = {str(SCALE_DENSE_N): [], str(SCALE_SPARSE_N): []}
    max_throughput_tree(dense_instance(50, np.random.default_rng(0)))  # warm up lazy imports
    for repeat in range(repeats):
        rng = np.random.default_rng([seed, 2, repeat])
        cases = (
            (str(SCALE_DENSE_N), partial(dense_instance, SCALE_DENSE_N, rng, SERVER_SOURCE)),
            (
                str(SCALE_SPARSE_N),
                partial(sparse_instance, SCALE_SPARSE_N, SCALE_SPARSE_PEERS, rng, SERVER_SOURCE),
            ),
        )
        for key, make in cases:
            instance = make()
            started = time.perf_counter()
            tree = max_throughput_tree(instance)
            elapsed = time.perf_counter() - started
            timings[key].append(elapsed)
            log.info(
                "build n=%s edges=%d: %.3f s, rate %.4g",
                key,
                instance.edge_count,
                elapsed,
                tree.rate,
            )
    return (
        {key: statistics.median(values) for key, values in timings.items()},
        {key: max(values) for key, values in timings.items()},
    )


@dataclass(slots=True)
class _ChurnTrace:
    kept: list[float] = field(default_factory=list)
    fresh: list[float] = field(default_factory=list)
    members: list[int] = field(default_factory=list)
    rebuilds: list[int] = field(default_factory=list)  # event indices


def _dynamic(
    events: int, seed: int, config: DynamicConfig
) -> tuple[dict[str, object], _ChurnTrace]:
    """Random joins and leaves; after each, compare with a rebuild from scratch."""
    rng = np.random.default_rng([seed, 3])
    universe = dense_instance(DYNAMIC_UNIVERSE, rng, SERVER_SOURCE)
    others = np.arange(DYNAMIC_UNIVERSE) != universe.source
    initial = rng.choice(np.flatnonzero(others), DYNAMIC_INITIAL, replace=False)
    tree = DynamicTree(universe, initial.tolist(), config)
    trace = _ChurnTrace()
    reparented: list[int] = []
    for event in range(events):
        members = tree.members()
        outside = sorted(set(range(DYNAMIC_UNIVERSE)) - set(members))
        joining = len(members) <= DYNAMIC_MIN_MEMBERS or (bool(outside) and rng.random() < 0.5)
        if joining:
            change = tree.join(int(rng.choice(outside)))
        else:
            leavers = [m for m in members if m != universe.source]
            change = tree.leave(int(rng.choice(leavers)))
        members = tree.members()
        fresh = max_throughput_tree(universe.restrict(members)).rate
        trace.kept.append(change.rate)
        trace.fresh.append(fresh)
        trace.members.append(len(members))
        if change.rebuilt:
            trace.rebuilds.append(event)
        reparented.append(change.reparented)
        if (event + 1) % 200 == 0:
            log.info("dynamic (raise_attempts=%d): %d/%d", config.raise_attempts, event + 1, events)
    ratios = [kept / fresh for kept, fresh in zip(trace.kept, trace.fresh, strict=True)]
    result: dict[str, object] = {
        "mean_rate_ratio": statistics.fmean(ratios),
        "mean_reparented": statistics.fmean(reparented),
        "min_rate_ratio": min(ratios),
        "max_reparented": max(reparented),
        "rebuilds": len(trace.rebuilds),
    }
    return result, trace


def _plot(directory: Path, seed: int, trace: _ChurnTrace, claims_trace: _ChurnTrace) -> None:
    plt = plot.pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    medians: dict[str, list[float]] = {name: [] for name in METHODS}
    for n in RATE_VS_N_SIZES:
        rates: dict[str, list[float]] = {name: [] for name in METHODS}
        for repeat in range(5):
            rng = np.random.default_rng([seed, 4, n, repeat])
            instance = dense_instance(n, rng, SERVER_SOURCE)
            for name, method in METHODS.items():
                rates[name].append(method(instance, rng).rate)
        for name in METHODS:
            medians[name].append(statistics.median(rates[name]))
        log.info("plot: rate vs n, n=%d done", n)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, values in medians.items():
        axes.plot(RATE_VS_N_SIZES, values, marker="o", label=name)
    axes.set(xscale="log", yscale="log", xlabel="nodes n (fully connected, server-like source)")
    axes.set(ylabel="tree rate, capacity units (median of 5)", title="Tree rate vs group size")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small", loc="lower left")
    figure.tight_layout()
    figure.savefig(directory / "tree_rate_vs_n.png", dpi=120)
    plt.close(figure)

    figure, (rate_axes, ratio_axes) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    steps = range(1, len(trace.kept) + 1)
    rate_axes.plot(steps, trace.fresh, label="rebuild from scratch", linewidth=1.5, color="grey")
    rate_axes.plot(steps, trace.kept, label="kept (default)", linewidth=0.8)
    rate_axes.plot(steps, claims_trace.kept, label="kept (claims only)", linewidth=0.8)
    rate_axes.set(
        ylabel="tree rate, capacity units", title="Rate under churn (random joins and leaves)"
    )
    rate_axes.legend(fontsize="small")
    for name, run in (("default", trace), ("claims only", claims_trace)):
        ratio = [kept / fresh for kept, fresh in zip(run.kept, run.fresh, strict=True)]
        ratio_axes.plot(steps, ratio, label=name, linewidth=0.8)
    for event in claims_trace.rebuilds:
        ratio_axes.axvline(event + 1, color="grey", alpha=0.4, linewidth=0.8)
    ratio_axes.set(xlabel="event (grey: a rebuild, claims only)", ylabel="kept / rebuilt rate")
    ratio_axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(directory / "tree_churn.png", dpi=120)
    plt.close(figure)
    log.info("plots saved in %s", directory)
