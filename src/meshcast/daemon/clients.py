"""The byte side of a daemon's client connections (sans-I/O): frame decoding, fair
reading and write back-pressure, for `DaemonNode`.

Reading. Each connection has a `FrameDecoder`. The node takes frames in turns: at most
`frames_per_turn` from one connection, then the next connection with input waiting, so
one client pouring frames in cannot starve the others. A frame decoded but not yet taken
is the connection's *head*; while a connection has a head, it is not read (`ClientReading`
paused), so what a daemon holds per client is one read chunk, never a client's backlog.

Writing. Frames for one connection are coalesced into one `ClientWrite` per input. While
the driver reports the connection's socket buffer over its high-water mark
(`writing_paused`), frames queue here (the session table counts them against
`max_backlog` and applies the slow-receiver policies); `writing_resumed` hands them back
`write_chunk` bytes at a time, as long as the socket keeps taking them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from meshcast.daemon.effects import ClientReading, ClientWrite
from meshcast.wire.client import ANY_FRAME, HELLO_FRAME_LIMIT, Frame, FrameDecoder


@dataclass(slots=True)
class _Connection:
    decoder: FrameDecoder
    head: Frame | None = None  # decoded, not yet taken
    reading: bool = True  # False once the session is closing or the stream was lost
    read_paused: bool = False  # what the driver was last told
    write_paused: bool = False  # the socket buffer is over its high-water mark
    slow: bool = False  # frames queue here until the backlog has drained
    backlog: deque[bytes] = field(default_factory=deque)
    backlog_bytes: int = 0
    outgoing: list[bytes] = field(default_factory=list)  # coalesced for this input


class ClientStreams:
    """Every open client connection's decoder, head frame and write queue."""

    def __init__(self, *, write_chunk: int) -> None:
        self.write_chunk = write_chunk
        self._conns: dict[int, _Connection] = {}
        # connections with input to look at, in turn order (a dict: an ordered set)
        self._ready: dict[int, None] = {}
        self._writing: list[int] = []  # connections with outgoing frames this input
        self._touched: set[int] = set()  # connections whose head changed this input

    def __contains__(self, conn: int) -> bool:
        return conn in self._conns

    def __len__(self) -> int:
        return len(self._conns)

    # ------------------------------------------------------------------ lifecycle

    def open(self, conn: int) -> None:
        # Until its HELLO, a connection may send no frame longer than a HELLO can be: a
        # stranger costs the daemon one read chunk, not a 16 MiB frame.
        self._conns[conn] = _Connection(
            FrameDecoder(max_frame_size=HELLO_FRAME_LIMIT, accept=ANY_FRAME)
        )

    def forget(self, conn: int) -> None:
        self._conns.pop(conn, None)
        self._ready.pop(conn, None)
        self._touched.discard(conn)

    # ------------------------------------------------------------------ reading

    def feed(self, conn: int, data: bytes) -> None:
        c = self._conns.get(conn)
        if c is None or not c.reading:
            return
        c.decoder.feed(data)
        self.mark_ready(conn)

    def mark_ready(self, conn: int) -> None:
        if conn in self._conns:
            self._ready.setdefault(conn)

    def ready(self) -> list[int]:
        """The connections with input to look at, in turn order (each once)."""
        return list(self._ready)

    def take_turn(self, conn: int) -> None:
        """`conn` had its turn: it goes to the back of the line if it has a head left,
        else out of the line until more input arrives."""
        if self._ready.pop(conn, 0) is not None:
            return  # not in the line
        c = self._conns.get(conn)
        if c is not None and c.head is not None:
            self._ready[conn] = None

    def has_input(self) -> bool:
        return bool(self._ready)

    def head(self, conn: int) -> Frame | None:
        """The connection's next frame (decoding it if needed); None: none complete.
        Raises `DecodeError` from the decoder (the stream is then lost)."""
        c = self._conns.get(conn)
        if c is None or not c.reading:
            return None
        if c.head is None:
            c.head = c.decoder.next_frame()
            if c.head is not None:
                self._touched.add(conn)
        return c.head

    def pop_head(self, conn: int) -> None:
        c = self._conns.get(conn)
        if c is not None and c.head is not None:
            c.head = None
            self._touched.add(conn)

    def stop_reading(self, conn: int) -> None:
        """The session is closing (or its stream is lost): later bytes are ignored."""
        c = self._conns.get(conn)
        if c is not None:
            c.reading = False
            c.head = None
            c.decoder = FrameDecoder(max_frame_size=1)  # frees the buffer
            self._ready.pop(conn, None)

    def set_frame_limit(self, conn: int, limit: int) -> None:
        c = self._conns.get(conn)
        if c is not None and c.decoder.max_frame_size != limit:
            c.decoder.max_frame_size = limit

    def reading_changes(self) -> list[ClientReading]:
        """The `ClientReading` changes due after this input: a connection is paused
        while it has a frame decoded and waiting, and read otherwise."""
        out: list[ClientReading] = []
        for conn in sorted(self._touched):
            c = self._conns.get(conn)
            if c is None:
                continue
            paused = c.head is not None
            if paused != c.read_paused:
                c.read_paused = paused
                out.append(ClientReading(conn, paused))
        self._touched.clear()
        return out

    # ------------------------------------------------------------------ writing

    def write(self, conn: int, data: bytes) -> None:
        c = self._conns.get(conn)
        if c is None:
            return
        if c.slow:
            c.backlog.append(data)
            c.backlog_bytes += len(data)
            return
        if not c.outgoing:
            self._writing.append(conn)
        c.outgoing.append(data)

    def flush(self, conn: int | None = None) -> list[ClientWrite]:
        """The coalesced writes of this input (of `conn` alone if given), in order."""
        conns = self._writing if conn is None else [conn]
        out: list[ClientWrite] = []
        for k in conns:
            c = self._conns.get(k)
            if c is None or not c.outgoing:
                continue
            chunks, c.outgoing = c.outgoing, []
            out.append(ClientWrite(k, chunks[0] if len(chunks) == 1 else b"".join(chunks)))
        if conn is None:
            self._writing = []
        return out

    def drop_writes(self, conn: int) -> None:
        """An abort: what was not handed to the socket is dropped."""
        c = self._conns.get(conn)
        if c is not None:
            c.outgoing = []
            c.backlog.clear()
            c.backlog_bytes = 0

    def drain_all(self, conn: int) -> list[ClientWrite]:
        """Before a graceful close: everything queued for `conn`, whatever the socket."""
        c = self._conns.get(conn)
        if c is None:
            return []
        chunks = list(c.backlog) + c.outgoing
        c.backlog.clear()
        c.backlog_bytes = 0
        c.outgoing = []
        c.slow = False
        return [ClientWrite(conn, b"".join(chunks))] if chunks else []

    def writing_paused(self, conn: int) -> bool:
        """The socket is full. True when this starts a slow period (the table is told
        once per period, however often the socket fills while the backlog drains)."""
        c = self._conns.get(conn)
        if c is None:
            return False
        c.write_paused = True
        if c.slow:
            return False
        c.slow = True
        # frames of this input not yet handed out go behind the earlier ones, in order
        c.backlog.extend(c.outgoing)
        c.backlog_bytes += sum(len(b) for b in c.outgoing)
        c.outgoing = []
        return True

    def writing_resumed(self, conn: int) -> tuple[list[ClientWrite], bool]:
        """The socket takes bytes again: the next `write_chunk` of the backlog, and
        whether the backlog is now empty (the slow period is over)."""
        c = self._conns.get(conn)
        if c is None:
            return [], False
        c.write_paused = False
        if not c.slow:
            return [], False
        chunk: list[bytes] = []
        size = 0
        while c.backlog and size < self.write_chunk:
            data = c.backlog.popleft()
            chunk.append(data)
            size += len(data)
        c.backlog_bytes -= size
        writes = [ClientWrite(conn, b"".join(chunk))] if chunk else []
        if c.backlog:
            return writes, False
        c.slow = False
        return writes, True

    def wants_writing(self, conn: int) -> bool:
        """Should the driver call `writing_resumed` again (backlog left, socket open)?"""
        c = self._conns.get(conn)
        return c is not None and c.slow and not c.write_paused and bool(c.backlog)

    def backlog_bytes(self) -> int:
        return sum(c.backlog_bytes for c in self._conns.values())

    def buffered_bytes(self) -> int:
        """Bytes of client input held: undecoded and decoded-not-taken (roughly)."""
        return sum(c.decoder.buffered for c in self._conns.values())
