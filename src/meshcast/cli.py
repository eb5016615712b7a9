"""The `meshcast` command: demo, daemon, user, flood, replicate, status, keygen, bench, sim.

Results go to stdout (`bench --json`: exactly one JSON object); logs and progress go to
stderr. Exit status: 0 success, 1 runtime failure, 2 usage error (bad options, a bad
cluster file), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence

from meshcast.argtypes import Parser, integer, non_negative_seconds, probability, run_handler
from meshcast.client.cli import add_flood_command, add_status_command, add_user_command
from meshcast.client.replicate_cli import add_replicate_command
from meshcast.errors import UsageError
from meshcast.runtime.daemon_cli import add_daemon_command

BENCH_SUITES = {
    "link": "meshcast.bench.link",
    "overlay": "meshcast.bench.overlay",
    "tree": "meshcast.bench.tree",
    "group": "meshcast.bench.group",
    "replicate": "meshcast.bench.replicate",
}


def _demo(args: argparse.Namespace) -> int:
    from meshcast.runtime.loop import run

    if args.link:
        from meshcast.demo.link import run_demo

        return run(
            run_demo(messages=args.messages, loss=args.loss, delay=args.delay, seed=args.seed)
        )
    from meshcast.config import load_config
    from meshcast.demo.cluster import run_cluster_demo

    config = load_config(args.config) if args.config else None
    return run(run_cluster_demo(config, victim=args.kill))


def _replicate_local(args: argparse.Namespace) -> int:
    from meshcast.demo.replicate import replicate_local

    return replicate_local(args)


def _bench(args: argparse.Namespace) -> int:
    result = args.bench_module.run(args)
    text = json.dumps(result, indent=None if args.json else 2, sort_keys=False)
    print(text)
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from meshcast.runtime.keyfile import new_key, write_key_file

    key = new_key()
    write_key_file(args.file, key, force=args.force)
    print(f"wrote a new cluster key to {args.file} (mode 0600), fingerprint {key.fingerprint}")
    return 0


def _sim(args: argparse.Namespace) -> int:
    from meshcast.sim.scenarios import SCENARIOS, run_scenario

    if args.list:
        width = max(map(len, SCENARIOS))
        for name, scenario in sorted(SCENARIOS.items()):
            print(f"{name:<{width}}  {scenario.description}")
        return 0
    if args.scenario is None:
        raise UsageError("give --scenario NAME (--list shows the names)")
    report = run_scenario(args.scenario, seed=args.seed, trace_out=args.trace)
    print(json.dumps(report, indent=2))
    return 0 if report.get("ok", False) else 1


def build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = Parser(
        prog="meshcast",
        description="Reliable group communication and bulk replication over an overlay.",
        epilog="exit status: 0 success, 1 runtime failure, 2 usage error, 130 interrupted",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more log output on stderr (-v info, -vv debug)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="a local multi-site cluster: views, trees, a group chat in agreed order, a crash",
        description=(
            "Start the cluster (the embedded one: six daemons in three sites on "
            "127.0.0.1-6) on loopback, show its views and source trees, run a group chat "
            "in AGREED order with one client per daemon, SIGKILL one daemon and show the "
            "survivors going on. Exit 0 only if every check held; every process it "
            "starts is stopped. With --link: one Hop link over an emulated lossy link."
        ),
    )
    demo.add_argument("--config", metavar="FILE", help="cluster file (default: embedded)")
    demo.add_argument(
        "--kill", metavar="NAME", help="daemon to SIGKILL (default: the middle site's gateway)"
    )
    link = demo.add_argument_group("link demo (--link): two endpoints over one lossy link")
    link.add_argument("--link", action="store_true", help="run the link demo instead")
    link.add_argument(
        "--messages", metavar="N", type=integer(1), default=3000, help="messages each way"
    )
    link.add_argument(
        "--loss", metavar="P", type=probability, default=0.05, help="emulated loss per direction"
    )
    link.add_argument(
        "--delay",
        metavar="SECONDS",
        type=non_negative_seconds,
        default=0.020,
        help="emulated one-way delay",
    )
    link.add_argument("--seed", type=int, default=1, help="seed of the emulated impairments")
    demo.set_defaults(handler=_demo)

    bench = sub.add_parser(
        "bench",
        help="run a benchmark suite",
        description=(
            "Run one benchmark suite and print its result on stdout: one JSON object with "
            "--json (indented without); progress and logs go to stderr."
        ),
    )
    suites = bench.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for name, module_name in BENCH_SUITES.items():
        module = importlib.import_module(module_name)
        summary = (module.__doc__ or "").strip().splitlines()[0]
        suite = suites.add_parser(name, help=summary, description=summary)
        suite.add_argument(
            "--json", action="store_true", help="print the result as one compact JSON object"
        )
        module.add_arguments(suite)
        suite.set_defaults(handler=_bench, bench_module=module)

    add_daemon_command(sub)
    add_user_command(sub)
    add_flood_command(sub)
    add_replicate_command(sub, local=_replicate_local)
    add_status_command(sub)

    keygen = sub.add_parser(
        "keygen",
        help="write a new cluster key file (mode 0600)",
        description=(
            "Write a new random 256-bit cluster key to FILE, readable by its owner only "
            "(mode 0600), and print its fingerprint. Copy the file to every daemon's host "
            'and name it in the cluster file: [security] key_file = "FILE". An existing '
            "file is never overwritten without --force."
        ),
    )
    keygen.add_argument("file", metavar="FILE", help="where to write the key")
    keygen.add_argument(
        "--force", action="store_true", help="replace FILE if it exists (its old key is lost)"
    )
    keygen.set_defaults(handler=_keygen)

    sim = sub.add_parser(
        "sim",
        help="run or replay a seeded simulator scenario",
        description=(
            "Run one named scenario in the deterministic simulator (virtual time, emulated "
            "loss, duplication and reordering) and print a JSON report: whether every "
            "receiver got every message exactly once and, where the protocol promises "
            "it, in order. One seed gives one identical run, so a failing seed of a sim "
            "test replays here."
        ),
    )
    sim.add_argument("--scenario", metavar="NAME", help="scenario to run (--list shows them)")
    sim.add_argument("--list", action="store_true", help="list the scenarios and exit")
    sim.add_argument("--seed", type=int, default=1, help="seed of the run")
    sim.add_argument("--trace", metavar="FILE", help="write the JSON-lines trace here")
    sim.set_defaults(handler=_sim)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run_handler(args)


if __name__ == "__main__":
    sys.exit(main())
