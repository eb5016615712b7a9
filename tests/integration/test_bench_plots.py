"""`meshcast bench SUITE --plot DIR` writes its PNG figures, through the real command, on
tiny runs (behaviour only, never speed). The tree suite's plots are checked with its
contract in tests/unit/overlay/test_tree_bench.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from meshcast.cli import main

pytestmark = pytest.mark.timeout(180)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GROUP_TIMEOUT = 150.0  # s: the tiny group run takes 10-30 s on a loaded 2-core machine


def _assert_pngs(directory: Path, names: set[str]) -> None:
    assert {p.name for p in directory.iterdir()} == names
    for name in names:
        data = (directory / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > 10_000, name  # axes, labels and data, not an empty canvas


def test_link_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny = ["--messages", "100", "--seeds", "1", "--latency-messages", "3", "--skip-real"]
    assert main(["bench", "link", "--json", *tiny, "--plot", str(tmp_path / "img")]) == 0
    json.loads(capsys.readouterr().out)
    _assert_pngs(tmp_path / "img", {"link_loss.png", "link_latency.png"})


def test_overlay_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny = ["--messages", "20", "--packet-messages", "3", "--paper-sources-only"]
    assert main(["bench", "overlay", "--json", *tiny, "--plot", str(tmp_path / "img")]) == 0
    json.loads(capsys.readouterr().out)
    _assert_pngs(tmp_path / "img", {"overlay_table1.png", "overlay_packets.png"})


def test_group_plots(tmp_path: Path) -> None:
    tiny = ["--daemons", "1,3", "--sizes", "100,1000", "--messages", "30", "--rtt-round-trips", "5"]
    command = [sys.executable, "-m", "meshcast", "bench", "group", "--json", *tiny]
    completed = subprocess.run(
        [*command, "--plot", str(tmp_path / "img")],
        capture_output=True,
        text=True,
        timeout=GROUP_TIMEOUT,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    json.loads(completed.stdout)
    _assert_pngs(tmp_path / "img", {"group_throughput.png", "group_rtt.png"})


def test_an_unusable_plot_directory_is_a_usage_error_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit) as exited:
        main(["bench", "link", "--json", "--plot", str(blocker / "img")])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert "--plot: cannot use" in err
