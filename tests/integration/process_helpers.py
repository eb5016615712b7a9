"""Helpers of the integration tests that check a command left no process behind."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path


def live_command_lines(matching: Callable[[str], bool]) -> list[str]:
    """Command lines (arguments joined by spaces) of the live processes `matching` keeps."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process has gone meanwhile
            continue
        if matching(text):
            found.append(text)
    return found


def processes_of_bench_run(tag: int) -> list[str]:
    """Live processes started for the bench run whose bench process was `tag`: its
    daemons are named g<i>-<tag>, its clients connect to their sockets."""
    name = re.compile(rf"g\d+-{tag}(?!\d)")
    return live_command_lines(lambda text: "meshcast" in text and name.search(text) is not None)
