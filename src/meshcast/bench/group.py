"""`meshcast bench group`: group messaging through real daemons on loopback.

Everything is real: `meshcast daemon` processes (`LocalCluster`, as the demo), client
processes using the public client library (`meshcast.connect`) over the daemons' Unix
sockets, UDP between daemons on 127.0.0.x, no emulated delay or loss. Results and
limits: docs/benchmarks.md.

* `throughput`: for 1, 3 and 6 daemons (a full mesh; uploads and links at 10 Gbit/s, so
  no configured rate limits anything; everything else default, so datagrams as large as
  loopback's route allows, `[link] max_path_mtu`),
  message sizes 100, 1,000 and 10,000 bytes, services RELIABLE and AGREED: one sender
  client on daemon 1 sends M messages to a group with one receiver client on every
  daemon. `msgs_per_s` is M over the time from the first send to the slowest receiver's
  last delivery; `mbit_per_s` the same for M x size x 8 payload bits.
* `rtt_ms`: per cluster size (2, 3 and 6 daemons, full mesh), min, median and p99 of the
  round trip of a 1,000-byte AGREED message from a client on daemon 1 to an echoing
  client on daemon 2 and back, after a warm-up; the other daemons host no client, but
  every AGREED message waits for their timestamps (docs/design/group.md, "NULLs").
  `rtt_floor_ms`: the same for the same chain of processes and sockets with daemons that
  only forward bytes (`meshcast.bench.rtt_floor`): what Python processes and the kernel
  cost here before any of meshcast's work.
* `cpu_us_per_msg`: per cluster size, the CPU time (user + system, from /proc/PID/stat)
  of all daemons together per message sent (each delivered to every receiver) in the
  1,000-byte AGREED cell, when it ran: {"1": ..., "3": ..., "6": ...}. On a shared
  2-core machine this is the steadier figure (Spread 4.0: 58 us at 3 daemons, 104 at 6).
  `cpu_us_per_msg_by_cell`: the same for every cell, of all daemons, all receivers
  together and the sender, which shows where the time goes.
* `profile` (with `--profile DIR`): each daemon profiled during each throughput cell,
  the profiles and their shares by layer under DIR (`meshcast.bench.profile`, docs/cli.md).
* `runs`: per cell, the messages, seconds, out-of-order deliveries (one sender: with
  AGREED it must be 0) and whether a daemon installed a view meanwhile;
  `daemon_counters`: a few of the daemons' final counters (retransmissions, group
  repairs, ...), summed per cluster; `setup`: the parameters.

Processes. The machine has two cores, so where the clients run matters. The sender runs
in this process, which does nothing else while it sends; each receiver runs in its own
process (``python -m meshcast.bench.group``, driven by JSON lines on stdin/stdout), like
one application per machine, so no receiver shares an event loop with the sender or with
another receiver; the echo client of `rtt_ms` is such a worker too. Times are
`time.monotonic()`: CLOCK_MONOTONIC, one clock for all processes on Linux.

The sender, like `spflooder -wo`, is not a member of the group. It is the only member of
a second group, to which it sends an AGREED *token* (its message count) every
window/4 messages, and it never has more than a window of messages (default 256, at
most 1 MiB of payload) beyond the last token delivered back to it. A token comes back
once every daemon has taken its timestamp, i.e. has received it, and the links from
daemon 1 are FIFO, so the window bounds what is in flight end to end. Without it only
the daemon's own back-pressure holds the sender (it stops reading the client while the
overlay outbox, 10,000 messages, or the group send window, 25,000 copies, is full), and
then (a) the group layer re-sends own messages not acknowledged within `repair_after`
(1 s) although they are only queued, a storm of duplicate repairs, and (b) an AGREED
submit is refused (ERROR 207 "daemon busy") once half of `max_held_messages` wait for
delivery, so messages are lost. `--window` changes the window; `daemon_counters` shows
repairs if they happen.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import resource
import signal
import statistics
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshcast.argtypes import integer, seconds
from meshcast.bench import plot
from meshcast.bench import profile as profiling
from meshcast.bench.rtt_floor import measure_floor
from meshcast.client import Client, Membership, Message, ServiceLevel, connect, service_level
from meshcast.config import ClusterConfig, LimitsConfig, parse_config
from meshcast.errors import MeshcastError
from meshcast.link import LinkConfig
from meshcast.runtime.compiled import compiled
from meshcast.runtime.json_child import JsonChild, emit, stdin_reader
from meshcast.runtime.local_cluster import LocalCluster, loopback_mesh_toml
from meshcast.runtime.loop import EVENT_LOOP_ENV, loop_factory
from meshcast.runtime.loop import run as run_loop

log = logging.getLogger(__name__)

DAEMON_COUNTS = (1, 3, 6)
MAX_DAEMONS = 254  # one loopback address each: 127.0.0.1-254
SIZES = (100, 1_000, 10_000)
SERVICES = (ServiceLevel.RELIABLE, ServiceLevel.AGREED)
HEADLINE_SIZE, HEADLINE_SERVICE = "1000", ServiceLevel.AGREED  # the cell of `cpu_us_per_msg`
# Messages per throughput cell: `--messages` (default DEFAULT_MESSAGES) for 100- and
# 1,000-byte messages, a quarter of it for 10,000 bytes, divided by the number of daemons
# (the cost of a message grows with them): a few seconds per cell on 2 cores.
DEFAULT_MESSAGES = 10_000
LARGE_MESSAGE = 5_000  # bytes: messages this large or larger are sent a quarter as often
MIN_MESSAGES = 20  # per cell: fewer would measure only the start and the tail
QUICK_MESSAGES = 200
WARMUP_MESSAGES = 300  # 1,000-byte RELIABLE messages through a fresh cluster, not measured
RTT_SIZE = 1_000
RTT_ROUND_TRIPS = 200
RTT_WARMUP = 20
QUICK_RTT_ROUND_TRIPS = 20
RTT_DAEMONS = (2, 3, 6)  # cluster sizes of `rtt_ms`: clients on daemons 1 and 2 only
PARTS = ("throughput", "rtt")  # what --only may pick
MIN_MTU, MAX_MTU = 512, 65_507  # what [link] mtu accepts (65,507: the largest UDP payload)
LINK_RATE = "10Gbit"  # uploads, downloads and hence link pacers: out of the way on loopback
DEFAULT_WINDOW = 256  # messages the sender may have beyond the last token back
WINDOW_MAX_BYTES = 1024 * 1024  # ... and at most this much payload (10,000 bytes: 104)
MAX_WINDOW = 2_000  # below the group engine's own-submit bound (max_held_messages / 2)
TOKENS_PER_WINDOW = 4
TOKEN = struct.Struct("!Q")  # a token's payload: flood messages sent before it
SEQ = struct.Struct("!Q")  # first 8 bytes of a flood message: its sequence number
ACK_TAG = 0xFFF0  # msg_type of tokens
FLOOD_GROUP = "flood"
TOKEN_GROUP = "flood-tokens"
START_TIMEOUT = 30.0  # s: daemons up and agreed on one view, workers connected
REQUEST_TIMEOUT = 20.0  # s: one join, one client connect (daemons may be busy)
DEFAULT_CELL_TIMEOUT = 120.0  # s: one throughput cell, from the first send to the last receipt
WORKER_MAX_RUNTIME = 3_600.0  # s: a worker never outlives this, whatever its parent does
_STOP_TIMEOUT = 5.0  # s: a worker exits after "stop" or the end of its stdin


class GroupBenchError(MeshcastError):
    """The group benchmark could not measure: a process failed, a message went missing."""


# ---------------------------------------------------------------------- the cluster


@dataclass(frozen=True, slots=True)
class Tuning:
    """What a run may change in the bench cluster's configuration."""

    mtu: int | None = None  # the Hop links' datagram size; None: the default
    insecure: bool = False  # links in the clear (for comparison); default: encrypted
    event_loop: str = "uvloop"  # the daemons' event loop: "uvloop" (if installed) or "asyncio"

    def environment(self) -> dict[str, str]:
        """What the daemons' environment gains for this tuning."""
        return {EVENT_LOOP_ENV: "asyncio"} if self.event_loop == "asyncio" else {}


def bench_config(count: int, tag: str, tuning: Tuning = Tuning()) -> ClusterConfig:
    """`count` daemons on 127.0.0.1..count, fully meshed, one site, fast rates, links
    encrypted with a fresh key as users run them (unless `tuning.insecure`).

    Daemon names carry `tag` (unique per run): each daemon's default client socket is
    named after it, so clusters of concurrent runs never collide. Ports are placeholders;
    `LocalCluster` picks free ones.
    """
    names = [daemon_name(i, tag) for i in range(1, count + 1)]
    lines = loopback_mesh_toml("bench-group", names, port_base=4900, rate=LINK_RATE)
    if tuning.mtu is not None:
        # the datagram size on every link, loopback included
        lines += ["", "[link]", f"mtu = {tuning.mtu}", f"max_path_mtu = {tuning.mtu}"]
    if tuning.insecure:
        lines += ["", "[security]", "insecure = true"]
    return parse_config("\n".join(lines) + "\n", source="<bench group>")


def daemon_name(index: int, tag: str) -> str:
    return f"g{index}-{tag}"


@dataclass(slots=True)
class RunningCluster:
    """What `running_cluster` yields."""

    local: LocalCluster
    addresses: list[str]  # client address of each daemon, daemon 1 first
    pids: list[int]
    final_stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # after the stop

    def views_installed(self) -> int:
        """Views installed so far, all daemons together (a change during a cell shows)."""
        return sum(len(d.named("view_installed")) for d in self.local.daemons.values())


@contextlib.asynccontextmanager
async def running_cluster(
    count: int, tag: str, tuning: Tuning = Tuning(), env: dict[str, str] | None = None
) -> AsyncIterator[RunningCluster]:
    """Start `count` daemons (`env` added to their environment), wait until they agree
    on one view; yield their client addresses (daemon 1 first). Every daemon is stopped
    on the way out, whatever happens."""
    config = bench_config(count, tag, tuning)
    env = {**tuning.environment(), **(env or {})}
    async with LocalCluster(config, env=env) as cluster:  # a failed start stops what did start
        handle = await _ready(cluster, config)
        yield handle
    for daemon in cluster.daemons.values():
        for stopped in daemon.named("daemon_stopped"):
            stats = stopped.get("stats")
            if isinstance(stats, dict):
                handle.final_stats[daemon.name] = stats


async def _ready(cluster: LocalCluster, config: ClusterConfig) -> RunningCluster:
    """Wait until every daemon agrees on the view of all and listens for clients."""
    names = {d.name for d in config.daemons}

    def ready() -> bool:
        for daemon in cluster.daemons.values():
            agreed = daemon.named("view_agreed")
            if not agreed or set(_names(agreed[-1])) != names:
                return False
            if not daemon.named("clients_listening"):
                return False
        return True

    def failed() -> str | None:
        for daemon in cluster.daemons.values():
            if daemon.process.returncode is not None:
                return f"daemon {daemon.name} exited with {daemon.process.returncode}"
            for event in ("clients_unix_unavailable", "daemon_failed"):
                if reports := daemon.named(event):
                    return f"daemon {daemon.name}: {reports[0]}"
        return None

    if not await cluster.wait_for(lambda: ready() or failed() is not None, START_TIMEOUT):
        raise GroupBenchError(
            f"{len(names)} daemons did not agree on one view within {START_TIMEOUT} s"
        )
    if (why := failed()) is not None:
        raise GroupBenchError(why)
    addresses = []
    for spec in config.daemons:
        path = cluster.daemons[spec.name].named("clients_listening")[0].get("unix_path")
        if not path:
            raise GroupBenchError(f"daemon {spec.name} has no client socket")
        addresses.append(f"unix:{path}")
    pids = [d.process.pid for d in cluster.daemons.values()]
    return RunningCluster(cluster, addresses, pids)


def _names(event: dict[str, object]) -> list[str]:
    names = event.get("names", [])
    return [str(n) for n in names] if isinstance(names, list) else []


def _process_cpu_seconds(pids: Sequence[int]) -> float | None:
    """User + system CPU seconds of these processes so far (Linux /proc), else None."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
        except OSError:
            return None
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------- worker processes


class Worker(JsonChild):
    """A client in its own process (``python -m meshcast.bench.group``); always `stop` it."""

    error = GroupBenchError

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        super().__init__(process, f"worker {name}")
        self.name = name
        self.private_name = ""

    @classmethod
    async def start(cls, address: str, name: str) -> Worker:
        """Start a worker connected to the daemon at `address` as client `name`."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "meshcast.bench.group",
            "--connect",
            address,
            "--name",
            name,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        worker = cls(name, process)
        try:
            connected = await worker.wait_event("connected", START_TIMEOUT)
        except BaseException:
            await worker.stop()
            raise
        worker.private_name = str(connected["private_name"])
        return worker

    async def wait_event(self, name: str, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109 - bounded wait is the API
        """The next event called `name`; `GroupBenchError` on "error", exit or timeout."""
        try:
            return await super().wait_event(name, timeout)
        except TimeoutError:
            raise GroupBenchError(
                f"worker {self.name}: no {name!r} event within {timeout:g} s"
            ) from None

    async def stop(self, timeout: float = _STOP_TIMEOUT) -> int:  # noqa: ASYNC109 - bounded wait is the API
        return await super().stop(timeout)


@contextlib.asynccontextmanager
async def running_workers(addresses: Sequence[str], prefix: str) -> AsyncIterator[list[Worker]]:
    """One worker on each address; all stopped on the way out."""
    workers: list[Worker] = []
    try:
        started = await asyncio.gather(
            *(Worker.start(a, f"{prefix}{i}") for i, a in enumerate(addresses, 1)),
            return_exceptions=True,
        )
        workers = [w for w in started if isinstance(w, Worker)]
        for result in started:
            if isinstance(result, BaseException):
                raise result
        yield workers
    finally:
        await asyncio.gather(*(w.stop() for w in workers))


# ---------------------------------------------------------------------- throughput


@dataclass(slots=True)
class CellResult:
    messages: int
    seconds: float  # first send to the slowest receiver's last delivery
    send_seconds: float  # first send to the last send
    out_of_order: int = 0  # deliveries not following the previous one, all receivers
    view_changed: bool = False  # a daemon installed a new view during the cell
    cpu_s: dict[str, float | None] = field(default_factory=dict)  # by role

    def describe(self) -> dict[str, object]:
        return {
            "messages": self.messages,
            "seconds": round(self.seconds, 4),
            "send_seconds": round(self.send_seconds, 4),
            "out_of_order": self.out_of_order,
            "view_changed": self.view_changed,
        }

    def rates(self, size: int) -> dict[str, float]:
        return {
            "msgs_per_s": round(self.messages / self.seconds, 1),
            "mbit_per_s": round(self.messages * size * 8 / self.seconds / 1e6, 3),
        }


async def _join_all(
    workers: Sequence[Worker],
    group: str,
    timeout: float,  # noqa: ASYNC109 - bounded wait
) -> None:
    for worker in workers:
        worker.command({"cmd": "join", "group": group, "members": len(workers)})
    await asyncio.gather(*(w.wait_event("joined", timeout) for w in workers))


async def _wait_tokens(sender: Client, at_least: int) -> int:
    """Receive until a token saying `at_least` or more messages were sent before it."""
    confirmed = 0
    while confirmed < at_least:
        event = await sender.receive()
        if isinstance(event, Message) and event.msg_type == ACK_TAG:
            confirmed = max(confirmed, TOKEN.unpack_from(event.payload)[0])
    return confirmed


@dataclass(frozen=True, slots=True)
class Window:
    """The sender's end-to-end window (see the module docstring)."""

    messages: int  # flood messages sent beyond the last token delivered back, at most
    token_every: int  # flood messages per token

    @classmethod
    def for_size(cls, window: int, size: int) -> Window:
        messages = max(1, min(window, WINDOW_MAX_BYTES // size))
        return cls(messages, max(1, messages // TOKENS_PER_WINDOW))


async def flood(
    sender: Client, count: int, size: int, service: ServiceLevel, tag: int, window: Window
) -> tuple[float, float]:
    """Send `count` messages of `size` bytes to the flood group, AGREED tokens in between.

    Returns (monotonic time of the first send, of the last send). The sender must be a
    member of `TOKEN_GROUP` only.
    """
    filler = bytes(size - SEQ.size)
    multicast = sender.multicast
    limit, every = window.messages, window.token_every
    confirmed = 0
    start = time.monotonic()
    for seq in range(count):
        if seq - confirmed >= limit:
            confirmed = await _wait_tokens(sender, seq - limit + 1)
        await multicast(FLOOD_GROUP, SEQ.pack(seq) + filler, service=service, msg_type=tag)
        sent = seq + 1
        if sent % every == 0 or sent == count:
            await multicast(
                TOKEN_GROUP, TOKEN.pack(sent), service=ServiceLevel.AGREED, msg_type=ACK_TAG
            )
    last_send = time.monotonic()
    await _wait_tokens(sender, count)  # nothing of this cell is left in the sender's queue
    return start, last_send


@dataclass(slots=True)
class FloodSetup:
    """A cluster with one receiver on every daemon and the sender on daemon 1."""

    cluster: RunningCluster
    sender: Client
    receivers: list[Worker]
    window: int  # messages (`Window.for_size`)
    timeout: float  # s: one cell, at most
    profiler: profiling.DaemonProfiler | None = None  # --profile: each cell profiled

    async def measure(
        self, count: int, size: int, service: ServiceLevel, tag: int, *, profile: bool = True
    ) -> CellResult:
        """One throughput cell: every receiver expects `count` messages tagged `tag`;
        profiled, from just before the first send to the last delivery, when this setup
        has a profiler and `profile` holds.

        Raises `GroupBenchError` when a receiver misses a message or the cell times out.
        """
        receivers, pids = self.receivers, self.cluster.pids
        for worker in receivers:
            worker.command({"cmd": "expect", "tag": tag, "count": count})
        await asyncio.gather(*(w.wait_event("expecting", REQUEST_TIMEOUT) for w in receivers))
        what = f"{len(pids)} daemons, {count} x {size} bytes {service.name}"
        if self.profiler is not None and profile:
            daemons = {f"daemon{i}": pid for i, pid in enumerate(pids, 1)}
            await self.profiler.start(cell_name(len(pids), size, service), daemons)
        views = self.cluster.views_installed()
        daemons_cpu = _process_cpu_seconds(pids)
        sender_cpu = _own_cpu_seconds()
        window = Window.for_size(self.window, size)
        try:
            async with asyncio.timeout(self.timeout):
                start, last_send = await flood(self.sender, count, size, service, tag, window)
                sender_cpu = _own_cpu_seconds() - sender_cpu
                reports = await asyncio.gather(
                    *(w.wait_event("done", self.timeout) for w in receivers)
                )
        except TimeoutError:
            if self.profiler is not None:
                await self.profiler.close()
            raise GroupBenchError(
                f"{what}: not delivered to every receiver within {self.timeout:g} s"
            ) from None
        except BaseException:
            if self.profiler is not None:  # every py-spy stopped and reaped; no profile
                await self.profiler.close()
            raise
        daemons_after = _process_cpu_seconds(pids)
        if self.profiler is not None and profile:
            await self.profiler.stop()
        if self.cluster.views_installed() != views:
            log.warning("%s: the daemons installed a new view during the run", what)
        disorder = sum(int(r["out_of_order"]) for r in reports)
        if disorder and service >= ServiceLevel.FIFO:
            log.warning("%s: %d deliveries out of the sender's order", what, disorder)
        last = max(float(r["last_at"]) for r in reports)
        return CellResult(
            messages=count,
            seconds=last - start,
            send_seconds=last_send - start,
            out_of_order=disorder,
            view_changed=self.cluster.views_installed() != views,
            cpu_s={
                "daemons": None
                if daemons_cpu is None or daemons_after is None
                else daemons_after - daemons_cpu,
                "receivers": sum(float(r["cpu_s"]) for r in reports),
                "sender": sender_cpu,
            },
        )


@contextlib.asynccontextmanager
async def flood_setup(
    count: int,
    tag: str,
    window: int,
    timeout: float,  # noqa: ASYNC109 - per cell
    tuning: Tuning = Tuning(),
    profiler: profiling.DaemonProfiler | None = None,
) -> AsyncIterator[FloodSetup]:
    """`count` daemons, a receiver process on each, the sender here; all stopped after."""
    env = profiler.daemon_environment() if profiler is not None else None
    async with (
        running_cluster(count, tag, tuning, env) as cluster,
        running_workers(cluster.addresses, "r") as receivers,
        await connect(cluster.addresses[0], name="sender", timeout=REQUEST_TIMEOUT) as sender,
    ):
        await _join_all(receivers, FLOOD_GROUP, REQUEST_TIMEOUT)
        await sender.join(TOKEN_GROUP)
        yield FloodSetup(cluster, sender, receivers, window, timeout, profiler)


def cell_name(daemons: int, size: int, service: ServiceLevel) -> str:
    """A throughput cell's name in `--profile` output: ``3d-1000B-AGREED``."""
    return f"{daemons}d-{size}B-{service.name}"


def cell_messages(base: int, size: int, daemons: int) -> int:
    """Messages of one throughput cell (see DEFAULT_MESSAGES)."""
    scaled = base / 4 if size >= LARGE_MESSAGE else base
    return max(MIN_MESSAGES, round(scaled / daemons))


async def measure_cluster(
    count: int,
    tag: str,
    sizes: Sequence[int],
    services: Sequence[ServiceLevel],
    base_messages: int,
    *,
    window: int,
    timeout: float,  # noqa: ASYNC109 - bounded wait per cell
    tuning: Tuning = Tuning(),
    profiler: profiling.DaemonProfiler | None = None,
) -> tuple[dict[str, dict[str, CellResult]], dict[str, dict[str, Any]]]:
    """Every (size, service) cell on one cluster of `count` daemons (each profiled
    when `profiler` is given); also the daemons' final statistics (`daemon_stopped`),
    by daemon name."""
    results: dict[str, dict[str, CellResult]] = {}
    async with flood_setup(count, tag, window, timeout, tuning, profiler) as setup:
        log.info("%d daemons: warm-up", count)
        tag_of_cell = 1
        await setup.measure(
            WARMUP_MESSAGES, 1_000, ServiceLevel.RELIABLE, tag_of_cell, profile=False
        )
        for size in sizes:
            for service in services:
                tag_of_cell += 1
                messages = cell_messages(base_messages, size, count)
                result = await setup.measure(messages, size, service, tag_of_cell)
                log.info(
                    "%d daemons, %d x %d bytes %s: %.0f msgs/s, %.1f Mbit/s "
                    "(%.2f s; sending took %.2f s); CPU s: %s",
                    count,
                    messages,
                    size,
                    service.name,
                    result.messages / result.seconds,
                    result.messages * size * 8 / result.seconds / 1e6,
                    result.seconds,
                    result.send_seconds,
                    {k: None if v is None else round(v, 2) for k, v in result.cpu_s.items()},
                )
                results.setdefault(str(size), {})[service.name] = result
    return results, setup.cluster.final_stats


# ---------------------------------------------------------------------- round trip


async def measure_rtt(
    tag: str,
    round_trips: int,
    warmup: int,
    size: int,
    tuning: Tuning = Tuning(),
    daemons: int = 2,
) -> list[float]:
    """Round-trip times (s) of AGREED messages, client on daemon 1 to an echo on daemon 2,
    in a cluster of `daemons` (the others idle)."""
    async with (
        running_cluster(daemons, tag, tuning) as cluster,
        running_workers(cluster.addresses[1:2], "echo") as (echo,),
        await connect(cluster.addresses[0], name="pinger", timeout=REQUEST_TIMEOUT) as pinger,
    ):
        await pinger.join("rtt-back")
        echo.command({"cmd": "join", "group": "rtt-out", "members": 1})
        await echo.wait_event("joined", REQUEST_TIMEOUT)
        echo.command({"cmd": "echo", "from": "rtt-out", "to": "rtt-back"})
        await echo.wait_event("echoing", REQUEST_TIMEOUT)
        filler = bytes(size - SEQ.size)
        samples: list[float] = []
        for seq in range(warmup + round_trips):
            sent_at = time.monotonic()
            await pinger.multicast("rtt-out", SEQ.pack(seq) + filler, service=ServiceLevel.AGREED)
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    while True:
                        event = await pinger.receive()
                        if isinstance(event, Message) and SEQ.unpack_from(event.payload)[0] == seq:
                            break
            except TimeoutError:
                raise GroupBenchError(
                    f"round trip {seq}: no echo within {REQUEST_TIMEOUT} s"
                ) from None
            if seq >= warmup:
                samples.append(time.monotonic() - sent_at)
    return samples


def summarise_rtt(samples: Sequence[float]) -> dict[str, float]:
    """min, median and p99 (nearest rank) in milliseconds."""
    ordered = sorted(samples)
    p99 = ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
    return {
        "min": round(ordered[0] * 1e3, 3),
        "median": round(statistics.median(ordered) * 1e3, 3),
        "p99": round(p99 * 1e3, 3),
    }


# ---------------------------------------------------------------------- the suite


_positive = integer(1)


def _window(text: str) -> int:
    value = _positive(text)
    if value > MAX_WINDOW:
        raise argparse.ArgumentTypeError(f"at most {MAX_WINDOW}, got {value}")
    return value


def _profile_rate(text: str) -> int:
    value = _positive(text)
    if value > profiling.MAX_RATE:
        raise argparse.ArgumentTypeError(f"at most {profiling.MAX_RATE}, got {value}")
    return value


def _mtu(text: str) -> int:
    value = _positive(text)
    if not MIN_MTU <= value <= MAX_MTU:
        raise argparse.ArgumentTypeError(f"must be {MIN_MTU}..{MAX_MTU}, got {value}")
    return value


def _int_list(low: int, high: int | None = None) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated integers within low..high."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
        if not values or min(values) < low or (high is not None and max(values) > high):
            bounds = f"{low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"integers {bounds} expected, got {text!r}")
        return values

    return parse


def _services(text: str) -> list[ServiceLevel]:
    try:
        return [service_level(part.strip()) for part in text.split(",") if part.strip()]
    except MeshcastError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--messages",
        type=_positive,
        default=None,
        help=f"messages per throughput cell (default {DEFAULT_MESSAGES:,}; {QUICK_MESSAGES} "
        f"with --quick), divided by the number of daemons, a quarter of it for messages "
        f"of {LARGE_MESSAGE:,} bytes or more",
    )
    parser.add_argument(
        "--daemons",
        type=_int_list(1, MAX_DAEMONS),
        default=list(DAEMON_COUNTS),
        help=f"cluster sizes, comma-separated (default 1,3,6; at most {MAX_DAEMONS})",
    )
    parser.add_argument(
        "--sizes",
        type=_int_list(SEQ.size, LimitsConfig().max_message_size),
        default=list(SIZES),
        help="message sizes in bytes, comma-separated (default 100,1000,10000)",
    )
    parser.add_argument(
        "--services",
        type=_services,
        default=list(SERVICES),
        help="service levels, comma-separated (default reliable,agreed)",
    )
    parser.add_argument(
        "--rtt-round-trips",
        type=_positive,
        default=None,
        help=f"measured AGREED round trips (default {RTT_ROUND_TRIPS}; 20 with --quick), "
        f"after {RTT_WARMUP} unmeasured ones",
    )
    parser.add_argument(
        "--skip-rtt", action="store_true", help="leave out the round-trip measurement"
    )
    parser.add_argument(
        "--only",
        choices=PARTS,
        default=None,
        help="measure only this part: the throughput cells, or the round trips with "
        f"{', '.join(map(str, RTT_DAEMONS))} daemons (default: both)",
    )
    parser.add_argument(
        "--window",
        type=_window,
        default=DEFAULT_WINDOW,
        metavar="MESSAGES",
        help="messages the sender may have sent beyond the last token delivered back "
        f"(default {DEFAULT_WINDOW}, at most {MAX_WINDOW}; never more than "
        f"{WINDOW_MAX_BYTES // 1024} KiB of payload)",
    )
    parser.add_argument(
        "--mtu",
        type=_mtu,
        default=None,
        metavar="BYTES",
        help=f"datagram size of the daemons' Hop links, {MIN_MTU}..{MAX_MTU} (default: "
        f"the configuration default: on loopback up to {LinkConfig().max_path_mtu:,}, "
        f"the largest UDP payload, [link] max_path_mtu)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="run the daemons' links in the clear, to compare with the default (encrypted)",
    )
    parser.add_argument(
        "--event-loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the daemons' event loop: uvloop (the default, where installed) or the "
        "standard library's asyncio loop, to measure what uvloop buys",
    )
    parser.add_argument(
        "--cell-timeout",
        type=seconds,
        default=DEFAULT_CELL_TIMEOUT,
        help=f"seconds one throughput cell may take (default {DEFAULT_CELL_TIMEOUT:g})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="few messages and round trips (smoke run)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="profile every daemon during each throughput cell (not the warm-up) and write "
        "the raw profiles and a summary by layer under DIR/<cell>/<daemon>/ (layers.json, "
        'layers.txt); the JSON gains "profile". Profiling slows the daemons: its '
        "figures are not the bench's",
    )
    parser.add_argument(
        "--profiler",
        choices=("auto", "py-spy", "cprofile"),
        default="auto",
        help="with --profile: py-spy (sampling, from outside; needs the py-spy executable "
        "and permission to attach), cprofile (inside each daemon) or auto (default: "
        "py-spy when on PATH, else cprofile)",
    )
    parser.add_argument(
        "--profile-rate",
        type=_profile_rate,
        default=profiling.DEFAULT_RATE,
        metavar="HZ",
        help=f"py-spy samples per second and daemon (default {profiling.DEFAULT_RATE})",
    )
    plot.add_plot_argument(parser, "throughput and round-trip plots")


def run(args: argparse.Namespace) -> dict[str, object]:
    """The suite's JSON object (see the module docstring).

    Raises `GroupBenchError` when something fails or SIGTERM arrives; SIGINT raises
    KeyboardInterrupt. Either way every process started is stopped first.
    """
    result = run_loop(_run_stoppable(args))
    if args.plot is not None:
        plot.group(args.plot, result)
    return result


async def _run_stoppable(args: argparse.Namespace) -> dict[str, object]:
    """`_run`, cancelled (so that every process is stopped on the way out) by SIGTERM."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    terminated = False

    def terminate() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, terminate)
    except (NotImplementedError, RuntimeError):  # no signals here (not the main thread)
        return await _run(args)
    try:
        return await _run(args)
    except asyncio.CancelledError:
        if not terminated:
            raise
        task.uncancel()
        raise GroupBenchError("stopped by SIGTERM") from None
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


# (section, key) of the daemons' final statistics summed in `daemon_counters`; a key a
# daemon does not report counts 0
_COUNTERS = {
    "datagrams_sent": ("", "datagrams_sent"),
    "gso_sends": ("", "gso_sends"),  # sendmsg calls that carried a run (UDP GSO)
    "gso_datagrams": ("", "gso_datagrams"),  # the datagrams those runs carried
    "link_retransmissions": ("links", "retransmissions"),
    "link_nacks_sent": ("links", "nacks_sent"),
    "link_gaps_opened": ("links", "gaps_opened"),  # packets a receiver found missing
    "link_probes_sent": ("links", "probes_sent"),  # tail probes (each resent, twice if idle)
    "link_duplicates_dropped": ("links", "duplicates_dropped"),  # e.g. a needless probe's
    "overlay_data_originated": ("overlay", "data_originated"),
    "group_repairs_sent": ("group", "repairs_sent"),
    "group_duplicates_dropped": ("group", "duplicates_dropped"),
    "group_broadcasts_lost": ("daemon", "group_broadcasts_lost"),
    "sessions_slow_disconnected": ("sessions", "slow_disconnected"),
    "internal_errors": ("", "internal_errors"),
}


def _profiler(args: argparse.Namespace) -> profiling.DaemonProfiler | None:
    """The `--profile` profiler, or None."""
    if args.profile is None:
        return None
    try:
        kind = profiling.choose(args.profiler)
    except profiling.ProfileError as exc:
        raise GroupBenchError(str(exc)) from None
    args.profile.mkdir(parents=True, exist_ok=True)
    return profiling.DaemonProfiler(args.profile, kind, rate=args.profile_rate)


def daemon_counters(final_stats: dict[str, dict[str, Any]]) -> dict[str, int]:
    """A few counters of the daemons' final statistics, summed over the daemons."""
    totals = dict.fromkeys(_COUNTERS, 0)
    for stats in final_stats.values():
        for name, (section, key) in _COUNTERS.items():
            if section == "links":
                links = stats.get("links", {})
                totals[name] += sum(int(link.get(key, 0)) for link in links.values())
            else:
                part = stats.get(section, {}) if section else stats
                totals[name] += int(part.get(key, 0) or 0)
    return totals


def _by_cell(
    cells: dict[str, dict[str, CellResult]], value: Callable[[int, CellResult], object]
) -> dict[str, dict[str, object]]:
    return {
        size: {service: value(int(size), cell) for service, cell in by_service.items()}
        for size, by_service in cells.items()
    }


def _cpu_per_message(cell: CellResult) -> dict[str, float | None]:
    return {
        role: None if seconds is None else round(seconds / cell.messages * 1e6, 1)
        for role, seconds in cell.cpu_s.items()
    }


async def _run(args: argparse.Namespace) -> dict[str, object]:
    base = args.messages or (QUICK_MESSAGES if args.quick else DEFAULT_MESSAGES)
    round_trips = args.rtt_round_trips or (QUICK_RTT_ROUND_TRIPS if args.quick else RTT_ROUND_TRIPS)
    tag = str(os.getpid())
    throughput: dict[str, object] = {}
    cpu: dict[str, object] = {}
    headline_cpu: dict[str, float | None] = {}  # all daemons, the 1,000-byte AGREED cell
    runs: dict[str, object] = {}
    tuning = Tuning(mtu=args.mtu, insecure=args.insecure, event_loop=args.event_loop)
    counters: dict[str, object] = {}
    do_throughput = args.only in (None, "throughput")
    do_rtt = args.only == "rtt" or (args.only is None and not args.skip_rtt)
    profiler = _profiler(args) if do_throughput else None
    try:
        for count in args.daemons if do_throughput else ():
            cells, final_stats = await measure_cluster(
                count,
                tag,
                args.sizes,
                args.services,
                base,
                window=args.window,
                timeout=args.cell_timeout,
                tuning=tuning,
                profiler=profiler,
            )
            throughput[str(count)] = _by_cell(cells, lambda size, cell: cell.rates(size))
            cpu[str(count)] = _by_cell(cells, lambda _, cell: _cpu_per_message(cell))
            headline = cells.get(HEADLINE_SIZE, {}).get(HEADLINE_SERVICE.name)
            if headline is not None:
                headline_cpu[str(count)] = _cpu_per_message(headline)["daemons"]
            runs[str(count)] = _by_cell(cells, lambda _, cell: cell.describe())
            counters[str(count)] = daemon_counters(final_stats)
    finally:
        if profiler is not None:
            await profiler.close()
    result: dict[str, object] = {}
    if do_throughput:
        result["throughput"] = throughput
    if do_rtt:
        result["rtt_ms"] = {
            str(count): summarise_rtt(
                await measure_rtt(tag, round_trips, RTT_WARMUP, RTT_SIZE, tuning, count)
            )
            for count in RTT_DAEMONS
        }
        result["rtt_floor_ms"] = {
            str(count): summarise_rtt(
                await measure_floor(count, round_trips, RTT_WARMUP, RTT_SIZE, tuning.environment())
            )
            for count in RTT_DAEMONS
        }
    if do_throughput:
        result["cpu_us_per_msg"] = headline_cpu
        result["cpu_us_per_msg_by_cell"] = cpu
        result["runs"] = runs
        result["daemon_counters"] = counters
    if profiler is not None:
        result["profile"] = profiler.describe()
    result["setup"] = {
        "only": args.only,
        "daemons": list(args.daemons) if do_throughput else [],
        "sizes": list(args.sizes),
        "services": [s.name for s in args.services],
        "messages_per_cell": {
            str(count): {str(size): cell_messages(base, size, count) for size in args.sizes}
            for count in args.daemons
        },
        "warmup_messages": WARMUP_MESSAGES,
        "window_messages": {
            str(size): Window.for_size(args.window, size).messages for size in args.sizes
        },
        "rtt_round_trips": round_trips if do_rtt else None,
        "rtt_daemons": list(RTT_DAEMONS) if do_rtt else [],
        "rtt_warmup": RTT_WARMUP,
        "rtt_size": RTT_SIZE,
        "overlay": f"full mesh on 127.0.0.x, shortest-path routing, {LINK_RATE} uploads "
        "and links, everything else default, no emulated delay or loss",
        "mtu": args.mtu or LinkConfig().mtu,
        "max_path_mtu": args.mtu or LinkConfig().max_path_mtu,  # loopback's datagrams
        "event_loop": args.event_loop
        if args.event_loop == "asyncio" or loop_factory() is not None
        else "asyncio (uvloop is not installed)",
        # the daemons are started with this process's modules: the same build
        "compiled": compiled(),
        "links": "in the clear (--insecure)"
        if args.insecure
        else "encrypted (AES-256-GCM, as users run them)",
        "sender": "one client on daemon 1 (this process), not a member of the group; an "
        f"AGREED token to itself every window/{TOKENS_PER_WINDOW} messages, at most one "
        "window of messages beyond the last token delivered back",
        "receivers": "one client per daemon, each in its own process, over Unix sockets",
        "throughput": "messages (payload bits) / (slowest receiver's last delivery - first send)",
        "rtt": f"{RTT_SIZE}-byte AGREED message from a client on daemon 1 to an echoing "
        "client on daemon 2 and back, in clusters of "
        f"{', '.join(map(str, RTT_DAEMONS))} daemons (full mesh, the others idle)",
        "rtt_floor": "the same chain with relays for daemons that only forward: each sends "
        "its client's bytes to every other relay over UDP and writes what it receives to "
        "its client (meshcast.bench.rtt_floor)",
        "cpu_us_per_msg": "user+system CPU of all daemons per message, 1000-byte AGREED",
        "cpu_us_per_msg_by_cell": "user+system CPU of all daemons / all receivers / the "
        "sender during a cell, per message",
        "daemon_counters": "summed over the daemons of each cluster, warm-up included",
        "cpu_count": os.cpu_count(),
    }
    return result


# ---------------------------------------------------------------------- worker side


async def _commands(queue: asyncio.Queue[dict[str, Any]], stop: asyncio.Event) -> None:
    """Commands from stdin into `queue`; "stop" or the end of stdin sets `stop`."""
    try:
        async with stdin_reader() as reader:
            while line := await reader.readline():
                command = json.loads(line)
                if command.get("cmd") == "stop":
                    break
                queue.put_nowait(command)
    finally:
        stop.set()


async def _wait_members(client: Client, group: str, members: int) -> None:
    while True:
        event = await client.receive()
        if isinstance(event, Membership) and event.group == group and len(event.members) >= members:
            return


async def _count(client: Client, tag: int, count: int) -> dict[str, Any]:
    """Receive until `count` messages tagged `tag` have arrived."""
    received = out_of_order = expected = 0
    first_at = last_at = 0.0
    cpu = _own_cpu_seconds()
    receive = client.receive
    while received < count:
        event = await receive()
        if type(event) is not Message or event.msg_type != tag:
            continue
        last_at = time.monotonic()
        if not received:
            first_at = last_at
        received += 1
        seq = SEQ.unpack_from(event.payload)[0]
        out_of_order += seq != expected
        expected = seq + 1
    return {
        "received": received,
        "first_at": first_at,
        "last_at": last_at,
        "out_of_order": out_of_order,
        "cpu_s": _own_cpu_seconds() - cpu,
    }


async def _echo(client: Client, source: str, to: str) -> None:
    while True:
        event = await client.receive()
        if isinstance(event, Message) and source in event.groups:
            await client.multicast(to, event.payload, service=event.service)


async def _serve(client: Client, queue: asyncio.Queue[dict[str, Any]]) -> None:
    while True:
        command = await queue.get()
        match command.get("cmd"):
            case "join":
                group = str(command["group"])
                await client.join(group)
                await _wait_members(client, group, int(command["members"]))
                emit({"event": "joined", "group": group})
            case "expect":
                tag, count = int(command["tag"]), int(command["count"])
                emit({"event": "expecting", "tag": tag})
                emit({"event": "done", "tag": tag, **await _count(client, tag, count)})
            case "echo":
                emit({"event": "echoing"})
                await _echo(client, str(command["from"]), str(command["to"]))
            case other:
                raise GroupBenchError(f"unknown command {other!r}")


async def worker_main(address: str, name: str) -> int:
    """A worker: connect, then obey commands until "stop" or the end of stdin."""
    try:
        async with asyncio.timeout(WORKER_MAX_RUNTIME):
            await _work(address, name)
    except (MeshcastError, OSError, ValueError, KeyError) as exc:  # TimeoutError: an OSError
        emit({"event": "error", "error": str(exc) or type(exc).__name__})
        return 1
    except ExceptionGroup as group:
        emit({"event": "error", "error": "; ".join(repr(e) for e in group.exceptions)})
        return 1
    return 0


async def _work(address: str, name: str) -> None:
    async with await connect(address, name=name, timeout=REQUEST_TIMEOUT) as client:
        emit({"event": "connected", "private_name": client.private_name})
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(_commands(queue, stop))
            work = tasks.create_task(_serve(client, queue))
            await stop.wait()
            work.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meshcast.bench.group",
        description="A client of `meshcast bench group`, driven by JSON lines on stdin.",
    )
    parser.add_argument("--connect", required=True, help="the daemon's client address")
    parser.add_argument("--name", required=True, help="client name")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return run_loop(worker_main(args.connect, args.name))


if __name__ == "__main__":
    sys.exit(main())
