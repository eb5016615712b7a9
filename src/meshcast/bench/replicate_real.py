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
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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


def _cluster_toml(addresses: Sequence[str], uploads: Sequence[float], rate: float) -> str:
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


def _digest(path: Path) -> str:
    hasher = blake3.blake3()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            hasher.update(block)
    return hasher.hexdigest()


class _Cluster:
    """The daemons of one testbed (or of loopback), started as processes."""

    def __init__(
        self, workdir: Path, hosts: int, upload_bps: float, shaped: bool, rate: float
    ) -> None:
        self.workdir = workdir
        self.hosts = hosts
        self.upload_bps = upload_bps
        self.testbed: netns.Testbed | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.shaped = shaped
        self.rate = rate  # [replicate] rate, bits/s (0: none)

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
        toml = _cluster_toml(addresses, [self.upload_bps] * self.hosts, rate)
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
            log = (self.workdir / f"H{i}.log").open("wb")
            if self.testbed is not None:
                proc = self.testbed.run(i, argv, stdout=subprocess.DEVNULL, stderr=log)
            else:
                proc = subprocess.Popen(
                    argv, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
                )
            self.procs.append(proc)

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


async def _wait_ready(cluster: _Cluster) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        if not cluster.socket(0).exists():
            continue
        try:
            async with await connect(f"unix:{cluster.socket(0)}", name="bench") as c:
                status = await c.status()
        except (OSError, MeshcastError):
            continue
        view = status.get("view") or {}
        if view.get("agreed") and len(view.get("members", [])) == cluster.hosts:
            return
    raise TimeoutError("the daemons did not agree on a view of all of them")


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
        source = workdir / "payload.bin"
        with source.open("wb") as f:
            for _ in range(size // (4 << 20)):
                f.write(os.urandom(4 << 20))
            f.write(os.urandom(size % (4 << 20)))
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
