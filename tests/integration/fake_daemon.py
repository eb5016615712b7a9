"""A small fake daemon speaking the client protocol, for testing the client library.

It implements only what the client sees (docs/client-protocol.md): the handshake, JOIN and
LEAVE with MEMBERSHIP to the group's members, MULTICAST echoed as MESSAGE to the members
of the named groups (once each), ERROR for bad requests, PING/PONG and the GOODBYE
handshake. Groups are local to one fake daemon. Modes:

* ``normal``: as above;
* ``mute``: accepts connections and never reads or answers (handshake timeouts);
* ``no_goodbye``: never answers GOODBYE (bounded close).

``replicate=SCRIPT`` answers REPLICATE (version 5): ``SCRIPT(frame)`` returns the report
objects to send, one REPLICATION each, ``report_interval`` seconds apart (the last one, in
state complete or failed, is final); without a script every REPLICATE is refused with a
final report in state failed, as a daemon refuses a request.

``busy_after=N`` takes N MULTICASTs, then refuses the rest as a daemon with full buffers
does: ERROR BUSY to a session of BUSY_VERSION or later, INTERNAL_ERROR to an older one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal

from meshcast.errors import DecodeError
from meshcast.wire.client import (
    BUSY_VERSION,
    FROM_CLIENT,
    MIN_VERSION,
    REPLICATE_VERSION,
    VERSION,
    Cause,
    Confirmed,
    DaemonLimits,
    ErrorCode,
    ErrorReport,
    Frame,
    FrameDecoder,
    Goodbye,
    Hello,
    HelloFlag,
    Join,
    Leave,
    Membership,
    Message,
    Multicast,
    Ping,
    Pong,
    Replicate,
    Replication,
    ServiceLevel,
    ViewId,
    Welcome,
    choose_version,
    clip_text,
    encode,
)

Mode = Literal["normal", "mute", "no_goodbye"]
ReplicateScript = Callable[[Replicate], list[dict[str, object]]]


def report(
    state: str,
    recipients: dict[str, tuple[str, int]],
    *,
    size: int = 1000,
    name: str = "file.bin",
    detail: str = "",
    rid: str = "00000000000000aa",
) -> dict[str, object]:
    """A REPLICATION report object: `recipients` maps daemon -> (state, held_bytes)."""
    return {
        "rid": rid,
        "name": name,
        "size": size,
        "digest": "ab" * 32 if state != "hashing" else "",
        "state": state,
        "elapsed": 0.5,
        "detail": detail,
        "recipients": [
            {
                "daemon": daemon,
                "state": where,
                "held_bytes": held,
                "bad_chunks": 0,
                "rate": 1000.0,
                "eta": None if where in ("complete", "failed") else (size - held) / 1000.0,
                "detail": "disk full" if where == "failed" else "",
                "path": f"/data/{daemon}/{name}" if where == "complete" else None,
            }
            for daemon, (where, held) in recipients.items()
        ],
    }


@dataclass(eq=False)
class Session:
    name: str  # private name
    flags: HelloFlag
    writer: asyncio.StreamWriter
    version: int
    groups: set[str] = field(default_factory=set)
    received: list[Frame] = field(default_factory=list)

    def send(self, frame: Frame) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode(frame))


class FakeDaemon:
    def __init__(
        self,
        name: str = "D1",
        *,
        limits: DaemonLimits | None = None,
        versions: tuple[int, int] = (MIN_VERSION, VERSION),
        services: frozenset[ServiceLevel] = frozenset(ServiceLevel),
        mode: Mode = "normal",
        confirms: bool = True,  # answer CONFIRM MULTICASTs (False: never, to test timeouts)
        busy_after: int | None = None,  # MULTICASTs taken before every later one is BUSY
        replicate: ReplicateScript | None = None,  # the reports answering a REPLICATE
        report_interval: float = 0.01,  # seconds between two REPLICATION frames
    ) -> None:
        self.name = name
        self.replicate = replicate
        self.report_interval = report_interval
        self._scripts: set[asyncio.Task[None]] = set()
        self.replicates: list[Replicate] = []  # every REPLICATE received
        self.busy_after = busy_after
        self.multicasts = 0  # MULTICASTs taken
        self.confirms = confirms
        self.limits = limits or DaemonLimits()
        self.versions = versions
        self.services = services
        self.mode = mode
        self.sessions: dict[str, Session] = {}  # by private name
        self.members: dict[str, list[Session]] = {}  # group -> members in join order
        self.view_counter: dict[str, int] = {}
        self.goodbyes = 0  # GOODBYE frames received
        self.address = ""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._picks = itertools.count(1)

    # ------------------------------------------------------------ lifecycle

    @contextlib.asynccontextmanager
    async def serve_unix(self, path: str) -> AsyncIterator[FakeDaemon]:
        self._server = await asyncio.start_unix_server(self._handle, path)
        self.address = f"unix:{path}"
        async with self._serving():
            yield self

    @contextlib.asynccontextmanager
    async def serve_tcp(self) -> AsyncIterator[FakeDaemon]:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"tcp:127.0.0.1:{port}"
        async with self._serving():
            yield self

    @contextlib.asynccontextmanager
    async def _serving(self) -> AsyncIterator[None]:
        assert self._server is not None
        try:
            yield
        finally:
            self._server.close()
            for task in list(self._scripts):
                task.cancel()
            await asyncio.gather(*self._scripts, return_exceptions=True)
            for writer in list(self._writers):
                writer.close()
            async with asyncio.timeout(5):
                await self._server.wait_closed()

    def session(self, client_name: str) -> Session:
        return self.sessions[f"#{client_name}#{self.name}"]

    # ------------------------------------------------------------ one connection

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        session: Session | None = None
        try:
            if self.mode == "mute":
                await reader.read()  # until the client goes away; never answers
                return
            decoder = FrameDecoder(max_frame_size=self.limits.max_frame_size, accept=FROM_CLIENT)
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                decoder.feed(chunk)
                try:
                    for frame in decoder:
                        if session is None:
                            session = self._handshake(frame, writer)
                            if session is None:
                                return
                        elif not self._on_frame(session, frame):
                            return
                except DecodeError as exc:
                    writer.write(encode(ErrorReport(ErrorCode.BAD_FRAME, clip_text(str(exc)))))
                    return
                await writer.drain()
        except ConnectionError:
            return
        finally:
            if session is not None:
                self._remove(session)
            self._writers.discard(writer)
            writer.close()

    def _handshake(self, frame: Frame, writer: asyncio.StreamWriter) -> Session | None:
        def refuse(code: ErrorCode, text: str) -> None:
            writer.write(encode(ErrorReport(code, text)))

        if not isinstance(frame, Hello):
            refuse(ErrorCode.UNEXPECTED_FRAME, f"expected HELLO, got {type(frame).__name__}")
            return None
        version = choose_version(frame, *self.versions)
        if version is None:
            low, high = self.versions
            refuse(ErrorCode.UNSUPPORTED_VERSION, f"this daemon speaks versions {low}..{high}")
            return None
        client = frame.name or f"c{next(self._picks)}"
        private = f"#{client}#{self.name}"
        if private in self.sessions:
            refuse(ErrorCode.NAME_IN_USE, f"the name {client!r} is in use")
            return None
        session = Session(private, frame.flags, writer, version)
        self.sessions[private] = session
        session.send(Welcome(version, private, self.limits))
        return session

    def _on_frame(self, session: Session, frame: Frame) -> bool:
        session.received.append(frame)
        match frame:
            case Join(group, _policy, request_id):
                self._join(session, group, request_id)
            case Leave(group, request_id):
                self._leave(session, group, request_id)
            case Multicast(groups, payload, service, msg_type, request_id, confirm):
                self._multicast(session, groups, payload, service, msg_type, request_id)
                if confirm and self.confirms:
                    session.send(Confirmed(request_id))
            case Replicate() if session.version >= REPLICATE_VERSION:
                self.replicates.append(frame)
                task = asyncio.ensure_future(self._replicate(session, frame))
                self._scripts.add(task)
                task.add_done_callback(self._scripts.discard)
            case Ping(nonce):
                session.send(Pong(nonce))
            case Goodbye():
                self.goodbyes += 1
                if self.mode == "no_goodbye":
                    return True
                self._remove(session)
                session.send(Goodbye())
                return False
            case _:
                session.send(
                    ErrorReport(ErrorCode.UNEXPECTED_FRAME, f"unexpected {type(frame).__name__}")
                )
                return False
        return True

    async def _replicate(self, session: Session, frame: Replicate) -> None:
        if self.replicate is None:
            name = frame.path.rsplit("/", 1)[-1]
            script = [report("failed", {}, size=0, name=name, detail="replication not offered")]
        else:
            script = self.replicate(frame)
        for index, entry in enumerate(script):
            if index:
                await asyncio.sleep(self.report_interval)
            final = entry["state"] in ("complete", "failed")
            session.send(Replication(frame.token, final, json.dumps(entry)))

    def _reject(self, session: Session, code: ErrorCode, text: str, request_id: int) -> None:
        session.send(ErrorReport(code, clip_text(text), request_id))

    def _view(self, group: str, cause: Cause, who: Session, extra: Session | None) -> None:
        counter = self.view_counter[group] = self.view_counter.get(group, 0) + 1
        members = self.members.get(group, [])
        view = Membership(
            group, ViewId(counter, 1), tuple(m.name for m in members), cause, (who.name,)
        )
        for member in members:
            if member.flags & HelloFlag.MEMBERSHIP or member is who:
                member.send(view)
        if extra is not None:
            extra.send(view)

    def _join(self, session: Session, group: str, request_id: int) -> None:
        if len(group.encode()) > self.limits.max_group_name:
            self._reject(session, ErrorCode.GROUP_NAME_TOO_LONG, group, request_id)
        elif group in session.groups:
            self._reject(session, ErrorCode.ALREADY_MEMBER, group, request_id)
        elif len(session.groups) >= self.limits.max_groups_per_client:
            self._reject(session, ErrorCode.TOO_MANY_GROUPS, group, request_id)
        else:
            session.groups.add(group)
            self.members.setdefault(group, []).append(session)
            self._view(group, Cause.JOIN, session, None)

    def _leave(self, session: Session, group: str, request_id: int) -> None:
        if group not in session.groups:
            self._reject(session, ErrorCode.NOT_A_MEMBER, group, request_id)
            return
        session.groups.discard(group)
        self.members[group].remove(session)
        self._view(group, Cause.LEAVE, session, session)

    def _multicast(
        self,
        session: Session,
        groups: tuple[str, ...],
        payload: bytes,
        service: ServiceLevel,
        msg_type: int,
        request_id: int,
    ) -> None:
        if len(payload) > self.limits.max_message_size:
            text = f"{len(payload)} bytes > {self.limits.max_message_size}"
            self._reject(session, ErrorCode.MESSAGE_TOO_LARGE, text, request_id)
            return
        if service not in self.services:
            self._reject(session, ErrorCode.SERVICE_NOT_SUPPORTED, service.name, request_id)
            return
        if self.busy_after is not None and self.multicasts >= self.busy_after:
            code = ErrorCode.BUSY if session.version >= BUSY_VERSION else ErrorCode.INTERNAL_ERROR
            self._reject(session, code, "daemon busy, request not taken; retry later", request_id)
            return
        self.multicasts += 1
        message = Message(session.name, groups, service, msg_type, payload)
        seen: set[str] = set()
        for group in groups:
            for member in self.members.get(group, []):
                if member.name not in seen:
                    seen.add(member.name)
                    member.send(message)

    def _remove(self, session: Session) -> None:
        if self.sessions.get(session.name) is not session:
            return
        del self.sessions[session.name]
        for group in sorted(session.groups):
            self.members[group].remove(session)
            self._view(group, Cause.DISCONNECT, session, None)
        session.groups.clear()
