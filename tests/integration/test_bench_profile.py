"""`meshcast bench group --profile`: real profilers on real processes.

cProfile through the daemons' signal hook and py-spy attached from outside: a profile and
a layer summary per daemon whose shares sum to 1, every profiler process stopped and
reaped, on success and on failure. py-spy tests skip where py-spy is missing or may not
attach (ptrace); the cProfile path needs nothing but Python.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from meshcast.bench import profile
from meshcast.bench.profile import LAYERS, DaemonProfiler, ProfileError, load_pstats
from meshcast.runtime import profiling

from .process_helpers import live_command_lines, processes_of_bench_run

pytestmark = pytest.mark.timeout(180)

RUN_TIMEOUT = 150.0  # s: a tiny profiled run on a loaded 2-core machine
CELL = "3d-1000B-AGREED"
DAEMONS = ("daemon1", "daemon2", "daemon3")

# A process that keeps its main thread busy in `spin` (cProfile samples the main thread)
# for at most a minute; with the hook when MESHCAST_CPROFILE_DIR is set.
BUSY = """
import signal, sys, time
from meshcast.runtime.profiling import install_from_environment
if install_from_environment() is None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
def spin():
    return sum(i * i for i in range(2000))
print("ready", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    spin()
"""


@asynccontextmanager
async def busy_process(env: dict[str, str]) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        BUSY,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            assert await process.stdout.readline() == b"ready\n"
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


def _shares_sum(shares: dict[str, float]) -> float:
    assert set(shares) == set(LAYERS)
    assert all(0.0 <= share <= 1.0 for share in shares.values())
    return sum(shares.values())


def test_signals_start_and_stop_cprofile_in_this_process(tmp_path: Path) -> None:
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGUSR2)}
    try:
        assert profiling.install_from_environment({}) is None  # no variable: nothing
        hook = profiling.install_from_environment({profiling.ENV: str(tmp_path)})
        assert hook is not None
        os.kill(os.getpid(), profiling.START_SIGNAL)  # handled before kill() returns
        assert hook.active
        assert profiling.started_path(tmp_path, os.getpid()).exists()
        sum(i * i for i in range(10_000))
        os.kill(os.getpid(), profiling.STOP_SIGNAL)
        assert not hook.active
        stats = load_pstats(profiling.pstats_path(tmp_path, os.getpid()))
        assert any(name == "<genexpr>" for _, _, name in stats)
        hook.stop()  # stopping twice changes nothing
        atexit.unregister(hook.stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@pytest.mark.asyncio
async def test_cprofile_profiles_a_process_with_the_hook(tmp_path: Path) -> None:
    profiler = DaemonProfiler(tmp_path / "prof", "cProfile")
    async with busy_process(profiler.daemon_environment()) as process:
        await profiler.start("cell", {"d1": process.pid})
        await asyncio.sleep(0.3)
        shares = await profiler.stop()
    out = tmp_path / "prof" / "cell" / "d1"
    assert (out / "profile.pstats").exists()
    summary = json.loads((out / "layers.json").read_text())
    assert summary["profiler"] == "cProfile"
    assert summary["seconds"] > 0
    assert summary["shares"] == shares["d1"]
    assert _shares_sum(shares["d1"]) == pytest.approx(1.0, abs=0.01)
    assert shares["d1"]["other"] > 0.9  # `spin` belongs to no layer of meshcast
    assert (tmp_path / "prof" / "cell" / "layers.txt").read_text().startswith("cell: cProfile")
    assert profiler.describe()["cells"] == {"cell": shares}
    assert list((tmp_path / "prof" / ".cprofile").iterdir()) == []  # nothing left behind


@pytest.mark.asyncio
async def test_cprofile_fails_in_time_without_the_hook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(profile, "ATTACH_TIMEOUT", 0.5)
    profiler = DaemonProfiler(tmp_path, "cProfile")
    async with busy_process({}) as process:  # ignores the signals: never confirms
        with pytest.raises(ProfileError, match="did not start cProfile"):
            await profiler.start("cell", {"d1": process.pid})
        assert process.returncode is None


def _require_py_spy() -> None:
    if shutil.which("py-spy") is None:
        pytest.skip("py-spy is not on PATH (pip install py-spy); the cProfile tests cover the rest")


@pytest.mark.asyncio
async def test_a_py_spy_that_cannot_attach_is_reaped(tmp_path: Path) -> None:
    _require_py_spy()
    dead = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await dead.wait()  # its pid names no process now
    profiler = DaemonProfiler(tmp_path, "py-spy")
    with pytest.raises(ProfileError, match="could not attach"):
        await profiler.start("cell", {"d1": dead.pid})
    assert profiler._spies == []  # every py-spy started was killed and waited for


@pytest.mark.asyncio
async def test_close_stops_a_running_py_spy(tmp_path: Path) -> None:
    _require_py_spy()
    profiler = DaemonProfiler(tmp_path, "py-spy", rate=50)
    async with busy_process({}) as process:
        try:
            await profiler.start("cell", {"d1": process.pid})
        except ProfileError as exc:
            pytest.skip(f"py-spy may not attach here (ptrace): {exc}")
        spies = [spy.process for spy in profiler._spies]
        assert [spy.returncode for spy in spies] == [None]
        await profiler.close()  # e.g. the cell failed: no profile, no process left
        assert all(spy.returncode is not None for spy in spies)
        assert process.returncode is None  # the profiled process lives on
    assert "cell" not in profiler.cells


def _live_py_spies(directory: Path) -> list[str]:
    return live_command_lines(lambda text: "py-spy" in text and str(directory) in text)


@pytest.mark.parametrize("profiler", ["cprofile", "py-spy"])
def test_a_profiled_cell_leaves_a_profile_per_daemon(tmp_path: Path, profiler: str) -> None:
    if profiler == "py-spy":
        _require_py_spy()
    directory = tmp_path / "prof"
    argv = [sys.executable, "-m", "meshcast", "bench", "group", "--json", "--quick"]
    argv += ["--daemons", "3", "--sizes", "1000", "--services", "agreed", "--skip-rtt"]
    argv += ["--profile", str(directory), "--profiler", profiler]
    # a cell long enough for py-spy to attach and sample each daemon (a --quick cell of
    # 66 messages can end before it has, on a loaded machine)
    argv += ["--messages", "3000"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"bench group --profile did not finish in {RUN_TIMEOUT} s:\n{err[-3000:]}")
    if process.returncode != 0 and profiler == "py-spy" and "could not attach" in err:
        pytest.skip(f"py-spy may not attach to processes here (ptrace): {err[-500:]}")
    assert process.returncode == 0, err[-3000:]
    assert _live_py_spies(directory) == []
    assert processes_of_bench_run(process.pid) == []

    result = json.loads(out)
    summary = result["profile"]
    assert summary["dir"] == str(directory)
    assert summary["profiler"] == ("py-spy" if profiler == "py-spy" else "cProfile")
    assert set(summary["cells"]) == {CELL}  # the warm-up is not profiled
    assert set(summary["cells"][CELL]) == set(DAEMONS)
    raw = "profile.raw.txt" if profiler == "py-spy" else "profile.pstats"
    for daemon, shares in summary["cells"][CELL].items():
        out_dir = directory / CELL / daemon
        assert (out_dir / raw).stat().st_size > 0
        layers = json.loads((out_dir / "layers.json").read_text())
        assert layers["cell"] == CELL
        assert layers["daemon"] == daemon
        assert layers["shares"] == shares
        assert _shares_sum(shares) == pytest.approx(1.0, abs=0.01)
        # the daemons spend their time in meshcast's layers, not in "other"
        assert shares["other"] < 0.5
        assert (out_dir / "layers.txt").exists()
    table = (directory / CELL / "layers.txt").read_text()
    assert all(daemon in table for daemon in DAEMONS)


def test_a_cell_that_times_out_leaves_no_py_spy(tmp_path: Path) -> None:
    _require_py_spy()
    directory = tmp_path / "prof"
    argv = [sys.executable, "-m", "meshcast", "bench", "group", "--json", "--skip-rtt"]
    argv += ["--daemons", "3", "--sizes", "1000", "--services", "agreed"]
    # 200,000 messages a cell: far longer than 2 s however fast the daemons get
    argv += ["--messages", "600000", "--cell-timeout", "2", "--profile", str(directory)]
    argv += ["--profiler", "py-spy"]
    completed = subprocess.run(
        argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )
    if "could not attach" in completed.stderr:
        pytest.skip(f"py-spy may not attach to processes here (ptrace): {completed.stderr[-500:]}")
    assert completed.returncode == 1
    # the profiled cell timed out, not the warm-up
    assert "200000 x 1000 bytes AGREED: not delivered" in completed.stderr, completed.stderr[-2000:]
    assert (directory / CELL / "daemon1").is_dir()  # its py-spy had started
    assert _live_py_spies(directory) == []
    assert not (directory / CELL / "layers.txt").exists()  # no profile of a failed cell
