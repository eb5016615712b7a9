"""Encrypted links under load and change, over real sockets against ``meshcast daemon``
processes (issue 10, item 6; docs/security.md, "Attacks tested"): a key rolled through a
running cluster while a group sends AGREED traffic, a fuzzer throwing random and mutated
datagrams at a live daemon, and a HELLO flood whose cost is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshcast.config import load_config
from meshcast.runtime.endpoints import daemon_address
from meshcast.wire.packet import FLAG_AUTH, HEADER_SIZE, PacketType

from .attack_helpers import (
    WAIT,
    agreed_traffic,
    assert_all_once_in_order,
    cpu_seconds,
    header_of,
    link_report,
    rss_kib,
    status,
    status_cli,
    until_report,
)
from .daemon_helpers import (
    DaemonProcess,
    marks,
    running_daemons,
    wait_agreed,
    write_cluster,
    write_key,
)
from .test_attacks import relayed_pair

pytestmark = [pytest.mark.timeout(300), pytest.mark.asyncio]

NEW_KEY = "new.key"


@asynccontextmanager
async def with_sockets(prefix: str) -> AsyncIterator[dict[str, str]]:
    with tempfile.TemporaryDirectory(prefix=prefix, dir="/tmp") as directory:
        yield {f"d{i}": str(Path(directory) / f"d{i}.sock") for i in range(1, 4)}


def set_security(path: Path, section: str) -> None:
    """Replace the cluster file's [security] section (the last one) with `section`,
    atomically: a daemon reading it on SIGHUP sees the old file or the new one."""
    text = path.read_text(encoding="utf-8")
    head = text[: text.rindex("[security]")]
    spare = path.with_suffix(".new")
    spare.write_text(head + "[security]\n" + section, encoding="utf-8")
    spare.replace(path)


def fingerprints(event: dict[str, Any]) -> list[str]:
    return [key["fingerprint"] for key in event["keys"]]


async def hup(daemon: DaemonProcess) -> dict[str, Any]:
    """SIGHUP, and the ``keys_reloaded`` it causes."""
    after = len(daemon.events)
    daemon.send_signal(signal.SIGHUP)
    return await daemon.wait_event("keys_reloaded", timeout=WAIT, after=after)


def losses(daemons: dict[str, DaemonProcess], after: dict[str, int]) -> list[dict[str, Any]]:
    """Views installed (or neighbours lost) after `after` that lack one of d1..d3."""
    return [
        event
        for name, daemon in daemons.items()
        for event in daemon.events[after.get(name, 0) :]
        if event["event"] == "neighbour_down"
        or (event["event"] in ("view_installed", "view_agreed") and len(event["members"]) < 3)
    ]


async def restart(
    daemons: dict[str, DaemonProcess], name: str, path: Path, socks: dict[str, str]
) -> None:
    """SIGTERM `name`, start it again, and wait until all three agree on the full view."""
    await daemons[name].stop()
    others = {n: len(d.events) for n, d in daemons.items() if n != name}
    daemons[name] = await DaemonProcess.start(path, name, "--client-socket", socks[name])
    after = {**others, name: 0}
    await wait_agreed(daemons.values(), {1, 2, 3}, WAIT, edges=3, after=after)


async def test_key_rotation_through_a_running_cluster(tmp_path: Path) -> None:
    """docs/security.md, "Rotating the key": a new key becomes next_key_file (SIGHUP to
    d1, d2; d3 restarted, so it shakes hands under the new ring), then the only key
    (SIGHUP to each; d3 restarted again: its links come up under the new key alone),
    while a client on d1 multicasts AGREED messages to clients on d1 and d2. Every
    message reaches both once, in the same order; no SIGHUP costs a view member."""
    path = write_cluster(tmp_path, 3, [(1, 2), (1, 3), (2, 3)])
    write_key(tmp_path, NEW_KEY)
    async with with_sockets("mcrot") as socks, running_daemons(path, []) as daemons:
        for name in ("d1", "d2", "d3"):
            daemons[name] = await DaemonProcess.start(path, name, "--client-socket", socks[name])
        await wait_agreed(daemons.values(), {1, 2, 3}, WAIT, edges=3)
        async with agreed_traffic(socks["d1"], {"d1": socks["d1"], "d2": socks["d2"]}) as (
            traffic,
            finish,
        ):
            await asyncio.sleep(0.5)
            # step 1: the new key as the next key
            set_security(path, f'key_file = "cluster.key"\nnext_key_file = "{NEW_KEY}"\n')
            mark = marks(daemons.values())
            step1 = [await hup(daemons[name]) for name in ("d1", "d2")]
            await asyncio.sleep(0.5)
            assert losses(daemons, mark) == []
            await restart(daemons, "d3", path, socks)  # a new handshake: under the new key
            both = fingerprints(step1[0])
            assert len(both) == 2
            assert all(fingerprints(event) == both for event in step1)
            d3_keys = (await status(socks["d3"]))["security"]["keys"]
            assert [key["fingerprint"] for key in d3_keys] == both
            await asyncio.sleep(0.5)
            # step 2: the new key alone
            set_security(path, f'key_file = "{NEW_KEY}"\n')
            mark = marks(daemons.values())
            step2 = [await hup(daemons[name]) for name in ("d1", "d2", "d3")]
            await asyncio.sleep(1.0)
            assert losses(daemons, mark) == []
            assert all(fingerprints(event) == both[:1] for event in step2)  # the new one
            await restart(daemons, "d3", path, socks)  # links of the new key alone
            await asyncio.sleep(0.5)
            await finish()
        assert_all_once_in_order(traffic)
        assert len(traffic.sent) >= 50
        for name in ("d1", "d2", "d3"):
            report = await status(socks[name])
            assert [key["fingerprint"] for key in report["security"]["keys"]] == both[:1]
            assert [m["node"] for m in report["view"]["members"]] == [1, 2, 3]
            assert report["counters"]["daemon"]["internal_errors"] == 0


# ---------------------------------------------------------------- fuzzing a live daemon

FUZZ_EXAMPLES = 200
FUZZ_BUDGET = 60.0  # s of fuzzing at most; the examples left over send nothing
RSS_GROWTH_KIB = 50 * 1024


def mutate(data: st.DataObject, captured: list[bytes]) -> bytes:
    """One hostile datagram: random bytes, or a captured one bit-flipped, truncated, with
    a header field changed, or spliced with another."""
    kind = data.draw(st.sampled_from(["random", "flip", "truncate", "field", "splice"]))
    if kind == "random":
        return data.draw(st.binary(min_size=0, max_size=1500))
    base = bytearray(data.draw(st.sampled_from(captured)))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            index = data.draw(st.integers(0, len(base) - 1))
            base[index] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        del base[data.draw(st.integers(0, len(base) - 1)) :]
    elif kind == "field":
        start, size = data.draw(
            st.sampled_from([(2, 1), (3, 1), (4, 1), (5, 1), (6, 2), (8, 4), (12, 4), (16, 8)])
        )
        base[start : start + size] = data.draw(st.binary(min_size=size, max_size=size))
    else:
        other = data.draw(st.sampled_from(captured))
        cut = data.draw(st.integers(0, min(len(base), len(other))))
        base = base[:cut] + bytearray(other[cut:])
    return bytes(base)


async def test_fuzzed_datagrams_at_a_live_daemon(tmp_path: Path) -> None:
    """Hypothesis throws random and mutated captured datagrams at d1 from d2's address
    (the on-path relay's) while a client on d1 multicasts AGREED messages to clients on
    d1 and d2: no crash, no internal error, no message lost or duplicated, the view
    holds, and d1's memory stays bounded."""
    loop = asyncio.get_running_loop()
    async with with_sockets("mcfz") as socks, relayed_pair(tmp_path, socks) as (relay, daemons, _):
        d1 = daemons["d1"]
        async with agreed_traffic(socks["d1"], {"d1": socks["d1"], "d2": socks["d2"]}) as (
            traffic,
            finish,
        ):
            await asyncio.sleep(1.0)
            captured = list(relay.from_b[-300:])
            assert {d[3] for d in captured} >= {PacketType.HELLO, PacketType.DATA}
            before = marks(daemons.values())
            rss_before = rss_kib(d1.process.pid)
            started = time.monotonic()
            sent = [0]

            @settings(
                settings.get_profile("ci"),
                max_examples=FUZZ_EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(st.data())
            def fuzz(data: st.DataObject) -> None:
                if time.monotonic() - started > FUZZ_BUDGET:
                    return
                for _ in range(data.draw(st.integers(1, 10))):
                    datagram = mutate(data, captured)
                    loop.call_soon_threadsafe(relay.to_a, datagram)
                    sent[0] += 1
                time.sleep(0.002)  # about the rate of a busy link, not a flood

            await asyncio.to_thread(fuzz)
            await asyncio.sleep(1.0)
            await finish()
        assert d1.process.returncode is None, d1.tail()
        rss_after = rss_kib(d1.process.pid)
        assert_all_once_in_order(traffic)
        changes = [
            e
            for name, daemon in daemons.items()
            for e in daemon.events[before[name] :]
            if e["event"] in ("neighbour_down", "view_installed")
        ]
        assert changes == []
        report = await status_cli(socks["d1"])
    assert report["counters"]["daemon"]["internal_errors"] == 0
    dropped = link_report(report, "d2")["dropped"]
    assert sent[0] >= FUZZ_EXAMPLES
    assert dropped["total"] >= sent[0] // 2, (sent[0], dropped)
    assert rss_after - rss_before < RSS_GROWTH_KIB, (rss_before, rss_after)
    print(f"fuzz: {sent[0]} datagrams, drops {dropped}, RSS {rss_before} -> {rss_after} KiB")


# ---------------------------------------------------------------- HELLO flood

FLOOD = 20_000


@pytest.mark.parametrize("cause", ["forged", "unknown_key", "cleartext"])
async def test_hello_flood_is_dropped_with_bounded_work(tmp_path: Path, cause: str) -> None:
    """20,000 HELLOs that do not authenticate, from a configured neighbour's address, each
    of a new epoch: sealed-looking under the key id the daemon uses (each costs it one
    AEAD attempt: forged), under another key id (unknown_key), or in the clear
    (cleartext). All dropped and counted, none answered, the daemon's memory unchanged.
    Prints the CPU time the daemon spent per datagram (measured, not asserted)."""
    path = write_cluster(tmp_path, 2, [(1, 2)])
    config = load_config(path)
    d2 = daemon_address(config.daemon("d2"))
    target = daemon_address(config.daemon("d1"))
    rng = random.Random(6)
    async with with_sockets("mcfl") as socks, running_daemons(path, []) as daemons:
        d1 = daemons["d1"] = await DaemonProcess.start(path, "d1", "--client-socket", socks["d1"])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(d2)
            sock.settimeout(WAIT)
            hello, _ = sock.recvfrom(65536)  # d1's sealed HELLO to d2: its header is clear
            seen = header_of(hello)
            assert seen is not None
            assert seen.flags & FLAG_AUTH
            await until_report(socks["d1"], lambda r: True)
            pid = d1.process.pid
            # The daemon's own cost of being idle for as long (timers, heartbeats, HELLOs).
            idle_start, wall_start = cpu_seconds(pid), time.monotonic()
            await asyncio.sleep(2.0)
            idle = (cpu_seconds(pid) - idle_start) / (time.monotonic() - wall_start)
            cpu_before, rss_before = cpu_seconds(pid), rss_kib(pid)
            wall_before = time.monotonic()
            sock.setblocking(False)
            stamp = 1
            for i in range(FLOOD):
                header = bytearray(hello[:HEADER_SIZE])
                header[8:12] = (2).to_bytes(4, "big")
                header[12:16] = rng.randrange(1, 2**32).to_bytes(4, "big")  # a new epoch
                header[16:24] = (stamp + i).to_bytes(8, "big")
                if cause == "unknown_key":
                    header[5] = (seen.key_id + 1) % 256
                elif cause == "cleartext":
                    header[4] &= ~FLAG_AUTH
                datagram = bytes(header) + os.urandom(len(hello) - HEADER_SIZE)
                while True:
                    try:
                        sock.sendto(datagram, target)
                        break
                    except BlockingIOError:
                        await asyncio.sleep(0.001)
                if i % 500 == 0:
                    await asyncio.sleep(0.005)  # let the daemon's socket buffer drain
            await asyncio.sleep(1.0)  # the daemon reads what is left in its socket buffer
            cpu_after, rss_after = cpu_seconds(pid), rss_kib(pid)
            flood_cpu = cpu_after - cpu_before - idle * (time.monotonic() - wall_before)
            answers = 0  # what d1 sent d2's address meanwhile: its own HELLOs only
            with contextlib.suppress(BlockingIOError):
                while sock.recvfrom(65536):
                    answers += 1
        # No answer to a datagram that does not authenticate: no reflection, no amplification.
        assert answers < 200, answers
        report = await status(socks["d1"])
    dropped = link_report(report, "d2")["dropped"]
    assert FLOOD * 0.9 <= dropped[cause] <= FLOOD  # loopback may lose a few under a flood
    assert dropped["total"] == dropped[cause]
    assert not link_report(report, "d2")["up"]
    assert report["counters"]["daemon"]["internal_errors"] == 0
    assert rss_after - rss_before < RSS_GROWTH_KIB
    per = flood_cpu / max(1, dropped[cause]) * 1e6
    print(
        f"HELLO flood: {FLOOD} sent, {dropped[cause]} counted {cause}; daemon CPU "
        f"{cpu_after - cpu_before:.3f} s, {flood_cpu:.3f} s above idle ({per:.1f} us per "
        "datagram); "
        f"RSS {rss_before} -> {rss_after} KiB; {answers} datagrams from d1 meanwhile"
    )
