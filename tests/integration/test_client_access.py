"""Client access control over real sockets: `meshcast daemon` processes on 127.0.0.1.

The Unix socket is private (0600) unless `[clients] socket_group` shares it (0660); a TCP
client port bound to 0.0.0.0 (not loopback-only, reached here through 127.0.0.1) requires
a token: none or a wrong one gets ERROR 109 UNAUTHENTICATED and the connection closes,
the right one opens the session; `[[clients.rule]]` entries make JOIN and MULTICAST fail
with ERROR 209 ACCESS_DENIED (the client library's `AccessDenied`), the session going on.
"""

from __future__ import annotations

import asyncio
import grp
import os
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

import meshcast
from meshcast.client import AccessDenied, Client, Unauthenticated, blocking
from meshcast.wire.client import (
    FROM_DAEMON,
    ErrorCode,
    ErrorReport,
    FrameDecoder,
    Hello,
    Message,
    encode,
)

from .daemon_helpers import DAEMON_COMMAND, DaemonProcess, run_command, write_cluster

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio]

WAIT = 10.0  # s: any one answer
READER = "reader-secret-0123456789abcdef"
WRITER = "writer-secret-0123456789abcdef"
RULES = """
[clients]
token_file = "tokens"

[[clients.rule]]
tokens = ["readers"]
groups = ["metrics.*"]
allow = ["read"]

[[clients.rule]]
tokens = ["writers"]
groups = ["metrics.*", "chat"]
allow = ["join", "send"]

[[clients.rule]]
clients = ["monitor-*"]
groups = ["*"]
allow = ["read"]
"""


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Unix socket paths are limited to ~107 bytes: tmp_path can be too long.
    with tempfile.TemporaryDirectory(prefix="mc-acl-") as path:
        yield Path(path)


def cluster(workdir: Path, clients: str = "") -> Path:
    """A one-daemon cluster file with `clients` appended, and the token file beside it."""
    tokens = workdir / "tokens"
    tokens.write_text(f"readers {READER}\nwriters {WRITER}\n", encoding="utf-8")
    tokens.chmod(0o600)
    path = write_cluster(workdir, 1, [])
    with path.open("a", encoding="utf-8") as file:
        file.write(clients)
    return path


@asynccontextmanager
async def daemon(config: Path, *extra: str) -> AsyncIterator[DaemonProcess]:
    process = await DaemonProcess.start(config, "d1", *extra)
    try:
        yield process
    finally:
        await process.stop()


async def tcp_address(process: DaemonProcess) -> str:
    listening = await process.wait_event("clients_listening", timeout=WAIT)
    return f"tcp:127.0.0.1:{listening['tcp_port']}"


async def raw_hello(address: str, hello: Hello) -> tuple[list[object], bool]:
    """Frames the daemon answers `hello` with, and whether it then closed the connection."""
    async with asyncio.timeout(WAIT):
        if address.startswith("tcp:"):
            host, _, port = address.removeprefix("tcp:").rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(port))
        else:
            reader, writer = await asyncio.open_unix_connection(address)
        try:
            writer.write(encode(hello))
            await writer.drain()
            decoder = FrameDecoder(accept=FROM_DAEMON)
            while chunk := await reader.read(65536):
                decoder.feed(chunk)
            return list(decoder), True
        finally:
            writer.close()


# ---------------------------------------------------------------- the Unix socket


async def test_unix_socket_is_private_by_default(workdir: Path) -> None:
    socket_path = workdir / "d1.sock"
    async with daemon(cluster(workdir), "--client-socket", str(socket_path)):
        info = socket_path.stat()
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_uid == os.getuid()
        async with await meshcast.connect(str(socket_path), name="local") as client:
            assert await client.ping() >= 0  # the owner needs no token


async def test_socket_group_shares_the_socket_with_a_group(workdir: Path) -> None:
    try:  # our primary group: a group that exists and that we may give files to
        group = grp.getgrgid(os.getgid()).gr_name
    except KeyError:
        pytest.skip("the primary group has no name")
    socket_path = workdir / "d1.sock"
    config = cluster(workdir, f'\n[clients]\nsocket_group = "{group}"\n')
    async with daemon(config, "--client-socket", str(socket_path)) as process:
        info = socket_path.stat()
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == os.getgid()
        listening = await process.wait_event("clients_listening", timeout=WAIT)
        assert listening["socket_group"] == group


async def test_an_unknown_socket_group_is_a_config_error(workdir: Path) -> None:
    config = cluster(workdir, '\n[clients]\nsocket_group = "no-such-group-mc"\n')
    code, _, err = await run_command(
        *DAEMON_COMMAND, "--config", str(config), "--name", "d1", "--no-client-socket"
    )
    assert code == 2, err
    assert "clients.socket_group: no group named 'no-such-group-mc'" in err


async def test_an_unsafe_token_file_stops_the_daemon_before_it_binds(workdir: Path) -> None:
    config = cluster(workdir, '\n[clients]\ntoken_file = "tokens"\n')
    (workdir / "tokens").chmod(0o644)
    code, _, err = await run_command(
        *DAEMON_COMMAND, "--config", str(config), "--name", "d1", "--no-client-socket"
    )
    assert code == 2, err
    assert "clients.token_file: token file" in err
    assert "mode 0644); run: chmod 600" in err
    assert READER not in err


# ---------------------------------------------------------------- tokens on a TCP port


async def test_a_client_port_beyond_loopback_without_tokens_refuses_to_start(
    workdir: Path,
) -> None:
    path = write_cluster(workdir, 1, [])
    argv = ("--config", str(path), "--name", "d1", "--no-client-socket", "--client-port", "0")
    code, _, err = await run_command(*DAEMON_COMMAND, *argv, "--client-host", "0.0.0.0")
    assert code == 2, err
    assert "clients.token_file: the TCP client address 0.0.0.0 is not loopback" in err
    # loopback needs no token: the same daemon starts (and is stopped at once)
    async with daemon(path, "--no-client-socket", "--client-port", "0") as process:
        address = await tcp_address(process)
        async with await meshcast.connect(address) as client:
            assert await client.ping() >= 0


async def test_tokens_on_a_port_open_beyond_loopback(workdir: Path) -> None:
    extra = ("--no-client-socket", "--client-port", "0", "--client-host", "0.0.0.0")
    async with daemon(cluster(workdir, '\n[clients]\ntoken_file = "tokens"\n'), *extra) as d:
        address = await tcp_address(d)
        assert d.named("clients_listening")[0]["tcp_tokens_required"] is True
        # no token: a typed ERROR, then the daemon closes the connection
        frames, closed = await raw_hello(address, Hello("anon"))
        assert closed
        assert [(f.code, "requires a token" in f.text) for f in frames] == [  # type: ignore[attr-defined]
            (ErrorCode.UNAUTHENTICATED, True)
        ]
        with pytest.raises(Unauthenticated, match="UNAUTHENTICATED") as info:
            await meshcast.connect(address, name="anon", timeout=WAIT)
        assert info.value.code == ErrorCode.UNAUTHENTICATED
        # a wrong token: the same, and the token is not echoed
        frames, closed = await raw_hello(address, Hello("guess", token="x" * 30))
        assert closed
        assert [type(f) for f in frames] == [ErrorReport]
        assert frames[0].code == ErrorCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        assert "x" * 30 not in frames[0].text  # type: ignore[attr-defined]
        with pytest.raises(Unauthenticated):
            await meshcast.connect(address, name="guess", token=READER[:-1] + "!", timeout=WAIT)
        # an old client cannot present a token: told which version it needs
        frames, _ = await raw_hello(address, Hello("old", max_version=2))
        assert [f.code for f in frames] == [ErrorCode.UNSUPPORTED_VERSION]  # type: ignore[attr-defined]
        # the right tokens: sessions that work (no rules: a token may do everything)
        async with (
            await meshcast.connect(address, name="r", token=READER, timeout=WAIT) as reader,
            await meshcast.connect(address, name="w", token=WRITER, timeout=WAIT) as writer,
        ):
            await reader.join("chat")
            await writer.multicast("chat", b"hello")
            message = await next_message(reader)
            assert (message.sender, message.payload) == ("#w#d1", b"hello")
            counters = (await writer.status())["counters"]["sessions"]
            assert counters["unauthenticated"] == 4
            assert counters["handshakes_refused"] == 5
        # the blocking wrapper passes the token too
        assert await asyncio.to_thread(blocking_ping, address, READER) >= 0
        with pytest.raises(Unauthenticated):
            await asyncio.to_thread(blocking_ping, address, None)


def blocking_ping(address: str, token: str | None) -> float:
    with blocking.connect(address, token=token, timeout=WAIT) as client:
        return client.ping()


async def ping_twice(client: Client) -> None:
    """Two calls: the ERROR of an earlier request precedes the first PONG, so the second
    call raises it at the latest."""
    for _ in range(2):
        await client.ping()


async def next_message(client: Client) -> Message:
    async with asyncio.timeout(WAIT):
        while True:
            event = await client.receive()
            if isinstance(event, Message):
                return event


# ---------------------------------------------------------------- access rules


async def test_access_rules_deny_join_and_send_and_the_session_goes_on(workdir: Path) -> None:
    socket_path = workdir / "d1.sock"
    extra = ("--client-socket", str(socket_path), "--client-port", "0", "--client-host", "0.0.0.0")
    async with daemon(cluster(workdir, RULES), *extra) as process:
        address = await tcp_address(process)
        async with (
            await meshcast.connect(address, name="r", token=READER, timeout=WAIT) as reader,
            await meshcast.connect(address, name="w", token=WRITER, timeout=WAIT) as writer,
            await meshcast.connect(str(socket_path), name="monitor-1") as monitor,
            await meshcast.connect(str(socket_path), name="alice") as local,
        ):
            # read-only: may join and receive, may not send
            await reader.join("metrics.cpu")
            await writer.join("metrics.cpu")
            await writer.multicast("metrics.cpu", b"42")
            assert (await next_message(reader)).payload == b"42"
            request = await reader.multicast("metrics.cpu", b"forged")
            with pytest.raises(AccessDenied, match=r"may not send to group 'metrics\.cpu'") as info:
                await ping_twice(reader)  # a later call raises it
            assert info.value.code == ErrorCode.ACCESS_DENIED
            assert info.value.request_id == request
            # no rule gives the reader "chat": a remote session gets nothing by default
            with pytest.raises(AccessDenied, match="may not join group 'chat'"):
                await reader.join("chat")
            assert await reader.ping() >= 0  # the session is still open
            assert reader.groups == {"metrics.cpu"}
            # a local client named monitor-*: read-only everywhere
            await monitor.join("chat")
            with pytest.raises(AccessDenied, match="ACCESS_DENIED"):
                await monitor.multicast("chat", b"x", confirm=True)
            # a local client no rule names: everything (the default for local sessions)
            await local.join("secret-plans")
            await local.multicast("secret-plans", b"mine")
            assert (await next_message(local)).payload == b"mine"
            # the writer reaches the read-only members; nothing forged arrived
            await writer.join("chat")
            await writer.multicast("chat", b"to all")
            assert (await next_message(monitor)).payload == b"to all"
            await writer.multicast("metrics.cpu", b"43")
            assert (await next_message(reader)).payload == b"43"  # nothing forged came first
            counters = (await local.status())["counters"]["sessions"]
            assert counters["access_denied"] == 3
        status = (sys.executable, "-m", "meshcast.cli", "status", "--socket", str(socket_path))
        code, out, err = await run_command(*status)
        assert code == 0, err
        assert "3 requests denied by the access rules" in out


async def test_the_cli_says_what_was_denied(workdir: Path) -> None:
    extra = ("--no-client-socket", "--client-port", "0", "--client-host", "0.0.0.0")
    token_file = workdir / "reader.token"
    token_file.write_text(f"{READER}\n", encoding="utf-8")
    token_file.chmod(0o600)
    async with daemon(cluster(workdir, RULES), *extra) as process:
        address = await tcp_address(process)
        user = (sys.executable, "-m", "meshcast.cli", "user", "--connect", address)
        code, _, err = await run_command(*user, "--join", "metrics.cpu")
        assert code == 1, err
        assert "UNAUTHENTICATED" in err
        assert "hint: present a valid token with --token-file FILE or $MESHCAST_TOKEN" in err
        code, _, err = await run_command(*user, "--token-file", str(token_file), "--join", "chat")
        assert code == 1, err
        assert "rejected JOIN 'chat': ACCESS_DENIED (209)" in err
        assert "hint: the daemon's access rules" in err
        env = {**os.environ, "MESHCAST_TOKEN": READER}
        code, _, err = await run_command(*user, "--join", "metrics.cpu", env=env)
        assert code == 0, err
        token_file.chmod(0o644)
        code, _, err = await run_command(*user, "--token-file", str(token_file))
        assert code == 2, err
        assert "chmod 600" in err


async def test_a_wrong_token_is_refused_on_the_unix_socket_too(workdir: Path) -> None:
    socket_path = workdir / "d1.sock"
    async with daemon(cluster(workdir, RULES), "--client-socket", str(socket_path)):
        with pytest.raises(Unauthenticated):
            await meshcast.connect(str(socket_path), token="y" * 20, timeout=WAIT)
        # an old client while rules are in force: it could not be told ACCESS_DENIED
        frames, closed = await raw_hello(str(socket_path), Hello("old", max_version=2))
        assert closed
        assert [f.code for f in frames] == [ErrorCode.UNSUPPORTED_VERSION]  # type: ignore[attr-defined]
        assert "enforces access rules" in frames[0].text  # type: ignore[attr-defined]
