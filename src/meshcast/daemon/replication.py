"""The daemon's side of bulk replication: clients' REPLICATE requests in, progress reports
out, the engine's control messages over the overlay (DATA for `Upper.REPLICATION`).

`DaemonReplication` wraps the sans-I/O `Replicator` for `DaemonNode`: it resolves a
request's targets (daemon names, "all" daemons of the view, or the daemons hosting a
group's members) and its buddy, keeps which client connection asked for which
replication, turns the engine's reports into REPLICATION frames, answers SET_RATE (a live
rate change, from any client of the origin), names the daemons stalled transfers wait on,
and holds control messages the overlay outbox cannot take yet (bounded; the engine's
reports are periodic, so the newest matter). Stream and file effects pass through to the
driver unchanged.

A replication to a group ("group:G") ends with one agreed event for G's members: from
its final report the origin builds a `BlobHeld` (who holds the blob, who misses what)
and hands its encoded body to `announce`, which sends it into G as a SAFE message
(docs/design/replicate.md, "Agreed completion"); events the group layer cannot take yet
wait here (bounded) and go out with the next `flush`.
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
    RecipientReport,
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
from meshcast.wire.client import (
    GROUP_TARGET_PREFIX,
    MAX_BLOB_REASON,
    MAX_REPLICATE_PATH,
    U64_MAX,
    BlobHeld,
    BlobMissing,
    ErrorCode,
    blob_held_body,
    clip_text,
    encode,
)

MAX_CONTROL_BACKLOG = 4096  # control messages waiting for the overlay outbox
MAX_REPORT_BYTES = 1024 * 1024  # a REPLICATION frame's JSON report
MAX_ANNOUNCEMENTS = 1024  # BLOB_HELD events waiting for the group layer
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
    buddy: str = ""  # (v6) the daemon name of the origin's buddy; "": none


@dataclass(frozen=True, slots=True)
class RateRefused(Exception):
    """A SET_RATE the daemon refuses: `code` and `text` go back in an ERROR."""

    code: ErrorCode
    text: str


# (conn, token, final, report JSON): what the node writes to a client
ReportWriter = Callable[[int, int, bool, bytes], None]
Multicast = Callable[[NodeId, bytes], list[DaemonEffect]]
# (group, BLOB_HELD body): send it into the group; raises BufferFull while it cannot yet
Announce = Callable[[str, bytes], list[DaemonEffect]]


class DaemonReplication:
    def __init__(
        self,
        replicator: Replicator,
        names: Mapping[NodeId, str],
        *,
        send_control: Multicast,
        write_report: ReportWriter,
        announce: Announce | None = None,
        enabled: bool = True,
    ) -> None:
        """Without `enabled` (no store) every request is answered at once as failed.
        Without `announce`, replications to a group end without a BLOB_HELD event."""
        self.replicator = replicator
        self.enabled = enabled
        self._names = names
        self._ids = {name: node for node, name in names.items()}
        self._send_control = send_control
        self._write_report = write_report
        self._askers: dict[int, tuple[int, int]] = {}  # rid -> (conn, token)
        self._backlog: deque[SendControl] = deque()
        self.controls_dropped = 0
        self._announce = announce
        # rid -> (group, recipients) of a replication to a group, until its final report
        self._group_targets: dict[int, tuple[str, tuple[NodeId, ...]]] = {}
        self._announcements: deque[tuple[str, bytes]] = deque()
        self.announcements_sent = 0
        self.announcements_dropped = 0

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
        send_denied: Callable[[str], str | None] = lambda group: None,
    ) -> None:
        """A client asks to replicate `ask.path`: start it, or answer with a failed report.
        `send_denied(G)` says why the client may not send to group G (None: it may): a
        replication to G ends with a message into G, so it is refused then."""
        try:
            if not self.enabled:
                raise UsageError(
                    "replication is not enabled on this daemon (it has no data directory, "
                    "or no cluster key for the streams)"
                )
            if ask.targets.startswith(GROUP_TARGET_PREFIX):
                denied = send_denied(ask.targets[len(GROUP_TARGET_PREFIX) :])
                if denied is not None:
                    raise UsageError(f"{denied}: the end of a replication to it is sent there")
            members = tuple(view)
            buddy = self._buddy(ask.buddy, members)
            recipients = self._targets(ask.targets, members, group_hosts, buddy)
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
                buddy=buddy,
            )
            rid, effects = self.replicator.request(request, now)
        except (UsageError, ValueError, IndexError) as exc:
            failed = ReplicationReport(0, ask.path, 0, "", "failed", 0.0, (), str(exc))
            self._write_report(conn, ask.token, True, self._json(failed))
            return
        self._askers[rid] = (conn, ask.token)
        if ask.targets.startswith(GROUP_TARGET_PREFIX):
            self.watch_group(rid, ask.targets[len(GROUP_TARGET_PREFIX) :], recipients)
        # at once: the client learns the replication's id (e.g. to change its rate)
        # while the daemon hashes the file
        name = ask.path.rsplit("/", 1)[-1]
        waiting = tuple(RecipientReport(n, "waiting", 0, 0, 0.0, None, "", "") for n in recipients)
        hashing = ReplicationReport(rid, name, 0, "", "hashing", 0.0, waiting)
        self._write_report(conn, ask.token, False, self._json(hashing))
        self.apply(effects, out)

    def set_rate(self, rid: int, rate: float, now: float, out: list[DaemonEffect]) -> None:
        """A client's SET_RATE: replication `rid`, which this daemon originates, may upload
        `rate` bytes/s per sender (0: no cap). `RateRefused` says why not."""
        role = self.replicator.runs(rid)
        if role is None:
            raise RateRefused(
                ErrorCode.UNKNOWN_REPLICATION, f"no replication {rid:016x} runs on this daemon"
            )
        if role != "origin":
            raise RateRefused(
                ErrorCode.NOT_THE_ORIGIN,
                f"this daemon receives replication {rid:016x}: ask its origin",
            )
        try:
            effects = self.replicator.set_rate(rid, rate or None, now)
        except UsageError as exc:
            raise RateRefused(ErrorCode.BAD_RATE, str(exc)) from None
        self.apply(effects, out)

    def _buddy(self, name: str, view: tuple[NodeId, ...]) -> NodeId | None:
        """The buddy's node id: a daemon of the view other than the origin."""
        if not name:
            return None
        node = self._ids.get(name)
        if node is None:
            raise UsageError(f"unknown daemon {name!r} as the buddy")
        if node == self.local:
            raise UsageError(f"the buddy {name} is the origin itself")
        if node not in view:
            raise UsageError(f"the buddy {name} is not in this daemon's view")
        return node

    def forget_client(self, conn: int) -> None:
        """The client is gone: its replications go on, unreported."""
        for rid, (c, _) in list(self._askers.items()):
            if c == conn:
                del self._askers[rid]

    def _targets(
        self,
        targets: str,
        view: Iterable[NodeId],
        group_hosts: Callable[[str], Iterable[NodeId]],
        buddy: NodeId | None = None,
    ) -> tuple[NodeId, ...]:
        """The recipients: "all" and "group:G" leave out the buddy (it holds the file);
        naming it as a recipient is an error."""
        if targets == "all":
            found = [n for n in view if n not in (self.local, buddy)]
        elif targets.startswith("group:"):
            group = targets[len("group:") :]
            found = sorted({n for n in group_hosts(group) if n not in (self.local, buddy)})
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
                if node == buddy:
                    raise UsageError(f"{name} is the buddy: it cannot be a recipient too")
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
                if effect.final and effect.rid in self._group_targets:
                    self._queue_event(effect.rid, effect.report)
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
        """Hand waiting control messages to the overlay while its outbox takes them, and
        waiting BLOB_HELD events to the group layer while it takes them."""
        while self._announcements and self._announce is not None:
            group, body = self._announcements[0]
            try:
                out.extend(self._announce(group, body))
            except BufferFull:
                break
            except UsageError:  # a bug: the event cannot be sent at all
                self.announcements_dropped += 1
            else:
                self.announcements_sent += 1
            self._announcements.popleft()
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
        return bool(self._backlog) or (bool(self._announcements) and self._announce is not None)

    # ------------------------------------------------------------ agreed completion

    def watch_group(self, rid: int, group: str, recipients: Iterable[NodeId]) -> None:
        """Replication `rid` (to `recipients`, the daemons hosting `group`'s members) ends
        with a BLOB_HELD event into `group` (made from its final report, in `apply`)."""
        self._group_targets[rid] = (group, tuple(recipients))

    def blob_held(
        self, group: str, recipients: Iterable[NodeId], report: ReplicationReport
    ) -> BlobHeld:
        """The event for `group` of a replication's final `report` to `recipients`."""
        name = self._name
        held = [name(self.local)] if report.digest else []  # the origin holds what it hashed
        missing: list[BlobMissing] = []
        reported = {r.node: r for r in report.recipients}
        for node in dict.fromkeys([*recipients, *reported]):  # targets first, in order
            r = reported.get(node)
            if r is not None and r.state == "complete":
                held.append(name(node))
                continue
            why = (r.detail or r.state) if r is not None else (report.detail or "never started")
            held_bytes = min(r.held_bytes, U64_MAX) if r is not None else 0
            missing.append(BlobMissing(name(node), held_bytes, clip_text(why, MAX_BLOB_REASON)))
        return BlobHeld(
            group=group,
            rid=f"{report.rid:016x}",
            name=clip_text(report.name, MAX_REPLICATE_PATH),
            size=report.size,
            digest=report.digest,
            origin=name(self.local),
            complete=report.state == "complete" and not missing,
            held_by=tuple(held),
            missing=tuple(missing),
        )

    def _queue_event(self, rid: int, report: ReplicationReport) -> None:
        group, recipients = self._group_targets.pop(rid)
        if self._announce is None:
            return
        event = self.blob_held(group, recipients, report)
        try:
            encode(event)  # checked once here, so that the body sent is valid
        except ValueError:
            self.announcements_dropped += 1
            return
        self._announcements.append((group, blob_held_body(event)))
        if len(self._announcements) > MAX_ANNOUNCEMENTS:
            self._announcements.popleft()
            self.announcements_dropped += 1

    def _name(self, node: NodeId) -> str:
        return self._names.get(node, str(int(node)))

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
                    "stalled": None if r.stalled is None else round(r.stalled, 3),
                }
                for r in report.recipients
            ],
        }

    def transfers(self, now: float | None = None) -> list[dict[str, object]]:
        """The engine's transfers (stalled as of `now`), each stalled one's peers also by
        daemon name."""
        out = []
        for entry in self.replicator.transfers(now)[:64]:
            stalled = entry.get("stalled")
            if isinstance(stalled, dict):
                waiting = stalled.get("waiting_on")
                ids = waiting if isinstance(waiting, list) else []
                names = [self._names.get(NodeId(n), str(n)) for n in ids]
                entry = {**entry, "stalled": {**stalled, "waiting_on_daemons": names}}
            out.append(entry)
        return out

    def _json(self, report: ReplicationReport) -> bytes:
        data = json.dumps(self.report_dict(report), separators=(",", ":")).encode()
        if len(data) > MAX_REPORT_BYTES:  # thousands of recipients: keep the summary
            slim = self.report_dict(report)
            slim["recipients"] = []
            slim["detail"] = f"{report.detail} (recipients left out: report too large)"
            data = json.dumps(slim, separators=(",", ":")).encode()
        return data

    def status(self, now: float | None = None) -> dict[str, object]:
        s = self.replicator.statistics()
        return {
            "replications": [self.report_dict(r) for r in self.replicator.reports()][:32],
            "transfers": self.transfers(now),
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
                "blob_events_sent": self.announcements_sent,
                "blob_events_dropped": self.announcements_dropped,
            },
        }
