"""The bench suites after a plain `pip install .`: no scipy, no matplotlib.

Each case runs the real `meshcast` command in a fresh interpreter whose import system
refuses scipy and/or matplotlib as if they were not installed (a finder first on
`sys.meta_path` that raises ModuleNotFoundError for them, as the import system does for a
missing package). `bench tree` must still run, saying in its JSON and in one stderr line
what it skipped; `--plot` must fail at once with one line naming the extra, exit 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

RUN_TIMEOUT = 150.0  # s: the tiny tree run takes a few seconds on an idle 2-core machine
# Prelude of `python -c`: hide the packages named in argv[1] (comma-separated).
HIDE = """
import sys

class Missing:
    def __init__(self, names):
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Missing(set(sys.argv.pop(1).split(","))))
"""
# ... then run the rest of the command line as `meshcast ...`
LAUNCHER = HIDE + "from meshcast.cli import main\nsys.exit(main(sys.argv[1:]))\n"
TINY_TREE = ("--instances", "3", "--events", "5", "--repeats", "1", "--pacing-messages", "100")
QUICK_SUITES = {  # arguments that would make each suite short if it did run
    "link": ("--messages", "50", "--seeds", "1", "--latency-messages", "3", "--skip-real"),
    "overlay": ("--messages", "20", "--packet-messages", "3", "--paper-sources-only"),
    "tree": TINY_TREE,
    "group": ("--daemons", "1", "--sizes", "100", "--messages", "20", "--skip-rtt"),
    "replicate": ("--quick",),
}


def _meshcast_without(missing: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", LAUNCHER, missing, *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def test_the_prelude_hides_a_package_as_if_it_were_not_installed() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", HIDE + "import scipy.optimize\n", "scipy"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert completed.returncode == 1
    assert "ModuleNotFoundError: No module named 'scipy'" in completed.stderr


def test_bench_tree_runs_without_scipy_and_says_what_it_skipped() -> None:
    completed = _meshcast_without("scipy", "bench", "tree", "--json", *TINY_TREE)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr
    result = json.loads(completed.stdout)
    assert result["quality"] is None
    assert "meshcast[bench]" in result["quality_skipped"]
    assert "scipy" in result["quality_skipped"]
    notes = [line for line in completed.stderr.splitlines() if "meshcast[bench]" in line]
    assert len(notes) == 1, completed.stderr
    # everything that does not need the exact solver was measured
    assert set(result["build_seconds"]) == {"1000", "10000"}
    assert result["dynamic"]["mean_rate_ratio"] > 0
    assert result["pacing"]["paced"]["goodput_mbps"] > 0


@pytest.mark.parametrize("suite", sorted(QUICK_SUITES))
def test_plot_without_matplotlib_is_a_one_line_usage_error(suite: str, tmp_path: Path) -> None:
    plots = tmp_path / "plots"
    completed = _meshcast_without(
        "matplotlib", "bench", suite, "--json", *QUICK_SUITES[suite], "--plot", str(plots)
    )
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert completed.stdout == ""
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr[-3000:]
    assert "--plot needs matplotlib" in lines[0]
    assert "pip install 'meshcast[bench]'" in lines[0]
    assert not plots.exists()
