"""cProfile inside a daemon, switched on and off by signals (`meshcast bench group --profile`
when py-spy is not available).

When the environment variable `MESHCAST_CPROFILE_DIR` names a directory, the daemon entry
point installs `SignalProfiler`: SIGUSR1 starts a fresh `cProfile.Profile` of the main
thread and creates ``DIR/<pid>.started``; SIGUSR2 (or the process's normal exit) stops it
and writes ``DIR/<pid>.pstats`` (atomically: written aside, then renamed). The bench
waits for these files, so it knows when profiling really began and ended. Without the
variable nothing is installed and nothing costs.
"""

from __future__ import annotations

import atexit
import cProfile
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

ENV = "MESHCAST_CPROFILE_DIR"
START_SIGNAL = signal.SIGUSR1
STOP_SIGNAL = signal.SIGUSR2


def started_path(directory: Path, pid: int) -> Path:
    return directory / f"{pid}.started"


def pstats_path(directory: Path, pid: int) -> Path:
    return directory / f"{pid}.pstats"


class SignalProfiler:
    """One cProfile run at a time, started and stopped from signal handlers."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._profile: cProfile.Profile | None = None

    @property
    def active(self) -> bool:
        return self._profile is not None

    def start(self) -> None:
        if self._profile is not None:  # already running: a repeated signal changes nothing
            return
        profile = cProfile.Profile()
        profile.enable()
        self._profile = profile
        started_path(self._directory, os.getpid()).touch()

    def stop(self) -> None:
        profile, self._profile = self._profile, None
        if profile is None:
            return
        profile.disable()
        final = pstats_path(self._directory, os.getpid())
        aside = final.with_suffix(".pstats.part")
        profile.dump_stats(str(aside))
        os.replace(aside, final)  # the bench never sees a half-written file

    def _on_start(self, signum: int, frame: FrameType | None) -> None:
        self.start()

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop()


def install_from_environment(environ: Mapping[str, str] = os.environ) -> SignalProfiler | None:
    """Install the signal handlers when `ENV` is set (main thread only); else None."""
    directory = environ.get(ENV)
    if not directory:
        return None
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    profiler = SignalProfiler(path)
    signal.signal(START_SIGNAL, profiler._on_start)
    signal.signal(STOP_SIGNAL, profiler._on_stop)
    atexit.register(profiler.stop)  # a run cut short by SIGTERM still leaves its profile
    return profiler
