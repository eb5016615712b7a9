"""`meshcast bench replicate`: bulk replication against the lower bound of issue 12.

Every figure is a ratio: the time the last recipient's copy was complete and verified,
over `meshcast.replicate.bound.lower_bound` (max(F/u_s, N·F/(u_s + Σu_i), F/min d_i)) for
the same file and capacities. 1.0 is the best any plan can do.

* `sim`: the simulator of capped uplinks (`meshcast.sim.replication.ReplicationSim`):
  real `Replicator` engines, every chunk hashed and verified, every node's upload a FIFO
  at its capacity, no download cap, 0.5 ms one-way latency.
  - `fastreplica`, `fanout`, `alm_tree`: N = 8, 64, 512 recipients, every node (origin
    too) uploading 100 Mbit/s; ALM-FastReplica with the default plan (k + 1 connections,
    a chain of groups), the origin sending the whole file to everyone, and the whole file
    down a binary tree.
  - `heterogeneous`: 64 recipients with uploads drawn (seeded) from 10/25/50/100 Mbit/s,
    the origin at 100; the same instance planned as the patent does (`patent`) and
    capacity-aware; worst over the seeds (`details` has each seed and the mean).
  - `variants`: FastReplica at N = 64 with each connection variant (K, K1, K2) and
    primary tree (chain, balanced).
  - `details`: raw seconds of each run (bound, last and mean completion), events and CPU
    seconds of the simulation; `params`: sizes and rates; `targets`: pass/fail.
* `real`: daemon processes on separate hosts (network namespaces, each host's upload
  capped by `tc tbf`; `meshcast.bench.replicate_real`): the origin and 8 recipients, a
  128 MiB file, at 100 and 400 Mbit/s, FastReplica and the naive fanout in the same run;
  the ratio to the bound at the tbf rate, every copy's digest checked, and the daemons' CPU
  seconds (user + system) per GB received. Not root: the same over loopback with each
  daemon's upload shaped by meshcast's own rate cap (`mode` says which).
* `memory`: one 4 GiB file replicated over loopback to 2 daemons; every daemon's RSS
  before, at its peak during, and after the run.
* `failure`: on the testbed of `real` (loopback fallback likewise), FastReplica from H0 to
  8 recipients at 100 Mbit/s with a buddy daemon (H9, holding the same file: the same
  source path on the shared filesystem); pairs of runs, one without failure then one with
  a recipient SIGKILLed at 30 % of the bytes; `slowdown` is the median time until every
  survivor's copy is complete with the failure over the median without, `digests_equal`
  that every survivor's copy is the source (`meshcast.bench.replicate_real.run_failure`).
* `failure_sim`: ≥ 1,000 seeded simulator runs of random size (8-64 recipients, small
  files), each with 1-3 nodes crashed at random moments (the origin's buddy among the
  candidates), against the same seed without failures (`meshcast.bench.replicate_failure`).

`--suite sim|real|memory|failure|failure_sim|all` picks the parts (default: all).
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshcast.bench import plot
from meshcast.replicate.bound import lower_bound
from meshcast.replicate.engine import ReplicationRequest
from meshcast.replicate.plan import Strategy, Tree, Variant
from meshcast.sim.replication import ReplicationSim

log = logging.getLogger(__name__)

MIB = 1 << 20
KIB = 1 << 10
UPLOAD = 100e6  # bits/s of every node, origin too (homogeneous runs)
LATENCY = 0.0005  # s, one way, between any two nodes
CHUNK = 64 * KIB
NS = (8, 64, 512)
# File sizes (MiB) per N. A chain of N/k groups delays the last group by ~N/k chunk times,
# so the file must be many more chunks than N/k for the ratio to show the steady rate; the
# simulation costs ~60-90 µs of CPU per chunk received (N x chunks).
FASTREPLICA_MIB = {8: 64, 64: 64, 512: 80}
# The baselines' ratios do not depend on the file size to first order (fanout: N copies
# through one uplink; the tree: half an uplink per child), so N = 512 uses smaller files.
FANOUT_MIB = {8: 64, 64: 64, 512: 8}
ALM_TREE_MIB = {8: 64, 64: 64, 512: 16}
QUICK_MIB = {8: 2, 64: 2, 512: 1}
HETERO_N = 64
HETERO_MIB = 32
HETERO_MIX = (10e6, 25e6, 50e6, 100e6)  # bits/s, each recipient's upload drawn from these
HETERO_SEEDS = (1, 2, 3)
VARIANT_N = 64
TARGET_FASTREPLICA = 1.10
TARGET_CAPACITY_AWARE = 1.25
PLOT_N = 64  # the run whose per-recipient progress is plotted
TARGET_REAL = {"100mbit": 1.15, "400mbit": 1.30}
REAL_RATES = {"100mbit": 100e6, "400mbit": 400e6}
REAL_MIB, REAL_QUICK_MIB = 128, 8
MEMORY_GIB = 4
FAILURE_MIB, FAILURE_QUICK_MIB = 128, 24
FAILURE_PAIRS, FAILURE_QUICK_PAIRS = 5, 1  # (no failure, failure) pairs of runs
FAILURE_RECIPIENTS, FAILURE_QUICK_RECIPIENTS = 8, 3
FAILURE_KILL_AT = 0.3  # of all the recipients' bytes
TARGET_FAILURE_SLOWDOWN = 1.3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny files and one heterogeneous seed (a smoke run of a few seconds; the "
        "ratios then include the start-up of the pipeline and are higher)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the simulator's engines")
    parser.add_argument(
        "--suite",
        choices=("sim", "real", "memory", "failure", "failure_sim", "all"),
        default="all",
        help="which parts to run (default: all; real and memory start daemon processes)",
    )
    plot.add_plot_argument(parser, "per-recipient progress and ratio plots")


@dataclass(frozen=True, slots=True)
class _Run:
    """One simulated replication, measured."""

    bound: float  # s
    last: float  # s: the last recipient's copy verified
    mean: float  # s: mean over the recipients
    events: int
    cpu: float  # s of CPU for the simulation (not the set-up)
    progress: tuple[tuple[tuple[float, int], ...], ...]  # per recipient, if recorded

    @property
    def ratio(self) -> float:
        return self.last / self.bound

    def details(self, **extra: object) -> dict[str, object]:
        return {
            "ratio": round(self.ratio, 4),
            "bound_s": round(self.bound, 4),
            "last_s": round(self.last, 4),
            "mean_s": round(self.mean, 4),
            "events": self.events,
            "cpu_s": round(self.cpu, 2),
            **extra,
        }


def simulate(
    uploads: Sequence[float],
    size: int,
    chunk: int = CHUNK,
    *,
    strategy: Strategy = Strategy.FASTREPLICA,
    variant: Variant = Variant.K1,
    tree: Tree = Tree.CHAIN,
    capacity_aware: bool = False,
    seed: int = 1,
    record_progress: bool = False,
) -> _Run:
    """Replicate a `size`-byte file from node 0 (upload `uploads[0]`, bits/s) to the
    others in the simulator; raises RuntimeError unless every copy completed."""
    sim = ReplicationSim(uploads, latency=LATENCY, seed=seed, record_progress=record_progress)
    sim.add_file("bench.bin", size, chunk)
    request = ReplicationRequest(
        "bench.bin",
        tuple(sim.ids[1:]),
        strategy=strategy,
        variant=variant,
        tree=tree,
        capacity_aware=capacity_aware,
    )
    started = time.process_time()
    outcome = sim.run_replication(request)
    cpu = time.process_time() - started
    report = outcome.report
    if report is None or report.state != "complete" or len(outcome.completed) != len(sim.ids) - 1:
        state = report.state if report else "no report"
        raise RuntimeError(f"simulated replication did not complete: {state}")
    times = [at - outcome.started for at in outcome.completed.values()]
    return _Run(
        bound=lower_bound(size, uploads[0], uploads[1:]),
        last=outcome.last,
        mean=statistics.fmean(times),
        events=outcome.events,
        cpu=cpu,
        progress=tuple(tuple(store.progress) for store in sim.stores[1:]),
    )


def hetero_uploads(seed: int, n: int = HETERO_N) -> list[float]:
    """The origin at 100 Mbit/s, then `n` recipients' uploads drawn from HETERO_MIX."""
    rng = random.Random(seed)
    return [UPLOAD, *(rng.choice(HETERO_MIX) for _ in range(n))]


def measure_sim(quick: bool, seed: int, plot_dir: Path | None) -> dict[str, Any]:
    def mib(table: Mapping[int, int], n: int) -> int:
        return QUICK_MIB[n] if quick else table[n]

    details: dict[str, Any] = {}
    result: dict[str, Any] = {}
    for name, strategy, table in (
        ("fastreplica", Strategy.FASTREPLICA, FASTREPLICA_MIB),
        ("fanout", Strategy.FANOUT, FANOUT_MIB),
        ("alm_tree", Strategy.ALM_TREE, ALM_TREE_MIB),
    ):
        result[name], details[name] = {}, {}
        for n in NS:
            record = plot_dir is not None and name == "fastreplica" and n == PLOT_N
            run = simulate(
                [UPLOAD] * (n + 1),
                mib(table, n) * MIB,
                strategy=strategy,
                seed=seed,
                record_progress=record,
            )
            log.info("%s N=%d: ratio %.3f (%.1f s CPU)", name, n, run.ratio, run.cpu)
            result[name][str(n)] = round(run.ratio, 4)
            details[name][str(n)] = run.details(file_mib=mib(table, n))
            if record and plot_dir is not None:
                progress_plot(plot_dir, run, n, mib(table, n))

    seeds = HETERO_SEEDS[:1] if quick else HETERO_SEEDS
    hetero_mib = QUICK_MIB[HETERO_N] if quick else HETERO_MIB
    per_seed: dict[str, dict[str, Any]] = {"patent": {}, "capacity_aware": {}}
    for s in seeds:
        uploads = hetero_uploads(s)
        for name, aware in (("patent", False), ("capacity_aware", True)):
            run = simulate(uploads, hetero_mib * MIB, capacity_aware=aware, seed=seed)
            log.info("heterogeneous seed %d %s: ratio %.3f", s, name, run.ratio)
            per_seed[name][str(s)] = run.details()
    result["heterogeneous"] = {
        name: max(d["ratio"] for d in runs.values()) for name, runs in per_seed.items()
    }
    details["heterogeneous"] = {
        name: {
            "worst": max(d["ratio"] for d in runs.values()),
            "mean": round(statistics.fmean(d["ratio"] for d in runs.values()), 4),
            "seeds": runs,
        }
        for name, runs in per_seed.items()
    }

    result["variants"], details["variants"] = {}, {}
    size = mib(FASTREPLICA_MIB, VARIANT_N)
    for variant in Variant:
        for tree in Tree:
            key = f"{variant.name}_{tree.value}"
            if variant is Variant.K1 and tree is Tree.CHAIN:  # the default plan: measured above
                entry = details["fastreplica"][str(VARIANT_N)]
            else:
                run = simulate(
                    [UPLOAD] * (VARIANT_N + 1), size * MIB, variant=variant, tree=tree, seed=seed
                )
                log.info("variant %s: ratio %.3f", key, run.ratio)
                entry = run.details(file_mib=size)
            result["variants"][key] = entry["ratio"]
            details["variants"][key] = entry

    result["params"] = {
        "upload_mbit": UPLOAD / 1e6,
        "origin_upload_mbit": UPLOAD / 1e6,
        "download_cap": None,
        "latency_ms": LATENCY * 1e3,
        "chunk_kib": CHUNK // KIB,
        "fastreplica_file_mib": {str(n): mib(FASTREPLICA_MIB, n) for n in NS},
        "fanout_file_mib": {str(n): mib(FANOUT_MIB, n) for n in NS},
        "alm_tree_file_mib": {str(n): mib(ALM_TREE_MIB, n) for n in NS},
        "baselines_note": "fanout and alm_tree at N=512 use smaller files: their ratios "
        "do not depend on the size to first order",
        "plan": "max_connections 9, variant K1 (k = 8), chain of groups",
        "heterogeneous": {
            "recipients": HETERO_N,
            "upload_mix_mbit": [u / 1e6 for u in HETERO_MIX],
            "origin_upload_mbit": UPLOAD / 1e6,
            "seeds": list(seeds),
            "file_mib": hetero_mib,
            "figure": "worst over the seeds (details: each seed and the mean)",
        },
        "variants_n": VARIANT_N,
        "seed": seed,
        "quick": quick,
    }
    result["details"] = details
    fastreplica = result["fastreplica"].values()
    result["targets"] = {
        "fastreplica_le_1.10": all(r <= TARGET_FASTREPLICA for r in fastreplica),
        "capacity_aware_le_1.25": result["heterogeneous"]["capacity_aware"]
        <= TARGET_CAPACITY_AWARE,
    }
    if plot_dir is not None:
        ratio_plot(plot_dir, result)
    return result


def measure_real(quick: bool) -> dict[str, Any]:
    """Daemon processes on separate hosts: network namespaces with `tc tbf` (root), else
    loopback with meshcast's own rate cap."""
    from meshcast.bench import netns
    from meshcast.bench.replicate_real import run_real

    usable, reason = netns.available()
    size = (REAL_QUICK_MIB if quick else REAL_MIB) * MIB
    recipients = 3 if quick else 8
    result: dict[str, Any] = {
        "mode": "netns" if usable else f"loopback, shaped by meshcast ({reason})",
        "params": {"recipients": recipients, "file_mib": size // MIB},
    }
    details: dict[str, Any] = {}
    cpu: dict[str, float] = {}
    passed: dict[str, bool] = {}
    for label, rate in REAL_RATES.items():
        runs = run_real(rate, recipients=recipients, size=size, shaped=not usable)
        result[label] = {name: round(r.ratio, 4) for name, r in runs.items()}
        details[label] = {
            name: {
                "seconds": round(r.seconds, 3),
                "bound": round(r.bound, 3),
                "cpu_seconds": round(r.cpu_seconds, 2),
                "digests_equal": r.digests_equal,
                "state": r.state,
            }
            for name, r in runs.items()
        }
        cpu[label] = round(runs["fastreplica"].cpu_seconds_per_gb, 2)
        ok = all(r.digests_equal and r.state == "complete" for r in runs.values())
        passed[f"fastreplica_{label}_le_{TARGET_REAL[label]}"] = (
            ok and runs["fastreplica"].ratio <= TARGET_REAL[label]
        )
    result["cpu_s_per_gb"] = cpu
    result["details"] = details
    result["targets"] = passed
    return result


def measure_memory(quick: bool) -> dict[str, Any]:
    from meshcast.bench.replicate_real import run_memory

    size = (64 * MIB) if quick else MEMORY_GIB << 30
    m = run_memory(size)
    return {
        "file_bytes": m.file_bytes,
        "seconds": round(m.seconds, 2),
        "digests_equal": m.digests_equal,
        "rss_mib": {
            name: {
                "before": round(m.rss_before_mib[name], 1),
                "peak": round(m.rss_peak_mib[name], 1),
                "after": round(m.rss_after_mib[name], 1),
            }
            for name in m.rss_peak_mib
        },
    }


def measure_failure(quick: bool) -> dict[str, Any]:
    """One recipient SIGKILLed at 30 % of the bytes against the same run without."""
    from meshcast.bench import netns
    from meshcast.bench.replicate_real import failure_summary, run_failure

    usable, reason = netns.available()
    recipients = FAILURE_QUICK_RECIPIENTS if quick else FAILURE_RECIPIENTS
    size = (FAILURE_QUICK_MIB if quick else FAILURE_MIB) * MIB
    runs = run_failure(
        UPLOAD,
        recipients=recipients,
        size=size,
        pairs=FAILURE_QUICK_PAIRS if quick else FAILURE_PAIRS,
        kill_at=FAILURE_KILL_AT,
        shaped=not usable,
    )
    result = failure_summary(runs)
    buddy = f"H{recipients + 1}"
    result["mode"] = "netns" if usable else f"loopback, shaped by meshcast ({reason})"
    result["params"] = {
        "strategy": "fastreplica",
        "recipients": recipients,
        "file_mib": size // MIB,
        "upload_mbit": UPLOAD / 1e6,
        "kill_at_fraction": FAILURE_KILL_AT,
        "victims": "H1, H2, ... in turn, one per pair; restarted empty after its run",
        "buddy": buddy,
        "buddy_holds": "the same source path (one filesystem for every host)",
        "slowdown": "median survivors' completion with the failure / median without "
        "(runs interleaved: no failure, failure, ...)",
        "quick": quick,
    }
    slowdown = result["slowdown"]
    result["targets"] = {
        f"slowdown_le_{TARGET_FAILURE_SLOWDOWN}": slowdown is not None
        and slowdown <= TARGET_FAILURE_SLOWDOWN,
        "digests_equal": result["digests_equal"],
    }
    return result


def run(args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {}
    suite = getattr(args, "suite", "all")
    if suite in ("sim", "all"):
        wall, cpu = time.monotonic(), time.process_time()
        sim = measure_sim(args.quick, args.seed, args.plot)
        sim["params"]["wall_s"] = round(time.monotonic() - wall, 1)
        sim["params"]["cpu_s"] = round(time.process_time() - cpu, 1)
        out["sim"] = sim
    if suite in ("real", "all"):
        out["real"] = measure_real(args.quick)
    if suite in ("memory", "all"):
        out["memory"] = measure_memory(args.quick)
    if suite in ("failure", "all"):
        out["failure"] = measure_failure(args.quick)
    if suite in ("failure_sim", "all"):
        from meshcast.bench.replicate_failure import measure_failure_sim

        out["failure_sim"] = measure_failure_sim(args.quick, args.seed)
    return out


# ---------------------------------------------------------------------- plots


def progress_plot(directory: Path, run: _Run, n: int, size_mib: int) -> None:
    """`replicate_progress.png`: every recipient's bytes held over time in one run, and
    each recipient's completion time against the bound."""
    plt = plot.pyplot()
    figure, (left, right) = plt.subplots(
        1, 2, figsize=(10, 4.5), gridspec_kw={"width_ratios": [3, 2]}
    )
    for progress in run.progress:
        if not progress:
            continue
        step = max(1, len(progress) // 200)  # a few hundred points per line are plenty
        points = [(0.0, 0), *progress[::step], progress[-1]]
        left.plot(
            [at for at, _ in points],
            [held / MIB for _, held in points],
            linewidth=0.6,
            alpha=0.6,
            drawstyle="steps-post",
        )
    left.axvline(run.bound, color="black", linestyle="--", linewidth=1, label="lower bound")
    left.set(xlabel="time (s)", ylabel="MiB held", ylim=(0, None), xlim=(0, None))
    left.set_title("every recipient's bytes held", fontsize="small")
    left.grid(True, alpha=0.3)
    left.legend(fontsize="small", loc="lower right")
    done = sorted(progress[-1][0] / run.bound for progress in run.progress if progress)
    right.plot(done, [(i + 1) / len(done) for i in range(len(done))], drawstyle="steps-post")
    right.axvline(1.0, color="black", linestyle="--", linewidth=1, label="lower bound")
    right.set(xlabel="completion time / lower bound", ylabel="share of recipients done")
    right.set_title("completions", fontsize="small")
    right.grid(True, alpha=0.3)
    right.legend(fontsize="small", loc="upper left")
    figure.suptitle(
        f"FastReplica, {n} recipients, {size_mib} MiB, 100 Mbit/s uplinks (simulator): "
        f"last at {run.ratio:.3f} x the bound",
        fontsize="medium",
    )
    _save(plt, figure, directory, "replicate_progress.png")


def ratio_plot(directory: Path, sim: Mapping[str, Any]) -> None:
    """`replicate_ratios.png`: each strategy's ratio to the bound per N (log scale), and
    the heterogeneous runs."""
    plt = plot.pyplot()
    figure, (left, right) = plt.subplots(
        1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 1]}
    )
    ns = list(sim["fastreplica"])
    for name in ("fastreplica", "alm_tree", "fanout"):
        left.plot([int(n) for n in ns], [sim[name][n] for n in ns], marker="o", label=name)
    left.axhline(TARGET_FASTREPLICA, color="grey", linestyle=":", label="target 1.10")
    left.set(
        xscale="log",
        yscale="log",
        xlabel="recipients N",
        ylabel="last completion / lower bound",
        title="Equal 100 Mbit/s uplinks",
    )
    left.set_xticks([int(n) for n in ns], ns)
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize="small")
    hetero = sim["heterogeneous"]
    bars = right.bar(list(hetero), list(hetero.values()), color=["tab:gray", "tab:blue"])
    right.bar_label(bars, fmt="%.3f", fontsize="small")
    right.axhline(TARGET_CAPACITY_AWARE, color="grey", linestyle=":", label="target 1.25")
    top = max(*hetero.values(), TARGET_CAPACITY_AWARE) * 1.35  # room for the legend
    right.set(title=f"Heterogeneous, N={HETERO_N}\n(worst seed)", ylim=(0, top))
    right.legend(fontsize="small", loc="upper right")
    right.tick_params(axis="x", labelsize="small")
    _save(plt, figure, directory, "replicate_ratios.png")


def _save(plt: Any, figure: Any, directory: Path, name: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(directory / name, dpi=plot.DPI)
    plt.close(figure)
    log.info("plot saved: %s", directory / name)


__all__ = [
    "add_arguments",
    "hetero_uploads",
    "measure_failure",
    "measure_real",
    "measure_sim",
    "run",
    "simulate",
]
