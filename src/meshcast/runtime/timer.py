"""The one loop timer a driver keeps for its state machine's `next_deadline()`."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable


class DeadlineTimer:
    """Armed at the earliest deadline asked for; a later deadline never delays it.

    `quarantine_until` holds timers back after a state machine raised, so a machine that
    keeps failing cannot spin the loop (the bulkhead's back-off).
    """

    __slots__ = ("_callback", "_handle", "_loop", "armed_at", "quarantine_until")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self.armed_at = math.inf
        self.quarantine_until = 0.0

    def arm(self, deadline: float | None) -> None:
        """Re-arm for `deadline` (None: the machine needs no timer)."""
        if deadline is None:
            self.cancel()
            return
        deadline = max(deadline, self.quarantine_until)
        if deadline < self.armed_at:
            if self._handle is not None:
                self._handle.cancel()
            self.armed_at = deadline
            self._handle = self._loop.call_at(deadline, self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.armed_at = math.inf

    def _fire(self) -> None:
        self._handle = None
        self._callback()

    def fired_at(self) -> float:
        """In the callback: the time to pass as `now` (never before the deadline), and
        disarm — the callback re-arms through `arm`."""
        now = max(self.armed_at, self._loop.time())
        self.armed_at = math.inf
        return now
