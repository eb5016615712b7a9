"""Helpers of the daemon tests: cluster files on free loopback ports, daemon processes.

`write_cluster` writes a TOML cluster file whose daemons listen on 127.0.0.1, 127.0.0.2,
... on ports found free at test time, and its cluster key beside it (`write_key`). `DaemonProcess` runs ``meshcast daemon`` as a child
process and parses the JSON lines it logs on stderr; `running_daemons` stops every process
it started (SIGTERM, then SIGKILL), whatever happens in the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshcast.config import ClusterConfig
from meshcast.runtime.keyfile import load_keyring, new_key, write_key_file
from meshcast.runtime.local_cluster import free_udp_ports
from meshcast.wire.keys import KeyRing

# The command under test: the `daemon` subcommand of the `meshcast` console script.
DAEMON_COMMAND = (sys.executable, "-m", "meshcast.cli", "daemon")

# Small membership timers, so failures are detected in half a second.
HELLO_INTERVAL = 0.1  # s: heartbeat of the overlay links
FAILURE_TIMEOUT = 0.5  # s: a silent neighbour is declared down after this long
VIEW_SETTLE_INTERVAL = 0.05  # s: quiet time before a new view is installed
KEY_FILE = "cluster.key"  # the cluster key, beside the cluster file
START_TIMEOUT = 20.0  # s: process start, bind and first log line
STOP_TIMEOUT = 10.0  # s: SIGTERM to exit; SIGKILL after that

Event = dict[str, Any]
Predicate = Callable[[Event], bool]


def host_of(index: int) -> str:
    """127.0.0.1 for daemon 1, 127.0.0.2 for daemon 2, ..."""
    return f"127.0.0.{index}"


def cluster_toml(
    count: int,
    edges: Iterable[tuple[int, int]],
    ports: Sequence[int],
    *,
    emulated: Iterable[tuple[int, int]] = (),
    key_file: str | None = KEY_FILE,
) -> str:
    """A cluster of daemons d1..d<count> with the given overlay edges (by daemon number).

    `key_file` (relative to the cluster file's directory: `write_key` puts it there) is
    the cluster key; None writes ``insecure = true`` instead."""
    lines = [
        "[cluster]",
        'name = "test"',
        'routing = "shortest-path"',
        "",
        "[[sites]]",
        'name = "lo"',
    ]
    for i in range(1, count + 1):
        lines += [
            "",
            "[[daemons]]",
            f'name = "d{i}"',
            f"id = {i}",
            f'host = "{host_of(i)}"',
            f"port = {ports[i - 1]}",
            'site = "lo"',
            'upload = "100Mbit"',
            'download = "100Mbit"',
        ]
    lines += ["", "[links]", 'within_sites = "none"', 'between_sites = "none"']
    delayed = set(emulated)
    for a, b in edges:
        lines += ["", "[[links.edge]]", f'a = "d{a}"', f'b = "d{b}"']
        if (a, b) in delayed:
            lines.append('emulate = { delay = "3ms", jitter = "1ms" }')
    lines += [
        "",
        "[link]",
        'hello_interval = "100ms"',
        "",
        "[membership]",
        f"hello_interval = {HELLO_INTERVAL}",
        f"failure_timeout = {FAILURE_TIMEOUT}",
        f"view_settle_interval = {VIEW_SETTLE_INTERVAL}",
        "",
        "[security]",
        "insecure = true" if key_file is None else f'key_file = "{key_file}"',
    ]
    return "\n".join(lines) + "\n"


def write_key(directory: Path, name: str = KEY_FILE) -> Path:
    """The cluster key file `name` in `directory` (mode 0600), made if there is none."""
    path = directory / name
    if not path.exists():
        write_key_file(path, new_key())
    return path


def write_cluster(
    directory: Path,
    count: int,
    edges: Iterable[tuple[int, int]],
    *,
    emulated: Iterable[tuple[int, int]] = (),
) -> Path:
    """Write a cluster file on free ports of 127.0.0.1..count, with its key beside it;
    returns its path."""
    ports = free_udp_ports([host_of(i) for i in range(1, count + 1)])
    write_key(directory)
    path = directory / "cluster.toml"
    path.write_text(cluster_toml(count, edges, ports, emulated=emulated), encoding="utf-8")
    return path


def ring(count: int) -> list[tuple[int, int]]:
    """d1-d2-...-d<count>-d1: any one daemon can fail and the rest stay connected."""
    return [(i, i + 1) for i in range(1, count)] + [(1, count)]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the test process dies (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class DaemonProcess:
    """One ``meshcast daemon`` child; its stderr parsed into `events` as it arrives."""

    name: str
    process: asyncio.subprocess.Process
    events: list[Event]
    other_lines: list[str]  # stderr lines that are not JSON (tracebacks, ...)
    changed: asyncio.Event
    reader: asyncio.Task[None]

    @classmethod
    async def start(cls, config: Path, name: str, *extra: str) -> DaemonProcess:
        """Start the daemon and wait for its ``daemon_started`` event."""
        process = await asyncio.create_subprocess_exec(
            *DAEMON_COMMAND,
            "--config",
            str(config),
            "--name",
            name,
            *extra,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        events: list[Event] = []
        other: list[str] = []
        changed = asyncio.Event()
        reader = asyncio.create_task(_read_stderr(process, events, other, changed))
        daemon = cls(name, process, events, other, changed, reader)
        try:
            await daemon.wait_event("daemon_started", timeout=START_TIMEOUT)
        except BaseException:
            await daemon.stop()
            raise
        return daemon

    @property
    def started(self) -> Event:
        return self.named("daemon_started")[0]

    def named(self, event: str) -> list[Event]:
        return [e for e in self.events if e["event"] == event]

    async def wait_event(
        self,
        event: str,
        predicate: Predicate = lambda _: True,
        *,
        timeout: float,  # noqa: ASYNC109 - every wait of a test is bounded
        after: int = 0,
    ) -> Event:
        """The first event called `event` (from index `after` on) that satisfies `predicate`.

        Raises `TimeoutError` (with the tail of the log), or `AssertionError` if the process
        exits first.
        """
        return (await self.wait_indexed(event, predicate, timeout=timeout, after=after))[1]

    async def wait_indexed(
        self,
        event: str,
        predicate: Predicate = lambda _: True,
        *,
        timeout: float,  # noqa: ASYNC109 - every wait of a test is bounded
        after: int = 0,
    ) -> tuple[int, Event]:
        """`wait_event`, also returning the event's index in `events`."""
        index = after
        try:
            async with asyncio.timeout(timeout):
                while True:
                    while index < len(self.events):
                        candidate = self.events[index]
                        index += 1
                        if candidate["event"] == event and predicate(candidate):
                            return index - 1, candidate
                    if self.reader.done():
                        raise AssertionError(
                            f"{self.name} exited (code {self.process.returncode}) before "
                            f"{event}; last lines: {self.tail()}"
                        )
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise TimeoutError(
                f"{self.name}: no {event} within {timeout} s; {self.tail()}"
            ) from None

    def tail(self, count: int = 5) -> str:
        return json.dumps(self.events[-count:]) + "".join(self.other_lines[-count:])

    def send_signal(self, sig: signal.Signals) -> float:
        """Send `sig`; returns the wall-clock time it was sent (comparable with "ts")."""
        sent_at = time.time()
        self.process.send_signal(sig)
        return sent_at

    async def wait_exit(self, timeout: float) -> int:  # noqa: ASYNC109 - every wait is bounded
        async with asyncio.timeout(timeout):
            code = await self.process.wait()
            await self.reader
        return code

    async def stop(self) -> int:
        """SIGTERM, wait, then SIGKILL: the process is gone when this returns."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.process.returncode is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_TIMEOUT):
                    await self.process.wait()
        code = await self.process.wait()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_TIMEOUT):
                await self.reader
        self.reader.cancel()
        return code


async def _read_stderr(
    process: asyncio.subprocess.Process,
    events: list[Event],
    other: list[str],
    changed: asyncio.Event,
) -> None:
    assert process.stderr is not None
    try:
        while line := await process.stderr.readline():
            text = line.decode("utf-8", "replace").rstrip("\n")
            try:
                parsed = json.loads(text)
            except ValueError:
                other.append(text)
            else:
                if isinstance(parsed, dict) and "event" in parsed:
                    events.append(parsed)
                else:
                    other.append(text)
            changed.set()
    finally:
        changed.set()


@asynccontextmanager
async def running_daemons(
    config: Path, names: Sequence[str], *extra: str
) -> AsyncIterator[dict[str, DaemonProcess]]:
    """Start the named daemons (all at once); stop every one of them on the way out.

    Daemons the test adds to the yielded dict (a restart) are stopped too.
    """
    daemons: dict[str, DaemonProcess] = {}
    started: list[DaemonProcess] = []
    try:
        results = await asyncio.gather(
            *(DaemonProcess.start(config, name, *extra) for name in names),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, DaemonProcess):
                started.append(result)
                daemons[result.name] = result
        for result in results:
            if isinstance(result, BaseException):
                raise result
        yield daemons
    finally:
        everyone = {id(d): d for d in [*started, *daemons.values()]}
        await asyncio.gather(*(d.stop() for d in everyone.values()))


def members(event: Event) -> set[int]:
    return set(event["members"])


async def wait_agreed(
    daemons: Iterable[DaemonProcess],
    expected: set[int],
    timeout: float,  # noqa: ASYNC109 - every wait is bounded
    *,
    edges: int | None = None,
    after: Mapping[str, int] | None = None,
) -> dict[str, Event]:
    """Each daemon's first ``view_agreed`` with members `expected` (from `after[name]` on).

    With `edges`, only a view with that many links counts: while links come up, the
    daemons may agree on a view with every member but not yet every link. Pass `after`
    (see `marks`) when waiting for a view the daemons may already have passed through on
    their way up: a view of the survivors can also be a view of the start-up.
    """

    def wanted(event: Event) -> bool:
        return members(event) == expected and (edges is None or len(event["edges"]) == edges)

    listed = list(daemons)
    waits = [
        d.wait_event(
            "view_agreed",
            wanted,
            timeout=timeout,
            after=0 if after is None else after[d.name],
        )
        for d in listed
    ]
    return dict(zip([d.name for d in listed], await asyncio.gather(*waits), strict=True))


def marks(daemons: Iterable[DaemonProcess]) -> dict[str, int]:
    """How many events each daemon has logged so far: wait for what comes after."""
    return {d.name: len(d.events) for d in daemons}


COMMAND_TIMEOUT = 30.0  # s: one command-line run, interpreter start included


async def run_command(
    *argv: str,
    env: Mapping[str, str] | None = None,
    timeout: float = COMMAND_TIMEOUT,  # noqa: ASYNC109 - the child is killed after it
) -> tuple[int, str, str]:
    """Run `argv` to its end (killed after `timeout`): (exit status, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=None if env is None else dict(env),
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode("utf-8"), err.decode("utf-8")


def cluster_ring(config: ClusterConfig) -> KeyRing:
    """The key ring of a cluster these helpers wrote (they always give it a key)."""
    ring = load_keyring(config.security, config.source)
    assert ring is not None
    return ring
