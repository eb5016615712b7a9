"""`meshcast demo` end to end: six daemon processes, a SIGKILL, a clean stop, exit 0."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_the_cluster_and_cleans_up() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "meshcast.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "all 6 daemons agree on view" in out
    assert "killing D3 with SIGKILL" in out
    assert "new view: D1, D2, D5, D6" in out
    assert "D1 exit 0" in out
    # Every daemon the demo started is gone (the demo waits for each exit status).
    assert "exit None" not in out
