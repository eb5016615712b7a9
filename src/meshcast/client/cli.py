"""`meshcast user`, `meshcast flood` and `meshcast status`: client commands (docs/client-api.md).

`add_user_command(sub)`, `add_flood_command(sub)` and `add_status_command(sub)` add them
to the `meshcast` parser; `main_user(argv)` / `main_flood(argv)` (and
``python -m meshcast.client user|flood|status``) run them on their own. Exit status: 0
success, 1 runtime failure (daemon unreachable, request rejected, timeout, messages
missing), 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from meshcast.argtypes import integer, seconds
from meshcast.client.connection import (
    Client,
    Event,
    RequestRejected,
    connect,
    parse_address,
    service_level,
)
from meshcast.client.status import format_status
from meshcast.errors import ClientError, ConfigError, MeshcastError, UsageError
from meshcast.wire.client import Membership, Message, ServiceLevel

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

FLOOD_MSG_TYPE = 0xF100  # msg_type tag of flood messages
SERVICE_NAMES = [s.name.lower() for s in ServiceLevel]


def _address(text: str) -> str:
    try:
        parse_address(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _service(text: str) -> ServiceLevel:
    try:
        return service_level(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _run(main: Coroutine[Any, Any, int], command: str) -> int:
    """One `asyncio.run`; errors become exit statuses (2 usage, 1 runtime)."""
    try:
        return asyncio.run(main)
    except UsageError as exc:
        print(f"meshcast {command}: error: {exc}", file=sys.stderr)
        return 2
    except (MeshcastError, OSError, TimeoutError) as exc:
        print(f"meshcast {command}: error: {str(exc) or type(exc).__name__}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------- meshcast user


def add_user_command(sub: SubParsers) -> None:
    """Add ``user`` to the subcommands of the `meshcast` parser."""
    parser = sub.add_parser(
        "user",
        help="join groups, send and receive messages (like Spread's spuser)",
        description=(
            "Connect to a daemon as one client. Scriptable: join the --join groups, send "
            "each --send text, print --recv N received messages (events as lines, or JSON "
            "lines with --json), leave. Interactive (stdin a terminal and no --send/--recv, "
            "or --interactive): commands j GROUP, l GROUP, s GROUP[,GROUP...] TEXT, "
            "r [N] (receive), q (quit); pending events are printed before each prompt."
        ),
    )
    parser.add_argument(
        "--connect", metavar="ADDR", required=True, type=_address, help="unix:PATH or tcp:HOST:PORT"
    )
    parser.add_argument("--name", default="", help="client name (default: the daemon picks)")
    parser.add_argument(
        "--join", metavar="GROUP", action="append", default=[], help="join GROUP (repeatable)"
    )
    parser.add_argument(
        "--send", metavar="TEXT", action="append", default=[], help="send TEXT (repeatable)"
    )
    parser.add_argument(
        "--to",
        metavar="GROUP",
        action="append",
        default=[],
        help="groups --send goes to (repeatable; default: the --join groups)",
    )
    parser.add_argument(
        "--service",
        type=_service,
        default=ServiceLevel.RELIABLE,
        metavar="LEVEL",
        help=f"service level of sends: {', '.join(SERVICE_NAMES)} (default: reliable)",
    )
    parser.add_argument("--msg-type", type=int, default=0, help="msg_type of sends (u16)")
    parser.add_argument(
        "--recv",
        metavar="N",
        type=integer(0),
        default=0,
        help="wait for N messages, printing events",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=seconds,
        default=10.0,
        help="bound on connecting, each request and --recv / r (default: 10)",
    )
    parser.add_argument("--json", action="store_true", help="print events as JSON lines")
    parser.add_argument(
        "--interactive", action="store_true", help="read commands from stdin even if no terminal"
    )
    parser.set_defaults(handler=user_command)


def user_command(args: argparse.Namespace) -> int:
    """Handler of ``meshcast user``: returns the exit status."""
    if args.send and not (args.to or args.join):
        print("meshcast user: error: --send needs --to or --join groups", file=sys.stderr)
        return 2
    interactive = args.interactive or (sys.stdin.isatty() and not args.send and not args.recv)
    return _run(_user(args, interactive), "user")


def _payload_json(payload: bytes) -> dict[str, Any]:
    try:
        return {"payload": payload.decode("utf-8")}
    except UnicodeDecodeError:
        return {"payload_hex": payload.hex()}


def event_json(event: Event) -> dict[str, Any]:
    """One event as a JSON-ready dict (``"event": "message" | "membership"``)."""
    if isinstance(event, Message):
        return {
            "event": "message",
            "sender": event.sender,
            "groups": list(event.groups),
            "service": event.service.name.lower(),
            "msg_type": event.msg_type,
            "size": len(event.payload),
            **_payload_json(event.payload),
        }
    return {
        "event": "membership",
        "group": event.group,
        "view_id": [event.view_id.counter, event.view_id.coordinator],
        "cause": str(event.cause),
        "who": list(event.who),
        "members": list(event.members),
    }


def event_line(event: Event) -> str:
    """One event as a line of text."""
    if isinstance(event, Message):
        text = event.payload.decode("utf-8", "backslashreplace")
        return (
            f"message from {event.sender} to {','.join(event.groups)} "
            f"[{event.service.name.lower()}, type {event.msg_type}, "
            f"{len(event.payload)} bytes]: {text}"
        )
    view = f"{event.view_id.counter}.{event.view_id.coordinator}"
    return (
        f"membership {event.group} view {view} {event.cause} {' '.join(event.who)}: "
        f"members {' '.join(event.members)}"
    )


@dataclass
class _Printer:
    as_json: bool
    out: TextIO

    def __call__(self, event: Event) -> None:
        text = json.dumps(event_json(event)) if self.as_json else event_line(event)
        print(text, file=self.out, flush=True)


async def _receive_messages(client: Client, count: int, show: Callable[[Event], None]) -> None:
    """Print events until `count` messages have arrived."""
    got = 0
    while got < count:
        event = await client.receive()
        show(event)
        got += isinstance(event, Message)


async def _user(args: argparse.Namespace, interactive: bool) -> int:
    show = _Printer(args.json, sys.stdout)
    client = await connect(args.connect, name=args.name, timeout=args.timeout)
    async with client:
        print(f"connected as {client.private_name}", file=sys.stderr)
        for group in args.join:
            await client.join(group)
        for text in args.send:
            await client.multicast(
                args.to or args.join,
                text.encode("utf-8"),
                service=args.service,
                msg_type=args.msg_type,
            )
        if args.recv:
            try:
                async with asyncio.timeout(args.timeout):
                    await _receive_messages(client, args.recv, show)
            except TimeoutError:
                raise ClientError(
                    f"fewer than {args.recv} messages within {args.timeout} s"
                ) from None
        if interactive:
            await _interactive(client, args, show)
    return 0


async def _stdin_lines() -> AsyncGenerator[str, None]:
    """Lines of stdin, read without a thread (the loop watches the descriptor)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
        )
    except ValueError:  # a regular file: it cannot block, read it as it is
        for line in sys.stdin.readlines():
            yield line
        return
    try:
        while line := await reader.readline():
            yield line.decode("utf-8", "replace")
    finally:
        transport.close()


USER_HELP = """commands:
  j GROUP                 join GROUP
  l GROUP                 leave GROUP
  s GROUP[,GROUP] TEXT    send TEXT to one or more groups
  t LEVEL                 service level of sends (unreliable ... safe)
  r [N]                   wait for N events (default 1) and print them
  q                       quit"""


async def _interactive(client: Client, args: argparse.Namespace, show: _Printer) -> None:
    service: ServiceLevel = args.service
    lines = _stdin_lines()
    prompt = sys.stdin.isatty()
    try:
        while True:
            while (event := client.receive_nowait()) is not None:
                show(event)
            if prompt:
                print(f"{client.private_name}> ", end="", file=sys.stderr, flush=True)
            line = await anext(lines, None)
            if line is None:
                return
            command, _, rest = line.strip().partition(" ")
            rest = rest.strip()
            try:
                match command:
                    case "":
                        continue
                    case "q":
                        return
                    case "j":
                        await client.join(rest)  # its MEMBERSHIP is printed as an event
                    case "l":
                        await client.leave(rest)
                    case "s":
                        groups, _, text = rest.partition(" ")
                        await client.multicast(
                            groups.split(","),
                            text.encode("utf-8"),
                            service=service,
                            msg_type=args.msg_type,
                        )
                    case "t":
                        service = service_level(rest)
                    case "r":
                        count = int(rest) if rest.isdigit() else 1
                        async with asyncio.timeout(args.timeout):
                            for _ in range(count):
                                show(await client.receive())
                    case _:
                        print(USER_HELP, file=sys.stderr)
            except (UsageError, TimeoutError) as exc:
                print(f"error: {exc or 'timed out'}", file=sys.stderr)
            except RequestRejected as exc:
                print(f"error: {exc}", file=sys.stderr)
    finally:
        await lines.aclose()


# ---------------------------------------------------------------- meshcast flood


def add_flood_command(sub: SubParsers) -> None:
    """Add ``flood`` to the subcommands of the `meshcast` parser."""
    parser = sub.add_parser(
        "flood",
        help="send N messages of S bytes and report receiver throughput (like spflooder)",
        description=(
            "Connect one or more receiving clients (--receivers; default one on --connect) "
            "and one sender, send --messages messages of --size bytes to --group, and print "
            "one JSON object with the messages/s and Mbit/s seen by the slowest receiver."
        ),
    )
    parser.add_argument(
        "--connect", metavar="ADDR", required=True, type=_address, help="the sender's daemon"
    )
    parser.add_argument("--group", default="flood", help="group to flood (default: flood)")
    parser.add_argument("--messages", metavar="N", type=integer(0), default=10_000)
    parser.add_argument("--size", metavar="BYTES", type=integer(0), default=1000)
    parser.add_argument(
        "--service",
        type=_service,
        default=ServiceLevel.RELIABLE,
        metavar="LEVEL",
        help=f"{', '.join(SERVICE_NAMES)} (default: reliable)",
    )
    parser.add_argument(
        "--receivers",
        metavar="ADDR",
        nargs="+",
        type=_address,
        default=None,
        help="daemons to connect one receiving client to, each (default: --connect)",
    )
    parser.add_argument("--name", default="flood", help="prefix of the client names")
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=seconds,
        default=60.0,
        help="bound on the whole run (default: 60)",
    )
    parser.add_argument(
        "--idle",
        metavar="SECONDS",
        type=seconds,
        default=2.0,
        help="unreliable service: stop waiting after this long without a message (default: 2)",
    )
    parser.add_argument("--json", action="store_true", help="compact JSON (one line)")
    parser.set_defaults(handler=flood_command)


def flood_command(args: argparse.Namespace) -> int:
    """Handler of ``meshcast flood``: returns the exit status."""
    return _run(_flood(args), "flood")


@dataclass
class _Tally:
    address: str
    name: str = ""
    received: int = 0
    out_of_order: int = 0
    last_at: float = 0.0  # time.perf_counter() of the last message


async def _receive_flood(
    client: Client, sender: asyncio.Future[str], tally: _Tally, total: int, idle: float | None
) -> None:
    expected_next = 0
    name = await sender
    while tally.received < total:
        try:
            async with asyncio.timeout(idle):
                event = await client.receive()
        except TimeoutError:
            return  # unreliable: the rest is lost
        if not isinstance(event, Message) or event.sender != name:
            continue
        if event.msg_type != FLOOD_MSG_TYPE:
            continue
        tally.received += 1
        tally.last_at = time.perf_counter()
        seq = int.from_bytes(event.payload[:8], "big") if len(event.payload) >= 8 else None
        if seq is not None:
            tally.out_of_order += seq != expected_next
            expected_next = seq + 1


async def _wait_all_joined(client: Client, group: str, names: set[str]) -> None:
    """Wait until `client` sees a view of `group` containing every name in `names`."""
    while True:
        event = await client.receive()
        if isinstance(event, Membership) and event.group == group and names <= set(event.members):
            return


def _rates(count: int, size: int, seconds: float) -> dict[str, float]:
    if seconds <= 0 or count == 0:
        return {"messages_per_second": 0.0, "mbit_per_second": 0.0}
    return {
        "messages_per_second": round(count / seconds, 1),
        "mbit_per_second": round(count * size * 8 / seconds / 1e6, 3),
    }


async def _flood(args: argparse.Namespace) -> int:
    receivers_at: list[str] = args.receivers or [args.connect]
    limit: float = args.timeout
    unreliable = args.service == ServiceLevel.UNRELIABLE
    result: dict[str, Any]
    async with contextlib.AsyncExitStack() as stack:
        async with asyncio.timeout(limit):
            receivers: list[Client] = []
            for i, address in enumerate(receivers_at):
                client = await connect(address, name=f"{args.name}-r{i}", timeout=limit)
                await stack.enter_async_context(client)
                receivers.append(client)
            for client in receivers:
                await client.join(args.group)
            names = {c.private_name for c in receivers}
            for client in receivers:  # every receiver sees every other: views agree
                await _wait_all_joined(client, args.group, names)
            sender = await connect(args.connect, name=f"{args.name}-s", timeout=limit)
            await stack.enter_async_context(sender)
        if args.size > sender.limits.max_message_size:
            raise UsageError(
                f"--size {args.size} is larger than the daemon's max_message_size "
                f"({sender.limits.max_message_size})"
            )
        tallies = [_Tally(c.address, c.private_name) for c in receivers]
        sender_name: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        filler = b"\x00" * max(0, args.size - 8)
        start = time.perf_counter()
        sent_at: float | None = None
        timed_out = False
        try:
            async with asyncio.timeout(limit), asyncio.TaskGroup() as tasks:
                for client, tally in zip(receivers, tallies, strict=True):
                    idle = args.idle if unreliable else None
                    tasks.create_task(
                        _receive_flood(client, sender_name, tally, args.messages, idle)
                    )
                sender_name.set_result(sender.private_name)
                start = time.perf_counter()
                for seq in range(args.messages):
                    payload = (seq.to_bytes(8, "big") + filler)[: args.size]
                    await sender.multicast(
                        args.group, payload, service=args.service, msg_type=FLOOD_MSG_TYPE
                    )
                sent_at = time.perf_counter()
        except TimeoutError:
            timed_out = True  # report what arrived
        end = time.perf_counter()
        per_receiver: list[dict[str, Any]] = []
        for tally in tallies:
            seconds = (tally.last_at or end) - start
            per_receiver.append(
                {
                    "address": tally.address,
                    "name": tally.name,
                    "received": tally.received,
                    "out_of_order": tally.out_of_order,
                    "seconds": round(seconds, 6),
                    **_rates(tally.received, args.size, seconds),
                }
            )
        slowest = min(per_receiver, key=lambda r: (r["received"], -r["seconds"]))
        complete = all(t.received == args.messages for t in tallies)
        result = {
            "messages": args.messages,
            "size": args.size,
            "service": args.service.name.lower(),
            "group": args.group,
            "receivers": len(tallies),
            "sender": sender.private_name,
            "send_seconds": None if sent_at is None else round(sent_at - start, 6),
            "seconds": slowest["seconds"],
            "received": slowest["received"],
            "messages_per_second": slowest["messages_per_second"],
            "mbit_per_second": slowest["mbit_per_second"],
            "complete": complete,
            "timed_out": timed_out,
            "per_receiver": per_receiver,
        }
    print(json.dumps(result, indent=None if args.json else 2))
    if not complete and not unreliable:
        print(
            f"meshcast flood: error: the slowest receiver got {slowest['received']} of "
            f"{args.messages} messages",
            file=sys.stderr,
        )
        return 1
    return 0


# ---------------------------------------------------------------- meshcast status


def add_status_command(sub: SubParsers) -> None:
    """Add ``status`` to the subcommands of the `meshcast` parser."""
    parser = sub.add_parser(
        "status",
        help="a daemon's view, links, groups and members",
        description=(
            "Connect to a daemon as a short-lived client (it joins no group), ask for its "
            "status report and print it: the daemon, its overlay view, its links, the tree "
            "of its own source, every group with its members, and its counters. A table "
            "by default; one JSON object with --json. The daemon is found by --socket, "
            "or by --name (and --config) at its default client socket."
        ),
    )
    parser.add_argument(
        "--socket",
        "--connect",
        dest="socket",
        metavar="ADDR",
        type=_address,
        default=None,
        help="the daemon's client address: unix:PATH or tcp:HOST:PORT",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="cluster file naming the daemon (with --name; default: the embedded cluster)",
    )
    parser.add_argument(
        "--name",
        default=None,
        help="the daemon's name: its default client socket is used (as `meshcast daemon` "
        "without --client-socket creates it)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=seconds,
        default=5.0,
        help="bound on connecting and on the answer (default: 5)",
    )
    parser.set_defaults(handler=status_command)


def status_address(socket: str | None, config: str | None, name: str | None) -> str:
    """The address `meshcast status` connects to: --socket, else the default Unix socket
    of daemon --name of the --config cluster. `UsageError` or `ConfigError` otherwise."""
    if socket is not None:
        if config is not None or name is not None:
            raise UsageError("give either --socket or --name (with --config), not both")
        return socket
    if name is None:
        raise UsageError(
            "which daemon? give --socket unix:PATH | tcp:HOST:PORT, or --name NAME "
            "(and --config FILE)"
        )
    from meshcast.config import default_config, load_config
    from meshcast.runtime.sessions import default_socket_path

    cluster = default_config() if config is None else load_config(config)
    cluster.daemon(name)  # ConfigError naming the file for an unknown daemon
    return f"unix:{default_socket_path(name)}"


def status_command(args: argparse.Namespace) -> int:
    """Handler of ``meshcast status``: returns the exit status."""
    try:
        address = status_address(args.socket, args.config, args.name)
    except (UsageError, ConfigError) as exc:
        print(f"meshcast status: error: {exc}", file=sys.stderr)
        return 2
    return _run(_status(address, args), "status")


async def _status(address: str, args: argparse.Namespace) -> int:
    client = await connect(address, timeout=args.timeout, membership=False)
    async with client:
        report = await client.status()
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return 0


# ---------------------------------------------------------------- running on its own


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshcast", description="meshcast client commands")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_user_command(sub)
    add_flood_command(sub)
    add_status_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m meshcast.client user|flood ...``."""
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


def main_user(argv: Sequence[str] | None = None) -> int:
    return main(["user", *(sys.argv[1:] if argv is None else argv)])


def main_flood(argv: Sequence[str] | None = None) -> int:
    return main(["flood", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
