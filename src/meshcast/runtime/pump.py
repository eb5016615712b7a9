"""The asyncio pump around one `DaemonNode`: feed an input, apply the effects, re-arm the
one timer (aioquic's `asyncio/protocol.py` is the model).

Inputs come from the UDP socket (`datagram_received`, mapped from the source address to a
neighbour), the client server (`ClientEvents`) and the timer. Effects go to the
neighbours' addresses (`Transmit`: the datagrams of one input are collected per neighbour
and sent once its other effects are applied, in order, a run of equal size in one system
call where UDP GSO works: runtime/gso.py), the client sockets (`ClientWrite`, written once
per loop iteration; `ClientReading`; `ClientClose`) and the event log (`DaemonEvent`).
After a burst of inputs, once the loop has run every ready callback, the pump writes the
client bytes and re-arms the timer from `next_deadline()` (one deadline scan per burst).

Every input runs in a bulkhead: an exception is logged (rate-limited), counted
(`internal_errors`) and the daemon goes on; after a failing `on_timer` the timer is held
off for `QUARANTINE_INTERVAL`, so it cannot spin.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from meshcast.daemon import (
    ClientClose,
    ClientReading,
    ClientWrite,
    DaemonEffect,
    DaemonEvent,
    DaemonNode,
)
from meshcast.ids import NodeId
from meshcast.link import Transmit
from meshcast.runtime.endpoints import Neighbours
from meshcast.runtime.logs import EventLog, RateLimiter
from meshcast.runtime.memory import release_free_memory
from meshcast.runtime.replication_io import ReplicationIO
from meshcast.runtime.sessions import ClientServer
from meshcast.runtime.timer import DeadlineTimer

QUARANTINE_INTERVAL = 0.05  # s: timer back-off after the node raised in on_timer
# s: after a group view is installed, when to hand the flush's freed memory back to the
# OS (by then the FLUSH is acknowledged and the old view's copies are gone)
RELEASE_AFTER_VIEW = 2.0
_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


@dataclass(frozen=True, slots=True)
class PumpStats:
    """What the pump counted (the node counts the rest)."""

    datagrams_received: int = 0  # datagrams read from the socket
    datagrams_sent: int = 0  # datagrams handed to the socket (or to an impairment shim)
    gso_sends: int = 0  # system calls that each sent a run of datagrams (UDP GSO)
    gso_datagrams: int = 0  # datagrams among datagrams_sent that left in those runs
    foreign_dropped: int = 0  # from an address that is no configured neighbour's
    unroutable_dropped: int = 0  # transmissions to a node that is not a neighbour
    socket_errors: int = 0  # errors the socket reported (ICMP port unreachable, ...)
    internal_errors: int = 0  # exceptions that escaped the node, contained here
    unknown_effects: int = 0  # effects the pump has no case for (a bug), dropped


class DaemonPump:
    """Drives one `DaemonNode` on the running loop (see the module docstring)."""

    def __init__(
        self,
        node: DaemonNode,
        neighbours: Neighbours,
        events: EventLog,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self.node = node
        self.neighbours = neighbours
        self.events = events
        self.client_server: ClientServer | None = None
        self.replication: ReplicationIO | None = None  # streams and file work
        self._log = log
        self._loop = asyncio.get_running_loop()
        self._timer = DeadlineTimer(self._loop, self._on_timer)
        self._clock = 0.0
        self._settle_pending = False
        self._closed = False
        self._release: asyncio.TimerHandle | None = None  # release_free_memory, pending
        self._drained: asyncio.Event | None = None  # set once the node is drained
        self._limiter = RateLimiter()
        self._logged_unknown: set[type] = set()
        # counters (statistics())
        self._datagrams_received = 0
        self._datagrams_sent = 0
        self._foreign_dropped = 0
        self._unroutable_dropped = 0
        self._socket_errors = 0
        self._internal_errors = 0
        self._unknown_effects = 0

    def statistics(self) -> PumpStats:
        return PumpStats(
            datagrams_received=self._datagrams_received,
            datagrams_sent=self._datagrams_sent,
            gso_sends=self.neighbours.gso_sends,
            gso_datagrams=self.neighbours.gso_datagrams,
            foreign_dropped=self._foreign_dropped,
            unroutable_dropped=self._unroutable_dropped,
            socket_errors=self._socket_errors,
            internal_errors=self._internal_errors,
            unknown_effects=self._unknown_effects,
        )

    def close(self) -> None:
        """Stop pumping: no input is fed and no effect applied from now on."""
        self._closed = True
        self._timer.cancel()
        if self._release is not None:
            self._release.cancel()

    async def drained(self, timeout: float) -> bool:  # noqa: ASYNC109 - the bound is the point
        """Wait (at most `timeout` s) until the node has nothing queued or unacknowledged."""
        if self.node.is_drained():
            return True
        self._drained = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await self._drained.wait()
        except TimeoutError:
            return False
        return True

    # ------------------------------------------------------------------ inputs

    def feed(self, where: str, feed: Callable[[float], list[DaemonEffect]]) -> None:
        """One input of the node: run it, apply its effects, settle after the burst."""
        if self._closed:
            return
        try:
            effects = feed(self.now())
        except Exception:
            self.contain(where)
        else:
            self._apply(effects)
        self._settle()

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._datagrams_received += 1
        if self._closed:
            return
        peer = self.neighbours.peer_of(addr)
        if peer is None:
            self._foreign_dropped += 1
            if self._limiter.allows(self._foreign_dropped):
                self._log.debug(
                    "drop datagram of %d bytes from unknown address %s", len(data), addr
                )
            return
        self.feed("datagram_received", lambda now: self.node.datagram_received(peer, data, now))

    def socket_error(self, exc: Exception) -> None:
        # ICMP port unreachable while a neighbour is down: expected, counted, rarely logged.
        self._socket_errors += 1
        if self._limiter.allows(self._socket_errors):
            self._log.debug("socket error: %s", exc)

    def _on_timer(self) -> None:
        now = self.now(self._timer.fired_at())
        if self._closed:
            return
        if self._settle_pending and self.client_server is not None:
            # the loop runs due timers before the settle the last burst asked for: its
            # deliveries go out first, not after the timer's work (NACKs, link pumps)
            self.client_server.flush()
        try:
            effects = self.node.on_timer(now)
        except Exception:
            self.contain("on_timer")
            self._timer.quarantine_until = now + QUARANTINE_INTERVAL
        else:
            self._apply(effects)
        self._settle()

    # client connections (`ClientEvents`: called by the client server)

    def client_connected(self, conn: int, *, remote: bool) -> None:
        self.feed(
            "client_connected", lambda now: self.node.client_connected(conn, now, remote=remote)
        )

    def client_data(self, conn: int, data: bytes) -> None:
        self.feed("client_data", lambda now: self.node.client_data(conn, data, now))

    def client_lost(self, conn: int) -> None:
        self.feed("client_lost", lambda now: self.node.client_lost(conn, now))

    def writing_paused(self, conn: int) -> None:
        try:
            self.node.writing_paused(conn)
        except Exception:
            self.contain("writing_paused")

    def writing_resumed(self, conn: int) -> None:
        # The node hands the backlog out a chunk at a time; each is written at once, so
        # the socket can pause us again (`writing_paused`) before the next is asked for.
        # Bounded: every round takes a chunk from the backlog or ends it.
        while not self._closed:
            try:
                effects = self.node.writing_resumed(conn, self.now())
            except Exception:
                self.contain("writing_resumed")
                break
            server = self.client_server
            for effect in effects:
                if type(effect) is ClientWrite and effect.conn == conn and server is not None:
                    server.write_now(conn, effect.data)
                else:
                    self._apply([effect])
            self._settle()
            if not self.node.wants_writing(conn):
                break

    # ------------------------------------------------------------------ effects

    def _apply(self, effects: Iterable[object]) -> None:
        # typed `object`: an effect type the node adds without a case here is counted
        server = self.client_server
        # the datagrams per neighbour, in order: sent together once the effects are
        # applied, so a run of them can leave in one system call (UDP GSO)
        outgoing: dict[NodeId, list[bytes]] | None = None
        try:
            for effect in effects:
                if isinstance(effect, Transmit):
                    if outgoing is None:
                        outgoing = {effect.to: [effect.datagram]}
                    else:
                        queued = outgoing.get(effect.to)
                        if queued is None:
                            outgoing[effect.to] = [effect.datagram]
                        else:
                            queued.append(effect.datagram)
                elif isinstance(effect, ClientWrite):
                    if server is not None:
                        server.send(effect.conn, effect.data)
                elif isinstance(effect, DaemonEvent):
                    self._on_event(effect)
                elif isinstance(effect, ClientReading):
                    if server is not None:
                        server.set_reading(effect.conn, effect.paused)
                elif isinstance(effect, ClientClose):
                    if server is not None:
                        server.close_connection(effect.conn, effect.abort, effect.last)
                elif self.replication is None or not self.replication.apply(effect):
                    self._unknown(effect)
        finally:
            if outgoing is not None:
                self._transmit(outgoing)

    def _transmit(self, outgoing: dict[NodeId, list[bytes]]) -> None:
        for peer, datagrams in outgoing.items():
            if not self._closed and self.neighbours.send_all(peer, datagrams):
                self._datagrams_sent += len(datagrams)
            else:
                self._unroutable_dropped += len(datagrams)

    def _on_event(self, event: DaemonEvent) -> None:
        if event.name == "bug_contained":
            count = event.fields.get("count", 0)
            if isinstance(count, int) and self._limiter.allows(count):
                self._log.error(
                    "bug contained: a layer raised in %s (%s so far): %s\n%s",
                    event.fields.get("where"),
                    count,
                    event.fields.get("error"),
                    event.fields.get("traceback"),
                )
            return
        if event.name == "group_view":
            self._schedule_release()
        try:
            self.events.log(_LEVELS[event.level], event.name, dict(event.fields))
        except Exception:
            self.contain(f"logging {event.name}")

    def _unknown(self, effect: object) -> None:
        self._unknown_effects += 1
        kind = type(effect)
        if kind not in self._logged_unknown:  # bounded by the classes in the program
            self._logged_unknown.add(kind)
            self._log.error(
                "bug: unknown effect %s.%s dropped (counted in unknown_effects; logged once "
                "per type)",
                kind.__module__,
                kind.__qualname__,
            )

    def _schedule_release(self) -> None:
        """`release_free_memory` once, RELEASE_AFTER_VIEW after the latest view."""
        if self._release is not None:
            self._release.cancel()
        self._release = self._loop.call_later(RELEASE_AFTER_VIEW, self._release_now)

    def _release_now(self) -> None:
        self._release = None
        if not self._closed:
            release_free_memory()

    # ------------------------------------------------------------------ after a burst

    def _settle(self) -> None:
        """Settle once the loop has run every callback now ready, so a burst of datagrams
        or client frames costs one deadline scan, not one each."""
        if self._settle_pending or self._closed:
            return
        self._settle_pending = True
        self._loop.call_soon(self._settle_now)

    def _settle_now(self) -> None:
        """Write what the clients were sent, re-arm the one timer, note a finished drain."""
        self._settle_pending = False
        if self._closed:
            return
        if self.client_server is not None:
            self.client_server.flush()
        try:
            deadline = self.node.next_deadline()
        except Exception:
            self.contain("next_deadline")
            deadline = self.now() + QUARANTINE_INTERVAL
        self._timer.arm(deadline)
        drained = self._drained
        if drained is not None and not drained.is_set() and self.node.is_drained():
            drained.set()

    def now(self, at_least: float = 0.0) -> float:
        """The loop clock, never going backwards (a timer may pass its deadline as now)."""
        now = max(self._loop.time(), at_least)
        if now > self._clock:
            self._clock = now
        return self._clock

    def contain(self, where: str) -> None:
        """The bulkhead: log the unexpected exception and keep serving."""
        self._internal_errors += 1
        if self._limiter.allows(self._internal_errors):
            self._log.exception(
                "bug contained: the daemon raised in %s (%d so far)", where, self._internal_errors
            )
