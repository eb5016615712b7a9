"""`meshcast replicate` as a process, against the fake daemon over a real Unix socket."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshcast.wire.client import Replicate

from .fake_daemon import FakeDaemon, report

pytestmark = pytest.mark.timeout(90)
SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture
def sock_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="mc-") as path:
        yield path


async def run_cli(*args: str, runtime_dir: str | None = None) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if runtime_dir is not None:
        env["XDG_RUNTIME_DIR"] = runtime_dir
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshcast.cli",
        "replicate",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def two_recipients(frame: Replicate) -> list[dict[str, object]]:
    names = frame.targets.split(",") if frame.targets != "all" else ["D2", "D3"]
    return [
        report("running", dict.fromkeys(names, ("receiving", 250))),
        report("running", dict.fromkeys(names, ("receiving", 500))),
        report("complete", dict.fromkeys(names, ("complete", 1000))),
    ]


def one_fails(frame: Replicate) -> list[dict[str, object]]:
    return [
        report("running", {"D2": ("receiving", 10), "D3": ("receiving", 10)}),
        report("failed", {"D2": ("complete", 1000), "D3": ("failed", 400)}, detail="1 failed"),
    ]


@pytest.mark.asyncio
async def test_a_replication_to_named_daemons(sock_dir: str) -> None:
    fake = FakeDaemon(replicate=two_recipients)
    async with fake.serve_unix(os.path.join(sock_dir, "d.sock")):
        code, out, err = await run_cli(
            "data/file.bin",
            "--to",
            "D2,D3",
            "--socket",
            fake.address,
            "--rate",
            "80M",
            "--strategy",
            "fanout",
            "--variant",
            "k",
            "--tree",
            "balanced",
            "--max-connections",
            "5",
            "--capacity-aware",
            "--dest",
            "/srv/in",
            "--buddy",
            "D4",
        )
    assert code == 0, err
    assert out.splitlines() == [
        "replicated file.bin (1000 B, blake3 " + "ab" * 32 + ") to 2 of 2 daemons in 0.5 s",
        "  D2  complete   /data/D2/file.bin",
        "  D3  complete   /data/D3/file.bin",
    ]
    # not a terminal: summary lines on stderr (the first, maybe others, always the last)
    lines = err.splitlines()
    assert lines[0].startswith("meshcast replicate: file.bin: running, 500 B of 2.0 KiB (25%)")
    assert lines[-1].startswith("meshcast replicate: file.bin: complete, 2.0 KiB of 2.0 KiB")
    assert "(2 complete)" in lines[-1]
    assert fake.replicates == [
        Replicate(
            str(Path.cwd() / "data/file.bin"),
            "D2,D3",
            fake.replicates[0].token,
            "/srv/in",
            10e6,  # 80 Mbit/s is 10 MB/s
            strategy=1,
            variant=0,
            tree=1,
            max_connections=5,
            capacity_aware=True,
            buddy="D4",
        )
    ]


@pytest.mark.asyncio
async def test_json_prints_the_final_report_only(sock_dir: str) -> None:
    fake = FakeDaemon(replicate=two_recipients)
    async with fake.serve_unix(os.path.join(sock_dir, "d.sock")):
        code, out, _ = await run_cli("/f", "--socket", fake.address, "--json")
    assert code == 0
    document = json.loads(out)
    assert document["state"] == "complete"
    assert [r["daemon"] for r in document["recipients"]] == ["D2", "D3"]
    assert fake.replicates[0].targets == "all"


@pytest.mark.asyncio
async def test_a_missing_copy_fails_and_is_named(sock_dir: str) -> None:
    fake = FakeDaemon(replicate=one_fails)
    async with fake.serve_unix(os.path.join(sock_dir, "d.sock")):
        code, out, err = await run_cli("/f", "--to", "group:ops", "--socket", fake.address)
    assert code == 1
    assert "to 1 of 2 daemons" in out
    assert "meshcast replicate: D3 is missing 600 B of 1000 B (failed: disk full)" in err
    assert "D2 is missing" not in err


@pytest.mark.asyncio
async def test_a_refusal_fails_with_the_daemons_reason(sock_dir: str) -> None:
    fake = FakeDaemon()  # refuses every REPLICATE
    async with fake.serve_unix(os.path.join(sock_dir, "d.sock")):
        code, _, err = await run_cli("/f", "--socket", fake.address)
    assert code == 1
    assert "no copy was made: replication not offered" in err


@pytest.mark.asyncio
async def test_the_one_listening_daemon_is_found(sock_dir: str) -> None:
    runtime = os.path.join(sock_dir, "run")
    os.makedirs(os.path.join(runtime, "meshcast"))
    code, _, err = await run_cli("/f", runtime_dir=runtime)
    assert code == 1
    assert "no daemon is listening in" in err
    fake = FakeDaemon(replicate=two_recipients)
    async with fake.serve_unix(os.path.join(runtime, "meshcast", "D1@c.sock")):
        code, out, err = await run_cli("/f", runtime_dir=runtime)
        assert code == 0, err
        assert "to 2 of 2 daemons" in out
        other = FakeDaemon("D9")
        async with other.serve_unix(os.path.join(runtime, "meshcast", "D9@c.sock")):
            code, _, err = await run_cli("/f", runtime_dir=runtime)
    assert code == 2
    assert "2 daemons are listening (D1@c, D9@c): pick one with --daemon NAME" in err


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--rate", "10MB/s"), "ambiguous rate '10MB/s'"),
        (("--rate", "0"), "must be a positive rate"),
        (("--variant", "k+5"), "invalid choice: 'k+5'"),
        (("--local", "3", "--socket", "unix:/x.sock"), "--local starts its own daemons"),
        (("--local", "1"), "must be at least 2"),
    ],
)
async def test_usage_errors(args: tuple[str, ...], message: str) -> None:
    code, _, err = await run_cli("/f", *args)
    assert code == 2
    assert message in err
