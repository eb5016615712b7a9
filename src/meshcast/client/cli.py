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
import glob
import json
import os
import re
import socket
import sys
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from meshcast.argtypes import Parser, integer, print_error, seconds
from meshcast.client.connection import (
    AccessDenied,
    Busy,
    Client,
    Event,
    RequestRejected,
    Unauthenticated,
    connect,
    parse_address,
    service_level,
)
from meshcast.client.status import format_status
from meshcast.config import private_file_fault
from meshcast.errors import ClientError, ConfigError, MeshcastError, UsageError
from meshcast.wire.client import BlobHeld, Membership, Message, ServiceLevel

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

FLOOD_MSG_TYPE = 0xF100  # msg_type tag of flood messages
SERVICE_NAMES = [s.name.lower() for s in ServiceLevel]


_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]*\]|[^:/\s\[\]]+):([0-9]+)\Z")
_DAEMON_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")  # as config.py allows


def check_address(text: str) -> str:
    """A daemon address as given on the command line: ``unix:PATH``, ``tcp:HOST:PORT``, a
    path with a ``/`` in it, or a daemon name (found at its default socket by
    `resolve_address`). ``HOST:PORT`` is refused with the spelling to use instead."""
    if text.startswith(("unix:", "tcp:")) or "/" in text:
        parse_address(text)
        return text
    if _HOST_PORT.match(text):
        raise UsageError(f"{text!r} is not a daemon address; for TCP write tcp:{text}")
    if _DAEMON_NAME.match(text) and len(text) <= 64:
        return text
    raise UsageError(
        f"{text!r} is not a daemon address: give unix:PATH, tcp:HOST:PORT or a daemon's name"
    )


def _address(text: str) -> str:
    try:
        return check_address(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _live_socket(path: Path) -> bool:
    """Does a process listen on the Unix socket at `path`? (stale files do not count)"""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def find_daemon(name: str, config: str | None = None) -> str:
    """The default client socket (``unix:PATH``) of the running daemon called `name`.

    With `config`, the daemon of that cluster file; without, the one daemon of that name
    listening in the default socket directory, whatever its cluster. `ConfigError` for a
    daemon the file does not name, `UsageError` when daemons of several clusters have that
    name, `ClientError` when none is listening.
    """
    from meshcast.config import load_config
    from meshcast.socket_paths import (
        SOCKET_NAME_SEPARATOR,
        default_socket_dir,
        default_socket_path,
    )

    if config is not None:
        cluster = load_config(config)
        cluster.daemon(name)  # ConfigError naming the file for an unknown daemon
        return f"unix:{default_socket_path(name, cluster.name)}"
    directory = default_socket_dir()
    found = sorted(directory.glob(f"{glob.escape(name)}{SOCKET_NAME_SEPARATOR}*.sock"))
    live = [path for path in found if _live_socket(path)]
    if len(live) == 1:
        return f"unix:{live[0]}"
    if live:
        clusters = [p.name[len(name) + 1 : -len(".sock")] for p in live]
        raise UsageError(
            f"daemons called {name!r} of {len(live)} clusters are running "
            f"({', '.join(clusters)}); give --config FILE of the one you mean"
        )
    raise ClientError(
        f"no daemon called {name!r} is listening at its default socket in {directory} "
        f"({name}{SOCKET_NAME_SEPARATOR}CLUSTER.sock); is it running? A daemon started with "
        f"--client-socket PATH is reached with unix:PATH"
    )


def resolve_address(text: str, config: str | None = None) -> str:
    """`text` (checked by `check_address`) as an address `connect` takes: a daemon name
    is looked up with `find_daemon`; an existing file is a Unix socket path."""
    check_address(text)
    if text.startswith(("unix:", "tcp:")) or "/" in text or Path(text).exists():
        return text
    return find_daemon(text, config)


def _service(text: str) -> ServiceLevel:
    try:
        return service_level(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


TOKEN_ENV = "MESHCAST_TOKEN"  # the token, when --token-file is not given


def client_token(path: str | None) -> str | None:
    """The token to present: from the --token-file `path`, else $MESHCAST_TOKEN, else None.

    The file holds the secret on its first line that is not blank or a ``#`` comment,
    alone or as ``NAME SECRET`` (a line of the daemon's token file). Like the daemon, the
    client refuses a file others may read (`ConfigError`).
    """
    if path is None:
        return os.environ.get(TOKEN_ENV) or None
    fault = private_file_fault(Path(path), "token file")
    if fault is not None:
        raise ConfigError(fault, key="--token-file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read token file {path!r}: {exc}", key="--token-file") from None
    for line in text.splitlines():
        words = line.split()
        if words and not words[0].startswith("#") and len(words) <= 2:
            return words[-1]
        if words and not words[0].startswith("#"):
            break
    raise ConfigError(
        f"token file {path!r} holds no line SECRET or NAME SECRET", key="--token-file"
    )


def _add_token_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        default=None,
        help=f"access token to present (mode 0600 file: SECRET or NAME SECRET); default: "
        f"${TOKEN_ENV}. Needed on a daemon's TCP port open beyond loopback",
    )


BUSY_HINT = (
    "the daemon could not take the message now (its send window or queues are full): "
    "send again later, backing off, or send more slowly"
)


def _hint(error: BaseException) -> str | None:
    """A line on what to do about an access error or a busy daemon, for the CLI's message."""
    if isinstance(error, Busy):
        return BUSY_HINT
    if isinstance(error, AccessDenied):
        return "the daemon's access rules ([[clients.rule]] in its cluster file) forbid this"
    if isinstance(error, Unauthenticated):
        return f"present a valid token with --token-file FILE or ${TOKEN_ENV}"
    return None


def _run(main: Coroutine[Any, Any, int], command: str) -> int:
    """One `asyncio.run`; errors become exit statuses (2 usage, 1 runtime)."""
    try:
        return asyncio.run(main)
    except (UsageError, ConfigError) as exc:
        print_error(f"meshcast {command}", exc)
        return 2
    except (MeshcastError, OSError, TimeoutError) as exc:
        print_error(f"meshcast {command}", exc)
        hint = _hint(exc)
        if hint is not None:
            print(f"meshcast {command}: hint: {hint}", file=sys.stderr)
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
            "t LEVEL, r [N] (wait for N events), q (quit); events are printed as they "
            "arrive. The daemon is given by address or by name: --connect D1 finds daemon "
            "D1 at its default socket (as `meshcast daemon` without --client-socket makes it)."
        ),
    )
    parser.add_argument(
        "--connect",
        metavar="ADDR",
        required=True,
        type=_address,
        help="unix:PATH, tcp:HOST:PORT or a daemon's name",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="cluster file of the daemon named by --connect NAME, when daemons of several "
        "clusters have that name",
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
        help="wait for N messages (a blob_held event counts as one), printing events",
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
    _add_token_option(parser)
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
    """One event as a JSON-ready dict (``"event": "message" | "membership" | "blob_held"``)."""
    if isinstance(event, BlobHeld):
        return {
            "event": "blob_held",
            "group": event.group,
            "rid": event.rid,
            "name": event.name,
            "size": event.size,
            "digest": event.digest,
            "origin": event.origin,
            "complete": event.complete,
            "held_by": list(event.held_by),
            "missing": [
                {"daemon": m.daemon, "held_bytes": m.held_bytes, "reason": m.reason}
                for m in event.missing
            ],
        }
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
    if isinstance(event, BlobHeld):
        digest = f"digest {event.digest[:16]}…" if event.digest else "no digest"
        line = (
            f"blob_held {event.group} {event.name!r} ({event.size} bytes, {digest}, "
            f"replication {event.rid} from {event.origin}): "
            f"{'complete' if event.complete else 'INCOMPLETE'}, "
            f"held by {' '.join(event.held_by) or 'nobody'}"
        )
        missing = "; ".join(
            f"{m.daemon} holds {m.held_bytes} bytes: {m.reason}" for m in event.missing
        )
        return f"{line}; missing: {missing}" if missing else line
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
        got += isinstance(event, Message | BlobHeld)


async def _user(args: argparse.Namespace, interactive: bool) -> int:
    show = _Printer(args.json, sys.stdout)
    address = resolve_address(args.connect, args.config)
    token = client_token(args.token_file)
    client = await connect(address, name=args.name, timeout=args.timeout, token=token)
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


@dataclass(frozen=True, slots=True)
class LongLine:
    """A line of stdin longer than the reader's limit: discarded, only its size kept."""

    size: int


STDIN_CHUNK = 64 * 1024  # bytes read from stdin at a time


def split_lines(buffer: bytearray, limit: int, skipped: int) -> tuple[list[str | LongLine], int]:
    """Take every complete line out of `buffer`; a line over `limit` bytes becomes a
    `LongLine`. `skipped` counts the bytes already dropped of the current over-long line
    (returned updated), so that memory stays bounded by `limit` whatever the input."""
    lines: list[str | LongLine] = []
    start = 0
    while (newline := buffer.find(b"\n", start)) >= 0:
        size = newline + 1 - start
        if skipped or size > limit:
            lines.append(LongLine(skipped + size))
            skipped = 0
        else:
            lines.append(buffer[start : newline + 1].decode("utf-8", "replace"))
        start = newline + 1
    del buffer[:start]
    if len(buffer) > limit:  # no end in sight: keep only the count
        skipped += len(buffer)
        buffer.clear()
    return lines, skipped


async def stdin_lines(limit: int) -> AsyncGenerator[str | LongLine, None]:
    """Lines of stdin, read without a thread (the loop watches the descriptor); lines
    longer than `limit` bytes come as `LongLine` (asyncio's readline would raise)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=STDIN_CHUNK)
    try:
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
        )
    except ValueError:  # a regular file: it cannot block, read it as it is
        for line in sys.stdin.buffer:
            yield LongLine(len(line)) if len(line) > limit else line.decode("utf-8", "replace")
        return
    buffer = bytearray()
    skipped = 0
    try:
        while chunk := await reader.read(STDIN_CHUNK):
            buffer += chunk
            lines, skipped = split_lines(buffer, limit, skipped)
            for line in lines:
                yield line
        if buffer or skipped:  # a last line without a newline
            buffer += b"\n"
            lines, skipped = split_lines(buffer, limit, skipped)
            for line in lines:
                yield line
    finally:
        transport.close()


USER_HELP = """commands:
  j GROUP                 join GROUP
  l GROUP                 leave GROUP
  s GROUP[,GROUP] TEXT    send TEXT to one or more groups
  t LEVEL                 service level of sends (unreliable ... safe)
  r [N]                   wait until N more events (default 1) have arrived
  q                       quit
events are printed as they arrive"""


class _Console:
    """Interactive output: events printed the moment they arrive, around the prompt."""

    def __init__(self, client: Client, show: _Printer, prompt: bool) -> None:
        self.client = client
        self.show = show
        self.prompt = f"{client.private_name}> " if prompt else ""
        self.prompting = False  # the prompt is on screen, waiting for a line
        self.arrived = 0  # events printed so far
        self.claimed = 0  # events an `r` has waited for
        self.changed = asyncio.Event()
        self.ended: ClientError | None = None  # the session is over

    def ask(self) -> None:
        if self.prompt:
            print(self.prompt, end="", file=sys.stderr, flush=True)
            self.prompting = True

    def note(self, text: str) -> None:
        """Print a line on stderr (errors), keeping the prompt intact."""
        self._around_prompt(lambda: print(text, file=sys.stderr, flush=True))

    def _around_prompt(self, write: Callable[[], None]) -> None:
        if self.prompting:  # clear the prompt line, print, show the prompt again
            print("\r\x1b[K", end="", file=sys.stderr, flush=True)
        write()
        if self.prompting:
            print(self.prompt, end="", file=sys.stderr, flush=True)

    def shown(self, event: Event) -> None:
        self._around_prompt(lambda: self.show(event))
        self.arrived += 1
        self.changed.set()

    async def pump(self) -> None:
        """Print events as they arrive, until the session ends."""
        while True:
            try:
                event = await self.client.receive()
            except RequestRejected as exc:  # a send the daemon refused: the session goes on
                hint = _hint(exc)
                self.note(f"error: {exc}" + (f"\nhint: {hint}" if hint else ""))
                continue
            except ClientError as exc:
                self.ended = exc
                self.changed.set()
                return
            self.shown(event)

    def drain(self) -> None:
        """Print the events already queued (on quit: nothing received is left unshown)."""
        with contextlib.suppress(MeshcastError):
            while (event := self.client.receive_nowait()) is not None:
                self.shown(event)

    async def wait_events(self, count: int, timeout: float) -> None:  # noqa: ASYNC109
        """Wait until `count` events beyond those earlier `r` commands waited for arrived."""
        target = self.claimed + count
        try:
            async with asyncio.timeout(timeout):
                while self.arrived < target:
                    if self.ended is not None:
                        raise self.ended
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            got = self.arrived - self.claimed
            self.claimed = self.arrived
            raise ClientError(
                f"r: timed out after {timeout:g} s: {got} of {count} events arrived"
            ) from None
        self.claimed = target


def _count(text: str) -> int:
    """The N of ``r [N]``."""
    if not text:
        return 1
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"r takes a number of events (1, 2, ...), got {text!r}")
    return int(text)


LINE_ROOM = 64 * 1024  # bytes of a command line beyond its payload: command and group names


async def _interactive(client: Client, args: argparse.Namespace, show: _Printer) -> None:
    service: ServiceLevel = args.service
    console = _Console(client, show, prompt=sys.stdin.isatty())
    limit = client.limits.max_message_size + LINE_ROOM
    lines = stdin_lines(limit)
    pump = asyncio.create_task(console.pump())
    try:
        while True:
            console.ask()
            reading = asyncio.ensure_future(anext(lines, None))
            await asyncio.wait({reading, pump}, return_when=asyncio.FIRST_COMPLETED)
            console.prompting = False
            if not reading.done():  # the session ended while we waited for a line
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reading
                if console.prompt:
                    print(file=sys.stderr)
                break
            line = reading.result()
            if line is None:
                break
            if isinstance(line, LongLine):
                console.note(
                    f"error: line of {line.size} bytes ignored: longer than this daemon's "
                    f"max_message_size ({client.limits.max_message_size} B) allows"
                )
                continue
            command, _, rest = line.strip().partition(" ")
            rest = rest.strip()
            try:
                match command:
                    case "":
                        continue
                    case "q":
                        break
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
                        await console.wait_events(_count(rest), args.timeout)
                    case _:
                        console.note(USER_HELP)
            except UsageError as exc:
                console.note(f"error: {exc}")
            except ClientError as exc:
                if console.ended is not None:
                    break
                hint = _hint(exc)  # rejected, timed out: the session goes on
                console.note(f"error: {exc}" + (f"\nhint: {hint}" if hint else ""))
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
        await lines.aclose()
    console.drain()
    if console.ended is not None:
        raise console.ended


# ---------------------------------------------------------------- meshcast flood


def add_flood_command(sub: SubParsers) -> None:
    """Add ``flood`` to the subcommands of the `meshcast` parser."""
    parser = sub.add_parser(
        "flood",
        help="send N messages of S bytes and report receiver throughput (like spflooder)",
        description=(
            "Connect one or more receiving clients (--receivers; default one on --connect) "
            "and one sender, send --messages messages of --size bytes to --group, and print "
            "one line with the messages/s and Mbit/s seen by the slowest receiver (with "
            "--json: one JSON object with every receiver's figures)."
        ),
    )
    parser.add_argument(
        "--connect",
        metavar="ADDR",
        required=True,
        type=_address,
        help="the sender's daemon: unix:PATH, tcp:HOST:PORT or a daemon's name",
    )
    parser.add_argument("--group", default="flood", help="group to flood (default: flood)")
    parser.add_argument(
        "--messages", metavar="N", type=integer(0), default=10_000, help="messages to send"
    )
    parser.add_argument(
        "--size", metavar="BYTES", type=integer(0), default=1000, help="bytes of each message"
    )
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
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the summary line"
    )
    _add_token_option(parser)
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


async def _first_refusal(
    sender: Client, receiving: list[asyncio.Task[None]], tasks: asyncio.TaskGroup
) -> Busy | None:
    """Wait until the receivers are done or the daemon refuses one of `sender`'s messages
    as BUSY (the sender joins nothing, so its `receive` yields only its rejections)."""

    async def watch() -> Busy:
        while True:
            try:
                await sender.receive()
            except Busy as exc:
                return exc

    watcher = tasks.create_task(watch())
    waiting: set[asyncio.Task[Any]] = {watcher, *receiving}
    while not watcher.done() and waiting != {watcher}:
        _, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if watcher.done():
        for task in receiving:  # what was sent will not all arrive: the receivers stop
            task.cancel()
        return watcher.result()
    watcher.cancel()  # the receivers are done
    return None


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
    sender_at = resolve_address(args.connect)
    receivers_at = [resolve_address(a) for a in args.receivers or [args.connect]]
    limit: float = args.timeout
    token = client_token(args.token_file)
    unreliable = args.service == ServiceLevel.UNRELIABLE
    result: dict[str, Any]
    async with contextlib.AsyncExitStack() as stack:
        async with asyncio.timeout(limit):
            receivers: list[Client] = []
            for i, address in enumerate(receivers_at):
                client = await connect(
                    address, name=f"{args.name}-r{i}", timeout=limit, token=token
                )
                await stack.enter_async_context(client)
                receivers.append(client)
            for client in receivers:
                await client.join(args.group)
            names = {c.private_name for c in receivers}
            for client in receivers:  # every receiver sees every other: views agree
                await _wait_all_joined(client, args.group, names)
            sender = await connect(sender_at, name=f"{args.name}-s", timeout=limit, token=token)
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
        busy: Busy | None = None
        try:
            async with asyncio.timeout(limit), asyncio.TaskGroup() as tasks:
                receiving = [
                    tasks.create_task(
                        _receive_flood(
                            client,
                            sender_name,
                            tally,
                            args.messages,
                            args.idle if unreliable else None,
                        )
                    )
                    for client, tally in zip(receivers, tallies, strict=True)
                ]
                sender_name.set_result(sender.private_name)
                start = time.perf_counter()
                for seq in range(args.messages):
                    payload = (seq.to_bytes(8, "big") + filler)[: args.size]
                    try:
                        await sender.multicast(
                            args.group, payload, service=args.service, msg_type=FLOOD_MSG_TYPE
                        )
                    except Busy as exc:  # an earlier message was refused: the run is void
                        busy = exc
                        break
                sent_at = time.perf_counter()
                if busy is None:  # a refusal still on its way ends the wait for the rest
                    busy = await _first_refusal(sender, receiving, tasks)
                else:
                    for task in receiving:  # what was sent will not all arrive
                        task.cancel()
        except TimeoutError:
            timed_out = True  # report what arrived
        end = time.perf_counter()
        if busy is not None:
            with contextlib.suppress(RequestRejected):
                await sender.close()  # the later refusals: the first one says it all
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
    print(json.dumps(result) if args.json else flood_summary(result))
    if busy is not None:
        print(f"meshcast flood: error: the daemon was busy: {busy}", file=sys.stderr)
        print(f"meshcast flood: hint: {BUSY_HINT}", file=sys.stderr)
        return 1
    if not complete and not unreliable:
        print(
            f"meshcast flood: error: the slowest receiver got {slowest['received']} of "
            f"{args.messages} messages",
            file=sys.stderr,
        )
        return 1
    return 0


def flood_summary(result: dict[str, Any]) -> str:
    """The result of `meshcast flood` as one line (what `--json` gives as an object)."""
    receivers = result["receivers"]
    line = (
        f"{result['received']:,} of {result['messages']:,} messages of {result['size']:,} B "
        f"({result['service']}, group {result['group']}) in {result['seconds']:.3f} s: "
        f"{result['messages_per_second']:,.0f} msgs/s, {result['mbit_per_second']:.2f} Mbit/s"
    )
    if receivers > 1:
        line += f" (slowest of {receivers} receivers)"
    if result["timed_out"]:
        line += "; timed out"
    return line


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
            "or by --name at its default client socket (--config picks the cluster when "
            "daemons of several clusters have that name)."
        ),
    )
    parser.add_argument(
        "--socket",
        "--connect",
        dest="socket",
        metavar="ADDR",
        type=_address,
        default=None,
        help="the daemon's client address: unix:PATH, tcp:HOST:PORT or a daemon's name",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="cluster file naming the daemon (with --name; default: any cluster)",
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
    _add_token_option(parser)
    parser.set_defaults(handler=status_command)


def status_address(address: str | None, config: str | None, name: str | None) -> str:
    """The address `meshcast status` connects to: --socket, else the default Unix socket
    of daemon --name (of the --config cluster, if given). `UsageError`, `ConfigError` or
    `ClientError` (no such daemon running) otherwise."""
    if address is not None:
        if name is not None:
            raise UsageError("give either --socket or --name, not both")
        return resolve_address(address, config)
    if name is None:
        raise UsageError(
            "which daemon? give --socket unix:PATH | tcp:HOST:PORT, or --name NAME "
            "(and --config FILE)"
        )
    return find_daemon(name, config)


def status_command(args: argparse.Namespace) -> int:
    """Handler of ``meshcast status``: returns the exit status."""
    return _run(_status(args), "status")


async def _status(args: argparse.Namespace) -> int:
    address = status_address(args.socket, args.config, args.name)
    token = client_token(args.token_file)
    client = await connect(address, timeout=args.timeout, membership=False, token=token)
    async with client:
        report = await client.status()
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return 0


# ---------------------------------------------------------------- running on its own


def build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = Parser(
        prog="meshcast", description="meshcast client commands"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_user_command(sub)
    add_flood_command(sub)
    add_status_command(sub)
    from meshcast.client.replicate_cli import add_replicate_command  # it imports this module

    add_replicate_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m meshcast.client user|flood ...``."""
    from meshcast.argtypes import run_handler

    return run_handler(build_parser().parse_args(argv))


def main_user(argv: Sequence[str] | None = None) -> int:
    return main(["user", *(sys.argv[1:] if argv is None else argv)])


def main_flood(argv: Sequence[str] | None = None) -> int:
    return main(["flood", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
