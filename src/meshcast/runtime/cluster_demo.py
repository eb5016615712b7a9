"""`meshcast demo`: the embedded six-daemon cluster, live, then one daemon killed.

What it shows: real daemon processes on 127.0.0.1-6 in three sites, with emulated
wide-area delays between sites, agree on one view; every daemon multicasts probes over
its source tree, split per next hop; a gateway is killed with SIGKILL and the others
notice, install new views and route around it; everything stops cleanly.
"""

from __future__ import annotations

import statistics
import sys
from typing import TextIO

from meshcast.config import ClusterConfig, default_config
from meshcast.runtime.local_cluster import DaemonProcess, LocalCluster

PROBE_INTERVAL = 0.2  # s between probes from each daemon
START_TIMEOUT = 20.0  # s for the cluster to agree on its first view
WATCH_TIME = 2.0  # s of probes shown per phase


def _member_names(event: dict[str, object]) -> tuple[str, ...]:
    names = event.get("names", ())
    return tuple(str(n) for n in names) if isinstance(names, list) else ()


def _last_view(daemon: DaemonProcess) -> tuple[str, ...] | None:
    agreed = daemon.named("view_agreed")
    return _member_names(agreed[-1]) if agreed else None


def _agreed_on(daemon: DaemonProcess, names: set[str]) -> bool:
    view = _last_view(daemon)
    return view is not None and set(view) == names


def _probe_table(cluster: LocalCluster, since: dict[str, int], out: TextIO) -> None:
    """Per receiver: probes received in this phase, mean hops and latency per source."""
    for name, daemon in cluster.daemons.items():
        probes = daemon.named("probe_received")[since[name] :]
        if daemon.process.returncode is not None or not probes:
            continue
        by_source: dict[str, list[dict[str, object]]] = {}
        for probe in probes:
            by_source.setdefault(str(probe["source_name"]), []).append(probe)
        cells = []
        for source in sorted(by_source):
            got = by_source[source]
            hops = statistics.fmean(float(p["hops"]) for p in got)  # type: ignore[arg-type]
            latency = statistics.median(float(p["latency_ms"]) for p in got)  # type: ignore[arg-type]
            cells.append(f"{source}:{len(got)}x {hops:.0f}hop {latency:.0f}ms")
        print(f"  {name} heard  " + "  ".join(cells), file=out)


def _marks(cluster: LocalCluster) -> dict[str, int]:
    return {name: len(d.named("probe_received")) for name, d in cluster.daemons.items()}


async def run_cluster_demo(
    config: ClusterConfig | None = None, *, victim: str | None = None, out: TextIO | None = None
) -> int:
    """Run the demo; 0 when every step behaved as described."""
    stream = out if out is not None else sys.stdout
    config = config or default_config()
    names = [d.name for d in config.daemons]
    # The middle site's gateway by default: killing it reroutes the others and cuts off
    # the daemon behind it.
    victim = victim or names[len(names) // 2 - 1]

    def say(text: str = "") -> None:
        print(text, file=stream, flush=True)

    say(
        f"meshcast demo: cluster {config.name!r}, {len(names)} daemons in "
        f"{len(config.sites)} sites, routing {config.routing}"
    )
    for site in config.sites:
        members = [d for d in config.daemons if d.site == site.name]
        say(f"  site {site.name}: " + ", ".join(f"{d.name}@{d.host}" for d in members))
    for link in config.links:
        emulated = (
            f", emulated {link.emulation.delay * 1e3:.0f} ms one way"
            if link.emulation is not None
            else ""
        )
        say(
            f"  link {link.a}-{link.b}: weight {link.weight:g}, "
            f"{link.bandwidth_bps / 1e6:g} Mbit/s{emulated}"
        )
    ok = True
    async with LocalCluster(config, probe_interval=PROBE_INTERVAL) as cluster:
        everyone = set(names)
        if not await cluster.wait_for(
            lambda: all(_agreed_on(d, everyone) for d in cluster.daemons.values()), START_TIMEOUT
        ):
            say("FAILED: the daemons did not agree on one view in time")
            for daemon in cluster.daemons.values():
                say(f"  {daemon.name}: last events {daemon.events[-3:]}")
            return 1
        view = cluster.daemons[names[0]].named("view_agreed")[-1]
        say(
            f"\nall {len(names)} daemons agree on view {view['digest']} "
            f"with members {', '.join(_member_names(view))}"
        )
        tree = cluster.daemons[names[0]].named("view_installed")[-1]["tree"]
        if isinstance(tree, dict):
            edges = ", ".join(f"{names[p - 1]}->{names[c - 1]}" for p, c in tree["edges"])
            say(f"{names[0]}'s source tree: {edges} (rate {tree['rate_bps'] / 1e6:g} Mbit/s)")

        marks = _marks(cluster)
        await cluster.wait_for(lambda: False, WATCH_TIME)
        say(
            f"\nprobes over {WATCH_TIME:g} s (each daemon multicasts one every "
            f"{PROBE_INTERVAL:g} s to all others; hops = overlay links crossed):"
        )
        _probe_table(cluster, marks, stream)

        say(f"\nkilling {victim} with SIGKILL ...")
        cluster.kill(victim)
        survivors = [n for n in names if n != victim]

        def settled() -> bool:
            views = [_last_view(cluster.daemons[n]) for n in survivors]
            return all(v is not None and victim not in v for v in views)

        if not await cluster.wait_for(settled, START_TIMEOUT):
            say(f"FAILED: the survivors did not drop {victim} from their views in time")
            ok = False
        else:
            views = {_last_view(cluster.daemons[n]) or () for n in survivors}
            for view_names in sorted(views):
                say(f"  new view: {', '.join(view_names)}")
            if len(views) > 1:
                say(
                    "  (a partition: a daemon whose only way out was the victim is on its own,"
                    " and goes on alone until the network heals)"
                )
        marks = _marks(cluster)
        await cluster.wait_for(lambda: False, WATCH_TIME)
        say(f"probes over the next {WATCH_TIME:g} s, routed around {victim}:")
        _probe_table(cluster, marks, stream)

        codes = await cluster.stop_all()
        clean = all(code == 0 for name, code in codes.items() if name != victim)
        say("\nstopped: " + ", ".join(f"{n} exit {c}" for n, c in codes.items()))
        ok = ok and clean
    say(
        "result: "
        + (
            "the cluster formed, routed over trees, survived a SIGKILL and stopped cleanly"
            if ok
            else "something went wrong (see above)"
        )
    )
    return 0 if ok else 1
