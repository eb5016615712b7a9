"""`meshcast demo` end to end, as a user runs it: the real command in a child process.

Six daemon processes, one chat client per daemon in AGREED order, a SIGKILL with the chat
going on, a clean stop and exit 0; Ctrl-C and SIGTERM in the middle stop everything too.
The demo runs in its own process group, so "nothing left running" is checked on the
whole group (its daemons are in it), and a test that times out kills the whole group.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

DEMO = (sys.executable, "-m", "meshcast.cli", "demo")
DEMO_TIMEOUT = 180.0  # s for a whole run (about 15 s on a laptop)
STOP_TIMEOUT = 60.0  # s for the demo to stop everything after a signal


def _default_sigint() -> None:
    # A child of a shell without job control inherits SIGINT ignored; Ctrl-C must work.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*DEMO, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the demo and its daemons
        preexec_fn=_default_sigint,
    )


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _finish(process: subprocess.Popen[bytes], timeout: float) -> tuple[str, str]:
    """Wait for the demo (bounded); on timeout kill its whole process group and fail."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(
            f"the demo did not finish within {timeout} s\n{out.decode()}\n{err.decode()[-3000:]}"
        )
    return out.decode(), err.decode()


def _assert_nothing_left(process: subprocess.Popen[bytes], out: str) -> None:
    """No process of the demo's group runs on; its socket directory is gone."""
    deadline = time.monotonic() + 5.0  # a daemon killed by its group exits at once
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _group_alive(process.pid):
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"processes of the demo were left running\n{out}")
    for directory in re.findall(r"\(in (/\S+)\):", out):
        assert not Path(directory).exists(), f"{directory} was left behind"


def _read_until(process: subprocess.Popen[bytes], marker: bytes, timeout: float) -> bytes:
    """The demo's stdout up to and including the first line holding `marker`."""
    assert process.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while marker not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                break
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break
            seen += chunk
    return seen


def test_demo_chats_in_agreed_order_survives_a_kill_and_cleans_up() -> None:
    process = _start()
    out, err = _finish(process, DEMO_TIMEOUT)
    assert process.returncode == 0, out + err[-3000:]
    _assert_nothing_left(process, out)

    assert "all 6 daemons agree on view" in out
    # the membership grows one join at a time, then the first chat round: one order
    assert "frank@D6 joined   chat = alice@D1, bob@D2, carol@D3, dave@D4, erin@D5, frank@D6" in out
    assert "6/6 clients saw the same order (18 messages)" in out
    # the kill: the victim's client is cut off, the others get a `network` change
    assert "killing D3 with SIGKILL" in out
    assert re.search(r"carol@D3 is disconnected after [\d.]+ s: daemon at unix:\S+ closed", out)
    assert "new view: D1, D2, D5, D6" in out
    assert re.search(
        r"before: +alice@D1, bob@D2, carol@D3, dave@D4, erin@D5, frank@D6\n"
        r" +transitional: +alice@D1, bob@D2, erin@D5, frank@D6 +\(moving on together\)\n"
        r" +network: +alice@D1, bob@D2, erin@D5, frank@D6 +\(gone: carol@D3, dave@D4\)",
        out,
    ), out
    # D4's only way out was D3: it goes on alone, and so does its client
    assert re.search(r"network: +dave@D4 +\(gone: ", out)
    # the chat goes on among the survivors, in one order on each side of the partition
    assert (
        "4/4 clients saw the same order (12 messages): alice@D1, bob@D2, erin@D5, frank@D6" in out
    )
    assert "1/1 clients saw the same order (3 messages): dave@D4" in out
    assert "whole run: all 15 pairs of clients delivered the lines they have in common" in out
    # everything stopped: the victim by SIGKILL, every other daemon cleanly
    stopped = dict(re.findall(r"(D\d) \(pid \d+\) exit (-?\d+|None)", out))
    assert stopped == {"D1": "0", "D2": "0", "D3": "-9", "D4": "0", "D5": "0", "D6": "0"}
    assert "\nsummary\n" in out
    assert "result: OK" in out


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_demo_stops_everything(how: signal.Signals) -> None:
    process = _start()
    try:
        shown = _read_until(process, b"round 1:", DEMO_TIMEOUT)
        assert b"round 1:" in shown, shown.decode()
        process.send_signal(how)  # to the demo alone: it must stop its daemons itself
        out, err = _finish(process, STOP_TIMEOUT)
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    out = shown.decode() + out
    # Ctrl-C: 130 as for every interrupted command; SIGTERM: a failed run
    assert process.returncode == (130 if how == signal.SIGINT else 1), out + err[-3000:]
    assert "interrupted: every client, daemon and socket the demo started is stopped" in out
    _assert_nothing_left(process, out)


def test_an_unknown_victim_is_a_usage_error() -> None:
    done = subprocess.run(
        [*DEMO, "--kill", "D9"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert "no such daemon" in done.stderr
