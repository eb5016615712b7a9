"""`meshcast bench SUITE --plot DIR`: PNG figures of each suite's main results.

matplotlib (Agg backend, no display needed) comes with the `bench` extra, not with a plain
install; `--plot` checks for it while the command line is parsed, so a missing extra is a
one-line usage error (exit 2) before minutes of measuring, never a traceback at the end.
The figures are drawn from the suite's JSON result (the tree suite also plots traces that
are not in its JSON: `meshcast.bench.tree`, `meshcast.bench.pacing`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

INSTALL_BENCH = "pip install 'meshcast[bench]' (from a clone: pip install '.[bench]')"
DPI = 120


class _PlotDirectory(argparse.Action):
    """Stores DIR as a Path once matplotlib is importable and DIR exists (made if need be)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        try:
            import matplotlib  # noqa: F401 - only checks that it is installed
        except ImportError:
            parser.exit(
                2,
                f"{parser.prog}: error: {option_string} needs matplotlib, "
                f"which is not installed: {INSTALL_BENCH}\n",
            )
        directory = Path(str(values))
        try:  # now rather than after the run: a typo must not cost the measurement
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            parser.exit(
                2, f"{parser.prog}: error: {option_string}: cannot use {directory}: {exc}\n"
            )
        setattr(namespace, self.dest, directory)


def add_plot_argument(parser: argparse.ArgumentParser, figures: str) -> None:
    """`--plot DIR`, saving `figures` (a description for --help) as PNG files in DIR."""
    parser.add_argument(
        "--plot",
        action=_PlotDirectory,
        metavar="DIR",
        default=None,
        help=f"save {figures} as PNG files in DIR (needs matplotlib: the bench extra)",
    )


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, figure: Any, directory: Path, name: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(directory / name, dpi=DPI)
    plt.close(figure)
    log.info("plot saved: %s", directory / name)


def _bars(
    axes: Any, groups: Sequence[str], series: Mapping[str, Sequence[float]], fmt: str = "%.3g"
) -> None:
    """Grouped bars: one group per label in `groups`, one bar per series, values on top."""
    width = 0.8 / max(len(series), 1)
    for index, (label, values) in enumerate(series.items()):
        offsets = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = axes.bar(offsets, values, width, label=label)
        axes.bar_label(bars, fmt=fmt, fontsize="x-small", padding=2)
    axes.set_xticks(range(len(groups)), groups)
    axes.grid(True, axis="y", alpha=0.3)
    axes.margins(y=0.15)


# ---------------------------------------------------------------------- bench link


def link(directory: Path, result: Mapping[str, Any]) -> None:
    """`link_loss.png` (throughput under loss, one link and the tree) and
    `link_latency.png` (latency over the chain, % over ping)."""
    plt = pyplot()
    figure, panels = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for axes, key, title in (
        (panels[0], "link_loss_throughput_pct", "one 10 Mbit/s, 50 ms link"),
        (panels[1], "tree_loss_throughput_pct", "6-site tree, slowest receiver"),
    ):
        losses: list[float] = []
        for protocol, label in (("hop", "Hop"), ("tcp", "TCP model")):
            row = result[key][protocol]
            levels = sorted((k for k in row if k.isdigit()), key=int)
            losses = [float(level) for level in levels]
            axes.plot(losses, [row[level] for level in levels], marker="o", label=label)
        axes.plot(losses, [100 - loss for loss in losses], "k--", linewidth=0.8, label="100·(1−p)")
        axes.set(title=title, xlabel="loss in each direction (%)")
        axes.set_xticks(losses)
        axes.grid(True, alpha=0.3)
    panels[0].set(ylabel="throughput, % of loss-free")
    panels[0].legend(fontsize="small")
    figure.suptitle("Reliable 1 KiB messages under uniform loss (simulator)")
    _save(plt, figure, directory, "link_loss.png")

    figure, axes = plt.subplots(figsize=(6, 4))
    chain = result["chain_latency_overhead_pct"]
    levels = sorted(chain["hop"], key=int)
    _bars(
        axes,
        [f"loss {level} %" for level in levels],
        {
            label: [chain[protocol][level] for level in levels]
            for protocol, label in (("hop", "Hop"), ("tcp", "TCP model"))
        },
    )
    axes.set(ylabel="one-way latency, % over ping", title="1 KB messages over a 5-link chain")
    axes.legend(fontsize="small")
    _save(plt, figure, directory, "link_latency.png")


# ---------------------------------------------------------------------- bench overlay


def overlay(directory: Path, result: Mapping[str, Any]) -> None:
    """`overlay_table1.png` (fanout vs tree per source) and `overlay_packets.png`
    (unicast vs multi-destination packets)."""
    plt = pyplot()
    table = result["table1"]
    figure, axes = plt.subplots(figsize=(8, 4))
    _bars(
        axes,
        list(table),
        {
            label: [table[source][policy] for source in table]
            for policy, label in (("fanout", "fanout"), ("tree", "shortest-path tree"))
        },
    )
    axes.set(
        ylabel="slowest receiver's goodput (Mbit/s)",
        xlabel="source site",
        title="Six sites, 1 KiB reliable messages: fanout vs shortest-path tree",
    )
    axes.legend(fontsize="small")
    _save(plt, figure, directory, "overlay_table1.png")

    figure, axes = plt.subplots(figsize=(8, 4))
    metrics = (
        ("packets_per_delivery", "data packets per\nremote delivery"),
        ("packets_per_delivery_with_retransmissions", "the same with\nretransmissions"),
        ("source_sends_per_message", "packets the source\nsends per message"),
    )
    _bars(
        axes,
        [label for _, label in metrics],
        {
            label: [result[key][mode] for key, _ in metrics]
            for mode, label in (("unicast", "unicast"), ("multidest", "multi-destination"))
        },
    )
    axes.set(
        ylabel="packets", title="Wide-area packets: one copy per destination vs multi-destination"
    )
    axes.legend(fontsize="small")
    _save(plt, figure, directory, "overlay_packets.png")


# ---------------------------------------------------------------------- bench tree


def tree_quality(directory: Path, quality: Mapping[str, Mapping[str, float]]) -> None:
    """`tree_quality.png`: each method's rate as a ratio to the exact optimum."""
    plt = pyplot()
    methods = sorted(quality, key=lambda name: -quality[name]["mean"])
    figure, axes = plt.subplots(figsize=(8, 4))
    _bars(
        axes,
        [name.replace("_", " ") for name in methods],
        {
            "mean": [quality[name]["mean"] for name in methods],
            "min": [quality[name]["min"] for name in methods],
            "share of instances optimal": [quality[name]["share_optimal"] for name in methods],
        },
        fmt="%.2f",
    )
    axes.set(
        ylabel="rate / optimal rate; share",
        title="Tree rate against the exact (MILP) optimum, random instances of 5-9 nodes",
    )
    axes.tick_params(axis="x", labelsize="small")
    axes.legend(fontsize="small")
    _save(plt, figure, directory, "tree_quality.png")


# ---------------------------------------------------------------------- bench group


def group(directory: Path, result: Mapping[str, Any]) -> None:
    """`group_throughput.png` (messages/s against daemons, per size and service) and
    `group_rtt.png`, each if its part was measured (`--only`)."""
    plt = pyplot()
    throughput = result.get("throughput")
    if throughput:
        _group_throughput(plt, directory, throughput)
    rtt = result.get("rtt_ms")
    if rtt:
        _group_rtt(plt, directory, rtt, result.get("rtt_floor_ms"))


def _group_throughput(plt: Any, directory: Path, throughput: Mapping[str, Any]) -> None:
    counts = sorted(throughput, key=int)
    sizes = sorted(throughput[counts[0]], key=int)
    figure, panels = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 4), squeeze=False)
    for axes, size in zip(panels[0], sizes, strict=True):
        for service in throughput[counts[0]][size]:
            axes.plot(
                [int(c) for c in counts],
                [throughput[c][size][service]["msgs_per_s"] for c in counts],
                marker="o",
                label=service,
            )
        axes.set(title=f"{int(size):,}-byte messages", xlabel="daemons", ylim=(0, None))
        axes.set_xticks([int(c) for c in counts])
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
    panels[0][0].set(ylabel="messages/s (slowest receiver)")
    figure.suptitle("Group throughput through real daemons on loopback")
    _save(plt, figure, directory, "group_throughput.png")


def _group_rtt(
    plt: Any, directory: Path, rtt: Mapping[str, Any], floor: Mapping[str, Any] | None
) -> None:
    figure, axes = plt.subplots(figsize=(6, 4))
    series = [(rtt, "meshcast median (bars: min to p99)", 0.0)]
    if floor:
        series.append((floor, "floor: relays that only forward", 0.08))
    for by_count, label, shift in series:  # cluster size -> {"min", "median", "p99"}
        counts = sorted(by_count, key=int)
        medians = [by_count[c]["median"] for c in counts]
        axes.errorbar(
            [int(c) + shift for c in counts],
            medians,
            yerr=[
                [m - by_count[c]["min"] for m, c in zip(medians, counts, strict=True)],
                [by_count[c]["p99"] - m for m, c in zip(medians, counts, strict=True)],
            ],
            fmt="o",
            capsize=6,
            label=label,
        )
    counts = sorted(rtt, key=int)
    axes.set(
        xlabel="daemons in the cluster",
        ylabel="round trip (ms)",
        title="1,000-byte AGREED round trip, clients on daemons 1 and 2",
        ylim=(0, None),
    )
    axes.set_xticks([int(c) for c in counts])
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small", loc="upper left")
    _save(plt, figure, directory, "group_rtt.png")
