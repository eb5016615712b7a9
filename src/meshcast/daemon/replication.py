"""The daemon's side of bulk replication: clients' REPLICATE requests in, progress reports
out, the engine's control messages over the overlay (DATA for `Upper.REPLICATION`).

`DaemonReplication` wraps the sans-I/O `Replicator` for `DaemonNode`: it resolves a
request's targets (daemon names, "all" daemons of the view, or the daemons hosting a
group's members), keeps which client connection asked for which replication, turns the
engine's reports into REPLICATION frames, and holds control messages the overlay outbox
cannot take yet (bounded; the engine's reports are periodic, so the newest matter).
Stream and file effects pass through to the driver unchanged.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from meshcast.daemon.effects import DaemonEffect, DaemonEvent
from meshcast.errors import BufferFull, UsageError
from meshcast.ids import NodeId
from meshcast.replicate.engine import (
    BeginCopy,
    CloseStream,
    Finalize,
    HashFile,
    OpenStream,
    ReplicationEffect,
    ReplicationEvent,
    ReplicationReport,
    ReplicationRequest,
    ReplicationUpdate,
    Replicator,
    SendControl,
    StreamSend,
)
from meshcast.replicate.plan import Strategy, Tree, Variant

MAX_CONTROL_BACKLOG = 4096  # control messages waiting for the overlay outbox
MAX_REPORT_BYTES = 1024 * 1024  # a REPLICATION frame's JSON report
_STRATEGIES = list(Strategy)
_TREES = list(Tree)


@dataclass(frozen=True, slots=True)
class ReplicateAsk:
    """A client's REPLICATE request, decoded (plain values: the wire knows no enums)."""

    token: int
    path: str
    targets: str  # "all", "name,name,...", or "group:G"
    dest: str
    rate: float  # bytes/s per sender; 0: no cap
    strategy: int
    variant: int
    tree: int
    max_connections: int
    capacity_aware: bool


# (conn, token, final, report JSON): what the node writes to a client
ReportWriter = Callable[[int, int, bool, bytes], None]
Multicast = Callable[[NodeId, bytes], list[DaemonEffect]]


class DaemonReplication:
    def __init__(
        self,
        replicator: Replicator,
        names: Mapping[NodeId, str],
        *,
        send_control: Multicast,
        write_report: ReportWriter,
        enabled: bool = True,
    ) -> None:
        """Without `enabled` (no store) every request is answered at once as failed."""
        self.replicator = replicator
        self.enabled = enabled
        self._names = names
        self._ids = {name: node for node, name in names.items()}
        self._send_control = send_control
        self._write_report = write_report
        self._askers: dict[int, tuple[int, int]] = {}  # rid -> (conn, token)
        self._backlog: deque[SendControl] = deque()
        self.controls_dropped = 0

    @property
    def local(self) -> NodeId:
        return self.replicator.local

    # ------------------------------------------------------------ client requests

    def request(
        self,
        conn: int,
        ask: ReplicateAsk,
        now: float,
        *,
        view: Iterable[NodeId],
        group_hosts: Callable[[str], Iterable[NodeId]],
        out: list[DaemonEffect],
    ) -> None:
        """A client asks to replicate `ask.path`: start it, or answer with a failed report."""
        try:
            if not self.enabled:
                raise UsageError(
                    "replication is not enabled on this daemon (it has no data directory, "
                    "or no cluster key for the streams)"
                )
            recipients = self._targets(ask.targets, view, group_hosts)
            request = ReplicationRequest(
                path=ask.path,
                recipients=recipients,
                strategy=_STRATEGIES[ask.strategy],
                max_connections=ask.max_connections,
                variant=Variant(ask.variant),
                tree=_TREES[ask.tree],
                capacity_aware=ask.capacity_aware,
                rate=ask.rate or None,
                dest=ask.dest,
            )
            rid, effects = self.replicator.request(request, now)
        except (UsageError, ValueError, IndexError) as exc:
            failed = ReplicationReport(0, ask.path, 0, "", "failed", 0.0, (), str(exc))
            self._write_report(conn, ask.token, True, self._json(failed))
            return
        self._askers[rid] = (conn, ask.token)
        self.apply(effects, out)

    def forget_client(self, conn: int) -> None:
        """The client is gone: its replications go on, unreported."""
        for rid, (c, _) in list(self._askers.items()):
            if c == conn:
                del self._askers[rid]

    def _targets(
        self, targets: str, view: Iterable[NodeId], group_hosts: Callable[[str], Iterable[NodeId]]
    ) -> tuple[NodeId, ...]:
        if targets == "all":
            found = [n for n in view if n != self.local]
        elif targets.startswith("group:"):
            group = targets[len("group:") :]
            found = sorted({n for n in group_hosts(group) if n != self.local})
            if not found:
                raise UsageError(f"no other daemon hosts a member of group {group!r}")
        else:
            found = []
            for name in (t.strip() for t in targets.split(",")):
                if name not in self._ids:
                    raise UsageError(f"unknown daemon {name!r}")
                node = self._ids[name]
                if node == self.local:
                    raise UsageError(f"{name} is the origin itself")
                if node not in found:
                    found.append(node)
        if not found:
            raise UsageError("no recipients: no other daemon is in the view")
        return tuple(found)

    # ------------------------------------------------------------ the engine's effects

    def apply(self, effects: Iterable[ReplicationEffect], out: list[DaemonEffect]) -> None:
        for effect in effects:
            if isinstance(
                effect, (StreamSend, OpenStream, CloseStream, HashFile, BeginCopy, Finalize)
            ):
                out.append(effect)
            elif isinstance(effect, SendControl):
                self._backlog.append(effect)
                if len(self._backlog) > MAX_CONTROL_BACKLOG:
                    self._backlog.popleft()
                    self.controls_dropped += 1
            elif isinstance(effect, ReplicationUpdate):
                asker = self._askers.get(effect.rid)
                if asker is not None:
                    self._write_report(asker[0], asker[1], effect.final, self._json(effect.report))
                    if effect.final:
                        del self._askers[effect.rid]
            elif isinstance(effect, ReplicationEvent):
                out.append(DaemonEvent(effect.name, effect.fields, effect.level))
            else:  # pragma: no cover - every effect type has a case above
                raise AssertionError(f"unknown replication effect {effect!r}")
        self.flush(out)

    def flush(self, out: list[DaemonEffect]) -> None:
        """Hand waiting control messages to the overlay while its outbox takes them."""
        while self._backlog:
            control = self._backlog[0]
            try:
                out.extend(self._send_control(control.dest, control.payload))
            except BufferFull:
                return
            except UsageError:  # leaving, or the destination is gone
                self.controls_dropped += 1
            self._backlog.popleft()

    def has_backlog(self) -> bool:
        return bool(self._backlog)

    # ------------------------------------------------------------ reports

    def report_dict(self, report: ReplicationReport) -> dict[str, object]:
        return {
            "rid": f"{report.rid:016x}",
            "name": report.name,
            "size": report.size,
            "digest": report.digest,
            "state": report.state,
            "elapsed": round(report.elapsed, 6),
            "detail": report.detail,
            "recipients": [
                {
                    "daemon": self._names.get(r.node, str(int(r.node))),
                    "state": r.state,
                    "held_bytes": r.held_bytes,
                    "bad_chunks": r.bad_chunks,
                    "rate": round(max(0.0, r.rate), 1),
                    "eta": None if r.eta is None else round(max(0.0, r.eta), 3),
                    "detail": r.detail,
                    "path": r.path or None,
                }
                for r in report.recipients
            ],
        }

    def _json(self, report: ReplicationReport) -> bytes:
        data = json.dumps(self.report_dict(report), separators=(",", ":")).encode()
        if len(data) > MAX_REPORT_BYTES:  # thousands of recipients: keep the summary
            slim = self.report_dict(report)
            slim["recipients"] = []
            slim["detail"] = f"{report.detail} (recipients left out: report too large)"
            data = json.dumps(slim, separators=(",", ":")).encode()
        return data

    def status(self) -> dict[str, object]:
        s = self.replicator.statistics()
        return {
            "replications": [self.report_dict(r) for r in self.replicator.reports()][:32],
            "transfers": self.replicator.transfers()[:64],
            "counters": {
                "started": s.replications_started,
                "completed": s.replications_completed,
                "failed": s.replications_failed,
                "copies_completed": s.copies_completed,
                "copies_failed": s.copies_failed,
                "bytes_sent": s.bytes_sent,
                "bytes_received": s.bytes_received,
                "bytes_skipped": s.bytes_skipped,
                "chunks_bad": s.chunks_bad,
                "chunks_duplicate": s.chunks_duplicate,
                "streams_failed": s.streams_failed,
                "streams_refused": s.streams_refused,
                "malformed": s.malformed,
                "suspects": s.suspects,
                "repairs_opened": s.repairs_opened,
                "feeds_retried": s.feeds_retried,
                "controls_dropped": self.controls_dropped,
            },
        }
