"""The daemon's client server: Unix-domain (default) and loopback TCP stream sockets.

A thin asyncio shell: each connection gets an integer id, and its events (connected,
bytes, EOF or reset, write buffer over or under its high-water mark) go to the daemon
(`ClientEvents`), which feeds them to its `DaemonNode`; the node's client effects come
back here: `send` (coalesced, written once per loop iteration), `set_reading` (the node
holds one read chunk per connection at most: the rest waits in the socket) and
`close_connection`. Decoding, fair reading, hold-back and the slow-receiver backlog are
the node's (`meshcast.daemon.clients`).

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
from pathlib import Path
from typing import Any, Protocol, cast

from meshcast.daemon.node import DEFAULT_WRITE_CHUNK
from meshcast.errors import ConfigError

log = logging.getLogger(__name__)

# bytes queued on a connection before it counts as slow: the node hands a slow client's
# backlog out in chunks of this size
DEFAULT_WRITE_HIGH_WATER = DEFAULT_WRITE_CHUNK
# s: a slow receiver cut off gets this long to read its last frames and the ERROR saying
# why before its connection is aborted
CLOSE_LINGER_TIMEOUT = 10.0


class ClientEvents(Protocol):
    """What the server tells the daemon about its connections."""

    def client_connected(self, conn: int, *, remote: bool) -> None: ...
    def client_data(self, conn: int, data: bytes) -> None: ...
    def client_lost(self, conn: int) -> None: ...
    def writing_paused(self, conn: int) -> None: ...
    def writing_resumed(self, conn: int) -> None: ...


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
        self._server._events.client_data(self.conn, data)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._lost(self.conn)

    def pause_writing(self) -> None:
        self._server._events.writing_paused(self.conn)

    def resume_writing(self) -> None:
        self._server._events.writing_resumed(self.conn)


class ClientServer:
    """Listening sockets and open client connections of one daemon."""

    def __init__(
        self, events: ClientEvents, *, write_high_water: int = DEFAULT_WRITE_HIGH_WATER
    ) -> None:
        self._events = events
        self._high_water = write_high_water
        self._loop = asyncio.get_running_loop()
        self._servers: list[asyncio.Server] = []
        self._transports: dict[int, asyncio.Transport] = {}
        # frames for each connection since the last flush: written as one chunk then
        self._outgoing: dict[int, list[bytes]] = {}
        self._lingering: dict[int, asyncio.TimerHandle] = {}  # closing: abort if unread
        self._next_conn = 1
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
        # read untyped: uvloop's Server.sockets is a list where typeshed says tuple, and
        # the compiled build checks the type it reads (docs/compiled.md)
        name = cast("Any", server).sockets[0].getsockname()
        self.tcp_address = (str(name[0]), int(name[1]))

    @property
    def connections(self) -> int:
        return len(self._transports)

    # ------------------------------------------------------------------ the node's effects

    def send(self, conn: int, data: bytes) -> None:
        """Queue bytes; `flush` (once per loop iteration) writes each connection's with
        one write: a burst of deliveries wakes a client once, not per frame."""
        transport = self._transports.get(conn)
        if transport is None or transport.is_closing():
            return
        chunks = self._outgoing.get(conn)
        if chunks is None:
            self._outgoing[conn] = [data]
        else:
            chunks.append(data)

    def write_now(self, conn: int, data: bytes) -> None:
        """Write at once, after what `send` queued for `conn` (a slow client's backlog:
        the socket must say whether it took it before the next chunk is asked for)."""
        self._write_out(conn)
        transport = self._transports.get(conn)
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def flush(self) -> None:
        for conn in list(self._outgoing):
            self._write_out(conn)

    def _write_out(self, conn: int) -> None:
        chunks = self._outgoing.pop(conn, None)
        transport = self._transports.get(conn)
        if not chunks or transport is None or transport.is_closing():
            return
        transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def set_reading(self, conn: int, paused: bool) -> None:
        transport = self._transports.get(conn)
        if transport is None or transport.is_closing():
            return
        if paused:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def close_connection(self, conn: int, abort: bool, last: bytes = b"") -> None:
        """Close `conn`. `abort`: drop the frames not yet handed to its socket, write
        `last` after those that were, and abort if it is not read within
        CLOSE_LINGER_TIMEOUT (a slow receiver learns why it was cut off)."""
        transport = self._transports.get(conn)
        if transport is None:
            return
        if abort:
            self._outgoing.pop(conn, None)
            if transport.is_closing():
                return
            if last:
                transport.write(last)
            transport.close()
            if transport.get_write_buffer_size() and conn not in self._lingering:
                self._lingering[conn] = self._loop.call_later(CLOSE_LINGER_TIMEOUT, transport.abort)
        else:
            self._write_out(conn)
            transport.close()

    async def aclose(self) -> None:
        """Stop listening, abort what is still open, remove our socket file."""
        if self._closed:
            return
        self._closed = True
        self.flush()
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
        transport.set_write_buffer_limits(high=self._high_water)
        self._events.client_connected(conn, remote=remote)
        return conn

    def _lost(self, conn: int) -> None:
        if self._transports.pop(conn, None) is None:
            return
        self._outgoing.pop(conn, None)
        handle = self._lingering.pop(conn, None)
        if handle is not None:
            handle.cancel()
        self._events.client_lost(conn)
