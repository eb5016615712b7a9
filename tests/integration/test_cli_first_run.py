"""The `meshcast` commands as a new user meets them, against real `meshcast daemon` processes.

* `meshcast user --interactive`: messages appear as they arrive (no Enter needed), a line
  over 64 KiB is sent, `r abc` is refused, a timed-out `r` says so.
* Two daemons called d1 in two clusters both get a client socket (NAME@CLUSTER.sock), and
  `--connect d1` / `status --name d1` find them by name (`--config` picks the cluster).
* `meshcast flood` prints one summary line (`--json`: one object); the daemon logs
  readable lines on a terminal; Ctrl-C gives exit status 130.

Every process a test starts is stopped; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import meshcast
from meshcast.runtime.local_cluster import free_udp_ports

from .daemon_helpers import cluster_toml, host_of, run_command, running_daemons, write_key

pytestmark = pytest.mark.timeout(120)

SRC = str(Path(__file__).resolve().parents[2] / "src")
WAIT = 15.0  # s: a line the test waits for


def env() -> dict[str, str]:
    """The environment of a child: this tree's sources first."""
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


async def meshcast_cli(*argv: str) -> tuple[int, str, str]:
    """Run ``python -m meshcast ARGV`` to its end: (exit status, stdout, stderr)."""
    return await run_command(sys.executable, "-m", "meshcast", *argv, env=env())


def write_one_daemon_cluster(directory: Path, cluster: str, index: int = 1) -> Path:
    """A cluster file of one daemon, d1, on 127.0.0.<index> and a free port."""
    host = host_of(index)
    text = cluster_toml(1, [], free_udp_ports([host])).replace(
        'name = "test"', f'name = "{cluster}"'
    )
    text = text.replace(f'host = "{host_of(1)}"', f'host = "{host}"')
    write_key(directory)
    path = directory / f"{cluster}.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def sockets(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private XDG_RUNTIME_DIR (short: the AF_UNIX path limit) for daemons and commands."""
    directory = Path(tempfile.mkdtemp(prefix="mccli", dir="/tmp"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(directory))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------- meshcast user --interactive


class Interactive:
    """A `meshcast user --interactive` child fed through a pipe; its output read as it comes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.out: list[str] = []
        self.err: list[str] = []
        self.changed = asyncio.Event()
        assert process.stdout is not None
        assert process.stderr is not None
        self.readers = [
            asyncio.create_task(self._read(process.stdout, self.out)),
            asyncio.create_task(self._read(process.stderr, self.err)),
        ]

    async def _read(self, stream: asyncio.StreamReader, lines: list[str]) -> None:
        while line := await stream.readline():
            lines.append(line.decode("utf-8", "replace").rstrip("\n"))
            self.changed.set()
        self.changed.set()

    async def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()

    async def wait_line(self, lines: list[str], pattern: str) -> str:
        """The first line of `lines` that matches `pattern` (bounded wait)."""
        try:
            async with asyncio.timeout(WAIT):
                while True:
                    for line in lines:
                        if re.search(pattern, line):
                            return line
                    if all(r.done() for r in self.readers):
                        raise AssertionError(f"exited before {pattern!r}: {self.out} {self.err}")
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"no line matching {pattern!r} within {WAIT} s: {self.out} {self.err}"
            ) from None

    async def stop(self) -> int:
        with contextlib.suppress(ProcessLookupError):
            if self.process.returncode is None:
                self.process.kill()
        code = await self.process.wait()
        await asyncio.gather(*self.readers, return_exceptions=True)
        return code


@pytest.mark.asyncio
async def test_interactive_user_shows_messages_as_they_arrive_and_takes_long_lines(
    tmp_path: Path, sockets: Path
) -> None:
    config = write_one_daemon_cluster(tmp_path, "test")
    path = sockets / "d1.sock"
    async with running_daemons(config, ["d1"], "--client-socket", str(path)):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshcast", "user", "--connect", f"unix:{path}",
            "--name", "ia", "--join", "chat", "--interactive", "--timeout", "2",
            limit=1 << 20,  # our own reading of its 100 kB line
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env(),
        )  # fmt: skip
        user = Interactive(process)
        try:
            await user.wait_line(user.out, r"^membership chat .* join #ia#d1")
            async with await meshcast.connect(f"unix:{path}", name="bob") as bob:
                await bob.join("chat")
                await bob.multicast("chat", b"hello from bob")
                # shown without a line typed: nothing is written to the user's stdin here
                await user.wait_line(user.out, r"^message from #bob#d1 .*: hello from bob$")

                long_text = "x" * 100_000  # over asyncio's 64 KiB line limit
                await user.send(f"s chat {long_text}")
                while True:
                    async with asyncio.timeout(WAIT):
                        event = await bob.receive()
                    if isinstance(event, meshcast.Message) and event.sender == "#ia#d1":
                        break
                assert event.payload == long_text.encode()
                await user.wait_line(user.out, r"^message from #ia#d1 .*100000 bytes")

                await user.send("r abc")
                await user.wait_line(user.err, r"^error: r takes a number of events .*'abc'")
                await user.send("r 9")
                await user.wait_line(user.err, r"^error: r: timed out after 2 s: \d of 9 events")
                await user.send("q")
                async with asyncio.timeout(WAIT):
                    code = await process.wait()
        finally:
            code = await user.stop()
        assert code == 0, user.err
        assert not [line for line in user.err if "Traceback" in line], user.err


# ---------------------------------------------------------------- two clusters, one daemon name


@pytest.mark.asyncio
async def test_daemons_of_two_clusters_with_one_name_each_get_a_socket_found_by_name(
    tmp_path: Path, sockets: Path
) -> None:
    alpha = write_one_daemon_cluster(tmp_path, "alpha", 1)
    beta = write_one_daemon_cluster(tmp_path, "beta", 2)
    async with (
        running_daemons(alpha, ["d1"]) as in_alpha,
        running_daemons(beta, ["d1"]) as in_beta,
    ):
        d_alpha, d_beta = in_alpha["d1"], in_beta["d1"]
        for daemon, cluster in ((d_alpha, "alpha"), (d_beta, "beta")):
            listening = await daemon.wait_event("clients_listening", timeout=WAIT)
            assert listening["unix_path"] == str(sockets / "meshcast" / f"d1@{cluster}.sock")
            assert daemon.named("clients_unix_unavailable") == []

        # by name, with --config picking the cluster
        for cluster, config in (("alpha", alpha), ("beta", beta)):
            code, out, err = await meshcast_cli(
                "status", "--name", "d1", "--config", str(config), "--json"
            )
            assert code == 0, err
            assert json.loads(out)["daemon"]["cluster"] == cluster
        code, out, err = await meshcast_cli(
            "user", "--connect", "d1", "--config", str(beta), "--name", "u",
            "--join", "g", "--send", "via beta", "--recv", "1",
        )  # fmt: skip
        assert code == 0, err
        assert out.splitlines()[-1].endswith(": via beta")

        # by name alone: ambiguous while both run, a usage error naming both clusters
        code, out, err = await meshcast_cli("status", "--name", "d1")
        assert (code, out) == (2, "")
        assert "of 2 clusters are running (alpha, beta); give --config FILE" in err

        assert await d_beta.stop() == 0
        code, out, err = await meshcast_cli("status", "--name", "d1", "--json")
        assert code == 0, err
        assert json.loads(out)["daemon"]["cluster"] == "alpha"
        code, out, err = await meshcast_cli(
            "user", "--connect", "d1", "--join", "g", "--send", "by name", "--recv", "1"
        )
        assert code == 0, err
        assert out.splitlines()[-1].endswith(": by name")

        code, out, err = await meshcast_cli("status", "--name", "nobody")
        assert code == 1
        assert "no daemon called 'nobody' is listening" in err


@pytest.mark.asyncio
async def test_host_port_address_suggests_tcp() -> None:
    code, out, err = await meshcast_cli("user", "--connect", "localhost:4801", "--join", "g")
    assert (code, out) == (2, "")
    assert "for TCP write tcp:localhost:4801" in err


# ---------------------------------------------------------------- flood, logs, Ctrl-C


@pytest.mark.asyncio
async def test_flood_prints_one_summary_line_or_one_json_object(
    tmp_path: Path, sockets: Path
) -> None:
    config = write_one_daemon_cluster(tmp_path, "test")
    async with running_daemons(config, ["d1"]):
        code, out, err = await meshcast_cli(
            "flood", "--connect", "d1", "--messages", "200", "--size", "100"
        )
        assert code == 0, err
        assert re.fullmatch(
            r"200 of 200 messages of 100 B \(reliable, group flood\) in [0-9.]+ s: "
            r"[0-9,]+ msgs/s, [0-9.]+ Mbit/s\n",
            out,
        ), out
        code, out, err = await meshcast_cli(
            "flood", "--connect", "d1", "--messages", "50", "--size", "100", "--json"
        )
        assert code == 0, err
        assert len(out.splitlines()) == 1
        result = json.loads(out)
        assert (result["messages"], result["received"], result["complete"]) == (50, 50, True)


def test_daemon_logs_readable_lines_on_a_terminal_and_json_otherwise(tmp_path: Path) -> None:
    config = write_one_daemon_cluster(tmp_path, "test")
    base = [sys.executable, "-m", "meshcast", "daemon", "--config", str(config), "--name", "d1"]
    base += ["--no-client-socket"]

    def first_lines(stderr: int, read_fd: int, *extra: str) -> list[str]:
        """Run the daemon until it logs daemon_started; its stderr lines up to there."""
        process = subprocess.Popen(
            [*base, *extra], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=stderr, env=env(),
        )  # fmt: skip
        data = b""
        try:
            deadline = time.monotonic() + WAIT
            while b"daemon_started" not in data and time.monotonic() < deadline:
                ready, _, _ = select.select([read_fd], [], [], 0.5)
                if ready:
                    data += os.read(read_fd, 65536)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return data.decode("utf-8", "replace").splitlines()

    primary, secondary = os.openpty()  # a terminal, as an operator's shell gives
    try:
        lines = first_lines(secondary, primary)
    finally:
        os.close(secondary)
        os.close(primary)
    started = next(line for line in lines if "daemon_started" in line)
    assert re.match(r"\d\d:\d\d:\d\d\.\d{3} d1 daemon_started host=127\.0\.0\.1 port=", started)

    read_end, write_end = os.pipe()  # a pipe: JSON lines for programs
    try:
        lines = first_lines(write_end, read_end)
        json_started = json.loads(next(line for line in lines if "daemon_started" in line))
        assert json_started["event"] == "daemon_started"
        lines = first_lines(write_end, read_end, "--log-format", "human")
        assert any(re.search(r" d1 daemon_started host=", line) for line in lines)
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.asyncio
async def test_an_interrupted_command_exits_130(tmp_path: Path) -> None:
    path = Path(tempfile.mkdtemp(prefix="mcint", dir="/tmp")) / "silent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.setblocking(False)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshcast", "user", "--connect", f"unix:{path}", "--recv", "1",
        "--timeout", "60",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env(),
    )  # fmt: skip
    connection: socket.socket | None = None
    try:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(WAIT):  # the command is in its event loop once it connects
            connection, _ = await loop.sock_accept(listener)
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(WAIT):
            _, err = await process.communicate()
        assert process.returncode == 130
        assert "interrupted" in err.decode()
        assert "Traceback" not in err.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if connection is not None:
            connection.close()
        listener.close()
        shutil.rmtree(path.parent, ignore_errors=True)
