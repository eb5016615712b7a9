"""The daemon's client server: Unix-domain (default) and loopback TCP stream sockets.

Thin asyncio shell around `meshcast.group.sessions.SessionTable` (the protocol logic):
each connection gets an integer id and a `FrameDecoder`; decoded frames, decode
failures, EOF/resets and write-buffer pauses are handed to the daemon through `feed`,
which runs them in its bulkhead against the table and applies the effects, calling back
`send` and `close_connection` here.

Hold-back: while `can_submit()` is False (the overlay outbox or the group send window is
full) no connection is read. A MULTICAST to a group that `holds_back` (a slow `block`
member is in it, here or at another daemon) stays decoded but untaken, and only its
connection stops being read until the group is released: other clients go on.
Frames for a connection whose transport is over its high-water mark wait here, not in
the transport, so that a slow receiver's disconnection can drop them and still write its
ERROR SLOW_RECEIVER right after the frames already handed to the socket.

Theory: docs/design/group.md, "Sessions and membership"; socket conventions:
docs/design/daemon.md, "Client sessions".

Unix sockets listen at `meshcast.socket_paths.default_socket_path` unless told otherwise.
Their directory is created ``0700`` and must belong to this user; the socket is created
``0600`` (``0660`` and given to the group of ``[clients] socket_group`` when set). A stale
socket file (nothing listening) is replaced; a live one, or a path that is not a socket, is
an error.

A TCP listener bound to anything but loopback is *remote*: its connections must present a
token in their HELLO (`SessionTable.connected(remote=True)`); `check_client_access`
refuses to start such a listener when no token is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import ipaddress
import logging
import os
import socket
import stat
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import cast

from meshcast.errors import ConfigError, DecodeError
from meshcast.group.sessions import SessionEffect, SessionTable
from meshcast.wire.client import ANY_FRAME, HELLO_FRAME_LIMIT, Frame, FrameDecoder, Multicast

log = logging.getLogger(__name__)

DEFAULT_WRITE_HIGH_WATER = 1024 * 1024  # bytes queued on a connection before it counts as slow
# s: a slow receiver cut off gets this long to read its last frames and the ERROR saying
# why before its connection is aborted
CLOSE_LINGER_TIMEOUT = 10.0

Input = Callable[[float], list[SessionEffect]]
Feed = Callable[[str, Input], None]


def ensure_private_dir(directory: Path) -> None:
    """Create `directory` 0700 if missing; refuse one that is not ours or not private."""
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700, parents=False)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(f"{directory} is not a directory")
    if info.st_uid != os.getuid():
        raise OSError(f"{directory} belongs to another user")
    if info.st_mode & 0o077:
        raise OSError(f"{directory} is open to other users (mode {info.st_mode & 0o777:o})")


def is_loopback(host: str) -> bool:
    """Is `host` a loopback address (only this machine can connect)? A name other than
    ``localhost`` is never resolved, so it counts as not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def socket_group_id(name: str, *, source: str = "") -> int:
    """The id of group `name` for ``[clients] socket_group``; `ConfigError` if none exists."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(
            f"no group named {name!r} on this machine (see /etc/group)",
            key="clients.socket_group",
            source=source,
        ) from None


def check_client_access(tcp_host: str | None, has_tokens: bool, *, source: str = "") -> None:
    """Refuse (`ConfigError`) a TCP client listener open beyond loopback without tokens."""
    if tcp_host is not None and not is_loopback(tcp_host) and not has_tokens:
        raise ConfigError(
            f"the TCP client address {tcp_host} is not loopback, so clients must present a "
            "token: configure [clients] token_file (lines NAME SECRET, mode 0600) or "
            "[clients.tokens], or bind the client port to 127.0.0.1",
            key="clients.token_file",
            source=source,
        )


def bind_unix_socket(path: Path, *, group: int | None = None) -> socket.socket:
    """A listening Unix stream socket at `path`, mode 0600, or 0660 owned by `group` (a
    group id) when given. Stale files are handled safely; the socket is never more open
    than asked, not even for a moment (created 0600, then given to the group)."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(info.st_mode):
            raise OSError(f"{path} exists and is not a socket; not removing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # stale: nobody listens
        else:
            raise OSError(f"another process is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        if group is not None:
            os.chown(path, -1, group)  # EPERM unless this user is a member of the group
            os.chmod(path, 0o660)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _inode(path: Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def _remove_if_ours(path: Path, inode: tuple[int, int]) -> None:
    """Unlink the socket file only if it is still the one we created."""
    with contextlib.suppress(OSError):
        info = os.lstat(path)
        if (info.st_dev, info.st_ino) == inode:
            os.unlink(path)


class _Connection(asyncio.Protocol):
    """Forwards transport events to the server; no logic here."""

    def __init__(self, server: ClientServer, *, remote: bool = False) -> None:
        self._server = server
        self._remote = remote  # from a TCP listener open beyond loopback
        self.conn = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's is not an asyncio.Transport subclass)
        transport = cast("asyncio.Transport", transport)
        self.conn = self._server._connected(transport, remote=self._remote)

    def data_received(self, data: bytes) -> None:
        self._server._data(self.conn, data)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._lost(self.conn)

    def pause_writing(self) -> None:
        self._server._pause_writing(self.conn)

    def resume_writing(self) -> None:
        self._server._resume_writing(self.conn)


class ClientServer:
    """Listening sockets and open client connections of one daemon."""

    def __init__(
        self,
        table: SessionTable,
        feed: Feed,
        *,
        can_submit: Callable[[], bool] = lambda: True,
        holds_back: Callable[[Iterable[str]], bool] = lambda _groups: False,
        write_high_water: int = DEFAULT_WRITE_HIGH_WATER,
    ) -> None:
        self._table = table
        self._feed = feed
        self._can_submit = can_submit
        self._holds_back = holds_back
        self._high_water = write_high_water
        self._loop = asyncio.get_running_loop()
        self._servers: list[asyncio.Server] = []
        self._transports: dict[int, asyncio.Transport] = {}
        self._decoders: dict[int, FrameDecoder] = {}
        # frames for each connection since the last settle: written as one chunk then
        self._outgoing: dict[int, list[bytes]] = {}
        # frames for connections whose transport is over its high-water mark (bounded by
        # the table's max_backlog), and those connections
        self._backlog: dict[int, deque[bytes]] = {}
        self._write_paused: set[int] = set()
        self._slow: set[int] = set()  # connections the table was told are paused
        self._lingering: dict[int, asyncio.TimerHandle] = {}  # closing: abort if unread
        self._next_conn = 1
        self._held = False  # reading paused on every connection (outbox or window full)
        # a MULTICAST to a held-back group, decoded but not taken; its connection is not read
        self._pending: dict[int, Frame] = {}
        self._closed = False
        self.unix_path: Path | None = None
        self._unix_inode: tuple[int, int] | None = None
        self.tcp_address: tuple[str, int] | None = None

    async def start_unix(self, path: Path, *, default_dir: bool, group: int | None = None) -> None:
        """Listen at `path` (0600; 0660 owned by group id `group` when given)."""
        if default_dir:
            ensure_private_dir(path.parent)
        sock = bind_unix_socket(path, group=group)
        self.unix_path = path
        self._unix_inode = _inode(path)
        self._servers.append(
            await self._loop.create_unix_server(lambda: _Connection(self), sock=sock)
        )

    async def start_tcp(self, host: str, port: int) -> None:
        """Listen on TCP `host`:`port`; beyond loopback its clients need a token."""
        remote = not is_loopback(host)
        server = await self._loop.create_server(
            lambda: _Connection(self, remote=remote), host, port
        )
        self._servers.append(server)
        name = server.sockets[0].getsockname()
        self.tcp_address = (str(name[0]), int(name[1]))

    @property
    def connections(self) -> int:
        return len(self._transports)

    # ------------------------------------------------------------------ called by the daemon

    def send(self, conn: int, data: bytes) -> None:
        """Queue a frame; `settle` (once per loop iteration) writes each connection's
        frames with one write: a burst of deliveries wakes a client once, not per frame."""
        transport = self._transports.get(conn)
        if transport is None or transport.is_closing():
            return
        chunks = self._outgoing.get(conn)
        if chunks is None:
            self._outgoing[conn] = [data]
        else:
            chunks.append(data)

    def _write_out(self, conn: int) -> None:
        chunks = self._outgoing.pop(conn, None)
        transport = self._transports.get(conn)
        if not chunks or transport is None or transport.is_closing():
            return
        if conn in self._write_paused:
            self._backlog.setdefault(conn, deque()).extend(chunks)
            return
        transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _write_backlog(self, conn: int, transport: asyncio.Transport, *, everything: bool) -> None:
        """Hand queued frames to the transport, a high-water mark's worth at a time,
        until it pauses again (or all of them, when closing)."""
        backlog = self._backlog.get(conn)
        while backlog and (everything or conn not in self._write_paused):
            chunk: list[bytes] = []
            size = 0
            while backlog and (everything or size < self._high_water):
                chunk.append(backlog.popleft())
                size += len(chunk[-1])
            transport.write(b"".join(chunk))
        if not backlog:
            self._backlog.pop(conn, None)

    def close_connection(self, conn: int, abort: bool, last: bytes = b"") -> None:
        """Close `conn`. `abort`: drop the frames not yet handed to its socket, write
        `last` after those that were, and abort if it is not read within
        CLOSE_LINGER_TIMEOUT (a slow receiver learns why it was cut off)."""
        transport = self._transports.get(conn)
        if transport is None:
            return
        self._forget_pending(conn)
        if abort:
            self._outgoing.pop(conn, None)
            self._backlog.pop(conn, None)
            if transport.is_closing():
                return
            if last:
                transport.write(last)
            transport.close()
            if transport.get_write_buffer_size() and conn not in self._lingering:
                self._lingering[conn] = self._loop.call_later(CLOSE_LINGER_TIMEOUT, transport.abort)
        else:
            if not transport.is_closing():  # what was sent before the close goes first
                self._write_backlog(conn, transport, everything=True)
            self._write_out(conn)
            transport.close()

    def settle(self) -> None:
        """After the daemon's inputs: write what they queued; resume reading once nothing
        holds local senders back."""
        for conn in list(self._outgoing):
            self._write_out(conn)
        if self._held and self._can_submit():
            self._held = False
            candidates = list(self._transports)
        elif self._held:
            candidates = []
        else:
            candidates = list(self._pending)
        for conn in candidates:
            transport = self._transports.get(conn)
            if transport is None or self._waits(conn):
                continue
            if not transport.is_closing():
                transport.resume_reading()
            self._pump(conn)

    def _waits(self, conn: int) -> bool:
        """Does `conn`'s next frame wait for a held-back group?"""
        frame = self._pending.get(conn)
        return isinstance(frame, Multicast) and self._holds_back(frame.groups)

    async def aclose(self) -> None:
        """Stop listening, abort what is still open, remove our socket file."""
        if self._closed:
            return
        self._closed = True
        for conn in list(self._outgoing):
            self._write_out(conn)
        for server in self._servers:
            server.close()
        for handle in self._lingering.values():
            handle.cancel()
        for transport in list(self._transports.values()):
            transport.abort()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        if self.unix_path is not None and self._unix_inode is not None:
            _remove_if_ours(self.unix_path, self._unix_inode)

    # ------------------------------------------------------------------ transport events

    def _connected(self, transport: asyncio.Transport, *, remote: bool) -> int:
        conn = self._next_conn
        self._next_conn += 1
        self._transports[conn] = transport
        # Until its HELLO, a connection may send no frame longer than a HELLO can be: a
        # stranger costs the daemon one read chunk, not a 16 MiB frame. Handshakes go on
        # while local senders are held back (a HELLO submits nothing), so the handshake
        # timeout is never the daemon's fault.
        self._decoders[conn] = FrameDecoder(max_frame_size=HELLO_FRAME_LIMIT, accept=ANY_FRAME)
        transport.set_write_buffer_limits(high=self._high_water)
        self._feed("connected", partial(self._table.connected, conn, remote=remote))
        return conn

    def _data(self, conn: int, data: bytes) -> None:
        decoder = self._decoders.get(conn)
        if decoder is None:
            return
        decoder.feed(data)
        self._pump(conn)

    def _pump(self, conn: int) -> None:
        decoder = self._decoders.get(conn)
        while decoder is not None and conn in self._transports:
            if not self._can_submit() and not self._table.handshaking(conn):
                self._hold(conn)
                return
            frame = self._pending.pop(conn, None)
            if frame is None:
                try:
                    frame = decoder.next_frame()
                except DecodeError as exc:
                    self._feed("decode_failed", partial(self._table.decode_failed, conn, str(exc)))
                    self._decoders.pop(conn, None)
                    return
                if frame is None:
                    return
            if isinstance(frame, Multicast) and self._holds_back(frame.groups):
                # a slow `block` member is in one of its groups: this client waits
                self._pending[conn] = frame
                self._transports[conn].pause_reading()
                return
            self._feed("frame_received", partial(self._table.frame_received, conn, frame))
            if self._transports.get(conn) is None or self._transports[conn].is_closing():
                return
            if decoder.max_frame_size == HELLO_FRAME_LIMIT:  # the handshake may be done
                decoder.max_frame_size = self._table.frame_limit(conn)

    def _hold(self, conn: int) -> None:
        """Stop reading every connection past its handshake (`conn` is one)."""
        transport = self._transports.get(conn)
        if transport is not None and not transport.is_closing():
            transport.pause_reading()
        if self._held:
            return
        self._held = True
        for other, transport in self._transports.items():
            if not transport.is_closing() and not self._table.handshaking(other):
                transport.pause_reading()

    def _forget_pending(self, conn: int) -> None:
        self._pending.pop(conn, None)

    def _lost(self, conn: int) -> None:
        if self._transports.pop(conn, None) is None:
            return
        self._decoders.pop(conn, None)
        self._outgoing.pop(conn, None)
        self._backlog.pop(conn, None)
        self._write_paused.discard(conn)
        self._slow.discard(conn)
        self._forget_pending(conn)
        handle = self._lingering.pop(conn, None)
        if handle is not None:
            handle.cancel()
        self._feed("connection_lost", partial(self._table.connection_lost, conn))

    def _pause_writing(self, conn: int) -> None:
        self._write_paused.add(conn)
        if conn not in self._slow:  # once per slow period: the table counts its backlog
            self._slow.add(conn)
            self._table.writing_paused(conn)

    def _resume_writing(self, conn: int) -> None:
        self._write_paused.discard(conn)
        transport = self._transports.get(conn)
        if transport is None or transport.is_closing():
            return
        self._write_backlog(conn, transport, everything=False)
        if conn in self._write_paused or conn in self._backlog:
            return  # still behind: the table keeps counting
        self._slow.discard(conn)
        self._feed("writing_resumed", lambda _now: self._table.writing_resumed(conn))
