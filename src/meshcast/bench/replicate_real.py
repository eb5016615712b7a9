"""`meshcast bench replicate`, part `real`: replication between daemons on separate hosts.

One daemon per network namespace (`meshcast.bench.netns.Testbed`: veths on a bridge,
each namespace's upload capped by `tc tbf`), the origin plus N recipients, a file of
random bytes. Each run asks the origin's daemon (over its client socket, as `meshcast
replicate` does) to replicate the file to every other daemon and takes the final report:
the completion time of the last recipient, from the request (the origin's hashing pass
included) to the report that all copies are verified and in place. FastReplica and the
naive fanout (the origin sends the whole file to each recipient) run on the same testbed,
one after the other; every copy's BLAKE3 digest is checked against the source.

The ratio is to the lower bound `max(F/u_s, N·F/(u_s + Σu_i), F/min d_i)` with the tbf
caps as the uploads (no download cap). CPU: user + system seconds of all daemon
processes during the run, per GB of file data received by the recipients.
When the machine cannot build namespaces (not root, no `ip`/`tc`), the same runs go over
loopback with every daemon's upload shaped by meshcast's own rate cap instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from meshcast.bench import netns
from meshcast.client.connection import connect
from meshcast.errors import MeshcastError
from meshcast.replicate.bound import lower_bound

_log = logging.getLogger(__name__)

PORT = 4801  # every daemon on its own host: one port number for all
# Each daemon shapes its replication payload to this fraction of its uplink: a full-size
# TCP segment carries 1448 payload bytes in a 1514-byte frame (0.956), and a tbf queue
# kept short drops no connection's first packet (a dropped SYN waits 1 s to be sent again).
RATE_FRACTION = 0.95
READY_TIMEOUT = 60.0  # s: the daemons agree on a view of all of them
GIVE_UP_AFTER = 20.0  # s: [replicate] give_up_after of the failure runs
RUN_TIMEOUT = 900.0  # s: one replication (fanout at 100 Mbit/s of 8 x 128 MiB is ~90 s)


@dataclass(frozen=True, slots=True)
class RealRun:
    strategy: str
    seconds: float  # request -> final report (every copy verified and in place)
    bound: float
    ratio: float
    cpu_seconds: float  # all daemons, user + system
    cpu_seconds_per_gb: float  # per GB received by the recipients
    digests_equal: bool
    state: str


def _cluster_toml(
    addresses: Sequence[str], uploads: Sequence[float], rate: float, give_up_after: float
) -> str:
    lines = [
        "[cluster]",
        'name = "bench"',
        'routing = "shortest-path"',
        "",
        "[[sites]]",
        'name = "lan"',
    ]
    for i, (host, up) in enumerate(zip(addresses, uploads, strict=True)):
        lines += [
            "",
            "[[daemons]]",
            f'name = "H{i}"',
            f'host = "{host}"',
            f"port = {PORT}",
            'site = "lan"',
            f"upload = {up:.0f}",
            f"download = {max(uploads) * 10:.0f}",
        ]
    lines += ["", "[links]", 'within_sites = "full"', "", "[replicate]", f"rate = {rate:.0f}"]
    lines.append(f"give_up_after = {give_up_after}")
    return "\n".join(lines) + "\n"


def _cpu_split(pids: Sequence[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of the processes so far."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11]) / tick
        system += int(fields[12]) / tick
    return user, system


def _cpu_seconds(pids: Sequence[int]) -> float:
    return sum(_cpu_split(pids))


def _random_file(path: Path, size: int) -> Path:
    """`size` random bytes at `path`, written 4 MiB at a time."""
    with path.open("wb") as f:
        for _ in range(size // (4 << 20)):
            f.write(os.urandom(4 << 20))
        f.write(os.urandom(size % (4 << 20)))
    return path


def _digest(path: Path) -> str:
    hasher = blake3.blake3()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            hasher.update(block)
    return hasher.hexdigest()


class _Cluster:
    """The daemons of one testbed (or of loopback), started as processes."""

    def __init__(
        self,
        workdir: Path,
        hosts: int,
        upload_bps: float,
        shaped: bool,
        rate: float,
        give_up_after: float = 120.0,
    ) -> None:
        self.workdir = workdir
        self.hosts = hosts
        self.upload_bps = upload_bps
        self.testbed: netns.Testbed | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.shaped = shaped
        self.rate = rate  # [replicate] rate, bits/s (0: none)
        self.give_up_after = give_up_after  # s: [replicate] give_up_after
        self._argv: list[list[str]] = []

    def start(self) -> None:
        from meshcast.runtime.keyfile import new_key, write_key_file

        if self.shaped:
            addresses = [f"127.0.77.{i + 1}" for i in range(self.hosts)]
        else:
            netns.cleanup_stale()
            self.testbed = netns.Testbed(self.hosts, self.upload_bps, tag=f"r{os.getpid()}")
            addresses = self.testbed.addresses
        rate = self.rate
        key = self.workdir / "cluster.key"
        write_key_file(key, new_key())
        toml = _cluster_toml(addresses, [self.upload_bps] * self.hosts, rate, self.give_up_after)
        toml += f'\n[security]\nkey_file = "{key}"\n'
        config = self.workdir / "cluster.toml"
        config.write_text(toml)
        config.chmod(0o600)
        for i in range(self.hosts):
            argv = [
                sys.executable,
                "-m",
                "meshcast.cli",
                "daemon",
                "--config",
                str(config),
                "--name",
                f"H{i}",
                "--data-dir",
                str(self.workdir / f"H{i}"),
                "--client-socket",
                str(self.socket(i)),
            ]
            self._argv.append(argv)
            self.procs.append(self._spawn(i))

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        with (self.workdir / f"H{i}.log").open("ab") as log:
            if self.testbed is not None:
                return self.testbed.run(i, self._argv[i], stdout=subprocess.DEVNULL, stderr=log)
            return subprocess.Popen(
                self._argv[i], stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
            )

    def kill(self, i: int) -> None:
        """SIGKILL daemon `i` (its process group: it runs in a session of its own)."""
        proc = self.procs[i]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def restart(self, i: int) -> None:
        """Start daemon `i` again (after `kill`): same config, data directory and socket."""
        self.procs[i] = self._spawn(i)

    def socket(self, i: int) -> Path:
        return self.workdir / f"H{i}.sock"

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.testbed is not None:
            self.testbed.close()


async def _view_members(cluster: _Cluster, host: int) -> set[str] | None:
    """The names in daemon `host`'s agreed view; None while it has none (or no socket)."""
    if not cluster.socket(host).exists():
        return None
    try:
        async with await connect(f"unix:{cluster.socket(host)}", name="bench") as c:
            status = await c.status()
    except (OSError, MeshcastError):
        return None
    view = status.get("view") or {}
    if not view.get("agreed"):
        return None
    return {str(m.get("name")) for m in view.get("members", [])}


async def _wait_ready(cluster: _Cluster, hosts: Sequence[int] = (0,)) -> None:
    """Until each daemon of `hosts` has an agreed view of every daemon."""
    everyone = {f"H{i}" for i in range(cluster.hosts)}
    deadline = time.monotonic() + READY_TIMEOUT
    pending = list(hosts)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        pending = [h for h in pending if await _view_members(cluster, h) != everyone]
        if not pending:
            return
    raise TimeoutError("the daemons did not agree on a view of all of them")


async def _wait_gone(cluster: _Cluster, host: int, gone: str) -> None:
    """Until daemon `host`'s agreed view no longer lists `gone` (bounded)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        members = await _view_members(cluster, host)
        if members is not None and gone not in members:
            return
        await asyncio.sleep(0.25)
    raise TimeoutError(f"H{host} still lists {gone} in its view")


async def _replicate(cluster: _Cluster, source: Path, strategy: str) -> tuple[float, object]:
    async with await connect(f"unix:{cluster.socket(0)}", name="bench") as client:
        started = time.perf_counter()
        handle = await client.replicate(str(source), to="all", strategy=strategy)
        report = await asyncio.wait_for(handle.wait(), RUN_TIMEOUT)
        return time.perf_counter() - started, report


def run_real(
    upload_bps: float,
    *,
    recipients: int = 8,
    size: int = 128 << 20,
    strategies: Sequence[str] = ("fastreplica", "fanout"),
    shaped: bool = False,
    rate_fraction: float = RATE_FRACTION,
) -> dict[str, RealRun]:
    """Replicate a `size`-byte file to `recipients` daemons with each strategy. Each
    daemon shapes its replication upload to `rate_fraction` of its cap (payload bits)."""
    workdir = Path(tempfile.mkdtemp(prefix="meshcast-bench-replicate-"))
    workdir.chmod(0o755)  # the daemons in the namespaces run as the same user anyway
    cluster = _Cluster(workdir, recipients + 1, upload_bps, shaped, upload_bps * rate_fraction)
    results: dict[str, RealRun] = {}
    try:
        source = _random_file(workdir / "payload.bin", size)
        want = _digest(source)
        cluster.start()
        asyncio.run(_wait_ready(cluster))
        pids = [p.pid for p in cluster.procs]
        bound = lower_bound(size, upload_bps, [upload_bps] * recipients)
        for strategy in strategies:
            for i in range(1, recipients + 1):  # every run starts from empty recipients
                shutil.rmtree(workdir / f"H{i}" / "replicas", ignore_errors=True)
            user0, system0 = _cpu_split(pids)
            seconds, report = asyncio.run(_replicate(cluster, source, strategy))
            user1, system1 = _cpu_split(pids)
            cpu = user1 + system1 - user0 - system0
            _log.info("cpu: user %.2f s, system %.2f s", user1 - user0, system1 - system0)
            copies = [
                workdir / f"H{i}" / "replicas" / source.name for i in range(1, recipients + 1)
            ]
            equal = all(p.exists() and _digest(p) == want for p in copies)
            state = str(getattr(report, "state", "?"))
            results[strategy] = RealRun(
                strategy,
                seconds,
                bound,
                seconds / bound,
                cpu,
                cpu / (recipients * size / 1e9),
                equal,
                state,
            )
            _log.info(
                "real %s at %.0f Mbit/s: %.2f s (bound %.2f s)",
                strategy,
                upload_bps / 1e6,
                seconds,
                bound,
            )
    finally:
        cluster.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return results


@dataclass(frozen=True, slots=True)
class MemoryRun:
    file_bytes: int
    seconds: float
    rss_before_mib: dict[str, float]
    rss_peak_mib: dict[str, float]
    rss_after_mib: dict[str, float]
    digests_equal: bool


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_memory(size: int = 4 << 30, recipients: int = 2) -> MemoryRun:
    """Replicate a `size`-byte file over loopback and sample every daemon's RSS: the
    daemons stream it in chunks, so their memory must not grow with the file."""
    workdir = Path(tempfile.mkdtemp(prefix="meshcast-bench-memory-"))
    cluster = _Cluster(workdir, recipients + 1, 10e9, shaped=True, rate=0.0)
    try:
        source = workdir / "big.bin"
        block = os.urandom(1 << 20)
        with source.open("wb") as f:  # random bytes: nothing compresses or dedups
            for i in range(size >> 20):
                f.write(block[i % 251 :] + block[: i % 251])
        want = _digest(source)
        cluster.start()
        asyncio.run(_wait_ready(cluster))
        names = [f"H{i}" for i in range(recipients + 1)]
        pids = [p.pid for p in cluster.procs]
        before = {n: _rss_mib(p) for n, p in zip(names, pids, strict=True)}
        peak = dict(before)

        async def sample_while(task: asyncio.Task[tuple[float, object]]) -> None:
            while not task.done():
                for n, p in zip(names, pids, strict=True):
                    peak[n] = max(peak[n], _rss_mib(p))
                await asyncio.sleep(0.1)

        async def run() -> float:
            task = asyncio.ensure_future(_replicate(cluster, source, "fastreplica"))
            await sample_while(task)
            return (await task)[0]

        seconds = asyncio.run(run())
        after = {n: _rss_mib(p) for n, p in zip(names, pids, strict=True)}
        copies = [workdir / f"H{i}" / "replicas" / source.name for i in range(1, recipients + 1)]
        equal = all(p.exists() and _digest(p) == want for p in copies)
        return MemoryRun(size, seconds, before, peak, after, equal)
    finally:
        cluster.close()
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------- failures


@dataclass(frozen=True, slots=True)
class FailureRun:
    """One replication of the `failure` part, with or without a recipient SIGKILLed."""

    victim: str | None  # the recipient killed in this run (None: the run without failure)
    survivors: tuple[str, ...]  # the recipients measured (the same in both runs of a pair)
    survivors_seconds: float  # request -> the first report with every survivor complete
    final_seconds: float  # request -> the final report
    killed_at: float | None  # fraction of all recipients' bytes held when the kill was sent
    digests_equal: bool  # every survivor's copy has the source's BLAKE3 digest
    state: str  # the final report's state
    missing: tuple[str, ...]  # the final report's recipients without a complete copy


async def _failure_run(
    cluster: _Cluster,
    source: Path,
    recipients: Sequence[str],
    victim: int | None,
    survivors: Sequence[str],
    size: int,
    kill_at: float,
    buddy: str | None,
) -> tuple[float, float, float | None, object]:
    """One FastReplica run to `recipients`; SIGKILL daemon `victim` (a host index) at the
    first report with `kill_at` of all the recipients' bytes held."""
    total = size * len(recipients)
    want = set(survivors)
    async with await connect(f"unix:{cluster.socket(0)}", name="bench") as client:
        started = time.perf_counter()
        handle = await client.replicate(
            str(source), to=list(recipients), strategy="fastreplica", buddy=buddy
        )
        survivors_at = float("inf")
        killed_at: float | None = None
        final: object = None
        async with asyncio.timeout(RUN_TIMEOUT):
            async for report in handle:
                if (
                    victim is not None
                    and killed_at is None
                    and report.held_bytes >= kill_at * total
                ):
                    cluster.kill(victim)
                    killed_at = report.held_bytes / total
                    _log.info(
                        "failure: H%d killed at %.1f %% of the bytes", victim, killed_at * 100
                    )
                done = {r.daemon for r in report.recipients if r.complete}
                if survivors_at == float("inf") and want <= done:
                    survivors_at = time.perf_counter() - started
                final = report
        return survivors_at, time.perf_counter() - started, killed_at, final


def run_failure(
    upload_bps: float,
    *,
    recipients: int = 8,
    size: int = 128 << 20,
    pairs: int = 5,
    kill_at: float = 0.3,
    buddy: bool = True,
    shaped: bool = False,
    rate_fraction: float = RATE_FRACTION,
) -> list[FailureRun]:
    """`pairs` pairs of FastReplica runs of a `size`-byte file from H0 to H1..H<recipients>,
    interleaved: one without failure, then one with a recipient SIGKILLed at `kill_at` of
    the bytes (H1, H2, ... in turn; restarted with an empty copy after its run). With
    `buddy`, one more daemon (the last) is the origin's buddy: it holds the same file, at
    the same path (one filesystem for every host)."""
    workdir = Path(tempfile.mkdtemp(prefix="meshcast-bench-failure-"))
    workdir.chmod(0o755)
    hosts = recipients + 1 + (1 if buddy else 0)
    # a run that cannot complete (a survivor stalled) ends in seconds, not minutes
    cluster = _Cluster(
        workdir, hosts, upload_bps, shaped, upload_bps * rate_fraction, GIVE_UP_AFTER
    )
    buddy_name = f"H{hosts - 1}" if buddy else None
    names = [f"H{i}" for i in range(1, recipients + 1)]
    runs: list[FailureRun] = []
    try:
        source = _random_file(workdir / "payload.bin", size)
        want = _digest(source)
        cluster.start()
        asyncio.run(_wait_ready(cluster))
        for pair in range(pairs):
            victim = 1 + pair % recipients
            survivors = [n for n in names if n != f"H{victim}"]
            for killed in (None, victim):
                for i in range(1, recipients + 1):  # every run starts from empty recipients
                    shutil.rmtree(workdir / f"H{i}" / "replicas", ignore_errors=True)
                survivors_s, final_s, killed_at, report = asyncio.run(
                    _failure_run(
                        cluster, source, names, killed, survivors, size, kill_at, buddy_name
                    )
                )
                copies = [workdir / n / "replicas" / source.name for n in survivors]
                equal = all(p.exists() and _digest(p) == want for p in copies)
                missing = tuple(r.daemon for r in getattr(report, "missing", ()))
                runs.append(
                    FailureRun(
                        None if killed is None else f"H{killed}",
                        tuple(survivors),
                        survivors_s,
                        final_s,
                        killed_at,
                        equal,
                        str(getattr(report, "state", "?")),
                        missing,
                    )
                )
                _log.info(
                    "failure pair %d, %s: survivors in %.2f s (final report %.2f s)",
                    pair,
                    "no failure" if killed is None else f"H{killed} killed",
                    survivors_s,
                    final_s,
                )
                if killed is not None:
                    if cluster.procs[killed].poll() is None:  # the run ended before 30 %
                        cluster.kill(killed)
                    asyncio.run(_wait_gone(cluster, 0, f"H{killed}"))
                    shutil.rmtree(workdir / f"H{killed}" / "replicas", ignore_errors=True)
                    cluster.restart(killed)
                    asyncio.run(_wait_ready(cluster, (0, killed)))
    finally:
        cluster.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return runs


def failure_summary(runs: Sequence[FailureRun]) -> dict[str, Any]:
    """The `failure` figures: the median survivors' time with a failure over the median
    without (the same survivor sets, pair by pair), and every run's details."""
    plain = [r.survivors_seconds for r in runs if r.victim is None]
    failed = [r.survivors_seconds for r in runs if r.victim is not None]
    slowdown = statistics.median(failed) / statistics.median(plain)
    pairs = [
        b.survivors_seconds / a.survivors_seconds
        for a, b in zip(runs[::2], runs[1::2], strict=True)
    ]
    return {
        "slowdown": round(slowdown, 4) if slowdown != float("inf") else None,
        "digests_equal": all(r.digests_equal for r in runs),
        "runs": len(runs),
        "pair_slowdowns": [round(p, 4) if p != float("inf") else None for p in pairs],
        "details": [
            {
                "victim": r.victim,
                "survivors_s": None
                if r.survivors_seconds == float("inf")
                else round(r.survivors_seconds, 3),
                "final_s": round(r.final_seconds, 3),
                "killed_at_fraction": None if r.killed_at is None else round(r.killed_at, 3),
                "digests_equal": r.digests_equal,
                "state": r.state,
                "missing": list(r.missing),
            }
            for r in runs
        ],
    }
