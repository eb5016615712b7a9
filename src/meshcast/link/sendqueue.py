"""Messages accepted for sending, cut into packet bodies on demand."""

from __future__ import annotations

from collections import deque

from meshcast.errors import BufferFull, MessageTooLarge
from meshcast.wire import PIECE_HEAD, WHOLE_HEAD, encode_piece

_MIN_PIECE = 64  # bytes of payload; smaller leftovers wait for the next packet


class SendQueue:
    """A bounded FIFO of messages that packs small ones together and splits large ones.

    Packing happens on demand: a body is cut only when the pacer admits a packet, so a
    backlog packs densely while a lone message leaves at once (no Nagle delay).
    """

    __slots__ = (
        "_head_msg_id",
        "_head_offset",
        "_max_bytes",
        "_max_message",
        "_messages",
        "_next_msg_id",
        "queued_bytes",
    )

    def __init__(self, max_bytes: int, max_message_size: int) -> None:
        self._max_bytes = max_bytes
        self._max_message = max_message_size
        self._messages: deque[bytes] = deque()
        self._head_offset = 0  # bytes of the head message already cut into pieces
        self._head_msg_id = 0
        self._next_msg_id = 1
        self.queued_bytes = 0

    def __len__(self) -> int:
        return len(self._messages)

    def can_accept(self, size: int) -> bool:
        return size <= self._max_message and self.queued_bytes + size <= self._max_bytes

    def push(self, payload: bytes) -> None:
        size = len(payload)
        if size > self._max_message:
            raise MessageTooLarge(
                f"message of {size} bytes exceeds the limit of {self._max_message}"
            )
        if self.queued_bytes + size > self._max_bytes:
            raise BufferFull(
                f"send queue holds {self.queued_bytes} of {self._max_bytes} bytes; "
                f"a message of {size} bytes must wait"
            )
        self._messages.append(payload)
        self.queued_bytes += size

    def clear(self) -> int:
        discarded = len(self._messages)
        self._messages.clear()
        self._head_offset = 0
        self.queued_bytes = 0
        return discarded

    def pop_body(self, budget: int) -> tuple[bytes, int]:
        """Cut the next packet body of at most `budget` bytes; return it and the messages done."""
        parts: list[bytes] = []
        room = budget
        finished = 0
        messages = self._messages
        while messages:
            message = messages[0]
            size = len(message)
            if self._head_offset == 0 and size + WHOLE_HEAD.size <= budget:
                if size + WHOLE_HEAD.size > room:
                    break  # fits a fresh packet whole: do not split it
                parts.append(WHOLE_HEAD.pack(0, size))  # FRAG_WHOLE; payload joins once below
                parts.append(message)
                room -= size + WHOLE_HEAD.size
                messages.popleft()
                self.queued_bytes -= size
                finished += 1
                continue
            if room < PIECE_HEAD.size + _MIN_PIECE:
                break
            if self._head_offset == 0:
                self._head_msg_id = self._next_msg_id
                self._next_msg_id = (self._next_msg_id + 1) & 0xFFFF_FFFF or 1
            offset = self._head_offset
            chunk = min(room - PIECE_HEAD.size, size - offset)
            parts.append(
                encode_piece(
                    self._head_msg_id, size, offset, memoryview(message)[offset : offset + chunk]
                )
            )
            room -= PIECE_HEAD.size + chunk
            if offset + chunk == size:
                messages.popleft()
                self._head_offset = 0
                self.queued_bytes -= size
                finished += 1
            else:
                self._head_offset = offset + chunk
                break
        return b"".join(parts), finished
