"""Child processes driven over pipes: JSON commands on stdin, JSON events on stdout, one
per line (the peer endpoints of `meshcast.runtime.peer_process`, the workers of
`meshcast bench group`). Logs go to stderr; the end of stdin means "stop"."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, ClassVar, Self

from meshcast.errors import MeshcastError

KILL_WAIT = 5.0  # s: after SIGTERM, then after SIGKILL


@contextlib.asynccontextmanager
async def stdin_reader() -> AsyncIterator[asyncio.StreamReader]:
    """Child side: stdin as a stream on the running loop (the parent's commands, one JSON
    line each; its end means "stop")."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    try:
        yield reader
    finally:
        transport.close()


def emit(event: dict[str, Any]) -> None:
    """Child side: one event as one JSON line on stdout."""
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def read_event(
    process: asyncio.subprocess.Process,
    timeout: float | None,  # noqa: ASYNC109 - bounded wait is the API
    error: type[MeshcastError],
    label: str,
) -> dict[str, Any]:
    """Parent side: the child's next event; `error` on exit or anything but a JSON object."""
    assert process.stdout is not None
    async with asyncio.timeout(timeout):
        line = await process.stdout.readline()
    if not line:
        code = await process.wait()
        raise error(f"{label} exited with code {code}")
    try:
        event = json.loads(line)
    except ValueError:
        raise error(f"{label} wrote {line!r}") from None
    if not isinstance(event, dict):
        raise error(f"{label} wrote {line!r}")
    return event


async def terminate(process: asyncio.subprocess.Process, timeout: float) -> int:  # noqa: ASYNC109 - bounded wait is the API
    """Wait up to `timeout` for a clean exit; then SIGTERM, then SIGKILL."""
    for action in (None, process.terminate, process.kill):
        if process.returncode is not None:
            break
        if action is not None:
            with contextlib.suppress(ProcessLookupError):
                action()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout if action is None else KILL_WAIT):
                await process.wait()
    return await process.wait()


class JsonChild:
    """Parent side of one child. Always `stop` it (or use ``async with``)."""

    error: ClassVar[type[MeshcastError]] = MeshcastError  # what its failures raise

    def __init__(self, process: asyncio.subprocess.Process, label: str) -> None:
        self.process = process
        self.label = label  # names the child in errors ("peer 2", "worker r1")
        self.events: list[dict[str, Any]] = []

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def command(self, command: dict[str, Any]) -> None:
        stdin = self.process.stdin
        if stdin is None or stdin.is_closing() or self.process.returncode is not None:
            raise self.error(f"{self.label} no longer takes commands")
        stdin.write((json.dumps(command) + "\n").encode())

    async def wait_event(self, name: str, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109 - bounded wait is the API
        """The next event called `name` (earlier ones are kept in `events`); `error` on an
        "error" event or exit, TimeoutError after `timeout`."""
        async with asyncio.timeout(timeout):
            while True:
                event = await read_event(self.process, None, self.error, self.label)
                self.events.append(event)
                if event.get("event") == name:
                    return event
                if event.get("event") == "error":
                    raise self.error(f"{self.label}: {event.get('error')}")

    async def stop(self, timeout: float = 10.0) -> int:  # noqa: ASYNC109 - bounded wait is the API
        """Ask the child to stop, wait, then terminate or kill it. Returns its exit code."""
        if self.process.returncode is None:
            with contextlib.suppress(MeshcastError, ConnectionError):
                self.command({"cmd": "stop"})
            stdin = self.process.stdin
            if stdin is not None:
                stdin.close()
        return await terminate(self.process, timeout)
