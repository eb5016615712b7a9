"""One link endpoint in its own OS process, for tests, the demo and the benchmark.

Child side (``python -m meshcast.runtime.peer_process --node 1 --listen 127.0.0.1:0 ...``):
binds its socket, then speaks JSON lines. On stdout it writes events::

    {"event": "listening", "node": 1, "host": "127.0.0.1", "port": 40123, "pid": 99}
    {"event": "established", "peer": 2}
    {"event": "done", "report": {...}}        sent everything (acknowledged), got everything
    {"event": "error", "error": "..."}         then exits 1

and on stdin it reads commands::

    {"cmd": "peer", "node": 2, "host": "127.0.0.1", "port": 40124}
    {"cmd": "stop"}

It exits by itself on ``stop``, when stdin closes (the parent vanished) and after
``--max-runtime`` seconds whatever happens. Logs go to stderr.

Parent side: `PeerProcess` starts a child, reads its events and stops it (terminate, then
kill, on timeout), so every test or benchmark stops what it started.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from meshcast.errors import MeshcastError
from meshcast.ids import NodeId
from meshcast.link.config import LinkConfig
from meshcast.runtime.impair import Impairment
from meshcast.runtime.json_child import (
    KILL_WAIT,
    JsonChild,
    emit,
    read_event,
    stdin_reader,
    terminate,
)
from meshcast.runtime.keyfile import read_key_file
from meshcast.runtime.loop import run
from meshcast.runtime.stats import DriverStats
from meshcast.runtime.tcp import TcpLinkDriver
from meshcast.runtime.udp import (
    DEFAULT_SEND_BATCH,
    Address,
    LinkFactory,
    UdpLinkDriver,
    hop_link_factory,
    link_security,
    parse_address,
    secure_link_factory,
)
from meshcast.runtime.workload import MessageChecker, MessagePlan, MessageSource
from meshcast.wire.keys import KeyRing

log = logging.getLogger(__name__)

DEFAULT_MAX_RUNTIME = 300.0  # s: a child never outlives this
_STARTUP_TIMEOUT = 30.0  # s: interpreter start + bind
_LINK_DEFAULTS = LinkConfig()


class _Driver(Protocol):
    @property
    def local_address(self) -> Address: ...
    def add_peer(self, peer: NodeId, address: Address) -> None: ...
    async def send(self, peer: NodeId, payload: bytes, *, timeout: float | None = ...) -> None: ...  # noqa: ASYNC109 - bounded wait is the API
    async def wait_established(self, peer: NodeId, *, timeout: float | None = None) -> None: ...  # noqa: ASYNC109 - bounded wait is the API
    async def wait_flushed(self, peer: NodeId, *, timeout: float | None = None) -> None: ...  # noqa: ASYNC109 - bounded wait is the API
    def statistics(self) -> DriverStats: ...


# ---------------------------------------------------------------------- child side


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m meshcast.runtime.peer_process",
        description="One meshcast link endpoint in its own process, driven over stdin/stdout.",
    )
    parser.add_argument("--node", type=int, required=True, help="this endpoint's node id")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to bind (port 0: any)")
    parser.add_argument("--transport", choices=("udp", "tcp"), default="udp")
    parser.add_argument("--send", type=int, default=0, help="messages to send to the peer")
    parser.add_argument("--expect", type=int, default=0, help="messages to expect from the peer")
    parser.add_argument(
        "--size", type=int, default=1024, help="message size in bytes (max if mixed)"
    )
    parser.add_argument("--mixed", action="store_true", help="mixed sizes, some split in pieces")
    parser.add_argument(
        "--verify",
        choices=("full", "light"),
        default="full",
        help="check every byte of what arrives, or only sequence numbers and sizes",
    )
    parser.add_argument("--loss", type=float, default=0.0, help="outgoing loss probability")
    parser.add_argument("--delay", type=float, default=0.0, help="outgoing one-way delay, s")
    parser.add_argument("--jitter", type=float, default=0.0, help="outgoing jitter, s")
    parser.add_argument("--impair-rate-bps", type=float, default=None, help="emulated bottleneck")
    parser.add_argument("--seed", type=int, default=0, help="seed of the impairment shim")
    parser.add_argument("--mtu", type=int, default=_LINK_DEFAULTS.mtu)
    parser.add_argument("--link-rate-bps", type=float, default=_LINK_DEFAULTS.rate_bps)
    parser.add_argument("--burst-bytes", type=int, default=_LINK_DEFAULTS.burst_bytes)
    parser.add_argument(
        "--send-batch", type=int, default=DEFAULT_SEND_BATCH, help="sends coalesced per pump"
    )
    parser.add_argument(
        "--key-file", default=None, help="seal the link with this cluster key (udp only)"
    )
    parser.add_argument("--max-runtime", type=float, default=DEFAULT_MAX_RUNTIME)
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    parser.add_argument("--profile", default=None, help="write a cProfile of the transfer here")
    parser.add_argument("--log-level", default="WARNING")
    return parser


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class _Progress:
    checker: MessageChecker
    complete: asyncio.Event
    first_delivery_at: float | None = None
    last_delivery_at: float | None = None


async def _read_commands(
    peer_info: asyncio.Future[tuple[NodeId, Address]], stop: asyncio.Event
) -> None:
    try:
        async with stdin_reader() as reader:
            while True:
                line = await reader.readline()
                if not line:
                    log.info("stdin closed: the parent is gone, stopping")
                    break
                try:
                    command = json.loads(line)
                    kind = command["cmd"]
                    if kind == "stop":
                        break
                    if kind == "peer" and not peer_info.done():
                        address = (str(command["host"]), int(command["port"]))
                        peer_info.set_result((NodeId(int(command["node"])), address))
                    else:
                        log.warning("ignoring command %r", command)
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("ignoring malformed command %r: %s", line, exc)
    finally:
        stop.set()


async def _work(
    args: argparse.Namespace,
    driver: _Driver,
    progress: _Progress,
    peer_info: asyncio.Future[tuple[NodeId, Address]],
) -> None:
    peer, address = await peer_info
    driver.add_peer(peer, address)
    await driver.wait_established(peer, timeout=args.max_runtime)
    emit({"event": "established", "peer": peer})
    profiler = cProfile.Profile() if args.profile else None
    cpu_start = _cpu_seconds()
    started_at = time.monotonic()
    if profiler is not None:
        profiler.enable()
    first_send_at = flushed_at = None
    if args.send:
        plan = MessagePlan(args.send, args.size, mixed=args.mixed)
        source = MessageSource(plan)
        first_send_at = time.monotonic()
        send = driver.send
        for seq in range(args.send):
            await send(peer, source.message(seq))
        await driver.wait_flushed(peer, timeout=args.max_runtime)
        flushed_at = time.monotonic()
    if args.expect:
        await progress.complete.wait()
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
    cpu = _cpu_seconds() - cpu_start
    checker = progress.checker
    report = {
        "node": args.node,
        "peer": peer,
        "sent": args.send,
        "delivered": checker.delivered,
        "bytes_delivered": checker.bytes_delivered,
        "duplicates": checker.duplicates,
        "corrupt": checker.corrupt,
        "started_at": started_at,
        "first_send_at": first_send_at,
        "flushed_at": flushed_at,
        "first_delivery_at": progress.first_delivery_at,
        "last_delivery_at": progress.last_delivery_at,
        "cpu_s": cpu,
        "stats": driver.statistics().as_dict(),
    }
    emit({"event": "done", "report": report})


async def _serve(args: argparse.Namespace, driver: _Driver, progress: _Progress) -> None:
    emit(
        {
            "event": "listening",
            "node": args.node,
            "host": driver.local_address[0],
            "port": driver.local_address[1],
            "pid": os.getpid(),
        }
    )
    loop = asyncio.get_running_loop()
    peer_info: asyncio.Future[tuple[NodeId, Address]] = loop.create_future()
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(_read_commands(peer_info, stop))
        work = tasks.create_task(_work(args, driver, progress, peer_info))
        await stop.wait()
        work.cancel()


async def child_main(args: argparse.Namespace) -> int:
    node = NodeId(args.node)
    plan = MessagePlan(args.expect, args.size, mixed=args.mixed)
    progress = _Progress(MessageChecker(plan), asyncio.Event())
    checker = progress.checker
    check = checker.check if args.verify == "full" else checker.check_light

    def on_delivered(peer: NodeId, payload: bytes) -> None:
        check(payload)
        if progress.first_delivery_at is None:
            progress.first_delivery_at = time.monotonic()
        if checker.delivered == plan.count and not progress.complete.is_set():
            progress.last_delivery_at = time.monotonic()
            progress.complete.set()

    try:
        async with asyncio.timeout(args.max_runtime):
            await _run_driver(args, node, on_delivered, progress)
    except TimeoutError:
        emit(
            {
                "event": "error",
                "error": f"max runtime of {args.max_runtime} s exceeded "
                f"({checker.delivered} of {plan.count} messages delivered)",
            }
        )
        return 1
    except (MeshcastError, OSError) as exc:
        emit({"event": "error", "error": str(exc)})
        return 1
    except ExceptionGroup as group:
        emit({"event": "error", "error": "; ".join(str(e) for e in group.exceptions)})
        return 1
    return 0


async def _run_driver(
    args: argparse.Namespace,
    node: NodeId,
    on_delivered: Callable[[NodeId, bytes], None],
    progress: _Progress,
) -> None:
    listen = parse_address(args.listen)
    if args.transport == "tcp":
        async with TcpLinkDriver.open(node, listen=listen, on_delivered=on_delivered) as tcp:
            await _serve(args, tcp, progress)
        return
    impaired = bool(args.loss or args.delay or args.jitter or args.impair_rate_bps)
    impairment = Impairment(
        loss=args.loss,
        delay=args.delay,
        jitter=args.jitter,
        rate_bps=args.impair_rate_bps,
        seed=args.seed,
    )
    config = LinkConfig(mtu=args.mtu, rate_bps=args.link_rate_bps, burst_bytes=args.burst_bytes)
    factory: LinkFactory = hop_link_factory
    if args.key_file is not None:
        ring = KeyRing.of(read_key_file(args.key_file))
        factory = secure_link_factory(link_security(ring))
    udp = await UdpLinkDriver.open(
        node,
        listen=listen,
        config=config,
        on_delivered=on_delivered,
        impairment=impairment if impaired else None,
        send_batch=args.send_batch,
        link_factory=factory,
    )
    async with udp:
        await _serve(args, udp, progress)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s peer[{args.node}] %(levelname)s %(name)s: %(message)s",
    )
    return run(child_main(args), use_uvloop=not args.no_uvloop)


# ---------------------------------------------------------------------- parent side


class PeerProcessError(MeshcastError):
    """A peer process failed to start, reported an error, or broke the JSON-lines protocol."""


class PeerProcess(JsonChild):
    """A running child endpoint. Always `stop` it (or use ``async with``)."""

    error = PeerProcessError

    def __init__(
        self, node: NodeId, process: asyncio.subprocess.Process, ready: dict[str, Any]
    ) -> None:
        super().__init__(process, f"peer {node}")
        self.node = node
        self.address: Address = (str(ready["host"]), int(ready["port"]))

    @classmethod
    async def start(
        cls, node: NodeId, *extra_args: str, startup_timeout: float = _STARTUP_TIMEOUT
    ) -> PeerProcess:
        """Spawn ``python -m meshcast.runtime.peer_process --node N ...`` and wait for its port."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "meshcast.runtime.peer_process",
            "--node",
            str(node),
            *extra_args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            ready = await read_event(process, startup_timeout, PeerProcessError, f"peer {node}")
            if ready.get("event") != "listening":
                raise PeerProcessError(f"peer {node} did not start: {ready}")
        except BaseException:
            await terminate(process, KILL_WAIT)
            raise
        return cls(node, process, ready)

    def connect(self, other: PeerProcess) -> None:
        """Tell this child where `other` listens; the link handshake starts at once."""
        host, port = other.address
        self.command({"cmd": "peer", "node": other.node, "host": host, "port": port})


if __name__ == "__main__":
    sys.exit(main())
