"""`meshcast daemon --config FILE --name NAME`: the command line of the overlay daemon.

`add_daemon_command(sub)` adds the subcommand to the `meshcast` parser (cli.py). Exit
status: 0 after a clean stop (SIGTERM, SIGINT), 1 on a runtime failure (the port cannot
be bound, the socket goes away), 2 on bad usage or a bad configuration file (the
`ConfigError` names the file and the key).
"""

from __future__ import annotations

import argparse
import math
import sys

from meshcast.config import ClusterConfig, default_config, load_config
from meshcast.errors import ConfigError, MeshcastError


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def add_daemon_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``daemon`` to the subcommands of the `meshcast` parser."""
    parser = sub.add_parser(
        "daemon",
        help="run one overlay daemon of a cluster configuration",
        description=(
            "Run one overlay daemon: Hop links to its neighbours, heartbeats, failure "
            "detection and the membership protocol. State changes are logged on stderr as "
            "JSON lines. SIGTERM or SIGINT drains and exits 0."
        ),
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="cluster configuration (TOML); default: the embedded default configuration",
    )
    parser.add_argument(
        "--name", required=True, help="which daemon of the configuration this process is"
    )
    parser.add_argument(
        "--probe-interval",
        metavar="SECONDS",
        type=_seconds,
        default=None,
        help="multicast a probe to every member of the view this often and log each "
        "probe received (source, seq, hops)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        dest="daemon_verbose",
        action="count",
        default=0,
        help="more log output (-v info, -vv debug); state-change events are always logged",
    )
    parser.set_defaults(handler=daemon_command)


def _load(path: str | None) -> ClusterConfig:
    return default_config() if path is None else load_config(path)


def daemon_command(args: argparse.Namespace) -> int:
    """Handler of ``meshcast daemon``: returns the exit status."""
    from meshcast.runtime.daemon import configure_logging, overlay_config, run_daemon
    from meshcast.runtime.loop import run

    try:
        config = _load(args.config)
        overlay_config(config, args.name)  # unknown name, unusable policy: before binding
    except ConfigError as exc:
        print(f"meshcast daemon: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(int(getattr(args, "verbose", 0) or 0) + int(args.daemon_verbose))
    try:
        return run(run_daemon(config, args.name, probe_interval=args.probe_interval))
    except ConfigError as exc:
        print(f"meshcast daemon: error: {exc}", file=sys.stderr)
        return 2
    except (MeshcastError, OSError) as exc:
        print(f"meshcast daemon: error: {exc}", file=sys.stderr)
        return 1
