"""The network-namespace testbed: hosts reach each other, caps hold, nothing is left behind.

Needs root and iproute2 (`meshcast.bench.netns.available()` says why not, and the tests
that build namespaces skip with that reason). Timing is only ever checked from below: a
capped transfer cannot finish faster than its bytes allow, however slow the machine.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshcast.bench import netns
from meshcast.bench.netns import Testbed, TestbedError

MIB = 1024 * 1024
PID = os.getpid()


@pytest.fixture(scope="module")
def can_build() -> None:
    ok, reason = netns.available()
    if not ok:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def testbed(can_build: None) -> Iterator[Testbed]:
    # host 0 capped at 40 Mbit/s for the cap test; the others fast until set_upload
    with Testbed(3, [40e6, 400e6, 400e6], tag=f"t{PID}") as bed:
        yield bed


def our_namespaces(prefix: str) -> list[str]:
    return [name for name in netns.netns_list() if name.startswith(prefix)]


def root_links_with(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if prefix in line]


def assert_gone(bed: Testbed, procs: list[subprocess.Popen[bytes]]) -> None:
    assert our_namespaces(bed.prefix) == []
    assert root_links_with(bed.prefix) == []
    assert all(proc.poll() is not None for proc in procs)
    assert not Path(netns.LOCK_DIR, f"{bed.prefix.rstrip('-')}.lock").exists()


# -- parameters: no root needed ---------------------------------------------------------


@pytest.mark.parametrize("rate", [1e6, 40e6, 100e6, 400e6, 1e9, 10e9])
@pytest.mark.parametrize("hz", [100, 250, 1000])
def test_tbf_bucket_covers_a_tick_and_the_queue_stays_short(rate: float, hz: int) -> None:
    params = netns.TbfParams.for_rate(rate, hz)
    assert params.burst_bytes >= rate / 8 / hz  # tbf's rule: a tick's worth of tokens
    assert params.burst_bytes > netns.GSO_MAX_BYTES  # a whole GSO packet passes
    assert params.limit_bytes >= 8 * netns.GSO_MAX_BYTES
    if rate >= netns.MIN_LIMIT_BYTES * 8 / netns.QUEUE_DELAY:
        assert params.limit_bytes * 8 / rate == pytest.approx(netns.QUEUE_DELAY, rel=0.01)
    args = params.tc_args()
    assert args[:2] == ["tbf", "rate"]
    assert args[args.index("burst") + 1] == f"{params.burst_bytes}b"


def test_bad_caps_and_tags_are_refused() -> None:
    with pytest.raises(TestbedError, match="> 0"):
        netns.TbfParams.for_rate(0)
    with pytest.raises(TestbedError, match="2 upload caps for 3 hosts"):
        Testbed(3, [1e6, 1e6])
    with pytest.raises(TestbedError, match="tag"):
        Testbed(1, 1e6, tag="Has Space")
    with pytest.raises(TestbedError, match="prefix must start with"):
        netns.cleanup_stale("other-")


# -- a live testbed ---------------------------------------------------------------------


def test_layout_and_addresses(testbed: Testbed) -> None:
    assert testbed.names == [f"mcbench-t{PID}-h{i}" for i in range(3)]
    assert set(our_namespaces(testbed.prefix)) == {*testbed.names, testbed.hub}
    assert len(set(testbed.addresses)) == 3
    assert all(addr.startswith("10.213.") for addr in testbed.addresses)
    root_addrs = subprocess.run(
        ["ip", "-o", "addr"], capture_output=True, text=True, check=True
    ).stdout
    assert testbed.subnet.rsplit(".", 1)[0] + "." not in root_addrs
    assert root_links_with(testbed.prefix) == []  # the root namespace is untouched
    for host, cap in enumerate(testbed.upload_bps):
        assert testbed.qdisc_stats(host)["options"]["rate"] * 8 == cap


def test_every_pair_connects_over_tcp(testbed: Testbed) -> None:
    for sender, receiver in itertools.permutations(range(3), 2):
        transfer = netns.measure_tcp_transfer(testbed, sender, receiver, 256 * 1024, timeout=30)
        assert transfer.nbytes == 256 * 1024
        assert transfer.goodput_bps > 0


def test_the_cap_holds(testbed: Testbed) -> None:
    # 6 MiB at 40 Mbit/s: 1.26 s; the bucket lets 20 kB through early, nothing more
    transfer = netns.measure_tcp_transfer(testbed, 0, 1, 6 * MIB, flows=2, timeout=60)
    assert transfer.nbytes == 6 * MIB
    assert transfer.seconds >= 1.1
    assert testbed.qdisc_stats(0)["bytes"] >= 6 * MIB  # it went through host 0's tbf


def test_set_upload_takes_effect(testbed: Testbed) -> None:
    sent_before = testbed.qdisc_stats(1)["bytes"]
    testbed.set_upload(1, 20e6)
    assert testbed.upload_bps[1] == 20e6
    assert testbed.qdisc_stats(1)["options"]["rate"] * 8 == 20e6
    # 3 MiB at 20 Mbit/s: 1.26 s
    transfer = netns.measure_tcp_transfer(testbed, 1, 2, 3 * MIB, timeout=60)
    assert transfer.seconds >= 1.1
    assert testbed.qdisc_stats(1)["bytes"] - sent_before >= 3 * MIB
    testbed.set_upload(1, 400e6)
    assert testbed.qdisc_stats(1)["options"]["rate"] * 8 == 400e6


def test_cleanup_stale_keeps_a_live_testbed(testbed: Testbed) -> None:
    assert netns.cleanup_stale(testbed.prefix) == []
    assert set(our_namespaces(testbed.prefix)) == {*testbed.names, testbed.hub}
    with pytest.raises(TestbedError, match="live testbed"):
        Testbed(1, 1e8, tag=testbed.tag)
    assert set(our_namespaces(testbed.prefix)) == {*testbed.names, testbed.hub}


# -- tearing down -----------------------------------------------------------------------


def test_close_stops_processes_and_removes_everything(can_build: None) -> None:
    bed = Testbed(2, 100e6, tag=f"t{PID}-close")
    bed.grace = 0.5
    # one that ignores SIGTERM (so SIGKILL after the grace period) ...
    ignores = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)"
    stubborn = bed.run(0, [sys.executable, "-c", ignores], stdout=subprocess.PIPE)
    # ... and one whose child would outlive it if only the parent were signalled
    parent = bed.run(1, ["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE)
    assert stubborn.stdout is not None
    assert parent.stdout is not None
    assert stubborn.stdout.readline() == b"1\n"
    grandchild = int(parent.stdout.readline())
    assert _proc_state(grandchild) != "gone"
    bed.close()
    assert_gone(bed, [stubborn, parent])
    assert stubborn.returncode == -9
    assert parent.returncode == -15
    assert _proc_state(grandchild) in ("gone", "Z")
    bed.close()  # idempotent
    with pytest.raises(TestbedError, match="closed"):
        bed.run(0, ["true"])


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_an_exception_inside_with_still_cleans_up(
    can_build: None, exc_type: type[BaseException]
) -> None:
    beds: list[Testbed] = []
    procs: list[subprocess.Popen[bytes]] = []

    def body() -> None:
        with Testbed(2, 100e6, tag=f"t{PID}-exc") as bed:
            beds.append(bed)
            procs.append(bed.run(0, ["sleep", "60"]))
            assert len(our_namespaces(bed.prefix)) == 3
            raise exc_type("boom")

    with pytest.raises(exc_type, match="boom"):
        body()
    assert_gone(beds[0], procs)


@pytest.mark.asyncio
async def test_async_with_from_asyncio_code(can_build: None) -> None:
    beds: list[Testbed] = []
    procs: list[subprocess.Popen[bytes]] = []

    async def body() -> None:
        async with await Testbed.create(2, 100e6, tag=f"t{PID}-async") as bed:
            beds.append(bed)
            procs.append(bed.run(1, ["sleep", "60"]))
            raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        await body()
    assert_gone(beds[0], procs)


def test_cleanup_stale_removes_what_a_killed_run_left(can_build: None) -> None:
    tag = f"t{PID}-stale"
    prefix = f"mcbench-{tag}-"
    # a run killed by SIGKILL: no close(), no atexit; its sleeping child lives on
    script = (
        "import os, signal, subprocess\n"
        "from meshcast.bench.netns import Testbed\n"
        f"bed = Testbed(2, 1e8, tag={tag!r})\n"
        "quiet = {'stdout': subprocess.DEVNULL, 'stderr': subprocess.DEVNULL}\n"
        "child = bed.run(0, ['sleep', '60'], **quiet)\n"
        "print(child.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    try:
        crashed = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
        )
        assert crashed.returncode == -9, crashed.stderr
        orphan = int(crashed.stdout.split()[0])
        assert len(our_namespaces(prefix)) == 3
        with pytest.raises(TestbedError, match="cleanup_stale"):
            Testbed(2, 1e8, tag=tag)
        removed = netns.cleanup_stale(prefix)
        assert sorted(removed) == sorted([f"{prefix}hub", f"{prefix}h0", f"{prefix}h1"])
        assert our_namespaces(prefix) == []
        assert not Path(f"/proc/{orphan}").exists() or "Z" in _proc_state(orphan)
        assert not Path(netns.LOCK_DIR, f"mcbench-{tag}.lock").exists()
        with Testbed(2, 1e8, tag=tag) as again:  # the tag is usable again
            assert len(our_namespaces(again.prefix)) == 3
    finally:
        netns.cleanup_stale(prefix)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"
