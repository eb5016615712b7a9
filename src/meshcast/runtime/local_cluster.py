"""A cluster of `meshcast daemon` processes on this machine, for the demo.

Each daemon is a real process on its own 127.0.0.x address; their JSON state lines
(stderr) are collected as events. Every process started here is stopped here. A
configuration without a key (and not ``insecure``) gets a fresh one for the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from meshcast.config import ClusterConfig, SecurityConfig, dump_config
from meshcast.runtime.keyfile import new_key, write_key_file

Event = dict[str, object]
_STOP_TIMEOUT = 5.0  # s for a daemon to drain and exit after SIGTERM
_LINE_LIMIT = 1 << 20  # bytes of one JSON log line


def loopback_mesh_toml(
    cluster: str, names: Sequence[str], *, port_base: int, rate: str
) -> list[str]:
    """Cluster-file lines for daemons `names` on 127.0.0.1.., one site, every pair linked,
    `rate` up and down, views settling fast (ports are placeholders: `LocalCluster` picks
    free ones). Callers append sections of their own."""
    lines = ["[cluster]", f'name = "{cluster}"', 'routing = "shortest-path"']
    lines += ["", "[[sites]]", 'name = "lo"']
    for i, name in enumerate(names, start=1):
        lines += [
            "",
            "[[daemons]]",
            f'name = "{name}"',
            f"id = {i}",
            f'host = "127.0.0.{i}"',
            f"port = {port_base + i}",
            'site = "lo"',
            f'upload = "{rate}"',
            f'download = "{rate}"',
        ]
    lines += ["", "[links]", 'within_sites = "full"', 'between_sites = "none"']
    lines += ["", "[membership]", 'view_settle_interval = "50ms"']
    return lines


def free_udp_ports(hosts: Sequence[str]) -> list[int]:
    """A port free for UDP on each host, all probed at once so no two collide."""
    sockets = []
    try:
        for host in hosts:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class DaemonProcess:
    name: str
    process: asyncio.subprocess.Process
    events: list[Event] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def named(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.get("event") == kind]


class LocalCluster:
    """Start, watch and stop the daemons of `config` (ports are picked free at start)."""

    def __init__(
        self,
        config: ClusterConfig,
        *,
        probe_interval: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._config = config
        self._probe_interval = probe_interval
        self._env = dict(env or {})  # added to the daemons' environment
        self.daemons: dict[str, DaemonProcess] = {}
        self._readers: list[asyncio.Task[None]] = []
        self._workdir = tempfile.TemporaryDirectory(prefix="meshcast-demo-")

    @property
    def config(self) -> ClusterConfig:
        return self._config

    async def __aenter__(self) -> LocalCluster:
        try:
            await self._start()
        except BaseException:
            await self.__aexit__()  # what did start is stopped: a failure leaves nothing
            raise
        return self

    async def _start(self) -> None:
        ports = free_udp_ports([d.host for d in self._config.daemons])
        self._config = self._config.with_ports(
            {d.name: port for d, port in zip(self._config.daemons, ports, strict=True)}
        )
        workdir = Path(self._workdir.name)
        security = self._config.security
        if security.key_file is None and not security.insecure:
            # Secure by default: a fresh key for this run, beside the cluster file.
            key = workdir / "cluster.key"
            write_key_file(key, new_key())
            self._config = replace(self._config, security=SecurityConfig(key_file=str(key)))
        path = workdir / "cluster.toml"
        # 0600: the dump holds the config's token secrets, if any (load_config checks)
        path.touch(mode=0o600)
        path.write_text(dump_config(self._config), encoding="utf-8")
        for spec in self._config.daemons:
            argv = [
                sys.executable,
                "-m",
                "meshcast.cli",
                "daemon",
                "--config",
                str(path),
                "--name",
                spec.name,
                "--data-dir",
                str(workdir / spec.name),
            ]
            if self._probe_interval is not None:
                argv += ["--probe-interval", str(self._probe_interval)]
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                limit=_LINE_LIMIT,
                env={**os.environ, **self._env, "PYTHONUNBUFFERED": "1"},
            )
            daemon = DaemonProcess(spec.name, process)
            self.daemons[spec.name] = daemon
            self._readers.append(asyncio.ensure_future(self._read(daemon)))

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop_all()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        self._workdir.cleanup()

    async def _read(self, daemon: DaemonProcess) -> None:
        assert daemon.process.stderr is not None
        while line := await daemon.process.stderr.readline():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    daemon.events.append(event)
                    daemon.changed.set()

    async def wait_for(
        self,
        condition: Callable[[], bool],
        timeout: float,  # noqa: ASYNC109 - bounded wait
    ) -> bool:
        """Wait until `condition()` holds (re-checked on every new event), at most `timeout` s."""
        try:
            async with asyncio.timeout(timeout):
                while not condition():
                    waiters = [
                        asyncio.ensure_future(d.changed.wait()) for d in self.daemons.values()
                    ]
                    try:
                        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for waiter in waiters:
                            waiter.cancel()
                    for daemon in self.daemons.values():
                        daemon.changed.clear()
        except TimeoutError:
            return False
        return True

    def kill(self, name: str) -> None:
        """SIGKILL: the daemon gets no chance to say goodbye."""
        self.daemons[name].process.send_signal(signal.SIGKILL)

    async def stop_all(self) -> dict[str, int | None]:
        """SIGTERM every live daemon; kill whoever does not exit in time. Exit codes by name."""
        for daemon in self.daemons.values():
            if daemon.process.returncode is None:
                daemon.process.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, daemon in self.daemons.items():
            try:
                codes[name] = await asyncio.wait_for(daemon.process.wait(), _STOP_TIMEOUT)
            except TimeoutError:
                daemon.process.kill()
                codes[name] = await daemon.process.wait()
        return codes
