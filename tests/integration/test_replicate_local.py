"""`meshcast replicate FILE --local 3`: real daemon processes on loopback, end to end.

Skipped (with the reason) while the daemon answers REPLICATE with an error instead of
REPLICATION frames: the client side is tested against the fake daemon meanwhile, and this
test turns on by itself once the daemon side is there.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import blake3
import pytest

pytestmark = pytest.mark.timeout(240)
SRC = str(Path(__file__).resolve().parents[2] / "src")
NOT_SERVED = (  # what a daemon without the REPLICATE side answers
    "REPLICATE is not sent by clients",
    "UNEXPECTED_FRAME",
    "unknown frame type 0x06",
    "BAD_FRAME",
)


def processes_mentioning(text: str) -> list[int]:
    """Pids of processes whose command line contains `text` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.asyncio
async def test_local_copies_equal_the_source(tmp_path: Path) -> None:
    source = tmp_path / "payload.bin"
    data = os.urandom(3 * 1024 * 1024 + 12345)  # several chunks, a ragged last one
    source.write_bytes(data)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshcast.cli",
        "replicate",
        str(source),
        "--local",
        "3",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        async with asyncio.timeout(200):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    errors = err.decode()
    if proc.returncode != 0 and any(text in errors for text in NOT_SERVED):
        pytest.skip(f"the daemon does not serve REPLICATE yet: {errors.strip()[-300:]}")
    assert proc.returncode == 0, errors[-2000:]
    document = json.loads(out)
    expected = blake3.blake3(data).hexdigest()
    assert document["source"]["digest"] == expected
    assert document["digest"] == expected
    assert document["all_equal"] is True
    copies = document["copies"]
    assert sorted(c["daemon"] for c in copies) == ["D2", "D3"]
    assert all(c["digest"] == expected for c in copies)
    assert_cleaned_up(copies)


def assert_cleaned_up(copies: list[dict[str, str]]) -> None:
    """Everything --local made is gone: the copies (in its temporary data directories)
    and every daemon process (their command lines name those directories)."""
    for copy in copies:
        path = Path(copy["path"])
        assert not path.exists()
        workdir = next(p for p in path.parents if p.name.startswith("meshcast-demo-"))
        assert not workdir.exists()
        assert processes_mentioning(str(workdir)) == []
