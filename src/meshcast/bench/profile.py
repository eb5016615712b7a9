"""`meshcast bench group --profile DIR`: where each daemon's time goes, layer by layer.

Two profilers. **py-spy** (when the `py-spy` executable is on PATH): one ``py-spy record
--native --idle`` per daemon, attached just before a cell's first send and stopped
(SIGINT, so that it writes its file) after the slowest receiver's last delivery; it
writes collapsed stacks (``--format raw``). **cProfile** (fallback, or
``--profiler cprofile``): the daemons run with `meshcast.runtime.profiling.ENV` set, and
SIGUSR1/SIGUSR2 start and stop a profile of each daemon's main thread around the cell.

For each profiled cell and daemon, ``DIR/<cell>/<daemon>/`` receives the raw profile
(``profile.raw.txt`` or ``profile.pstats``), ``layers.json`` and ``layers.txt``;
``DIR/<cell>/layers.txt`` puts the daemons side by side.

Layers (`LAYERS`): a py-spy sample is charged to the innermost frame that belongs to a
known layer, except that a sample whose leaf is a system call (``sendto``, ``epoll_wait``,
... in libc: `SYSCALLS`) counts as ``syscalls``. With cProfile a function's own time
(tottime) is charged to its layer; time in a function of no layer (a builtin such as
``list.append``, a library) goes to its callers' layers in proportion to the time spent
under each caller. Classification is pure (`classify_stack`, `summarise_collapsed`,
`summarise_pstats`) and unit-tested.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import marshal
import os
import re
import shutil
import signal
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from meshcast.errors import MeshcastError
from meshcast.runtime import profiling

ProfilerName = Literal["py-spy", "cProfile"]
LAYERS = (
    "session",  # group/sessions.py, runtime/sessions.py: client sessions and their wire
    "ordering",  # the rest of group/: ordering, engine, flush, membership, stability...
    "overlay",
    "link",
    "wire",  # codecs
    "runtime",  # daemon/ and runtime/: glue between the layers and the sockets
    "event_loop",  # asyncio, uvloop, selectors
    "syscalls",  # a leaf that is a system call: sendto, recvfrom, write, epoll_wait...
    "other",
)
# names of system calls (libc leaves; with cProfile, builtin methods of that name)
SYSCALLS = frozenset(
    {
        "send",
        "sendto",
        "sendmsg",
        "sendmmsg",
        "recv",
        "recvfrom",
        "recvmsg",
        "recvmmsg",
        "read",
        "readv",
        "write",
        "writev",
        "epoll_wait",
        "epoll_pwait",
        "epoll_pwait2",
        "epoll_ctl",
        "poll",
        "ppoll",
        "select",
        "pselect",
        "pselect6",
        "accept",
        "accept4",
        "connect",
        "getrandom",
    }
)
# system calls that wait for work (an idle event loop) rather than do it
WAITS = frozenset({"epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select"})
# py-spy samples per second per daemon: with --native each sample pauses the daemon and
# unwinds its stack; at 100 Hz a 3-daemon cell keeps about 70 % of its unprofiled rate
DEFAULT_RATE = 100
MAX_RATE = 10_000
ATTACH_TIMEOUT = 15.0  # s: py-spy attached / a daemon confirms its cProfile started
STOP_TIMEOUT = 30.0  # s: py-spy writes its file / a daemon dumps its pstats
_POLL = 0.01  # s between looks for a daemon's cProfile files
_OUTPUT_LINES = 20  # last lines of a py-spy's output kept for an error message
_MAX_CALLER_DEPTH = 12  # cProfile: how far up a function of no layer is charged
_TOP = 15  # functions listed per daemon in layers.json


class ProfileError(MeshcastError):
    """A profiler could not start, stop or write its profile."""


# ---------------------------------------------------------------------- classification


@dataclass(frozen=True, slots=True)
class Frame:
    """One stack frame: function name and file ("" when unknown)."""

    name: str
    file: str = ""


_FRAME = re.compile(r"^(?P<name>.*?) \((?P<where>[^()]*)\)$")
_LINE = re.compile(r":\d+$")
_MESHCAST = re.compile(r"(?:^|/)meshcast/(?P<rest>[^/]+(?:/[^/]+)?)$")


def parse_frame(text: str) -> Frame:
    """A py-spy frame, ``name (file:line)`` or ``name (library.so)``."""
    match = _FRAME.match(text.strip())
    if match is None:
        return Frame(text.strip())
    return Frame(match["name"], _LINE.sub("", match["where"]))


def layer_of_file(file: str) -> str | None:
    """The layer a source file belongs to; None when it belongs to none of them."""
    path = file.replace("\\", "/")
    match = _MESHCAST.search(path)
    if match is not None:
        parts = match["rest"].split("/")
        if len(parts) < 2:  # a top-level module (errors.py, ids.py): no layer of its own
            return None
        package, module = parts[0], parts[1].removesuffix(".py")
        if package in ("group", "runtime") and module == "sessions":
            return "session"
        return {
            "group": "ordering",
            "overlay": "overlay",
            "link": "link",
            "wire": "wire",
            "daemon": "runtime",
            "runtime": "runtime",
        }.get(package)
    if "/asyncio/" in path or path.startswith("asyncio/") or "uvloop" in path or "libuv" in path:
        return "event_loop"
    if path.rsplit("/", 1)[-1] == "selectors.py":
        return "event_loop"
    return None


def _syscall_name(name: str) -> str:
    """``__libc_sendto`` -> ``sendto``; ``epoll_wait`` stays."""
    return name.lstrip("_").removeprefix("libc_")


def is_syscall_leaf(frame: Frame) -> bool:
    """A native frame (not Python source) named after a system call."""
    if frame.file.endswith((".py", ".pyx")):
        return False
    return _syscall_name(frame.name) in SYSCALLS


def classify_stack(stack: Sequence[Frame]) -> str:
    """The layer of one sample; `stack` runs from the outermost frame to the leaf."""
    if not stack:
        return "other"
    if is_syscall_leaf(stack[-1]):
        return "syscalls"
    for frame in reversed(stack):
        layer = layer_of_file(frame.file)
        if layer is not None:
            return layer
    return "other"


def parse_collapsed(text: str) -> Iterator[tuple[list[Frame], int]]:
    """Stacks and sample counts of py-spy's raw format (``f1;f2;f3 COUNT`` per line)."""
    for line in text.splitlines():
        stack, _, count = line.strip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        yield [parse_frame(part) for part in stack.split(";")], int(count)


@dataclass(slots=True)
class LayerSummary:
    """Samples (py-spy) or seconds of own time (cProfile) per layer, and the top functions."""

    profiler: ProfilerName
    weights: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LAYERS, 0.0))
    functions: collections.defaultdict[tuple[str, str, str], float] = field(
        default_factory=lambda: collections.defaultdict(float)
    )  # (layer, function, file) -> weight
    syscalls: collections.defaultdict[str, float] = field(
        default_factory=lambda: collections.defaultdict(float)
    )  # system call -> weight: sending, receiving and waiting (epoll) apart
    waiting: float = 0.0  # the part of "syscalls" spent waiting for work (`WAITS`)

    @property
    def total(self) -> float:
        return sum(self.weights.values())

    def shares(self) -> dict[str, float]:
        """Each layer's share of the total (0 everywhere when nothing was sampled)."""
        total = self.total
        return {
            layer: round(weight / total, 4) if total else 0.0
            for layer, weight in self.weights.items()
        }

    def busy_shares(self) -> dict[str, float]:
        """Shares without the time spent waiting for work: where the CPU goes."""
        busy = dict(self.weights)
        busy["syscalls"] -= self.waiting
        total = sum(busy.values())
        return {
            layer: round(weight / total, 4) if total > 0 else 0.0 for layer, weight in busy.items()
        }

    def describe(self) -> dict[str, object]:
        total = self.total
        unit = "samples" if self.profiler == "py-spy" else "seconds"
        return {
            "profiler": self.profiler,
            unit: round(total, 6) if unit == "seconds" else int(total),
            "shares": self.shares(),
            "waiting": round(self.waiting / total, 4) if total else 0.0,
            "busy_shares": self.busy_shares(),
            "syscalls": {
                name: round(weight / total, 4) if total else 0.0
                for name, weight in sorted(self.syscalls.items(), key=lambda item: -item[1])
            },
            "top_functions": [
                {
                    "layer": layer,
                    "function": name,
                    "file": file,
                    "share": round(weight / total, 4) if total else 0.0,
                }
                for (layer, name, file), weight in sorted(
                    self.functions.items(), key=lambda item: -item[1]
                )[:_TOP]
            ],
        }


def summarise_collapsed(text: str) -> LayerSummary:
    """The layer summary of a py-spy raw profile."""
    summary = LayerSummary("py-spy")
    for stack, count in parse_collapsed(text):
        layer = classify_stack(stack)
        summary.weights[layer] += count
        leaf = stack[-1]
        summary.functions[(layer, leaf.name, leaf.file)] += count
        if layer == "syscalls":
            name = _syscall_name(leaf.name)
            summary.syscalls[name] += count
            if name in WAITS:
                summary.waiting += count
    return summary


# pstats: {(file, line, name): (primitive calls, calls, tottime, cumtime, callers)} where
# callers maps (file, line, name) -> (primitive calls, calls, tottime, cumtime)
PstatsKey = tuple[str, int, str]
_BUILTIN = re.compile(r"^<(?:built-in )?method '?(?P<name>[\w.]+)'?(?: of '(?P<owner>[\w.]+)')?")


def _builtin_name(key: PstatsKey) -> str:
    """``<method 'poll' of 'select.epoll' objects>`` -> ``poll``; "" if no builtin."""
    match = _BUILTIN.match(key[2])
    return "" if match is None else _syscall_name(match["name"].rsplit(".", 1)[-1])


def _builtin_layer(key: PstatsKey) -> str | None:
    """The layer of a C function in a pstats key (file ``~``), by its name."""
    match = _BUILTIN.match(key[2])
    if match is None:
        return None
    owner, name = match["owner"] or "", match["name"]
    qualified = f"{owner}.{name}" if owner else name
    if "uvloop" in qualified or qualified.startswith(("_asyncio.", "asyncio.")):
        return "event_loop"
    if _syscall_name(name.rsplit(".", 1)[-1]) in SYSCALLS:
        return "syscalls"
    return None


def _key_layer(key: PstatsKey) -> str | None:
    if key[0] == "~":
        return _builtin_layer(key)
    return layer_of_file(key[0])


def summarise_pstats(stats: Mapping[PstatsKey, Any]) -> LayerSummary:
    """The layer summary of cProfile statistics (`pstats.Stats.stats`, or a dump's dict)."""
    summary = LayerSummary("cProfile")
    memo: dict[PstatsKey, dict[str, float]] = {}

    def charged(
        key: PstatsKey, depth: int, seen: frozenset[PstatsKey]
    ) -> tuple[dict[str, float], bool]:
        """How a unit of `key`'s own time spreads over the layers (empty: only through
        callers already on the path, a cycle), and whether a cycle was cut on the way
        (then the answer holds for this path only and is not remembered)."""
        layer = _key_layer(key)
        if layer is not None:
            return {layer: 1.0}, False
        if key in memo:
            return memo[key], False
        entry = stats.get(key)
        callers: Mapping[PstatsKey, Sequence[float]] = entry[4] if entry else {}
        if depth >= _MAX_CALLER_DEPTH or not callers:
            return {"other": 1.0}, False
        spread: dict[str, float] = collections.defaultdict(float)
        total = 0.0
        cut = False
        for caller, values in callers.items():
            if caller in seen:
                cut = True
                continue
            weight = float(values[2]) or float(values[1]) or 1.0
            parts, caller_cut = charged(caller, depth + 1, seen | {key})
            cut |= caller_cut
            if not parts:
                continue
            total += weight
            for part_layer, part in parts.items():
                spread[part_layer] += part * weight
        result = {part_layer: value / total for part_layer, value in spread.items()}
        if not cut:
            memo[key] = result
        return result, cut

    for key, entry in stats.items():
        own = float(entry[2])
        if own <= 0:
            continue
        parts = charged(key, 0, frozenset())[0] or {"other": 1.0}
        for layer, part in parts.items():
            summary.weights[layer] += own * part
            summary.functions[(layer, key[2], f"{key[0]}:{key[1]}")] += own * part
            if layer == "syscalls":
                summary.syscalls[key[2]] += own * part
                if _builtin_name(key) in WAITS:
                    summary.waiting += own * part
    return summary


def load_pstats(path: Path) -> dict[PstatsKey, Any]:
    """The statistics dict of a ``.pstats`` file (`cProfile.Profile.dump_stats`)."""
    with path.open("rb") as file:
        stats = marshal.load(file)  # our own daemons' dump, never foreign input
    if not isinstance(stats, dict):
        raise ProfileError(f"{path}: not a pstats dump")
    return stats


def render_text(title: str, columns: Mapping[str, Mapping[str, float]]) -> str:
    """A small table: one row per layer, one column of percentages per daemon."""
    names = list(columns)
    width = max([len(layer) for layer in LAYERS] + [len("layer")])
    cell = max([len(name) for name in names] + [7])
    lines = [title, f"{'layer':<{width}}  " + "  ".join(f"{n:>{cell}}" for n in names)]
    for layer in LAYERS:
        values = "  ".join(f"{100 * columns[n].get(layer, 0.0):>{cell - 2}.1f} %" for n in names)
        lines.append(f"{layer:<{width}}  {values}")
    return "\n".join(lines) + "\n"


def _tables(title: str, summaries: Mapping[str, LayerSummary]) -> str:
    """Shares of all samples, then of the busy ones (without waiting for work)."""
    busy = {daemon: summary.busy_shares() for daemon, summary in summaries.items()}
    return (
        render_text(title, {daemon: summary.shares() for daemon, summary in summaries.items()})
        + "\n"
        + render_text(f"the same without waiting for work ({', '.join(sorted(WAITS))})", busy)
    )


# ---------------------------------------------------------------------- running profilers


def pyspy_available() -> bool:
    return shutil.which("py-spy") is not None


def choose(requested: str) -> ProfilerName:
    """``auto``: py-spy when on PATH, else cProfile."""
    if requested == "cprofile":
        return "cProfile"
    if requested == "py-spy":
        if not pyspy_available():
            raise ProfileError("--profiler py-spy: no py-spy executable on PATH")
        return "py-spy"
    return "py-spy" if pyspy_available() else "cProfile"


@dataclass(slots=True)
class _Spy:
    daemon: str
    process: asyncio.subprocess.Process
    output: Path
    output_lines: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=_OUTPUT_LINES)
    )
    reader: asyncio.Task[None] | None = None


class DaemonProfiler:
    """Profiles the daemons of one cluster cell by cell; results under `root`.

    `start(cell, pids)` before a cell's first send, `stop()` after its last delivery;
    `close()` (always, also on errors) stops and reaps whatever still runs.
    """

    def __init__(self, root: Path, profiler: ProfilerName, rate: int = DEFAULT_RATE) -> None:
        self.root = root
        self.profiler: ProfilerName = profiler
        self.rate = rate
        self.cells: dict[str, dict[str, dict[str, float]]] = {}
        self.native = True  # py-spy: with native frames (system-call leaves), if it can
        self._spool = root / ".cprofile"
        self._cell: str | None = None
        self._pids: dict[str, int] = {}
        self._spies: list[_Spy] = []

    def daemon_environment(self) -> dict[str, str]:
        """What the daemons' environment needs (cProfile: the spool directory)."""
        if self.profiler != "cProfile":
            return {}
        self._spool.mkdir(parents=True, exist_ok=True)
        return {profiling.ENV: str(self._spool.resolve())}

    def describe(self) -> dict[str, object]:
        return {
            "dir": str(self.root),
            "profiler": self.profiler,
            "rate_hz": self.rate if self.profiler == "py-spy" else None,
            "native": self.native if self.profiler == "py-spy" else None,
            "cells": self.cells,
        }

    def _daemon_dir(self, daemon: str) -> Path:
        assert self._cell is not None
        return self.root / self._cell / daemon

    async def start(self, cell: str, pids: Mapping[str, int]) -> None:
        if self._cell is not None:
            raise ProfileError(f"cell {self._cell} is still being profiled")
        self._cell, self._pids = cell, dict(pids)
        for daemon in pids:
            self._daemon_dir(daemon).mkdir(parents=True, exist_ok=True)
        try:
            if self.profiler == "py-spy":
                await self._start_spies()
            else:
                await self._start_cprofile()
        except BaseException:
            await self.close()
            raise

    async def stop(self) -> dict[str, dict[str, float]]:
        """Stop profiling the cell; write and return its layer shares by daemon."""
        cell = self._cell
        if cell is None:
            raise ProfileError("no cell is being profiled")
        try:
            if self.profiler == "py-spy":
                summaries = await self._stop_spies()
            else:
                summaries = await self._stop_cprofile()
        finally:
            await self.close()
        return self._write(cell, summaries)

    async def close(self) -> None:
        """Stop and reap every py-spy still running (the profile of the cell is lost)."""
        spies, self._spies = self._spies, []
        for spy in spies:
            if spy.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    spy.process.kill()
        for spy in spies:
            await spy.process.wait()
            if spy.reader is not None:
                spy.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await spy.reader
        self._cell = None

    def _write(
        self, cell: str, summaries: Mapping[str, LayerSummary]
    ) -> dict[str, dict[str, float]]:
        shares = {daemon: summary.shares() for daemon, summary in summaries.items()}
        for daemon, summary in summaries.items():
            directory = self.root / cell / daemon
            (directory / "layers.json").write_text(
                json.dumps({"cell": cell, "daemon": daemon, **summary.describe()}, indent=2) + "\n",
                encoding="utf-8",
            )
            title = f"{cell}, {daemon}: {self._what(summary)}"
            (directory / "layers.txt").write_text(
                _tables(title, {daemon: summary}), encoding="utf-8"
            )
        what = self._what(next(iter(summaries.values()))) if summaries else self.profiler
        (self.root / cell / "layers.txt").write_text(
            _tables(f"{cell}: {what}", summaries), encoding="utf-8"
        )
        self.cells[cell] = shares
        return shares

    def _what(self, summary: LayerSummary) -> str:
        if summary.profiler == "py-spy":
            native = "native frames" if self.native else "Python frames only"
            return f"py-spy, {self.rate} Hz, idle samples and {native} included, share of samples"
        return "cProfile, main thread, share of own time (tottime)"

    # ------------------------------------------------------------------ py-spy

    async def _start_spies(self) -> None:
        try:
            await self._launch_spies(native=self.native)
        except ProfileError:
            if not self.native:
                raise
            await self._reap_spies()
            self.native = False  # native unwinding unsupported here: Python frames only
            await self._launch_spies(native=False)

    async def _reap_spies(self) -> None:
        cell = self._cell
        await self.close()
        self._cell = cell

    async def _launch_spies(self, *, native: bool) -> None:
        for daemon, pid in self._pids.items():
            output = self._daemon_dir(daemon) / "profile.raw.txt"
            argv = ["py-spy", "record", "--pid", str(pid), "--rate", str(self.rate)]
            argv += ["--format", "raw", "--output", str(output), "--idle", "--full-filenames"]
            if native:
                argv.append("--native")
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,  # "Sampling process ..." comes on stdout
                stderr=asyncio.subprocess.STDOUT,
            )
            spy = _Spy(daemon, process, output)
            self._spies.append(spy)
            attached = asyncio.get_running_loop().create_future()
            spy.reader = asyncio.ensure_future(_read_output(spy, attached))
            try:
                async with asyncio.timeout(ATTACH_TIMEOUT):
                    ok = await attached
            except TimeoutError:
                ok = False
            if not ok:
                await asyncio.sleep(0)  # let the reader take the last lines
                raise ProfileError(
                    f"py-spy could not attach to {daemon} (pid {pid}): "
                    + (" | ".join(spy.output_lines) or "no output")
                )

    async def _stop_spies(self) -> dict[str, LayerSummary]:
        for spy in self._spies:
            if spy.process.returncode is None:
                spy.process.send_signal(signal.SIGINT)  # py-spy writes its file and exits
        summaries: dict[str, LayerSummary] = {}
        for spy in self._spies:
            try:
                await asyncio.wait_for(spy.process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                raise ProfileError(
                    f"py-spy of {spy.daemon} did not stop within {STOP_TIMEOUT:g} s"
                ) from None
            if spy.reader is not None:
                await asyncio.wait([spy.reader], timeout=STOP_TIMEOUT)
            if not spy.output.exists():
                raise ProfileError(
                    f"py-spy of {spy.daemon} wrote no profile (exit {spy.process.returncode}): "
                    + " | ".join(spy.output_lines)
                )
            summaries[spy.daemon] = summarise_collapsed(spy.output.read_text(encoding="utf-8"))
        return summaries

    # ------------------------------------------------------------------ cProfile

    async def _start_cprofile(self) -> None:
        for pid in self._pids.values():
            for stale in (
                profiling.started_path(self._spool, pid),
                profiling.pstats_path(self._spool, pid),
            ):
                stale.unlink(missing_ok=True)
        for pid in self._pids.values():
            os.kill(pid, profiling.START_SIGNAL)
        await self._await_files(
            {d: profiling.started_path(self._spool, p) for d, p in self._pids.items()},
            "start cProfile",
            ATTACH_TIMEOUT,
        )

    async def _stop_cprofile(self) -> dict[str, LayerSummary]:
        for pid in self._pids.values():
            os.kill(pid, profiling.STOP_SIGNAL)
        dumps = {d: profiling.pstats_path(self._spool, p) for d, p in self._pids.items()}
        await self._await_files(dumps, "write its cProfile statistics", STOP_TIMEOUT)
        summaries = {}
        for daemon, dump in dumps.items():
            kept = self._daemon_dir(daemon) / "profile.pstats"
            os.replace(dump, kept)
            profiling.started_path(self._spool, self._pids[daemon]).unlink(missing_ok=True)
            summaries[daemon] = summarise_pstats(load_pstats(kept))
        return summaries

    async def _await_files(self, paths: Mapping[str, Path], what: str, timeout: float) -> None:  # noqa: ASYNC109 - bounded wait
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while missing := [d for d, path in paths.items() if not path.exists()]:
            if loop.time() >= deadline:
                raise ProfileError(
                    f"{', '.join(missing)} did not {what} within {timeout:g} s "
                    f"(was it started with {profiling.ENV}?)"
                )
            await asyncio.sleep(_POLL)


async def _read_output(spy: _Spy, attached: asyncio.Future[bool]) -> None:
    """Keep py-spy's last output lines; resolve `attached` once it samples or ends."""
    assert spy.process.stdout is not None
    try:
        while line := await spy.process.stdout.readline():
            text = line.decode(errors="replace").strip()
            if text:
                spy.output_lines.append(text)
            if "Sampling process" in text and not attached.done():
                attached.set_result(True)
    finally:
        if not attached.done():
            attached.set_result(False)
