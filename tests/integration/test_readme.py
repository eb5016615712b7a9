"""The README's Python snippet is a complete program: it runs against the daemon the README
starts in the lines above it, prints its join and its message, and ends.

The daemon command and the snippet are taken from README.md as they are written; only
the socket path is moved into a private temporary directory. The daemon is stopped
whatever happens.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio]

ROOT = Path(__file__).resolve().parents[2]
SRC = str(ROOT / "src")
README_SOCKET = "/tmp/d1.sock"
WAIT = 30.0  # s: daemon start-up, and the whole snippet run, interpreters included


def readme_block(marker: str, language: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"<!-- {marker} -->\s*```{language}\n(.+?)\n```", text, re.DOTALL)
    assert match, f"README.md has no {marker} block"
    return match.group(1)


async def test_readme_python_snippet_runs_as_a_script_and_ends(tmp_path: Path) -> None:
    command = readme_block("daemon-command", "sh").strip()
    snippet = readme_block("client-snippet", "python")
    assert README_SOCKET in command
    assert README_SOCKET in snippet
    sockets = Path(tempfile.mkdtemp(prefix="mcrd", dir="/tmp"))  # short: AF_UNIX limit
    path = str(sockets / "d1.sock")
    argv = shlex.split(command.replace(README_SOCKET, path))
    assert argv[0] == "meshcast"
    script = tmp_path / "snippet.py"
    script.write_text(snippet.replace(README_SOCKET, path), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # the embedded cluster's key is made on first use under here, not in the user's home
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")

    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshcast", *argv[1:],
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )  # fmt: skip
    try:
        assert daemon.stderr is not None
        async with asyncio.timeout(WAIT):
            while True:
                line = await daemon.stderr.readline()
                assert line, f"the daemon exited ({await daemon.wait()}) before listening"
                if json.loads(line).get("event") == "clients_listening":
                    break
        snippet_run = await asyncio.create_subprocess_exec(
            sys.executable, str(script),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )  # fmt: skip
        try:
            async with asyncio.timeout(WAIT):  # the loop must end by itself
                out, err = await snippet_run.communicate()
        finally:
            if snippet_run.returncode is None:
                snippet_run.kill()
                await snippet_run.wait()
        assert snippet_run.returncode == 0, err.decode()
        lines = out.decode().splitlines()
        assert len(lines) == 2, lines
        assert lines[0].startswith("Membership(group='chat'")
        assert "'#alice#D1'" in lines[0]
        assert lines[1] == (
            "Message(sender='#alice#D1', groups=('chat',), service=<ServiceLevel.AGREED: 4>, "
            "msg_type=7, payload=b'hello')"
        )
    finally:
        if daemon.returncode is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(WAIT):
                    await daemon.wait()
            except TimeoutError:
                daemon.kill()
                await daemon.wait()
        shutil.rmtree(sockets, ignore_errors=True)
