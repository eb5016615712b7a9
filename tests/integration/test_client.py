"""The client library (meshcast.client) against a fake daemon over real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
import pytest_asyncio

import meshcast
from meshcast.client import (
    Client,
    ClientError,
    MessageTooLarge,
    RequestRejected,
    UsageError,
    blocking,
    parse_address,
)
from meshcast.wire.client import (
    BUSY_VERSION,
    VERSION,
    Cause,
    DaemonLimits,
    ErrorCode,
    ErrorReport,
    Join,
    Membership,
    Message,
    Ping,
    Pong,
    ServiceLevel,
)

from .fake_daemon import FakeDaemon

pytestmark = pytest.mark.timeout(60)

SMALL = DaemonLimits(max_message_size=1000, max_group_name=16, max_groups_per_client=3)
SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # Unix socket paths are limited to ~107 bytes: tmp_path can be too long.
    with tempfile.TemporaryDirectory(prefix="mc-") as path:
        yield path


@pytest_asyncio.fixture
async def daemon(sock_dir: str) -> AsyncIterator[FakeDaemon]:
    async with FakeDaemon(limits=SMALL).serve_unix(os.path.join(sock_dir, "d.sock")) as fake:
        yield fake


async def _next(client: Client) -> Message | Membership:
    async with asyncio.timeout(5):
        return await client.receive()


async def _wait_until_queued(client: Client, count: int) -> None:
    """Poll (the queue has no waiting API) until `count` events are queued; at most 5 s."""
    for _ in range(500):
        if client.statistics().queued >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{client!r}: {client.statistics()}")


# ---------------------------------------------------------------- addresses and exports


def test_addresses_parse() -> None:
    assert str(parse_address("unix:/tmp/x.sock")) == "unix:/tmp/x.sock"
    assert parse_address("/tmp/x.sock").path == "/tmp/x.sock"
    tcp = parse_address("tcp:127.0.0.1:7000")
    assert (tcp.transport, tcp.host, tcp.port) == ("tcp", "127.0.0.1", 7000)
    assert str(parse_address("tcp:[::1]:9")) == "tcp:[::1]:9"
    for bad in ("", "unix:", "tcp:host", "tcp::80", "tcp:h:0", "tcp:h:x"):
        with pytest.raises(UsageError):
            parse_address(bad)


def test_package_top_exports_the_client_api() -> None:
    assert meshcast.AGREED is ServiceLevel.AGREED
    assert list(ServiceLevel)[:3] == [meshcast.UNRELIABLE, meshcast.RELIABLE, meshcast.FIFO]
    assert (meshcast.CAUSAL, meshcast.SAFE) == (ServiceLevel.CAUSAL, ServiceLevel.SAFE)
    assert meshcast.Message is Message
    assert meshcast.Membership is Membership
    assert meshcast.Cause is Cause
    assert meshcast.ServiceLevel is ServiceLevel
    assert callable(meshcast.connect)
    assert issubclass(meshcast.AccessDenied, meshcast.RequestRejected)
    assert issubclass(meshcast.Unauthenticated, meshcast.ClientError)
    assert meshcast.ErrorCode.ACCESS_DENIED == 209
    assert meshcast.ErrorCode.UNAUTHENTICATED == 109
    assert issubclass(meshcast.Busy, meshcast.RequestRejected)
    assert meshcast.ErrorCode.BUSY == 210
    with pytest.raises(AttributeError):
        _ = meshcast.nonexistent


# ---------------------------------------------------------------- handshake and errors


@pytest.mark.asyncio
async def test_handshake_over_unix_socket(daemon: FakeDaemon) -> None:
    async with await meshcast.connect(daemon.address, name="alice") as c:
        assert c.private_name == "#alice#D1"
        assert (c.name, c.daemon_name, c.version) == ("alice", "D1", VERSION)
        assert c.limits == SMALL
        assert await c.ping() >= 0
    assert c.closed
    assert daemon.goodbyes == 1
    assert not daemon.sessions


@pytest.mark.asyncio
async def test_bare_path_and_daemon_picked_name(daemon: FakeDaemon) -> None:
    async with await meshcast.connect(daemon.address.removeprefix("unix:")) as c:
        assert c.private_name.startswith("#c")
        assert c.private_name.endswith("#D1")


@pytest.mark.asyncio
async def test_unreachable_daemon_names_the_address(sock_dir: str) -> None:
    missing = os.path.join(sock_dir, "nobody.sock")
    with pytest.raises(ClientError, match=r"cannot reach daemon at unix:.*nobody.sock") as info:
        await meshcast.connect(missing)
    assert info.value.code == 0
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(ClientError, match=f"tcp:127.0.0.1:{port}"):
        await meshcast.connect(f"tcp:127.0.0.1:{port}")


@pytest.mark.asyncio
async def test_silent_daemon_times_out_the_handshake(sock_dir: str) -> None:
    fake = FakeDaemon(mode="mute")
    async with fake.serve_unix(os.path.join(sock_dir, "m.sock")):
        with pytest.raises(ClientError, match=r"did not answer HELLO within 0.2 s"):
            await meshcast.connect(fake.address, timeout=0.2)


@pytest.mark.asyncio
async def test_name_in_use_is_refused_with_the_daemons_code(daemon: FakeDaemon) -> None:
    async with await meshcast.connect(daemon.address, name="alice"):
        with pytest.raises(ClientError, match=r"NAME_IN_USE") as info:
            await meshcast.connect(daemon.address, name="alice")
        assert info.value.code == ErrorCode.NAME_IN_USE


@pytest.mark.asyncio
async def test_unsupported_version_is_refused(sock_dir: str) -> None:
    fake = FakeDaemon(versions=(VERSION + 1, VERSION + 2))
    async with fake.serve_unix(os.path.join(sock_dir, "v.sock")):
        with pytest.raises(ClientError, match=rf"versions {VERSION + 1}..{VERSION + 2}") as info:
            await meshcast.connect(fake.address, name="old")
        assert info.value.code == ErrorCode.UNSUPPORTED_VERSION


@pytest.mark.asyncio
async def test_confirm_needs_a_version_2_daemon(sock_dir: str) -> None:
    fake = FakeDaemon(versions=(1, 1))
    async with (
        fake.serve_unix(os.path.join(sock_dir, "v1.sock")),
        await meshcast.connect(fake.address, name="old") as c,
    ):
        assert c.version == 1
        with pytest.raises(UsageError, match=r"confirm=True needs protocol version 2"):
            await c.multicast("g", b"x", confirm=True)
        await c.multicast("g", b"x")  # the fast path works with any version


@pytest.mark.asyncio
async def test_bad_arguments_are_usage_errors_before_connecting(daemon: FakeDaemon) -> None:
    for name in ("has space", "a#b", "x" * 33, "tab\t"):
        with pytest.raises(UsageError, match=r"client name"):
            await meshcast.connect(daemon.address, name=name)
    with pytest.raises(UsageError, match=r"timeout"):
        await meshcast.connect(daemon.address, timeout=0)
    with pytest.raises(UsageError, match=r"policy"):
        await meshcast.connect(daemon.address, policy="sometimes")
    assert not daemon.sessions


@pytest.mark.asyncio
async def test_requests_are_checked_early_against_the_daemons_limits(daemon: FakeDaemon) -> None:
    async with await meshcast.connect(daemon.address, name="alice") as c:
        with pytest.raises(MessageTooLarge, match=r"1001 bytes is larger than .* 1000 bytes"):
            await c.multicast("chat", b"x" * 1001)
        with pytest.raises(UsageError, match=r"more than the 16 allowed"):
            await c.join("g" * 17)
        with pytest.raises(UsageError, match=r"100000 bytes, more than the 16 allowed") as huge:
            await c.join("g" * 100_000)
        assert len(str(huge.value)) < 200  # the name is echoed cut short, one limit named
        with pytest.raises(UsageError, match=r"more than the 16 allowed") as huge:
            await c.multicast(["a", "é" * 100_000], b"")
        assert len(str(huge.value)) < 200
        with pytest.raises(UsageError, match=r"starts with '#'"):
            await c.multicast("#alice#D1", b"")
        with pytest.raises(UsageError, match=r"twice"):
            await c.multicast(["a", "a"], b"")
        with pytest.raises(UsageError, match=r"at least one group"):
            await c.multicast([], b"")
        with pytest.raises(UsageError, match=r"msg_type"):
            await c.multicast("a", b"", msg_type=70000)
        with pytest.raises(UsageError, match=r"service level"):
            await c.multicast("a", b"", service="psychic")
        with pytest.raises(UsageError, match=r"not a member"):
            await c.leave("chat")
        for group in ("a", "b", "c"):
            await c.join(group)
        with pytest.raises(UsageError, match=r"3 groups per client"):
            await c.join("d")
        with pytest.raises(UsageError, match=r"already a member"):
            await c.join("a")
        sent = daemon.session("alice").received
        assert [type(f) for f in sent] == [Join, Join, Join]  # nothing invalid was sent
    assert daemon.goodbyes == 1


# ---------------------------------------------------------------- groups and messages


@pytest.mark.asyncio
async def test_join_multicast_receive_over_tcp(sock_dir: str) -> None:
    fake = FakeDaemon(limits=SMALL)
    async with fake.serve_tcp():
        assert fake.address.startswith("tcp:127.0.0.1:")
        async with (
            await meshcast.connect(fake.address, name="alice") as alice,
            await meshcast.connect(fake.address, name="bob") as bob,
        ):
            view = await alice.join("chat")
            assert view.cause == Cause.JOIN
            assert view.who == ("#alice#D1",)
            assert await _next(alice) == view  # also delivered as an event
            await bob.join("chat")
            assert alice.groups == frozenset({"chat"})
            seen = await _next(alice)
            assert isinstance(seen, Membership)
            assert seen.members == ("#alice#D1", "#bob#D1")
            await _next(bob)
            await alice.multicast("chat", b"hello", service=meshcast.AGREED, msg_type=7)
            for client in (alice, bob):
                message = await _next(client)
                assert message == Message("#alice#D1", ("chat",), ServiceLevel.AGREED, 7, b"hello")
            left = await bob.leave("chat")
            assert left.cause == Cause.LEAVE
            assert left.members == ("#alice#D1",)
            assert bob.groups == frozenset()


@pytest.mark.asyncio
async def test_one_multicast_to_several_groups_arrives_once(daemon: FakeDaemon) -> None:
    async with (
        await meshcast.connect(daemon.address, name="alice") as alice,
        await meshcast.connect(daemon.address, name="bob") as bob,
    ):
        await bob.join("g1")
        await bob.join("g2")
        await alice.multicast(["g1", "g2", "g3"], b"x", service="fifo")
        events = [await _next(bob), await _next(bob), await _next(bob)]
        assert [type(e) for e in events] == [Membership, Membership, Message]
        message = events[2]
        assert isinstance(message, Message)
        assert message.groups == ("g1", "g2", "g3")
        assert message.service == ServiceLevel.FIFO
        assert bob.receive_nowait() is None


@pytest.mark.asyncio
async def test_statistics_is_a_frozen_snapshot_that_counts(daemon: FakeDaemon) -> None:
    async with (
        await meshcast.connect(daemon.address, name="alice") as alice,
        await meshcast.connect(daemon.address, name="bob") as bob,
    ):
        before = bob.statistics()
        await bob.join("g")
        await alice.multicast("g", b"hello")
        await _wait_until_queued(bob, 2)  # the join's view and the message
        queued = bob.statistics()
        assert (queued.memberships_received, queued.messages_received, queued.queued) == (1, 1, 2)
        assert [type(await _next(bob)) for _ in range(2)] == [Membership, Message]
        sent = alice.statistics()
        assert (sent.multicasts_sent, sent.payload_bytes_sent) == (1, 5)
        assert bob.statistics().queued == 0
        # a snapshot stays as it was taken, and cannot be changed
        assert (before.messages_received, queued.queued) == (0, 2)
        with pytest.raises(FrozenInstanceError):
            sent.multicasts_sent = 0  # type: ignore[misc]


@pytest.mark.asyncio
async def test_async_for_yields_events_until_close(daemon: FakeDaemon) -> None:
    async with await meshcast.connect(daemon.address, name="alice") as alice:
        await alice.join("chat")
        for i in range(3):
            await alice.multicast("chat", str(i).encode())
        got: list[bytes] = []
        async for event in alice:
            if isinstance(event, Message):
                got.append(event.payload)
            if len(got) == 3:
                await alice.close()
        assert got == [b"0", b"1", b"2"]
    with pytest.raises(UsageError, match=r"closed"):
        await alice.receive()
    with pytest.raises(UsageError, match=r"closed"):
        await alice.multicast("chat", b"late")


@pytest.mark.asyncio
async def test_rejected_multicast_is_raised_by_the_next_call(sock_dir: str) -> None:
    fake = FakeDaemon(services=frozenset({ServiceLevel.RELIABLE}))
    async with fake.serve_unix(os.path.join(sock_dir, "s.sock")):
        async with await meshcast.connect(fake.address, name="alice") as alice:
            await alice.join("chat")
            request_id = await alice.multicast("chat", b"x", service=meshcast.SAFE)
            assert isinstance(await _next(alice), Membership)
            await alice.ping()  # the ERROR has arrived by now
            with pytest.raises(RequestRejected, match=r"SERVICE_NOT_SUPPORTED") as info:
                await alice.multicast("chat", b"y")
            assert info.value.code == ErrorCode.SERVICE_NOT_SUPPORTED
            assert info.value.request_id == request_id
            assert f"MULTICAST {request_id} of 1 bytes" in str(info.value)
            await alice.multicast("chat", b"z")  # the session goes on
            message = await _next(alice)
            assert isinstance(message, Message)
            assert message.payload == b"z"
            await alice.multicast("chat", b"w", service=meshcast.SAFE)
            with pytest.raises(RequestRejected):
                await alice.close()  # GOODBYE: every outcome is known, none lost
        assert alice.statistics().requests_rejected == 2


@pytest.mark.asyncio
async def test_a_busy_daemon_raises_busy_and_the_session_goes_on(sock_dir: str) -> None:
    fake = FakeDaemon(busy_after=1)
    async with fake.serve_unix(os.path.join(sock_dir, "s.sock")):
        async with await meshcast.connect(fake.address, name="alice") as alice:
            assert alice.version >= BUSY_VERSION
            await alice.join("chat")
            await alice.multicast("chat", b"taken")
            refused = await alice.multicast("chat", b"refused")
            await alice.ping()  # the ERROR has arrived by now
            with pytest.raises(meshcast.Busy, match=r"BUSY \(210\).*retry later") as info:
                await alice.multicast("chat", b"after")
            assert isinstance(info.value, RequestRejected)
            assert (info.value.code, info.value.request_id) == (ErrorCode.BUSY, refused)
            assert not ErrorCode(info.value.code).ends_session
            assert await alice.ping() >= 0  # the session goes on
            await alice.multicast("chat", b"again")  # ("after" was never sent)
            with pytest.raises(meshcast.Busy):  # "again" was refused too
                await alice.close()
        assert alice.statistics().requests_rejected == 2


@pytest.mark.asyncio
async def test_flood_says_the_daemon_was_busy(sock_dir: str) -> None:
    fake = FakeDaemon(busy_after=5)
    async with fake.serve_unix(os.path.join(sock_dir, "s.sock")):
        code, out, err = await _run_cli(
            "flood", "--connect", fake.address, "--group", "f", "--messages", "50",
            "--size", "10", "--json", "--timeout", "20",
        )  # fmt: skip
    assert code == 1
    result = json.loads(out)
    assert result["complete"] is False
    assert result["received"] == 5
    assert "the daemon was busy" in err
    assert "BUSY (210)" in err
    assert "hint: the daemon could not take the message now" in err
    assert "Traceback" not in err


@pytest.mark.asyncio
async def test_join_rejected_by_the_daemon_raises_at_once(sock_dir: str) -> None:
    # The client's early check is bypassed by announcing a laxer limit than enforced.
    fake = FakeDaemon(limits=DaemonLimits(max_group_name=8))
    async with (
        fake.serve_unix(os.path.join(sock_dir, "j.sock")),
        await meshcast.connect(fake.address, name="alice") as alice,
    ):
        fake.limits = DaemonLimits(max_group_name=4)
        with pytest.raises(RequestRejected, match=r"JOIN 'longer'.*GROUP_NAME_TOO_LONG"):
            await alice.join("longer")
        assert alice.groups == frozenset()


@pytest.mark.asyncio
async def test_session_ended_by_the_daemon(daemon: FakeDaemon) -> None:
    alice = await meshcast.connect(daemon.address, name="alice")
    await alice.join("chat")
    daemon.session("alice").send(ErrorReport(ErrorCode.SHUTTING_DOWN, "bye"))
    daemon.session("alice").writer.close()
    assert isinstance(await _next(alice), Membership)  # queued events come first
    with pytest.raises(ClientError, match=r"SHUTTING_DOWN") as info:
        await _next(alice)
    assert info.value.code == ErrorCode.SHUTTING_DOWN
    with pytest.raises(ClientError, match=r"SHUTTING_DOWN"):
        await alice.multicast("chat", b"x")
    await alice.close()  # no GOODBYE to wait for
    assert daemon.goodbyes == 0


@pytest.mark.asyncio
async def test_malformed_frame_from_the_daemon_ends_the_session(daemon: FakeDaemon) -> None:
    async with await meshcast.connect(daemon.address, name="alice") as alice:
        daemon.session("alice").writer.write(b"\x00\x00\x00\x01\x01")  # a HELLO to a client
        with pytest.raises(ClientError, match=r"malformed frame.*HELLO") as info:
            await _next(alice)
        assert info.value.code == ErrorCode.BAD_FRAME


@pytest.mark.asyncio
async def test_daemon_ping_is_answered_and_notices_counted(daemon: FakeDaemon) -> None:
    async with await meshcast.connect(daemon.address, name="alice") as alice:
        session = daemon.session("alice")
        session.send(Ping(42))
        session.send(ErrorReport(ErrorCode.MESSAGES_DROPPED, "chat: 3"))
        await alice.ping()  # PONG(42) was written before this PING
        assert Pong(42) in session.received
        assert alice.statistics().notices == 1


@pytest.mark.asyncio
async def test_close_is_bounded_when_the_daemon_never_says_goodbye(sock_dir: str) -> None:
    fake = FakeDaemon(mode="no_goodbye")
    async with fake.serve_unix(os.path.join(sock_dir, "g.sock")):
        alice = await meshcast.connect(fake.address, name="alice", timeout=0.3)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await alice.close()
        assert 0.25 < loop.time() - start < 3
        assert fake.goodbyes == 1
        await alice.close()  # idempotent


@pytest.mark.asyncio
async def test_full_queue_stops_reading_and_nothing_is_lost(daemon: FakeDaemon) -> None:
    async with (
        await meshcast.connect(daemon.address, name="slow", queue_size=4) as slow,
        await meshcast.connect(daemon.address, name="fast") as fast,
    ):
        await slow.join("chat")
        for i in range(50):
            await fast.multicast("chat", i.to_bytes(2, "big"))
        await _wait_until_queued(slow, 4)
        await asyncio.sleep(0.05)  # more has arrived at the socket by now, but is not read
        assert slow.statistics().queued == 4
        got = [await _next(slow) for _ in range(51)]
        payloads = [e.payload for e in got if isinstance(e, Message)]
        assert payloads == [i.to_bytes(2, "big") for i in range(50)]


# ---------------------------------------------------------------- the blocking wrapper


@pytest.mark.asyncio
async def test_blocking_wrapper(daemon: FakeDaemon) -> None:
    def script() -> list[object]:
        out: list[object] = []
        with blocking.connect(daemon.address, name="script") as c:
            out.append(c.private_name)
            out.append(c.join("chat").cause)
            c.multicast("chat", b"hi", service="agreed", msg_type=3)
            out.append(c.receive(timeout=5))
            out.append(c.receive(timeout=5))
            with pytest.raises(TimeoutError):
                c.receive(timeout=0.05)
            out.append(c.receive_nowait())
            c.multicast("chat", b"again", confirm=True)  # returns once CONFIRMED
            for event in c:
                out.append(event)
                c.close()
            assert c.closed
        with (
            pytest.raises(ClientError, match=r"NAME_IN_USE|cannot reach"),
            blocking.connect(daemon.address + ".missing"),
        ):
            pass
        return out

    out = await asyncio.to_thread(script)
    assert out[0] == "#script#D1"
    assert out[1] == Cause.JOIN
    assert isinstance(out[2], Membership)
    assert out[3] == Message("#script#D1", ("chat",), ServiceLevel.AGREED, 3, b"hi")
    assert out[4] is None
    assert isinstance(out[5], Message)
    assert out[5].payload == b"again"
    assert len(out) == 6


# ---------------------------------------------------------------- the CLI commands


async def _run_cli(*argv: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshcast.client",
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        async with asyncio.timeout(30):
            out, err = await proc.communicate(stdin)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.asyncio
async def test_user_send_and_recv_as_json_lines(daemon: FakeDaemon) -> None:
    async with await meshcast.connect(daemon.address, name="watcher") as watcher:
        await watcher.join("chat")
        code, out, err = await _run_cli(
            "user", "--connect", daemon.address, "--name", "alice", "--join", "chat",
            "--send", "hello", "--send", "wörld", "--service", "agreed", "--msg-type", "7",
            "--recv", "2", "--json", "--timeout", "10",
        )  # fmt: skip
        assert code == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        assert lines[0]["event"] == "membership"
        assert lines[0]["who"] == ["#alice#D1"]
        messages = [line for line in lines if line["event"] == "message"]
        assert [m["payload"] for m in messages] == ["hello", "wörld"]
        assert messages[0]["service"] == "agreed"
        assert messages[0]["msg_type"] == 7
        got = [await _next(watcher) for _ in range(4)]  # 2 joins, 2 messages
        assert [e.payload for e in got if isinstance(e, Message)] == [b"hello", "wörld".encode()]


@pytest.mark.asyncio
async def test_user_errors_exit_1_or_2(daemon: FakeDaemon, sock_dir: str) -> None:
    code, _, err = await _run_cli(
        "user", "--connect", os.path.join(sock_dir, "none.sock"), "--send", "x", "--to", "g"
    )
    assert code == 1
    assert "cannot reach daemon" in err
    code, _, err = await _run_cli("user", "--connect", daemon.address, "--send", "x")
    assert code == 2
    assert "--send needs" in err
    code, _, err = await _run_cli(
        "user", "--connect", daemon.address, "--join", "g", "--recv", "1", "--timeout", "0.3"
    )
    assert code == 1
    assert "fewer than 1 messages" in err


@pytest.mark.asyncio
async def test_user_interactive_commands_from_stdin(daemon: FakeDaemon) -> None:
    commands = b"j chat\ns chat hi there\nr 1\nx\nl chat\nl chat\nq\n"
    code, out, err = await _run_cli(
        "user", "--connect", daemon.address, "--name", "ia", "--interactive", stdin=commands
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("membership chat view 1.1 join #ia#D1")
    assert lines[1] == "message from #ia#D1 to chat [reliable, type 0, 8 bytes]: hi there"
    assert lines[2].startswith("membership chat view 2.1 leave #ia#D1")
    assert "commands:" in err
    assert "not a member of group 'chat'" in err


@pytest.mark.asyncio
async def test_flood_reports_slowest_receiver_throughput(daemon: FakeDaemon) -> None:
    code, out, err = await _run_cli(
        "flood", "--connect", daemon.address, "--group", "f", "--messages", "300",
        "--size", "100", "--service", "fifo", "--receivers", daemon.address, daemon.address,
        "--json", "--timeout", "20",
    )  # fmt: skip
    assert code == 0, err
    assert len(out.splitlines()) == 1
    result = json.loads(out)
    assert result["messages"] == 300
    assert result["size"] == 100
    assert result["service"] == "fifo"
    assert result["receivers"] == 2
    assert result["complete"] is True
    assert result["received"] == 300
    assert result["messages_per_second"] > 0
    assert result["mbit_per_second"] > 0
    assert all(r["received"] == 300 and r["out_of_order"] == 0 for r in result["per_receiver"])
    assert not daemon.sessions  # every client said GOODBYE


@pytest.mark.asyncio
async def test_flood_with_a_too_large_size_is_a_usage_error(daemon: FakeDaemon) -> None:
    code, _, err = await _run_cli(
        "flood", "--connect", daemon.address, "--messages", "1", "--size", "5000"
    )
    assert code == 2
    assert "max_message_size" in err


@pytest.mark.asyncio
async def test_close_with_a_full_queue_discards_and_finishes(daemon: FakeDaemon) -> None:
    slow = await meshcast.connect(daemon.address, name="slow", queue_size=2)
    async with await meshcast.connect(daemon.address, name="fast") as fast:
        await slow.join("chat")
        for i in range(20):
            await fast.multicast("chat", bytes([i]))
        await _wait_until_queued(slow, 2)
        async with asyncio.timeout(5):
            await slow.close()  # the blocked reader goes on, discarding, up to GOODBYE
        assert slow.statistics().events_discarded == 21  # the join's view and 20 messages
        assert daemon.goodbyes == 1


@pytest.mark.asyncio
async def test_without_membership_flag_only_own_views_arrive(daemon: FakeDaemon) -> None:
    async with (
        await meshcast.connect(daemon.address, name="quiet", membership=False) as quiet,
        await meshcast.connect(daemon.address, name="other") as other,
    ):
        await quiet.join("chat")
        await other.join("chat")
        await other.multicast("chat", b"m")
        first, second = await _next(quiet), await _next(quiet)
        assert isinstance(first, Membership)
        assert first.who == ("#quiet#D1",)
        assert isinstance(second, Message)


@pytest.mark.asyncio
async def test_an_unconfirmed_multicast_raises_within_its_timeout(sock_dir: str) -> None:
    fake = FakeDaemon(confirms=False)
    async with (
        fake.serve_unix(os.path.join(sock_dir, "nc.sock")),
        await meshcast.connect(fake.address, name="waiting") as c,
    ):
        with pytest.raises(ClientError, match=r"not confirmed .* within 0.2 s"):
            await c.multicast("g", b"x", service="safe", confirm=True, timeout=0.2)
        assert await c.ping() >= 0  # the session goes on
