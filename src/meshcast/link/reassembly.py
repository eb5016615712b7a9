"""Reassembly of messages that were split into pieces across packets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class _Partial:
    buffer: bytearray
    received: int


class Reassembler:
    """Collects `MessagePiece`s by message id; bounded by `budget_bytes` of open messages.

    Pieces of one message may arrive in any order (the link is non-blocking). The link
    suppresses duplicate packets, so each piece is seen once from an honest peer; a
    dishonest one can at worst corrupt its own messages, never grow memory past the budget.
    """

    __slots__ = ("_budget", "_max_message", "_open", "_used")

    def __init__(self, max_message_size: int, budget_bytes: int) -> None:
        self._max_message = max_message_size
        self._budget = budget_bytes
        self._open: dict[int, _Partial] = {}
        self._used = 0

    @property
    def buffered_bytes(self) -> int:
        return self._used

    def add(self, msg_id: int, total: int, offset: int, data: bytes) -> bytes | None:
        """Add one piece; return the whole message once complete.

        Raises ValueError when the piece breaks the limits (the caller counts a violation).
        """
        partial = self._open.get(msg_id)
        if partial is None:
            if total > self._max_message:
                raise ValueError(f"message of {total} bytes exceeds the maximum size")
            if self._used + total > self._budget:
                raise ValueError("reassembly budget exhausted")
            partial = _Partial(bytearray(total), 0)
            self._open[msg_id] = partial
            self._used += total
        elif len(partial.buffer) != total:
            raise ValueError(f"piece of message {msg_id} disagrees about its total size")
        end = offset + len(data)
        partial.buffer[offset:end] = data
        partial.received += len(data)
        if partial.received < total:
            return None
        del self._open[msg_id]
        self._used -= total
        return bytes(partial.buffer)

    def clear(self) -> None:
        self._open.clear()
        self._used = 0
