"""`meshcast daemon --config FILE --name NAME`: the command line of the overlay daemon.

`add_daemon_command(sub)` adds the subcommand to the `meshcast` parser (cli.py). Exit
status: 0 after a clean stop (SIGTERM, SIGINT), 1 on a runtime failure (the port cannot
be bound, the socket goes away), 2 on bad usage or a bad configuration file (the
`ConfigError` names the file and the key).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from meshcast.argtypes import print_error, seconds
from meshcast.config import ClusterConfig, SecurityConfig, default_config, load_config
from meshcast.errors import ConfigError, MeshcastError
from meshcast.runtime.keyfile import default_key_path, ensure_key_file


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, got {text!r}")
    return value


def add_daemon_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``daemon`` to the subcommands of the `meshcast` parser."""
    parser = sub.add_parser(
        "daemon",
        help="run one overlay daemon of a cluster configuration",
        description=(
            "Run one overlay daemon: Hop links to its neighbours, heartbeats, failure "
            "detection and the membership protocol. State changes are logged on stderr: "
            "readable lines on a terminal, JSON lines otherwise (--log-format). SIGTERM or "
            "SIGINT (Ctrl-C) is the daemon's normal stop: it drains and exits 0. SIGHUP "
            "reads the cluster file's [security] section and its key files again (key "
            "rotation, docs/security.md); a daemon needs a cluster key (meshcast keygen) "
            "unless the file says insecure = true."
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
        type=seconds,
        default=None,
        help="multicast a probe to every member of the view this often and log each "
        "probe received (source, seq, hops)",
    )
    parser.add_argument(
        "--client-socket",
        metavar="PATH",
        default=None,
        help="Unix socket for client sessions (created 0600, or 0660 for [clients] "
        "socket_group); default: "
        "$XDG_RUNTIME_DIR/meshcast/NAME@CLUSTER.sock, else "
        "<tmp>/meshcast-<uid>/NAME@CLUSTER.sock",
    )
    parser.add_argument(
        "--no-client-socket",
        action="store_true",
        help="do not listen on a Unix socket for clients",
    )
    parser.add_argument(
        "--client-port",
        metavar="PORT",
        type=_port,
        default=None,
        help="also accept client sessions over TCP on this port (0: any free port, logged "
        "in the clients_listening event)",
    )
    parser.add_argument(
        "--client-host",
        metavar="ADDRESS",
        default="127.0.0.1",
        help="address of the TCP client listener (default 127.0.0.1: loopback only; any "
        "other address needs tokens, see [clients] in docs/config.md)",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        default=None,
        help="where replicated files land (under DIR/replicas, created 0700); default: "
        "$XDG_DATA_HOME/meshcast/CLUSTER/NAME, else ~/.local/share/meshcast/CLUSTER/NAME",
    )
    parser.add_argument(
        "--log-format",
        choices=("auto", "human", "json"),
        default="auto",
        help="log lines on stderr: human-readable, JSON, or auto: human on a terminal, "
        "JSON otherwise (default: auto)",
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


def _load(path: str | None) -> tuple[ClusterConfig, Callable[[], SecurityConfig]]:
    """The cluster configuration, and how SIGHUP gets its [security] section again.

    With a file, SIGHUP reads the file again (its other sections need a restart). The
    embedded cluster has no key of its own: it uses the user's key at
    `default_key_path()`, made on first use, so that a daemon is never started insecure
    by default.
    """
    if path is not None:
        return load_config(path), lambda: load_config(path).security
    key = default_key_path()
    ensure_key_file(key)
    security = SecurityConfig(key_file=str(key))
    return replace(default_config(), security=security), lambda: security


def default_data_dir(cluster: str, name: str) -> Path:
    """$XDG_DATA_HOME/meshcast/CLUSTER/NAME, else ~/.local/share/meshcast/CLUSTER/NAME."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "meshcast" / cluster / name


# Objects the young generation may gain before the collector runs (CPython's default:
# 700). A daemon allocates a few short-lived objects per message and makes next to no
# cycles; at the default the collector ran every few dozen messages and took ~7 % of the
# sending daemon's time (py-spy, `bench group --profile`).
GC_YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """Collect cycles less often, and never look again at what start-up made (the
    configuration, the code): the daemon's own process only."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def daemon_command(args: argparse.Namespace) -> int:
    """Handler of ``meshcast daemon``: returns the exit status."""
    from meshcast.daemon.config import overlay_config
    from meshcast.runtime.daemon import run_daemon
    from meshcast.runtime.endpoints import ClientListen
    from meshcast.runtime.logs import configure_logging
    from meshcast.runtime.loop import run
    from meshcast.runtime.profiling import install_from_environment as install_profiler

    if args.no_client_socket and args.client_socket is not None:
        print("meshcast daemon: error: --client-socket and --no-client-socket", file=sys.stderr)
        return 2
    clients = ClientListen(
        unix_path="" if args.no_client_socket else args.client_socket,
        tcp_port=args.client_port,
        tcp_host=args.client_host,
    )

    try:
        config, reload_security = _load(args.config)
        # An unknown name or unusable policy before logging starts; the daemon checks its
        # keys and client settings itself, before it binds (a ConfigError, caught below).
        overlay_config(config, args.name)
    except ConfigError as exc:
        print_error("meshcast daemon", exc)
        return 2
    configure_logging(
        int(getattr(args, "verbose", 0) or 0) + int(args.daemon_verbose),
        log_format=args.log_format,
    )
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir(config.name, args.name)
    install_profiler()  # only for `bench group --profile` without py-spy
    tune_gc()
    try:
        return run(
            run_daemon(
                config,
                args.name,
                probe_interval=args.probe_interval,
                clients=clients,
                reload_security=reload_security,
                data_dir=data_dir,
            )
        )
    except ConfigError as exc:
        print_error("meshcast daemon", exc)
        return 2
    except (MeshcastError, OSError) as exc:
        print_error("meshcast daemon", exc)
        return 1
