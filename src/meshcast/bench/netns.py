"""A testbed of separate hosts in Linux network namespaces, each with a capped upload.

Layout (`Testbed(hosts=3, upload_bps=100e6, tag="x")`)::

    mcbench-x-hub:  br0 ── h0, h1, h2          (a bridge; no address, no qdisc)
                          │   │   │  veth pairs
    mcbench-x-h0:  eth0 10.213.N.1/24   tbf rate R  (egress = that host's upload)
    mcbench-x-h1:  eth0 10.213.N.2/24   tbf rate R
    mcbench-x-h2:  eth0 10.213.N.3/24   tbf rate R

The bridge lives in a hub namespace of its own and each veth pair is created directly
between a host namespace and the hub, so the root namespace's links, addresses and routes
are never touched. Only a host's own veth end has a qdisc: it caps what that host sends;
what it receives is limited by the senders' caps only, as on an access link whose
download is much faster than its upload.

Processes started with `Testbed.run` are tracked and stopped by `close()` (SIGTERM to
their process group, SIGKILL after a grace period, then anything else still inside one
of our namespaces). `close()` runs on `with` exit, on an exception or KeyboardInterrupt
in the body or during setup, and from `atexit`; `cleanup_stale` removes what a crashed
run (SIGKILL, power loss) left behind. Needs root, `ip` and `tc` (iproute2).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import fcntl
import functools
import gzip
import ipaddress
import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from meshcast.errors import MeshcastError

_log = logging.getLogger(__name__)

PREFIX = "mcbench-"  # every namespace this module creates starts with it
LOCK_DIR = Path("/run/mcbench")  # one flock'd file per live testbed (see cleanup_stale)
SUBNET_BASE = "10.213"  # hosts get 10.213.N.(i+1)/24, N picked per testbed
HOST_IFNAME = "eth0"  # a host's veth end, inside its namespace
BRIDGE = "br0"  # inside the hub namespace
MAX_HOSTS = 250
_CMD_TIMEOUT = 30.0  # seconds for one `ip`/`tc` call (they take milliseconds)
_TAG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")

# Why these tbf parameters (measured: docs/benchmarks.md, "Network-namespace testbed"):
# - GSO: a host's veth end builds super-packets of at most GSO_MAX_BYTES (veth's default
#   is 64 KiB). TCP fills whatever queue it is given, so the queue must be small in
#   time; at 100 Mbit/s 64 KiB is already 5 ms, and a queue of a few such packets drops
#   whole 44-segment bursts. With 16 KiB the same bytes hold 4x as many packets.
# - burst: at least what one timer tick lets through, rate/HZ (tc's rule; a smaller
#   bucket cannot refill between two watchdog wake-ups that fire a tick late), and at
#   least one GSO packet plus a frame. The bucket only lets the first `burst` bytes of
#   a busy period leave at line rate; after that the rate is exactly R.
# - limit: the bytes that may wait for tokens, so the queue delay is at most limit/R:
#   R·4 ms, but at least 8 GSO packets (128 KiB: 10.5 ms at 100 Mbit/s). A drop here is
#   local: TCP is told at once and keeps the segment, but a flow whose every packet
#   was refused sends again only when its probe timer fires (200 ms+), and with 8 flows
#   at 100 Mbit/s a 64 KiB limit lost 5-8% of the rate to such pauses in 5 runs of 7;
#   128 KiB never did. One and eight TCP flows (BBR and CUBIC) then reach 95.4-95.7% of
#   R as payload at 100 and 400 Mbit/s, the ceiling: tbf counts Ethernet frames, and
#   1448 payload bytes ride in 1514-byte frames (95.6%).
GSO_MAX_BYTES = 16 * 1024
MIN_BURST_BYTES = GSO_MAX_BYTES + 1514
QUEUE_DELAY = 0.004  # seconds of queue at the cap, at most (for caps >= 262 Mbit/s)
MIN_LIMIT_BYTES = 8 * GSO_MAX_BYTES


class TestbedError(MeshcastError):
    """The testbed could not be built, driven or removed (the message says which step)."""

    __test__ = False  # not a pytest test class despite the name


@dataclass(frozen=True, slots=True)
class TbfParams:
    """One host's `tc tbf` settings, in bits/s and bytes."""

    rate_bps: float
    burst_bytes: int
    limit_bytes: int

    @classmethod
    def for_rate(cls, rate_bps: float, hz: int | None = None) -> TbfParams:
        """Parameters for a cap of `rate_bps` (see the comment above `GSO_MAX_BYTES`)."""
        if not rate_bps > 0:
            raise TestbedError(f"upload cap must be > 0 bits/s, got {rate_bps!r}")
        rate_bytes = rate_bps / 8
        tick = hz if hz is not None else kernel_hz()
        burst = max(MIN_BURST_BYTES, math.ceil(rate_bytes / tick))
        limit = max(MIN_LIMIT_BYTES, math.ceil(rate_bytes * QUEUE_DELAY))
        return cls(rate_bps, burst, limit)

    def tc_args(self) -> list[str]:
        """The `tbf ...` part of a `tc qdisc add|change` command line."""
        return [
            "tbf",
            "rate",
            f"{round(self.rate_bps)}bit",
            "burst",
            f"{self.burst_bytes}b",
            "limit",
            f"{self.limit_bytes}b",
        ]


@functools.cache
def kernel_hz() -> int:
    """The kernel's CONFIG_HZ if its config is readable, else 100 (the largest tick)."""
    candidates = [Path("/proc/config.gz"), Path(f"/boot/config-{os.uname().release}")]
    for path in candidates:
        try:
            raw = path.read_bytes()
            text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("ascii", "ignore")
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
        match = re.search(r"^CONFIG_HZ=(\d+)$", text, re.MULTILINE)
        if match:
            return int(match.group(1))
    return 100


def _cmd(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one `ip`/`tc` command; raise TestbedError with its stderr when `check` fails."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=_CMD_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TestbedError(f"{' '.join(argv)}: {exc}") from exc
    if check and done.returncode != 0:
        raise TestbedError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done


def _in(netns: str, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`ip -n NETNS ...` or `tc -n NETNS ...`: one command inside a namespace."""
    return _cmd([tool, "-n", netns, *args], check=check)


def netns_list() -> list[str]:
    """Names of all named network namespaces (`ip netns list`)."""
    out = _cmd(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(name: str) -> list[int]:
    done = _cmd(["ip", "netns", "pids", name], check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def _kill_pids(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """Wait until none of `pids` exists (zombies of other parents count as gone)."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive:
        alive = [pid for pid in alive if _pid_running(pid)]
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    return alive


def _pid_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _lock_path(ns_prefix: str) -> Path:
    return LOCK_DIR / f"{ns_prefix.rstrip('-')}.lock"


def _take_lock(ns_prefix: str) -> IO[bytes]:
    """Hold the lock of testbed `ns_prefix` until the file is closed (or we die)."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    lock = _lock_path(ns_prefix).open("wb")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        lock.close()
        raise TestbedError(f"a live testbed already uses {ns_prefix!r}") from exc
    return lock


def _release_lock(ns_prefix: str, lock: IO[bytes]) -> None:
    _lock_path(ns_prefix).unlink(missing_ok=True)
    lock.close()  # releases the flock


def _is_locked(ns_prefix: str) -> bool:
    """True if a live testbed holds the lock of `ns_prefix` (flock dies with its process)."""
    path = _lock_path(ns_prefix)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _remove_namespaces(names: Sequence[str], grace: float) -> list[str]:
    """Kill every process inside `names`, delete their links, then the namespaces.

    Returns what could not be removed (as human-readable problems).
    """
    problems: list[str] = []
    pids = [pid for name in names for pid in _netns_pids(name)]
    _kill_pids(pids, signal.SIGTERM)
    left = _wait_gone(pids, grace)
    _kill_pids(left, signal.SIGKILL)
    if _wait_gone(left, 5.0):
        problems.append(f"processes survived SIGKILL: {left}")
    for name in names:
        # Deleting one end of a veth deletes the pair; bridges go with their namespace
        # too, but removing links first means a namespace kept alive by a stray process
        # (or an open /proc/PID/ns/net) no longer bridges anything.
        links = _in(name, "ip", "-o", "link", "show", check=False).stdout
        for line in links.splitlines():
            fields = line.split(":", 2)
            if len(fields) < 2:
                continue
            ifname = fields[1].strip().split("@", 1)[0]
            if ifname != "lo":
                _in(name, "ip", "link", "del", "dev", ifname, check=False)
    for name in names:
        done = _cmd(["ip", "netns", "del", name], check=False)
        if done.returncode != 0 and name in netns_list():
            problems.append(f"ip netns del {name}: {done.stderr.strip()}")
    return problems


def cleanup_stale(prefix: str = PREFIX, *, grace: float = 1.0) -> list[str]:
    """Remove namespaces (and their links and processes) whose name starts with `prefix`.

    `prefix` must start with `PREFIX` ("mcbench-"), so nothing else is ever touched. A
    testbed that is still alive (its owner process holds its lock) is skipped, so one
    run cannot tear down another's. Returns the namespaces removed.
    """
    if not prefix.startswith(PREFIX):
        raise TestbedError(f"cleanup_stale: prefix must start with {PREFIX!r}, got {prefix!r}")
    stale: list[str] = []
    for name in netns_list():
        if not name.startswith(prefix):
            continue
        ns_prefix = name.rsplit("-", 1)[0] + "-"
        if _is_locked(ns_prefix):
            _log.info("cleanup_stale: %s belongs to a live testbed; kept", name)
            continue
        stale.append(name)
    if stale:
        problems = _remove_namespaces(stale, grace)
        if problems:
            raise TestbedError("cleanup_stale: " + "; ".join(problems))
        _log.info("cleanup_stale: removed %s", ", ".join(stale))
    for path in LOCK_DIR.glob(f"{prefix.rstrip('-')}*.lock"):
        ns_prefix = path.stem + "-"
        if ns_prefix.startswith(prefix) and not _is_locked(ns_prefix):
            path.unlink(missing_ok=True)
    return stale


def available() -> tuple[bool, str]:
    """Whether a Testbed can be built here, and if not, why (for skip messages)."""
    if sys.platform != "linux":
        return False, f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return False, "network namespaces and tc need root (euid 0)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return False, f"{' and '.join(missing)} not found: install iproute2"
    probe_prefix = f"{PREFIX}probe{os.getpid()}-"
    probe = f"{probe_prefix}x"
    veth = ["name", "va", "gso_max_size", str(GSO_MAX_BYTES), "type", "veth", "peer", "name", "vb"]
    lock = None
    try:
        lock = _take_lock(probe_prefix)  # so a concurrent cleanup_stale leaves it alone
        _cmd(["ip", "netns", "add", probe])
        _in(probe, "ip", "link", "add", "name", BRIDGE, "type", "bridge")
        _in(probe, "ip", "link", "add", *veth)
        _in(probe, "ip", "link", "set", "dev", "vb", "master", BRIDGE)
        _in(probe, "tc", "qdisc", "add", "dev", "va", "root", *TbfParams.for_rate(1e8).tc_args())
    except TestbedError as exc:
        return False, f"cannot build a namespace testbed: {exc}"
    except OSError as exc:
        return False, f"cannot take a lock in {LOCK_DIR}: {exc}"
    finally:
        _cmd(["ip", "netns", "del", probe], check=False)
        if lock is not None:
            _release_lock(probe_prefix, lock)
    return True, "root, iproute2, veth, bridge and tbf available"


def _used_subnets() -> set[int]:
    """Third octets N of 10.213.N.0/24 networks with an address in the root namespace."""
    out = _cmd(["ip", "-o", "addr", "show"], check=False).stdout
    used = set()
    for match in re.finditer(r"\binet (\d+\.\d+\.\d+\.\d+)/(\d+)", out):
        net = ipaddress.ip_network(f"{match.group(1)}/{match.group(2)}", strict=False)
        for third in range(256):
            ours = ipaddress.ip_network(f"{SUBNET_BASE}.{third}.0/24")
            if ours.overlaps(net):
                used.add(third)
    return used


class Testbed:
    """`hosts` network namespaces on one bridge, each with its upload capped by tbf.

    `upload_bps` is one cap for every host or one per host (bits/s). `tag` names the run
    (namespaces are `mcbench-<tag>-hub`, `mcbench-<tag>-h<i>`); default `p<pid>`. Raises
    TestbedError (and removes whatever it had built) if a step fails.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        hosts: int,
        upload_bps: float | Sequence[float],
        *,
        tag: str | None = None,
        grace: float = 3.0,
    ) -> None:
        if not 1 <= hosts <= MAX_HOSTS:
            raise TestbedError(f"hosts must be 1..{MAX_HOSTS}, got {hosts}")
        caps = (
            [float(upload_bps)] * hosts
            if isinstance(upload_bps, int | float)
            else [float(b) for b in upload_bps]
        )
        if len(caps) != hosts:
            raise TestbedError(f"{len(caps)} upload caps for {hosts} hosts")
        self.tag = tag if tag is not None else f"p{os.getpid()}"
        if not _TAG_RE.match(self.tag):
            raise TestbedError(f"tag must match {_TAG_RE.pattern}, got {self.tag!r}")
        self.prefix = f"{PREFIX}{self.tag}-"
        self.hub = f"{self.prefix}hub"
        self.names: list[str] = [f"{self.prefix}h{i}" for i in range(hosts)]
        self.upload_bps: list[float] = caps
        self.tbf: list[TbfParams] = [TbfParams.for_rate(cap) for cap in caps]
        self.addresses: list[str] = []
        self.subnet = ""
        self.grace = grace
        self._procs: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []
        self._lock: IO[bytes] | None = None
        self._closed = False
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- building ---------------------------------------------------------------------

    def _build(self) -> None:
        started = time.monotonic()
        self._lock = _take_lock(self.prefix)
        existing = set(netns_list()) & {self.hub, *self.names}
        if existing:
            raise TestbedError(
                f"namespaces {sorted(existing)} exist (a crashed run?): "
                f"meshcast.bench.netns.cleanup_stale({self.prefix!r}) removes them"
            )
        third = self._pick_subnet()
        self.subnet = f"{SUBNET_BASE}.{third}.0/24"
        self.addresses = [f"{SUBNET_BASE}.{third}.{i + 1}" for i in range(len(self.names))]

        self._add_netns(self.hub)
        _in(self.hub, "ip", "link", "add", "name", BRIDGE, "type", "bridge", "stp_state", "0")
        _in(self.hub, "ip", "link", "set", "dev", BRIDGE, "up")
        for i, name in enumerate(self.names):
            self._add_netns(name)
            port = f"h{i}"
            veth = ["name", HOST_IFNAME, "gso_max_size", str(GSO_MAX_BYTES), "type", "veth"]
            _in(name, "ip", "link", "add", *veth, "peer", "name", port, "netns", self.hub)
            _in(self.hub, "ip", "link", "set", "dev", port, "master", BRIDGE, "up")
            _in(name, "ip", "addr", "add", f"{self.addresses[i]}/24", "dev", HOST_IFNAME)
            _in(name, "ip", "link", "set", "dev", "lo", "up")
            _in(name, "ip", "link", "set", "dev", HOST_IFNAME, "up")
            _in(name, "tc", "qdisc", "add", "dev", HOST_IFNAME, "root", *self.tbf[i].tc_args())
        _log.info(
            "testbed %s: %d hosts in %s, built in %.2f s",
            self.tag,
            len(self.names),
            self.subnet,
            time.monotonic() - started,
        )

    def _add_netns(self, name: str) -> None:
        _cmd(["ip", "netns", "add", name])
        self._created.append(name)

    def _pick_subnet(self) -> int:
        used = _used_subnets()
        start = zlib.crc32(self.tag.encode()) % 256
        for step in range(256):
            third = (start + step) % 256
            if third not in used:
                return third
        raise TestbedError(f"every {SUBNET_BASE}.N.0/24 is in use in the root namespace")

    # -- driving ----------------------------------------------------------------------

    def exec_argv(self, host: int, argv: Sequence[str]) -> list[str]:
        """`argv` prefixed to run inside host `host`'s namespace (untracked: see run)."""
        return ["ip", "netns", "exec", self.names[self._index(host)], *argv]

    def run(self, host: int, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside host `host`'s namespace; close() stops it.

        Runs in a new session (own process group) unless `start_new_session` is given,
        so close() can stop what it spawns too. Other keywords go to subprocess.Popen.
        """
        if self._closed:
            raise TestbedError("run() on a closed testbed")
        popen_kwargs.setdefault("start_new_session", True)
        proc: subprocess.Popen[Any] = subprocess.Popen(self.exec_argv(host, argv), **popen_kwargs)
        self._procs.append(proc)
        return proc

    def set_upload(self, host: int, bps: float) -> None:
        """Change host `host`'s upload cap now (`tc qdisc change`; traffic keeps flowing)."""
        index = self._index(host)
        params = TbfParams.for_rate(bps)
        _in(
            self.names[index],
            "tc",
            "qdisc",
            "change",
            "dev",
            HOST_IFNAME,
            "root",
            *params.tc_args(),
        )
        self.upload_bps[index] = float(bps)
        self.tbf[index] = params

    def qdisc_stats(self, host: int) -> dict[str, Any]:
        """tc's JSON statistics of host `host`'s tbf (bytes, packets, drops, overlimits)."""
        name = self.names[self._index(host)]
        out = _in(name, "tc", "-s", "-j", "qdisc", "show", "dev", HOST_IFNAME).stdout
        entries: list[dict[str, Any]] = json.loads(out)
        return next((e for e in entries if e.get("kind") == "tbf"), {})

    def _index(self, host: int) -> int:
        if not 0 <= host < len(self.names):
            raise TestbedError(f"host {host} out of range 0..{len(self.names) - 1}")
        return host

    # -- tearing down -----------------------------------------------------------------

    def close(self) -> None:
        """Stop every process, delete the veths, the bridge and the namespaces. Idempotent.

        Raises TestbedError if something could not be removed (after trying everything).
        """
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        problems = self._stop_processes()
        ours = [name for name in self._created if name != self.hub]
        # Hosts first: deleting their veth ends empties the bridge, then the hub goes.
        if self.hub in self._created:
            ours.append(self.hub)
        problems += _remove_namespaces(ours, self.grace)
        if self._lock is not None:
            _release_lock(self.prefix, self._lock)
            self._lock = None
        if problems:
            raise TestbedError(f"testbed {self.tag}: " + "; ".join(problems))

    def _stop_processes(self) -> list[str]:
        running = [p for p in self._procs if p.poll() is None]
        for proc in running:
            self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for proc in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        problems = []
        for proc in running:
            if proc.poll() is None:
                self._signal(proc, signal.SIGKILL)
                try:
                    proc.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    problems.append(f"pid {proc.pid} survived SIGKILL")
        for proc in self._procs:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        return problems

    @staticmethod
    def _signal(proc: subprocess.Popen[Any], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            try:
                pgid = os.getpgid(proc.pid)
            except ProcessLookupError:
                return
            if pgid == proc.pid:  # its own group (start_new_session): reach its children
                os.killpg(pgid, sig)
            else:
                proc.send_signal(sig)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except TestbedError:
            _log.exception("testbed %s: cleanup failed while handling %r", self.tag, exc)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # close() blocks for up to the grace period: keep the event loop running meanwhile.
        await asyncio.to_thread(self.__exit__, exc_type, exc, tb)

    @classmethod
    async def create(
        cls, hosts: int, upload_bps: float | Sequence[float], *, tag: str | None = None
    ) -> Testbed:
        """Build a testbed from asyncio code without blocking the loop (`async with`)."""
        return await asyncio.to_thread(cls, hosts, upload_bps, tag=tag)


def _read_json_line(proc: subprocess.Popen[Any], what: str, timeout: float) -> dict[str, Any]:
    """The next JSON line `proc` prints, or TestbedError with its stderr."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    # readline() blocks, but the probe gives up after its own --timeout (the same one),
    # so this returns by then; after EOF a bounded wait() collects its complaint.
    line = proc.stdout.readline()
    if not line:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
        err = proc.stderr.read() if proc.stderr is not None else ""
        raise TestbedError(f"netns_probe {what} exited ({proc.returncode}): {err.strip()}")
    result: dict[str, Any] = json.loads(line)
    return result


@dataclass(frozen=True, slots=True)
class TcpTransfer:
    """One measured transfer: payload goodput, and UDP echo round trips meanwhile."""

    nbytes: int
    seconds: float  # from just before the first connect to the last byte read
    goodput_bps: float  # payload bits/s
    rtt_ms: tuple[float, ...]  # sorted; the sender's queue delay plus ~0.1 ms base

    def rtt_quantile(self, q: float) -> float:
        """The q-quantile (0..1) of the round trips in ms; NaN if no echo came back."""
        if not self.rtt_ms:
            return float("nan")
        return self.rtt_ms[min(len(self.rtt_ms) - 1, int(q * len(self.rtt_ms)))]


def measure_tcp_transfer(
    testbed: Testbed,
    sender: int,
    receiver: int,
    nbytes: int,
    flows: int = 1,
    *,
    congestion: str | None = None,
    timeout: float = 120.0,
) -> TcpTransfer:
    """Send `nbytes` from host `sender` to host `receiver` over `flows` TCP connections.

    Each flow runs in its own thread of a `meshcast.bench.netns_probe` process; the time
    runs from just before the sender connects to the last byte read, so it includes the
    handshakes and slow start, as a real transfer does. Every 5 ms a UDP echo to the
    receiver is timed too (`rtt_ms`). `congestion` picks the senders' TCP congestion
    control (default: the system's). Raises TestbedError if a byte is missing or the
    probe fails.
    """
    probe = [sys.executable, "-m", "meshcast.bench.netns_probe"]
    common = ["--flows", str(flows), "--bytes", str(nbytes), "--timeout", str(timeout)]
    pipes: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    to = testbed.addresses[receiver]
    recv = testbed.run(receiver, [*probe, "recv", "--bind", to, *common], **pipes)
    send: subprocess.Popen[Any] | None = None
    try:
        ports = _read_json_line(recv, "recv", timeout)
        send = testbed.run(
            sender,
            [*probe, "send", "--to", to, "--port", str(ports["port"])]
            + ["--udp-port", str(ports["udp_port"]), *common]
            + (["--cc", congestion] if congestion else []),
            **pipes,
        )
        start = float(_read_json_line(send, "send", timeout)["start"])
        done = _read_json_line(recv, "recv", timeout)
        rtts = _read_json_line(send, "send", timeout)["rtt_ms"]
        for proc, what in ((send, "send"), (recv, "recv")):
            if proc.wait(timeout=timeout) != 0:
                err = proc.stderr.read() if proc.stderr is not None else ""
                raise TestbedError(f"netns_probe {what} failed: {err.strip()}")
    finally:
        for child in (recv, send):
            if child is not None and child.poll() is None:
                child.kill()
                child.wait()
    seconds = float(done["end"]) - start
    if seconds <= 0:
        raise TestbedError(f"netns_probe: nonsensical duration {seconds}")
    received = int(done["bytes"])
    return TcpTransfer(received, seconds, received * 8 / seconds, tuple(float(r) for r in rtts))


def measure_tcp_goodput(
    testbed: Testbed,
    sender: int,
    receiver: int,
    nbytes: int,
    flows: int = 1,
    *,
    congestion: str | None = None,
    timeout: float = 120.0,
) -> float:
    """Payload bits/s of `nbytes` from host `sender` to `receiver` (measure_tcp_transfer)."""
    return measure_tcp_transfer(
        testbed, sender, receiver, nbytes, flows, congestion=congestion, timeout=timeout
    ).goodput_bps


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m meshcast.bench.netns`: goodput/cap of capped TCP transfers, as JSON lines."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m meshcast.bench.netns",
        description="Measure TCP goodput between two testbed hosts against their tbf cap.",
    )
    parser.add_argument("--rates", default="100e6,400e6", help="caps in bits/s, comma-separated")
    parser.add_argument("--flows", default="1,8", help="TCP flow counts, comma-separated")
    parser.add_argument("--cc", default="", help="congestion controls, e.g. bbr,cubic")
    parser.add_argument("--seconds", type=float, default=5.0, help="transfer length at the cap")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    ok, reason = available()
    if not ok:
        print(f"netns testbed unavailable: {reason}", file=sys.stderr)
        return 1
    ccs: list[str | None] = [c for c in args.cc.split(",") if c] or [None]
    for rate in (float(r) for r in args.rates.split(",")):
        nbytes = int(rate / 8 * args.seconds)
        with Testbed(2, rate) as bed:
            for cc, flows in itertools.product(ccs, (int(f) for f in args.flows.split(","))):
                for _ in range(args.repeat):
                    drops = bed.qdisc_stats(0).get("drops", 0)
                    t = measure_tcp_transfer(bed, 0, 1, nbytes, flows, congestion=cc)
                    row = {
                        "cap_bps": rate,
                        "cc": cc or "default",
                        "flows": flows,
                        "mbytes": round(nbytes / 1e6, 1),
                        "goodput_ratio": round(t.goodput_bps / rate, 4),
                        "seconds": round(t.seconds, 3),
                        "tbf_drops": bed.qdisc_stats(0).get("drops", 0) - drops,
                        "echo_rtt_ms_p50_p95_max": [
                            t.rtt_quantile(0.5),
                            t.rtt_quantile(0.95),
                            t.rtt_ms[-1] if t.rtt_ms else float("nan"),
                        ],
                        "tbf": [bed.tbf[0].burst_bytes, bed.tbf[0].limit_bytes],
                    }
                    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
