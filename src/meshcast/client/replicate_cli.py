"""`meshcast replicate`: copy a file to other daemons, with live progress (docs/client-api.md).

`add_replicate_command(sub, local=...)` adds the command; `local` runs ``--local N`` (it
starts daemons, so it lives above the client package: `meshcast.demo.replicate`).
`follow(handle, ...)` shows a replication's progress until its final report: a `rich` table
on a terminal, else one summary line per second at most. Progress goes to stderr; the
result (a line per recipient, or one JSON object with --json) to stdout. Exit status: 0
when every recipient holds a verified copy, 1 otherwise (the missing ones are named), 2
usage error. ``meshcast replicate --id RID --rate R`` changes the rate cap of a running
replication instead (at its origin daemon): exit 0 once applied, 1 if the daemon refuses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from meshcast.argtypes import bit_rate, integer, seconds
from meshcast.client.cli import _add_token_option, _address, _run, client_token, find_daemon
from meshcast.client.cli import resolve_address as _resolve
from meshcast.client.connection import connect
from meshcast.client.replication import (
    DEFAULT_MAX_CONNECTIONS,
    Replication,
    ReplicationFailed,
    ReplicationReport,
)
from meshcast.errors import ClientError, UsageError
from meshcast.wire.client import REPLICATE_STRATEGIES, REPLICATE_TREES, REPLICATE_VARIANTS

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

SUMMARY_INTERVAL = 1.0  # s between two summary lines when not on a terminal
LocalRunner = Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------- formatting


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def human_rate(bytes_per_second: float) -> str:
    """Bytes/s as bits/s, as links are rated: 12.5e6 -> '100.0 Mbit/s'."""
    bits = bytes_per_second * 8
    for unit in ("bit/s", "kbit/s", "Mbit/s", "Gbit/s"):
        if bits < 1000 or unit == "Gbit/s":
            return f"{bits:.0f} {unit}" if unit == "bit/s" else f"{bits:.1f} {unit}"
        bits /= 1000
    raise AssertionError("unreachable")


def human_eta(eta: float | None) -> str:
    if eta is None:
        return "-"
    if eta < 60:
        return f"{eta:.0f} s"
    if eta < 3600:
        return f"{eta // 60:.0f} min {eta % 60:02.0f} s"
    return f"{eta // 3600:.0f} h {eta % 3600 // 60:02.0f} min"


def bit_rate_or_none(text: str) -> float:
    """--rate: bits/s as `bit_rate` reads them, or ``none`` for no cap (0.0)."""
    if text.strip().lower() == "none":
        return 0.0
    return bit_rate(text)


def summary_line(report: ReplicationReport) -> str:
    """One line of progress: bytes held by all recipients, states, total rate, worst ETA,
    and the stalled recipients."""
    total = report.size * len(report.recipients)
    share = f" ({100 * report.held_bytes / total:.0f}%)" if total else ""
    states: dict[str, int] = {}
    for r in report.recipients:
        states[r.state] = states.get(r.state, 0) + 1
    counts = ", ".join(f"{n} {state}" for state, n in states.items()) or "no recipients yet"
    etas = [r.eta for r in report.recipients if r.eta is not None and not r.complete]
    rate = sum(r.rate for r in report.recipients)
    stalled = ", ".join(
        f"{r.daemon} ({r.stalled:.0f} s)" for r in report.recipients if r.stalled is not None
    )
    return (
        f"{report.name}: {report.state}, {human_bytes(report.held_bytes)} of "
        f"{human_bytes(total)}{share} held by {len(report.recipients)} daemons ({counts}); "
        f"{human_rate(rate)}; ETA {human_eta(max(etas) if etas else None)}"
        + (f"; stalled: {stalled}" if stalled else "")
    )


def missing_lines(report: ReplicationReport) -> list[str]:
    """Who is missing what, one line each (for the exit message)."""
    lines = []
    for r in report.missing:
        why = f": {r.detail}" if r.detail else ""
        lines.append(
            f"{r.daemon} is missing {human_bytes(report.size - r.held_bytes)} of "
            f"{human_bytes(report.size)} ({r.state}{why})"
        )
    if not report.recipients:
        lines.append(f"no copy was made: {report.detail or report.state}")
    return lines


def result_lines(report: ReplicationReport) -> list[str]:
    """The final result for stdout: a header and one line per recipient."""
    done = sum(1 for r in report.recipients if r.complete)
    if not report.recipients:  # refused before anything moved
        return [f"not replicated: {report.name}: {report.detail or report.state}"]
    head = (
        f"replicated {report.name} ({human_bytes(report.size)}, blake3 {report.digest or '-'}) "
        f"to {done} of {len(report.recipients)} daemons in {report.elapsed:.1f} s"
    )
    if report.detail:
        head += f": {report.detail}"
    width = max((len(r.daemon) for r in report.recipients), default=0)
    lines = [head]
    for r in report.recipients:
        where = r.path or r.detail or "-"
        lines.append(f"  {r.daemon:<{width}}  {r.state:<9}  {where}")
    return lines


# ---------------------------------------------------------------- progress views


class ProgressView(Protocol):
    def update(self, report: ReplicationReport) -> None: ...
    def close(self) -> None: ...


class LineView:
    """Not a terminal: a summary line per `interval` at most, and the last one always."""

    def __init__(self, out: TextIO, interval: float = SUMMARY_INTERVAL) -> None:
        self._out = out
        self._interval = interval
        self._last_at: float | None = None
        self._pending: ReplicationReport | None = None

    def update(self, report: ReplicationReport) -> None:
        now = time.monotonic()
        if report.final or self._last_at is None or now - self._last_at >= self._interval:
            self._print(report)
            self._last_at = now
            self._pending = None
        else:
            self._pending = report

    def _print(self, report: ReplicationReport) -> None:
        print(f"meshcast replicate: {summary_line(report)}", file=self._out, flush=True)

    def close(self) -> None:
        if self._pending is not None:
            self._print(self._pending)
            self._pending = None


class RichView:
    """On a terminal: a live table (recipient, state, bytes, rate, ETA) and an overall bar."""

    def __init__(self, out: TextIO) -> None:
        from rich.console import Console
        from rich.live import Live

        self._console = Console(file=out)
        self._live = Live(console=self._console, refresh_per_second=4, transient=False)
        self._live.start()

    def update(self, report: ReplicationReport) -> None:
        self._live.update(render_report(report))

    def close(self) -> None:
        self._live.stop()


def render_report(report: ReplicationReport) -> Any:
    """The live display of one report: a table of the recipients over an overall bar."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{report.name} ({human_bytes(report.size)}): {report.state}")
    for column, justify in (
        ("recipient", "left"),
        ("state", "left"),
        ("bytes", "right"),
        ("rate", "right"),
        ("ETA", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    colours = {"complete": "green", "failed": "red", "receiving": "cyan"}
    for r in report.recipients:
        state = Text(r.state, style=colours.get(r.state, ""))
        if r.stalled is not None:  # the origin has heard nothing from it for stall_after
            state.append(f" (stalled {r.stalled:.0f} s)", style="yellow")
        table.add_row(
            r.daemon,
            state,
            f"{human_bytes(r.held_bytes)} / {human_bytes(report.size)}",
            human_rate(r.rate),
            human_eta(None if r.complete else r.eta),
        )
    total = max(1, report.size * len(report.recipients))
    bar = ProgressBar(total=total, completed=min(report.held_bytes, total), width=50)
    line = Text(f" {100 * report.held_bytes / total:.0f}%  {report.elapsed:.1f} s")
    return Group(table, Group(bar, line))


def progress_view(out: TextIO) -> ProgressView:
    return RichView(out) if out.isatty() else LineView(out)


async def follow(handle: Replication, view: ProgressView) -> ReplicationReport:
    """Show every report of `handle` until the final one; return it (whatever its state).
    `ClientError` if the session ends first."""
    try:
        async for report in handle:
            view.update(report)
    finally:
        view.close()
    final = handle.final
    assert final is not None  # the iteration ends with the final report, or raises
    return final


def finish(report: ReplicationReport, as_json: bool, out: TextIO, err: TextIO) -> int:
    """Print the final report (stdout) and who is missing what (stderr); the exit status."""
    if as_json:
        print(json.dumps(report.to_json()), file=out)
    else:
        print("\n".join(result_lines(report)), file=out)
    if report.ok:
        return 0
    for line in missing_lines(report):
        print(f"meshcast replicate: {line}", file=err)
    return 1


# ---------------------------------------------------------------- the command


def add_replicate_command(sub: SubParsers, local: LocalRunner | None = None) -> None:
    """Add ``replicate`` to the subcommands of the `meshcast` parser; `local` runs --local."""
    parser = sub.add_parser(
        "replicate",
        help="copy a file to other daemons (FastReplica), with live progress",
        description=(
            "Ask a running daemon on this machine to replicate FILE to other daemons of its "
            "cluster, and show the progress: a live table on a terminal, else a summary "
            "line per second on stderr. The result goes to stdout (--json: the final report "
            "as one JSON object). Exit 0 only if every recipient holds a verified copy. "
            "The daemon is --socket ADDR, or --daemon NAME at its default socket, or the "
            "one daemon listening at the default socket directory. With --local N: start N "
            "daemons on loopback, replicate from the first to the others, print every "
            "copy's BLAKE3 digest, stop them all. With --id RID --rate R (no FILE): change "
            "the rate cap of replication RID (as `meshcast status` prints it), running "
            "with this daemon as its origin, at once on every sender."
        ),
    )
    parser.add_argument(
        "path",
        metavar="FILE",
        nargs="?",
        default=None,
        help="the file (on this machine) to replicate",
    )
    parser.add_argument(
        "--id",
        metavar="RID",
        default=None,
        help="a running replication (16 hex digits, from meshcast status or a report): "
        "change its --rate instead of starting one",
    )
    parser.add_argument(
        "--to",
        default=None,
        metavar="TARGETS",
        help="'all' (every other daemon of the view), NAME,NAME,... or group:G (the daemons "
        "hosting members of group G); default: all",
    )
    where = parser.add_argument_group("which daemon (the origin)")
    where.add_argument(
        "--socket",
        "--connect",
        dest="socket",
        metavar="ADDR",
        type=_address,
        default=None,
        help="the daemon's client address: unix:PATH, tcp:HOST:PORT or a daemon's name",
    )
    where.add_argument(
        "--daemon",
        "--name",
        dest="name",
        default=None,
        help="the daemon's name (its default client socket is used)",
    )
    where.add_argument("--config", metavar="FILE", default=None, help="its cluster file")
    where.add_argument(
        "--local",
        metavar="N",
        type=integer(2),
        default=None,
        help="start N daemons on loopback (a fresh key), replicate from the first to the "
        "others, print every copy's digest and stop them",
    )
    plan = parser.add_argument_group("the transfer")
    plan.add_argument(
        "--rate",
        metavar="RATE",
        type=bit_rate_or_none,
        default=None,
        help="upload cap of each sender in bits/s: 80M, 1.5G, 500k, 100Mbit, or none (default: "
        "the daemons' own caps); with --id, the running replication's new cap",
    )
    plan.add_argument(
        "--buddy",
        metavar="NAME",
        default=None,
        help="a daemon holding the same file that repairs failures in the origin's place "
        "(left out of 'all' and group targets)",
    )
    plan.add_argument(
        "--dest",
        metavar="DIR",
        default=None,
        help="directory of the copies on each recipient (default: under its data directory)",
    )
    plan.add_argument(
        "--strategy", choices=REPLICATE_STRATEGIES, default="fastreplica", help="the plan"
    )
    plan.add_argument(
        "--variant",
        choices=REPLICATE_VARIANTS,
        default="k+1",
        help="connections of a node beyond its group's k (FastReplica)",
    )
    plan.add_argument(
        "--tree", choices=REPLICATE_TREES, default="chain", help="the groups' primary tree"
    )
    plan.add_argument(
        "--max-connections",
        metavar="K",
        type=integer(1),
        default=DEFAULT_MAX_CONNECTIONS,
        help="concurrent connections per node; the group size k is planned from it",
    )
    plan.add_argument(
        "--capacity-aware",
        action="store_true",
        help="plan by the daemons' upload capacities: balanced groups, each node spreading a "
        "share in proportion to its upload, slow nodes at the leaves",
    )
    parser.add_argument("--json", action="store_true", help="print the final report as JSON")
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=seconds,
        default=10.0,
        help="bound on connecting to the daemon (the replication itself has none)",
    )
    _add_token_option(parser)
    parser.set_defaults(handler=replicate_command, local_runner=local)


def replicate_command(args: argparse.Namespace) -> int:
    """Handler of ``meshcast replicate``: returns the exit status."""
    if args.id is not None:
        if args.path is not None or args.local is not None or args.rate is None:
            print(
                "meshcast replicate: error: --id RID changes a running replication's rate: "
                "give --rate R (bits/s, or none) and no FILE or --local",
                file=sys.stderr,
            )
            return 2
        return _run(_set_rate(args), "replicate")
    if args.path is None:
        print("meshcast replicate: error: give the FILE to replicate", file=sys.stderr)
        return 2
    if args.local is not None:
        if args.socket or args.name or args.config:
            print(
                "meshcast replicate: error: --local starts its own daemons: give no "
                "--socket, --daemon or --config",
                file=sys.stderr,
            )
            return 2
        runner: LocalRunner | None = args.local_runner
        if runner is None:
            print("meshcast replicate: error: --local needs the meshcast command", file=sys.stderr)
            return 2
        return runner(args)
    return _run(_replicate(args), "replicate")


def origin_address(address: str | None, name: str | None, config: str | None) -> str:
    """--socket, else daemon --name's default socket, else the one daemon listening in the
    default socket directory (`UsageError` when none or several are)."""
    if address is not None:
        if name is not None:
            raise UsageError("give either --socket or --daemon, not both")
        return _resolve(address, config)
    if name is not None:
        return find_daemon(name, config)
    from meshcast.client.cli import _live_socket
    from meshcast.socket_paths import default_socket_dir

    directory = default_socket_dir()
    live = sorted(p for p in directory.glob("*.sock") if _live_socket(p))
    if len(live) == 1:
        return f"unix:{live[0]}"
    if not live:
        raise ClientError(
            f"no daemon is listening in {directory}: start one (meshcast daemon), give "
            "--socket ADDR, or try --local N"
        )
    names = ", ".join(p.name[: -len(".sock")] for p in live)
    raise UsageError(f"{len(live)} daemons are listening ({names}): pick one with --daemon NAME")


def request_options(args: argparse.Namespace) -> dict[str, Any]:
    """`Client.replicate`'s keyword arguments from the command line (rate: bits to bytes)."""
    return {
        "rate": args.rate / 8 if args.rate else None,
        "buddy": args.buddy,
        "dest": args.dest,
        "strategy": args.strategy,
        "variant": args.variant,
        "tree": args.tree,
        "max_connections": args.max_connections,
        "capacity_aware": args.capacity_aware,
    }


async def _replicate(args: argparse.Namespace) -> int:
    address = origin_address(args.socket, args.name, args.config)
    token = client_token(args.token_file)
    client = await connect(address, timeout=args.timeout, membership=False, token=token)
    async with client:
        handle = await client.replicate(args.path, args.to or "all", **request_options(args))
        final = await follow(handle, progress_view(sys.stderr))
    return finish(final, args.json, sys.stdout, sys.stderr)


async def _set_rate(args: argparse.Namespace) -> int:
    address = origin_address(args.socket, args.name, args.config)
    token = client_token(args.token_file)
    client = await connect(address, timeout=args.timeout, membership=False, token=token)
    async with client:
        await client.set_rate(args.id, args.rate / 8 if args.rate else None)
    what = human_rate(args.rate / 8) if args.rate else "no cap"
    print(f"replication {args.id.strip().lower()}: rate set to {what}")
    return 0


__all__ = [
    "ReplicationFailed",
    "add_replicate_command",
    "bit_rate_or_none",
    "finish",
    "follow",
    "human_bytes",
    "human_rate",
    "origin_address",
    "progress_view",
    "replicate_command",
    "request_options",
    "summary_line",
]
