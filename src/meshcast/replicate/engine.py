"""The sans-I/O replication engine of one daemon: `Replicator`.

It plays every role a daemon can have in any number of replications at once: the origin
(hashes are computed by its driver, then it offers subfiles to the first group), a
recipient (verifies, stores and forwards each chunk the moment it holds it — fast-forward),
and the sender of every feed the plan gives it. The same object runs in the simulator
(`meshcast.sim.replication`) and in the daemon (`meshcast.daemon.node`), which carries out
its effects on real secure streams and files.

Inputs (each returns the effects it caused):

* `request(request, now)` at the origin: asks the driver to hash the file (`HashFile`),
  then `hashed(rid, manifest | error, now)` starts the transfer.
* `stream_accepted(stream, peer, now)`, `stream_data(stream, data, now)`,
  `stream_drained(stream, now)`, `stream_closed(stream, error, now)`: the driver's streams.
  Streams this engine opens have ids below `INBOUND_STREAM_BASE`; the driver numbers the
  ones it accepts from `INBOUND_STREAM_BASE` up.
* `control_received(source, payload, now)`: PROGRESS reports, FETCH and RATE (overlay
  DATA, REPLICATION).
* `set_rate(rid, rate | None, now)` at the origin: a new upload cap for one replication,
  applied here and sent (RATE) to every participant, which applies it to its feeds at once.
* `finalized(rid, path | None, error, now)`: the store renamed a complete copy into place.
* `on_timer(now)` at `next_deadline()`: the upload shaper and the progress reports.
* `view_changed(members, now)`: the daemons alive (the overlay's agreed view): a
  participant that left is repaired around; one that came back is fed again.

Failures (seed 002 [0071]-[0098]): a stream that breaks before its END makes its node a
suspect; the origin (its buddy, if the suspect is the origin) tells every participant to
repair around it (REPAIR), and a view without the node does the same at every node. The
repair itself is `plan.repair`, the same pure function at every node; a node opens the
replacement feeds it is the sender of, and a broken feed to a node still in the view is
opened again (with back-off: a restarted daemon resumes from its verified chunks), and a
node back in the view is fed again by its senders, even by feeds that had ended (their tail
may have been lost in flight when it died).

Scheduling: a node serves its feeds in the plan's priority order (tree edges before
collection, after-complete feeds last) and shares equally among feeds of one priority,
weighted by their sizes (so subfiles sized to capacities finish together). Its upload is
shaped by token buckets (`meshcast.replicate.shaper`): one for the whole daemon (its
configured rate) and one for each replication with a cap of its own; a chunk goes out when
both allow it, and a feed whose replication must wait steps aside for the others. With a
cap the order of its writes is the order on the wire.

Stall diagnosis: `transfers()` calls a transfer stalled once it made no progress for
`stall_after` and names the peers it waits on (silent or missing feeders, receivers that
take nothing, recipients that stopped reporting).

Theory of operation: docs/design/replicate.md.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

from meshcast.errors import DecodeError, ReplicationError, UsageError
from meshcast.ids import NodeId
from meshcast.replicate.effects import (
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
    ReplicatorConfig,
    ReplicatorStats,
    SendControl,
    StreamSend,
)
from meshcast.replicate.manifest import Manifest
from meshcast.replicate.messages import (
    MAX_RECIPIENTS,
    Chunk,
    Done,
    End,
    Fetch,
    Have,
    Offer,
    Progress,
    Rate,
    ReceiverState,
    RepairAround,
    Suspect,
    decode_control,
    decode_stream_message,
    encode_chunk_head,
    encode_control,
    encode_stream_message,
)
from meshcast.replicate.plan import (
    Feed,
    FeedKind,
    PlanSpec,
    make_plan,
    repair,
)
from meshcast.replicate.shaper import TokenBucket
from meshcast.replicate.store import ChunkStore
from meshcast.replicate.transfer import (
    STATE_NAME,
    STATE_RANK,
    Deframer,
    FeedOut,
    Recipient,
    Transfer,
    merged_ranges,
    ranges_of,
)

__all__ = [
    "INBOUND_STREAM_BASE",
    "BeginCopy",
    "CloseStream",
    "Finalize",
    "HashFile",
    "OpenStream",
    "RecipientReport",
    "ReplicationEffect",
    "ReplicationEvent",
    "ReplicationReport",
    "ReplicationRequest",
    "ReplicationUpdate",
    "Replicator",
    "ReplicatorConfig",
    "ReplicatorStats",
    "SendControl",
    "StreamSend",
]

INBOUND_STREAM_BASE = 1 << 32
MAX_DEST = 4096  # bytes: a request's dest directory (a path; the OFFER carries it)
# replications this node took part in and forgot, remembered so that a late OFFER of one
# (a feeder that joined after this copy was done) is answered, not joined all over again
MAX_FORGOTTEN = 4096
# a feed whose stream broke is opened again after FEED_RETRY_FIRST s, doubling up to
# FEED_RETRY_MAX s, at most MAX_FEED_RETRIES times (a view change back resets the count)
FEED_RETRY_FIRST = 0.5
FEED_RETRY_MAX = 8.0
MAX_FEED_RETRIES = 8
# RATEs of replications not joined yet (the RATE overtook their first OFFER), kept for
# their join: (origin, rate) by rid
MAX_EARLY_RATES = 64


# ---------------------------------------------------------------- statistics


@dataclass(slots=True)
class _Counters:
    """The cumulative counters of `ReplicatorStats`, bumped in place."""

    replications_started: int = 0
    replications_completed: int = 0
    replications_failed: int = 0
    copies_completed: int = 0
    copies_failed: int = 0
    chunks_received: int = 0
    chunks_duplicate: int = 0
    chunks_bad: int = 0
    reports_stale: int = 0
    repairs_sent: int = 0
    chunks_sent: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    bytes_skipped: int = 0
    streams_opened: int = 0
    streams_accepted: int = 0
    streams_failed: int = 0
    streams_refused: int = 0
    malformed: int = 0
    suspects: int = 0
    repairs_opened: int = 0
    feeds_retried: int = 0


# ---------------------------------------------------------------- the engine


class Replicator:
    """Bulk replication at one daemon (see the module docstring)."""

    def __init__(
        self,
        local: NodeId,
        store: ChunkStore,
        config: ReplicatorConfig | None = None,
        *,
        rng: random.Random,
        capacities: Mapping[NodeId, float] | None = None,
    ) -> None:
        """`capacities`: upload bits/s per daemon (the cluster file's `upload`), for
        capacity-aware plans."""
        self.local = local
        self.config = config or ReplicatorConfig()
        self._store = store
        self._rng = rng
        self._capacities = dict(capacities or {})
        self._transfers: dict[int, Transfer] = {}
        self._pending: dict[int, tuple[ReplicationRequest, float]] = {}  # hashing
        self._stream_ids = itertools.count(1)
        self._outs: dict[int, FeedOut] = {}  # stream -> the feed it carries
        self._ins: dict[int, Transfer | None] = {}  # accepted stream -> its transfer
        self._peers: dict[int, NodeId] = {}
        self._deframers: dict[int, Deframer] = {}
        self._heap: list[tuple[int, float, int, FeedOut]] = []
        self._heap_seq = itertools.count()
        # the daemon's whole upload, and each capped replication's (by rid)
        self._bucket = TokenBucket(self.config.rate or 0.0, 0.0, self.config.burst_seconds)
        self._buckets: dict[int, TokenBucket] = {}
        self._early_rates: OrderedDict[int, tuple[NodeId, float]] = OrderedDict()
        self._wake_at: float | None = None
        self._fresh: dict[tuple[int, int], memoryview] = {}  # chunks received this input
        self._now = 0.0
        self._c = _Counters()
        self._forgotten: OrderedDict[int, bool] = OrderedDict()  # rid -> copy complete
        self._members: frozenset[NodeId] | None = None  # the view (None: not known yet)
        self._ended_ins: set[int] = set()  # accepted streams whose END arrived
        self._mirrors: dict[int, Transfer] = {}  # the buddy's transfers being hashed

    # ------------------------------------------------------------ queries

    def next_deadline(self) -> float | None:
        deadline = self._wake_at
        for t in self._transfers.values():
            if t.report_due is not None and (deadline is None or t.report_due < deadline):
                deadline = t.report_due
            for when in (self._stall_deadline(t), self._linger_deadline(t)):
                if when is not None and (deadline is None or when < deadline):
                    deadline = when
            for o in t.retries:
                if o.retry_at is not None and (deadline is None or o.retry_at < deadline):
                    deadline = o.retry_at
        return deadline

    def _linger_deadline(self, t: Transfer) -> float | None:
        """When a finished copy (or the buddy) that was never told DONE forgets the
        replication (it stays to serve repairs until then)."""
        if t.is_origin or t.done or t.state == ReceiverState.RECEIVING or t.opening:
            return None
        return t.last_activity + self.config.give_up_after

    def _stall_deadline(self, t: Transfer) -> float | None:
        """When a copy that stopped receiving is given up here (None: not receiving, or
        fed after its feeders complete: then a long wait is the plan, and the origin
        decides when the replication has stalled)."""
        if t.is_origin or t.is_buddy or t.state != ReceiverState.RECEIVING or t.opening:
            return None
        if t.fed_late and t.spec.origin not in t.departed:
            return None
        return t.last_progress + self.config.give_up_after

    def memory(self) -> int:
        """Bytes held for others: partly received stream messages."""
        return sum(d.buffered for d in self._deframers.values())

    def statistics(self) -> ReplicatorStats:
        c = self._c
        return ReplicatorStats(
            replications_started=c.replications_started,
            replications_completed=c.replications_completed,
            replications_failed=c.replications_failed,
            copies_completed=c.copies_completed,
            copies_failed=c.copies_failed,
            chunks_received=c.chunks_received,
            chunks_duplicate=c.chunks_duplicate,
            chunks_bad=c.chunks_bad,
            reports_stale=c.reports_stale,
            repairs_sent=c.repairs_sent,
            chunks_sent=c.chunks_sent,
            bytes_received=c.bytes_received,
            bytes_sent=c.bytes_sent,
            bytes_skipped=c.bytes_skipped,
            streams_opened=c.streams_opened,
            streams_accepted=c.streams_accepted,
            streams_failed=c.streams_failed,
            streams_refused=c.streams_refused,
            malformed=c.malformed,
            suspects=c.suspects,
            repairs_opened=c.repairs_opened,
            feeds_retried=c.feeds_retried,
            transfers=len(self._transfers),
            streams=len(self._outs) + len(self._ins),
        )

    def reports(self) -> list[ReplicationReport]:
        """The replications this node originated and still runs."""
        return [self._report(t) for t in self._transfers.values() if t.is_origin]

    def transfers(self, now: float | None = None) -> list[dict[str, object]]:
        """This node's part in each replication (for status). `stalled` is None, or
        ``{"for": s, "waiting_on": [node ids], "why": text}`` once it made no progress for
        `stall_after` (at `now`, default the time of the latest input)."""
        at = self._now if now is None else max(now, self._now)
        return [
            {
                "rid": f"{t.rid:016x}",
                "name": t.manifest.name,
                "role": "origin" if t.is_origin else "buddy" if t.is_buddy else "recipient",
                "state": t.state.name.lower(),
                "held_bytes": t.held_bytes,
                "size": t.manifest.size,
                "feeds_out": len(t.outs),
                "feeds_in": len(t.ins),
                "repairing_around": sorted(int(n) for n in t.failed),
                "rate": t.rate,
                "detail": t.detail,
                "stalled": self._stalled(t, at),
            }
            for t in self._transfers.values()
        ]

    def runs(self, rid: int) -> Literal["origin", "recipient"] | None:
        """This node's role in replication `rid` (None: it takes no part in it now)."""
        if rid in self._pending:
            return "origin"
        t = self._transfers.get(rid)
        if t is None:
            return None
        return "origin" if t.is_origin else "recipient"

    def _stalled(self, t: Transfer, now: float) -> dict[str, object] | None:
        """Why `t` made no progress for `stall_after`, and on whom it waits (None: it
        did progress). Computed when asked: no timer runs for it."""
        after = self.config.stall_after
        waiting: dict[NodeId, None] = {}  # (ordered, without repeats)
        whys: list[str] = []
        idle = 0.0
        if not t.is_origin and t.state == ReceiverState.RECEIVING and not t.opening:
            quiet = now - t.last_progress
            silent, missing = self._silent_feeders(t, now) if quiet >= after else ([], [])
            if silent or missing:  # (else it only waits for after-complete feeds: the plan)
                idle = quiet
                waiting.update(dict.fromkeys(silent + missing))
                if silent:
                    whys.append(f"no data from {len(silent)} feeders for {after:g} s")
                if missing:
                    whys.append(f"{len(missing)} feeders have opened no stream")
        blocked = [
            o
            for o in t.outs
            if not o.ended
            and not o.failed
            and (not o.remote_known or o.outstanding)
            and now - o.progress_at >= after
        ]
        if blocked:
            idle = max(idle, max(now - o.progress_at for o in blocked))
            waiting.update(dict.fromkeys(o.feed.receiver for o in blocked))
            whys.append(f"{len(blocked)} receivers take no data")
        if t.is_origin and not t.finished and now - t.last_progress >= after and not blocked:
            idle = max(idle, now - t.last_progress)
            quiet_ones = [
                r.node
                for r in t.recipients.values()
                if r.state not in ("complete", "failed")
                and now - (t.started if r.last_at is None else r.last_at) >= after
            ]
            waiting.update(dict.fromkeys(quiet_ones))
            whys.append(f"no progress report from {len(quiet_ones)} recipients")
        if not whys:
            return None
        return {
            "for": round(idle, 3),
            "waiting_on": [int(n) for n in waiting],
            "why": "; ".join(whys),
        }

    def _silent_feeders(self, t: Transfer, now: float) -> tuple[list[NodeId], list[NodeId]]:
        """The feeders of copy `t` whose open stream brought nothing for `stall_after`, and
        the planned feeders that owe chunks and have no stream open. A feeder whose feeds
        to us all start once it holds them (after-complete) is silent by plan: its own
        copy's stall, if any, is diagnosed where it is."""
        after = self.config.stall_after
        feeds = t.plan.feeds_to(self.local)
        late = {f.sender for f in feeds} - {f.sender for f in feeds if not f.after_complete}
        open_from = {self._peers[s] for s in t.ins if s in self._peers}
        silent = sorted(
            peer for peer in open_from - late if now - t.fed_at.get(peer, t.started) >= after
        )
        missing: list[NodeId] = []
        for feed in feeds:
            if feed.sender in open_from or feed.sender in missing:
                continue
            chunks = merged_ranges(t.plan.subfiles[i] for i in feed.subfiles)
            if not all(all(t.held[first:end]) for first, end in chunks):
                missing.append(feed.sender)
        return silent, missing

    def set_rate(self, rid: int, rate: float | None, now: float) -> list[ReplicationEffect]:
        """At the origin: replication `rid` may upload `rate` bytes/s per sender from now
        on (None: no cap beyond each daemon's own). Applied here at once and sent (RATE)
        to every recipient, which applies it to its own feeds of the replication.
        UsageError: not a replication this node originates and runs, or a bad rate (not
        positive and finite, or so low that one chunk takes half of `give_up_after`)."""
        self._now = now
        if rate is not None and not 0 < rate < math.inf:
            raise UsageError(f"the rate must be positive and finite (or none), not {rate!r}")
        pending = self._pending.get(rid)
        if pending is not None:  # still hashing: the plan will carry it
            self._pending[rid] = (replace(pending[0], rate=rate), pending[1])
            return []
        t = self._transfers.get(rid)
        if t is None or t.finished:
            raise UsageError(f"no replication {rid:016x} runs here")
        if not t.is_origin:
            raise UsageError(f"this daemon is not the origin of replication {rid:016x}")
        chunk = t.manifest.chunk_size
        if rate is not None and rate * self.config.give_up_after < 2 * chunk:
            raise UsageError(
                f"a rate of {rate:g} bytes/s is too low: one chunk of {chunk} bytes would "
                f"take more than half of give_up_after ({self.config.give_up_after:g} s)"
            )
        out: list[ReplicationEffect] = []
        self._apply_rate(t, rate or 0.0)
        payload = encode_control(Rate(rid, t.rate))
        out.extend(SendControl(node, payload) for node in sorted(t.participants - {self.local}))
        out.append(
            ReplicationEvent("replication_rate_changed", {"rid": f"{rid:016x}", "rate": t.rate})
        )
        self._pump(out)
        return out

    def _apply_rate(self, t: Transfer, rate: float) -> None:
        t.rate = rate
        bucket = self._buckets.get(t.rid)
        if bucket is not None:
            bucket.set_rate(rate, self._now)
        for o in t.outs:
            self._wake(o)

    def _on_rate(self, source: NodeId, message: Rate) -> list[ReplicationEffect]:
        """The origin changed a replication's cap: apply it to our feeds of it."""
        t = self._transfers.get(message.rid)
        if t is None:
            if message.rid not in self._forgotten:  # its OFFER has not come yet
                self._early_rates[message.rid] = (source, message.rate)
                while len(self._early_rates) > MAX_EARLY_RATES:
                    self._early_rates.popitem(last=False)
            return []
        if t.is_origin or source != t.spec.origin:
            self._c.malformed += 1  # only the origin sets a replication's rate
            return []
        out: list[ReplicationEffect] = []
        self._apply_rate(t, message.rate)
        self._pump(out)
        return out

    def _take_early_rate(self, t: Transfer) -> None:
        early = self._early_rates.pop(t.rid, None)
        if early is not None and early[0] == t.spec.origin:
            t.rate = early[1]

    # ------------------------------------------------------------ origin

    def request(
        self, request: ReplicationRequest, now: float
    ) -> tuple[int, list[ReplicationEffect]]:
        """Start replicating `request.path`; returns the replication id and the effects."""
        self._now = now
        if len(self._transfers) + len(self._pending) >= self.config.max_transfers:
            raise UsageError(f"this daemon runs {self.config.max_transfers} replications already")
        if not request.recipients:
            raise UsageError("a replication needs at least one recipient")
        if self.local in request.recipients:
            raise UsageError("the origin cannot be one of its own recipients")
        if request.rate is not None and not 0 < request.rate < math.inf:
            raise UsageError("the rate must be positive and finite")
        if len(request.recipients) > MAX_RECIPIENTS:
            raise UsageError(f"more than {MAX_RECIPIENTS} recipients")
        if not 1 <= request.max_connections <= 255:
            raise UsageError("max_connections must be 1 to 255")
        try:
            dest_bytes = len(request.dest.encode())
        except UnicodeEncodeError as exc:
            raise UsageError("the dest directory is not valid text") from exc
        if dest_bytes > MAX_DEST:
            raise UsageError(f"the dest directory is longer than {MAX_DEST} bytes")
        rid = self._rng.getrandbits(64) or 1
        self._pending[rid] = (request, now)
        return rid, [HashFile(rid, request.path)]

    def hashed(
        self, rid: int, manifest: Manifest | None, error: str | None, now: float
    ) -> list[ReplicationEffect]:
        self._now = now
        if rid in self._mirrors:
            return self._mirror_hashed(self._mirrors.pop(rid), manifest, error)
        pending = self._pending.pop(rid, None)
        if pending is None:
            return []
        request, asked = pending
        out: list[ReplicationEffect] = []
        if manifest is None:
            self._c.replications_failed += 1
            report = ReplicationReport(
                rid, request.path, 0, "", "failed", now - asked, (), error or ""
            )
            out.append(ReplicationUpdate(rid, report, final=True))
            return out
        caps = None
        if request.capacity_aware:
            caps = tuple(self._capacities.get(n, 0.0) for n in (self.local, *request.recipients))
            if not all(c > 0 for c in caps):
                caps = None
        spec = PlanSpec(
            origin=self.local,
            recipients=request.recipients,
            chunk_count=manifest.chunk_count,
            strategy=request.strategy,
            max_connections=request.max_connections,
            variant=request.variant,
            tree=request.tree,
            capacities=caps,
            capacity_aware=request.capacity_aware and caps is not None,
            buddy=request.buddy,
        )
        try:
            plan = make_plan(spec)
            self._store.open_source(manifest, request.path)
        except (UsageError, ReplicationError) as exc:
            self._c.replications_failed += 1
            report = ReplicationReport(
                rid,
                manifest.name,
                manifest.size,
                manifest.digest.hex(),
                "failed",
                now - asked,
                (),
                str(exc),
            )
            out.append(ReplicationUpdate(rid, report, final=True))
            return out
        t = Transfer(
            rid, manifest, plan, rate=request.rate or 0.0, dest=request.dest, origin=True, now=asked
        )
        t.store_open = True
        t.source = request.path
        t.held = bytearray(b"\x01" * manifest.chunk_count)
        t.held_count = manifest.chunk_count
        t.held_bytes = manifest.size
        t.state = ReceiverState.COMPLETE
        t.recipients = {n: Recipient(n) for n in request.recipients}
        t.report_due = now
        self._transfers[rid] = t
        self._c.replications_started += 1
        out.append(
            ReplicationEvent(
                "replication_started",
                {
                    "rid": f"{rid:016x}",
                    "file": manifest.name,
                    "bytes": manifest.size,
                    "recipients": len(request.recipients),
                    "k": plan.k,
                    "strategy": str(spec.strategy),
                },
            )
        )
        # the buddy (mirroring the file at the same path) hears of it first: if this node
        # dies early, it is the only one left that can send the whole file
        if spec.buddy is not None:
            feed = Feed(self.local, spec.buddy, (), FeedKind.MIRROR)
            self._open_feed(t, feed, (), out, source=request.path)
        self._open_feeds(t, out)
        self._pump(out)
        return out

    def _mirror_hashed(
        self, t: Transfer, manifest: Manifest | None, error: str | None
    ) -> list[ReplicationEffect]:
        """The buddy hashed its mirror of the file: it can repair if the digest matches,
        else it tells the origin to repair around it."""
        out: list[ReplicationEffect] = []
        if self._transfers.get(t.rid) is not t:
            return out
        if manifest is not None and manifest.digest != t.digest:
            error = "its copy differs from the origin's"
        if manifest is not None and error is None:
            try:
                self._store.open_source(t.manifest, t.source)
            except ReplicationError as exc:
                error = str(exc)
        if error is not None:
            self._fail_copy(t, f"cannot mirror {t.source}: {error}", out)
            out.append(SendControl(t.spec.origin, encode_control(Suspect(t.rid, self.local))))
            self._maybe_forget(t)
            return out
        t.store_open = True
        t.held = bytearray(b"\x01" * t.manifest.chunk_count)
        t.held_count = t.manifest.chunk_count
        t.held_bytes = t.manifest.size
        t.state = ReceiverState.COMPLETE
        out.append(
            ReplicationEvent("replication_buddy_ready", {"rid": f"{t.rid:016x}", "path": t.source})
        )
        for o in t.outs:
            self._wake(o)
        self._pump(out)
        return out

    # ------------------------------------------------------------ failures

    def view_changed(self, members: frozenset[NodeId], now: float) -> list[ReplicationEffect]:
        """The daemons alive now (the overlay's agreed view)."""
        self._now = now
        self._members = members
        out: list[ReplicationEffect] = []
        for t in list(self._transfers.values()):
            gone = t.participants - members
            back = t.departed - gone
            new = gone - t.departed
            t.departed = gone
            for node in back:
                self._rejoined(t, node, out)
            if new:
                self._departed(t, new, out)
        self._pump(out)
        return out

    def _departed(self, t: Transfer, nodes: set[NodeId], out: list[ReplicationEffect]) -> None:
        for stream, peer in list(self._peers.items()):
            if peer not in nodes:
                continue
            o = self._outs.get(stream)
            if o is not None and o.transfer is t:
                self._drop_stream(stream, f"daemon {peer} left the view", out)
                if o.attempts < MAX_FEED_RETRIES:  # opened again if it comes back
                    o.retry_at = None
                    t.retries.append(o)
            elif self._ins.get(stream) is t:
                self._drop_stream(stream, f"daemon {peer} left the view", out)
        if t.is_origin:
            for node in nodes:
                r = t.recipients.get(node)
                if r is not None and r.state not in ("complete", "failed"):
                    r.state, r.departed = "failed", True
                    r.detail = f"daemon {node} left the view during the transfer"
        self._repair_around(t, nodes, out)
        if (
            t.is_origin
            and t.recipients
            and all(x.state in ("complete", "failed") for x in t.recipients.values())
        ):
            self._finish_origin(t, out)

    def _rejoined(self, t: Transfer, node: NodeId, out: list[ReplicationEffect]) -> None:
        """`node` is back in the view: feed it again (a restarted daemon resumes)."""
        if t.is_origin:
            r = t.recipients.get(node)
            if r is not None and r.departed:
                r.state, r.departed, r.rank = "waiting", False, -1
                r.detail = f"daemon {node} is back"
        for o in t.retries:
            if o.feed.receiver == node:
                o.attempts = 0
                o.retry_at = self._now
        # no longer repaired around: a later repair must feed it too (and if it fails
        # again, it is repaired around again)
        t.failed.discard(node)
        self._feed_again(t, node, out)

    def _feed_again(self, t: Transfer, node: NodeId, out: list[ReplicationEffect]) -> None:
        """Open again the feeds this node sends to `node` (planned, or in place of failed
        senders) that are neither open nor waiting to be retried: a feed that had ended
        here may have lost its tail in flight when `node` died, and the restarted daemon
        tells what it holds (HAVE), so only what it lacks is sent."""
        if t.finished or t.done or t.state == ReceiverState.FAILED:
            return
        wanted = [f for f in t.plan.feeds_to(node) if f.sender not in t.failed]
        wanted += [f for f in repair(t.plan, t.failed).feeds if f.receiver == node]
        covered = {
            s
            for o in [*t.retries, *(o for o in t.outs if not o.ended)]
            if o.feed.receiver == node
            for s in o.feed.subfiles
        }
        for feed in wanted:
            if feed.sender != self.local:
                continue
            subfiles = tuple(s for s in feed.subfiles if s not in covered)
            if not subfiles:
                continue
            covered.update(subfiles)
            self._c.feeds_retried += 1
            ranges = merged_ranges(t.plan.subfiles[s] for s in subfiles)
            self._open_feed(t, replace(feed, subfiles=subfiles), ranges, out)

    def _suspect(self, t: Transfer, node: NodeId, out: list[ReplicationEffect]) -> None:
        """A stream with `node` broke before its end: have the replication repaired
        around it (the origin decides; the buddy when the suspect is the origin)."""
        if node in t.failed or t.finished or t.done:
            return
        self._c.suspects += 1
        decider = t.spec.origin
        if node == decider and t.spec.buddy is not None:
            decider = t.spec.buddy
        if decider != self.local:
            if decider != node:
                out.append(SendControl(decider, encode_control(Suspect(t.rid, node))))
            return
        self._repair_around(t, {node}, out)
        announce = encode_control(RepairAround(t.rid, tuple(sorted(t.failed))))
        peers = sorted(t.participants - t.failed - t.departed - {self.local})
        out.extend(SendControl(peer, announce) for peer in peers)

    def _repair_around(self, t: Transfer, nodes: set[NodeId], out: list[ReplicationEffect]) -> None:
        """Open the feeds this node sends in place of the failed ones (`plan.repair`)."""
        fresh = nodes - t.failed
        if not fresh:
            return
        t.failed |= fresh
        t.last_activity = self._now
        out.append(
            ReplicationEvent(
                "replication_repair",
                {"rid": f"{t.rid:016x}", "failed": sorted(int(n) for n in t.failed)},
                "warning",
            )
        )
        fix = repair(t.plan, t.failed)
        for feed in fix.feeds:
            if feed.sender != self.local:
                continue
            subfiles = tuple(s for s in feed.subfiles if (feed.receiver, s) not in t.substituted)
            if not subfiles:
                continue
            t.substituted.update((feed.receiver, s) for s in subfiles)
            self._c.repairs_opened += 1
            ranges = merged_ranges(t.plan.subfiles[s] for s in subfiles)
            self._open_feed(t, replace(feed, subfiles=subfiles), ranges, out)
        if t.is_origin or t.state != ReceiverState.RECEIVING or t.opening:
            return
        lost = [
            s
            for node, s in fix.lost
            if node == self.local and not all(t.held[slice(*t.plan.subfiles[s])])
        ]
        if (
            lost
            and t.spec.origin in t.departed
            and (t.spec.buddy is None or t.spec.buddy in t.departed)
        ):
            self._give_up_copy(
                t, out, f"subfiles {lost[:8]} are lost: the origin failed and no buddy has the file"
            )

    def stream_accepted(self, stream: int, peer: NodeId, now: float) -> list[ReplicationEffect]:
        self._now = now
        if len(self._ins) + len(self._outs) >= self.config.max_streams:
            self._c.streams_refused += 1
            return [CloseStream(stream, abort=True)]
        self._c.streams_accepted += 1
        self._ins[stream] = None
        self._peers[stream] = peer
        self._deframers[stream] = Deframer()
        return []

    def stream_data(self, stream: int, data: bytes, now: float) -> list[ReplicationEffect]:
        self._now = now
        deframer = self._deframers.get(stream)
        if deframer is None:
            return []
        out: list[ReplicationEffect] = []
        try:
            for frame in deframer.feed(data):
                if stream not in self._deframers:
                    break  # dropped by the message before (refused): the rest is moot
                message = decode_stream_message(frame)
                if stream in self._outs:
                    self._on_feedback(self._outs[stream], message, out)
                else:
                    self._on_incoming(stream, message, out)
            fed, feeder = self._ins.get(stream), self._peers.get(stream)
            if fed is not None and feeder is not None:
                fed.fed_at[feeder] = now
        except (DecodeError, _ProtocolViolation) as exc:
            self._c.malformed += 1
            self._drop_stream(stream, f"malformed: {exc}", out)
            out.append(
                ReplicationEvent(
                    "replication_stream_dropped",
                    {"peer": self._peers.get(stream, 0), "reason": str(exc)},
                    "warning",
                )
            )
        self._pump(out)
        self._fresh.clear()
        return out

    def stream_drained(self, stream: int, now: float) -> list[ReplicationEffect]:
        self._now = now
        o = self._outs.get(stream)
        if o is None:
            return []
        o.outstanding = 0
        o.progress_at = now
        out: list[ReplicationEffect] = []
        self._wake(o)
        self._pump(out)
        return out

    def stream_closed(self, stream: int, error: str | None, now: float) -> list[ReplicationEffect]:
        self._now = now
        out: list[ReplicationEffect] = []
        o = self._outs.pop(stream, None)
        self._deframers.pop(stream, None)
        peer = self._peers.pop(stream, None)
        ended = stream in self._ended_ins
        self._ended_ins.discard(stream)
        if o is not None:
            if not o.ended:
                o.failed = True
                o.ended = True
                self._c.streams_failed += 1
                o.transfer.detail = f"feed to {peer} failed: {error or 'closed early'}"
                out.append(
                    ReplicationEvent(
                        "replication_feed_failed",
                        {
                            "rid": f"{o.transfer.rid:016x}",
                            "peer": peer,
                            "reason": error or "closed",
                        },
                        "warning",
                    )
                )
                self._feed_broken(o, out)
            self._maybe_forget(o.transfer)
        elif stream in self._ins:
            t = self._ins.pop(stream)
            if t is not None:
                t.ins.discard(stream)
                if not ended and not t.complete and peer is not None:
                    self._c.streams_failed += 1
                    t.detail = f"feed from {peer} failed: {error or 'closed before its end'}"
                    self._suspect(t, peer, out)
                self._maybe_forget(t)
        self._pump(out)
        return out

    def _feed_broken(self, o: FeedOut, out: list[ReplicationEffect]) -> None:
        """A feed's stream broke before its end: suspect its receiver, and open the feed
        again later while the receiver is in the view (a restarted daemon resumes)."""
        t = o.transfer
        receiver = o.feed.receiver
        if t.finished or t.done or self._transfers.get(t.rid) is not t:
            return
        if o.feed.kind != FeedKind.MIRROR:
            self._suspect(t, receiver, out)
        if o.attempts < MAX_FEED_RETRIES:
            o.retry_at = self._now + min(FEED_RETRY_FIRST * 2**o.attempts, FEED_RETRY_MAX)
            t.retries.append(o)

    def _retry_feeds(self, t: Transfer, out: list[ReplicationEffect]) -> None:
        due = [o for o in t.retries if o.retry_at is not None and o.retry_at <= self._now]
        for o in due:
            t.retries.remove(o)
            if o.feed.receiver in t.departed:  # opened again when it comes back
                o.retry_at = None
                t.retries.append(o)
                continue
            if o in t.outs:
                t.outs.remove(o)
            self._c.feeds_retried += 1
            source = t.source if o.feed.kind == FeedKind.MIRROR else ""
            again = self._open_feed(t, o.feed, o.ranges, out, source=source)
            again.attempts = o.attempts + 1

    # ------------------------------------------------------------ control, files, timer

    def control_received(
        self, source: NodeId, payload: bytes, now: float
    ) -> list[ReplicationEffect]:
        self._now = now
        try:
            progress = decode_control(payload)
        except DecodeError:
            self._c.malformed += 1
            return []
        if isinstance(progress, Fetch):
            return self._on_fetch(source, progress)
        if isinstance(progress, Suspect | RepairAround | Done):
            return self._on_failure_control(source, progress)
        if isinstance(progress, Rate):
            return self._on_rate(source, progress)
        t = self._transfers.get(progress.rid)
        if t is None or not t.is_origin or source not in t.recipients:
            return []
        r = t.recipients[source]
        # Reports may overtake one another (the overlay forwards without blocking, so two
        # messages of one source can arrive out of order): an older one is dropped.
        rank = STATE_RANK[progress.state]
        if (
            r.state in ("complete", "failed")
            or rank < r.rank
            or (rank == r.rank and progress.held_bytes < r.held_bytes)
        ):
            self._c.reports_stale += 1
            return []
        r.rank = rank
        if r.last_at is not None and now > r.last_at:
            sample = max(0.0, (progress.held_bytes - r.held_bytes) / (now - r.last_at))
            r.rate = sample if r.rate == 0 else 0.5 * r.rate + 0.5 * sample
        r.last_at = now
        r.held_bytes = max(r.held_bytes, progress.held_bytes)
        r.bad_chunks = max(r.bad_chunks, progress.bad_chunks)
        r.detail = progress.detail
        r.path = progress.path
        r.state = STATE_NAME[progress.state]
        t.last_progress = now
        out: list[ReplicationEffect] = []
        if all(x.state in ("complete", "failed") for x in t.recipients.values()):
            self._finish_origin(t, out)
        return out

    def _on_failure_control(
        self, source: NodeId, message: Suspect | RepairAround | Done
    ) -> list[ReplicationEffect]:
        t = self._transfers.get(message.rid)
        out: list[ReplicationEffect] = []
        if t is None or source not in t.participants:
            return out
        t.last_activity = self._now
        match message:
            case Suspect(_, node):
                if node in t.participants:
                    self._suspect(t, node, out)
            case RepairAround(_, failed):
                self._repair_around(t, set(failed) & t.participants - {self.local}, out)
            case Done():
                if source == t.spec.origin and not t.is_origin:
                    t.done = True
                    for o in t.retries:
                        o.retry_at = None
                    t.retries.clear()
                    self._maybe_forget(t)
        self._pump(out)
        return out

    def finalized(
        self, rid: int, path: str | None, error: str | None, now: float
    ) -> list[ReplicationEffect]:
        self._now = now
        t = self._transfers.get(rid)
        if t is None or t.state != ReceiverState.VERIFYING:
            return []
        out: list[ReplicationEffect] = []
        if path is not None:
            t.state = ReceiverState.COMPLETE
            t.path = path
            self._c.copies_completed += 1
            out.append(
                ReplicationEvent(
                    "replica_complete",
                    {"rid": f"{rid:016x}", "path": path, "digest": t.manifest.digest.hex()},
                )
            )
        else:
            self._fail_copy(t, error or "the copy did not verify", out)
        self._report_progress(t, out)
        self._maybe_forget(t)
        return out

    def on_timer(self, now: float) -> list[ReplicationEffect]:
        self._now = now
        out: list[ReplicationEffect] = []
        for t in list(self._transfers.values()):
            if t.report_due is not None and now >= t.report_due:
                if t.is_origin:
                    if now - t.last_progress > self.config.give_up_after:
                        t.detail = f"no progress for {self.config.give_up_after:.0f} s"
                        self._finish_origin(t, out)
                        continue
                    out.append(ReplicationUpdate(t.rid, self._report(t), final=False))
                    t.report_due = now + self.config.progress_interval
                else:
                    self._report_progress(t, out)
            stall = self._stall_deadline(t)
            if stall is not None and now >= stall:
                self._give_up_copy(t, out)
            if t.retries:
                self._retry_feeds(t, out)
            linger = self._linger_deadline(t)
            if linger is not None and now >= linger:
                t.done = True  # nobody said DONE (the origin failed?): stop serving repairs
                t.retries.clear()
                for o in t.outs:
                    if not o.ended:
                        self._drop_stream(o.stream, "the replication is over", out)
                self._maybe_forget(t)
        if self._wake_at is not None and now >= self._wake_at:
            self._wake_at = None
        self._pump(out)
        return out

    def _fail_copy(self, t: Transfer, reason: str, out: list[ReplicationEffect]) -> None:
        """This node's copy cannot complete: say why (the caller reports it)."""
        t.state = ReceiverState.FAILED
        t.detail = reason
        self._c.copies_failed += 1
        out.append(
            ReplicationEvent("replica_failed", {"rid": f"{t.rid:016x}", "reason": reason}, "error")
        )

    def _give_up_copy(
        self, t: Transfer, out: list[ReplicationEffect], why: str | None = None
    ) -> None:
        """No chunk arrived for `give_up_after` (or, `why`, none can arrive): fail this
        copy (its partial file stays for a later replication of the same file to resume
        from) and free what it held."""
        feeders = sorted({int(self._peers[s]) for s in t.ins if s in self._peers})
        t.state = ReceiverState.FAILED
        stalled = why or (
            f"no data for {self.config.give_up_after:.0f} s "
            f"({t.manifest.chunk_count - t.held_count} chunks missing; feeders {feeders})"
        )
        self._fail_copy(t, f"{stalled}; {t.detail}" if t.detail else stalled, out)
        self._report_progress(t, out)
        detail = t.detail
        for stream in list(t.ins):
            self._drop_stream(stream, "given up", out)
        for o in t.outs:
            if not o.ended:
                self._drop_stream(o.stream, "given up", out)
        t.detail = detail
        self._maybe_forget(t)

    # ------------------------------------------------------------ receiving

    def _on_fetch(self, source: NodeId, fetch: Fetch) -> list[ReplicationEffect]:
        """`source` asks for chunks again: send those we hold on a new stream."""
        t = self._transfers.get(fetch.rid)
        if t is None or source == self.local:
            return []
        if len(self._ins) + len(self._outs) >= self.config.max_streams:
            self._c.streams_refused += 1
            return []
        count = t.manifest.chunk_count
        ranges = tuple(
            (first, min(end, count))
            for first, end in fetch.ranges
            if first < count and all(t.held[first : min(end, count)])
        )
        if not ranges:
            return []
        self._c.repairs_sent += 1
        out: list[ReplicationEffect] = []
        feed = Feed(self.local, source, (), FeedKind.REPAIR)
        self._open_feed(t, feed, ranges, out)
        self._pump(out)
        return out

    def _on_incoming(self, stream: int, message: object, out: list[ReplicationEffect]) -> None:
        t = self._ins.get(stream)
        if isinstance(message, Offer):
            if t is not None:
                raise _ProtocolViolation("a second OFFER on one stream")
            t = self._transfers.get(message.rid)
            if t is not None and (
                t.is_origin or t.manifest != message.manifest or t.spec != message.spec
            ):
                raise _ProtocolViolation("an OFFER that disagrees with its replication")
            if t is None and message.rid in self._forgotten:
                self._answer_forgotten(stream, message, out)
                return
            t = t or self._join(message, out)
            if t is None:
                self._drop_stream(stream, "refused", out)
                return
            self._ins[stream] = t
            t.ins.add(stream)
            if t.opening:
                t.waiting.append((stream, message))
            elif t.state == ReceiverState.FAILED:
                self._drop_stream(stream, t.detail, out)
            else:
                out.extend(self._send_have(t, stream, message))
            return
        if t is None:
            raise _ProtocolViolation("data before OFFER")
        if isinstance(message, Chunk):
            self._on_chunk(t, stream, message, out)
        elif isinstance(message, End):
            self._ended_ins.add(stream)  # the feeder closes the stream after END
        else:
            raise _ProtocolViolation(f"unexpected {type(message).__name__} from a feeder")

    def _answer_forgotten(self, stream: int, offer: Offer, out: list[ReplicationEffect]) -> None:
        """An OFFER of a replication this node is done with. Joining it again would open the
        copy and every feed of ours a second time (and those feeds' receivers, done too,
        would join again...): a complete copy answers that it holds every chunk (the feeder
        ends its feed as usual), a failed one refuses the stream."""
        if not self._forgotten[offer.rid]:
            self._drop_stream(stream, "refused: this copy failed", out)
            return
        count = offer.manifest.chunk_count
        self._c.bytes_skipped += sum(
            offer.manifest.range_bytes(first, min(end, count)) for first, end in offer.ranges
        )
        everything = ((0, count),)
        out.append(StreamSend(stream, (encode_stream_message(Have(everything)),)))
        out.append(CloseStream(stream))
        self._ins.pop(stream, None)
        self._deframers.pop(stream, None)
        self._peers.pop(stream, None)

    def _send_have(self, t: Transfer, stream: int, offer: Offer) -> list[ReplicationEffect]:
        held = [c for c in range(t.manifest.chunk_count) if t.held[c]]
        if held:
            self._c.bytes_skipped += sum(
                t.manifest.chunk_length(c) for c in held if any(a <= c < b for a, b in offer.ranges)
            )
        return [StreamSend(stream, (encode_stream_message(Have(ranges_of(held))),))]

    def begun(
        self, rid: int, held: set[int] | None, error: str | None, now: float
    ) -> list[ReplicationEffect]:
        """The store opened the copy of `BeginCopy(rid)`: `held` are the chunks it holds
        already (a resumed or complete copy), or it could not (`error`)."""
        self._now = now
        t = self._transfers.get(rid)
        if t is None or not t.opening:
            return []
        t.opening = False
        out: list[ReplicationEffect] = []
        waiting, t.waiting = t.waiting, []
        if held is None:
            self._fail_copy(t, error or "the copy could not be opened", out)
            for stream, _ in waiting:
                self._drop_stream(stream, t.detail, out)
            self._report_progress(t, out)
            self._maybe_forget(t)
            return out
        t.store_open = True
        for c in held:
            if 0 <= c < t.manifest.chunk_count and not t.held[c]:
                t.held[c] = 1
                t.held_count += 1
                t.held_bytes += t.manifest.chunk_length(c)
        out.append(
            ReplicationEvent(
                "replica_started",
                {
                    "rid": f"{rid:016x}",
                    "file": t.manifest.name,
                    "bytes": t.manifest.size,
                    "held_bytes": t.held_bytes,
                },
            )
        )
        for stream, offer in waiting:
            if stream in t.ins:
                out.extend(self._send_have(t, stream, offer))
        self._open_feeds(t, out)
        self._report_progress(t, out)
        self._check_complete(t, out)
        self._pump(out)
        return out

    def _join(self, offer: Offer, out: list[ReplicationEffect]) -> Transfer | None:
        """A first OFFER of replication `offer.rid`: take our part in it."""
        buddy = offer.spec.buddy == self.local
        if offer.spec.origin == self.local or not (buddy or self.local in offer.spec.recipients):
            raise _ProtocolViolation("an OFFER for a plan without us as a recipient")
        if buddy and (offer.ranges or not offer.source):
            raise _ProtocolViolation("an OFFER to the buddy must name the file, not send it")
        if len(self._transfers) >= self.config.max_transfers:
            self._c.streams_refused += 1
            return None
        try:
            plan = make_plan(offer.spec)
        except UsageError as exc:
            raise _ProtocolViolation(f"unplannable spec: {exc}") from exc
        t = Transfer(
            offer.rid,
            offer.manifest,
            plan,
            rate=offer.rate,
            dest=offer.dest,
            origin=False,
            now=self._now,
            buddy=buddy,
        )
        self._take_early_rate(t)
        self._transfers[offer.rid] = t
        # the store serves one replication per file at a time (its contract)
        other = next(
            (x for x in self._transfers.values() if x is not t and x.digest == t.digest), None
        )
        if other is not None:
            what = "sent" if other.is_origin else "received"
            self._fail_copy(
                t,
                f"{offer.manifest.name} is being {what} here already (replication {other.rid:016x})",
                out,
            )
            self._report_progress(t, out)
            return t
        if buddy:  # it hashes its mirror; the origin's stream carries nothing
            t.source = offer.source
            self._mirrors[offer.rid] = t
            out.append(HashFile(offer.rid, offer.source))
            return t
        t.fed_late = any(f.after_complete for f in plan.feeds_to(self.local))
        t.opening = True
        out.append(BeginCopy(offer.rid, offer.manifest, offer.dest or None))
        return t

    def _on_chunk(
        self, t: Transfer, stream: int, chunk: Chunk, out: list[ReplicationEffect]
    ) -> None:
        index = chunk.index
        manifest = t.manifest
        if not 0 <= index < manifest.chunk_count:
            raise _ProtocolViolation(f"chunk {index} beyond the file")
        self._c.chunks_received += 1
        self._c.bytes_received += len(chunk.data)
        if t.held[index] or t.state == ReceiverState.FAILED:
            self._c.chunks_duplicate += 1
            return
        if not manifest.verifies(index, chunk.data):
            sender = self._peers.get(stream, NodeId(0))
            self._c.chunks_bad += 1
            t.bad_chunks += 1
            t.bad_from[sender] = t.bad_from.get(sender, 0) + 1
            t.detail = f"bad chunk {index} from daemon {sender}: fetched again from the origin"
            if t.report_due is None:  # the origin hears of it even if nothing else follows
                t.report_due = self._now + self.config.progress_interval
            out.append(
                ReplicationEvent(
                    "replication_bad_chunk",
                    {"rid": f"{t.rid:016x}", "chunk": index, "peer": int(sender)},
                    "warning",
                )
            )
            # the origin holds every chunk: ask it for this one on a new stream
            if index not in t.fetching and t.spec.origin != sender:
                t.fetching.add(index)
                fetch = Fetch(t.rid, ((index, index + 1),))
                out.append(SendControl(t.spec.origin, encode_control(fetch)))
            return
        try:
            self._store.write(manifest.digest, index, chunk.data)
        except ReplicationError as exc:
            self._fail_copy(t, str(exc), out)
            self._report_progress(t, out)
            return
        t.held[index] = 1
        t.held_count += 1
        t.held_bytes += len(chunk.data)
        t.last_progress = self._now
        self._fresh[(t.rid, index)] = memoryview(chunk.data)
        for o in t.outs:
            self._wake(o)
        if t.report_due is None:
            t.report_due = self._now + self.config.progress_interval
        self._check_complete(t, out)

    def _check_complete(self, t: Transfer, out: list[ReplicationEffect]) -> None:
        if t.complete and t.state == ReceiverState.RECEIVING and not t.is_origin:
            t.state = ReceiverState.VERIFYING
            out.append(Finalize(t.rid, t.manifest.digest))
            self._report_progress(t, out)
            for o in t.outs:
                self._wake(o)

    def _report_progress(self, t: Transfer, out: list[ReplicationEffect]) -> None:
        """Tell the origin how far this copy is (now; then each progress interval while
        it changes)."""
        t.report_due = None
        if t.is_origin or t.is_buddy:
            return
        reported = (t.state, t.held_count, t.bad_chunks)
        if reported == t.reported:
            return
        t.reported = reported
        progress = Progress(
            t.rid,
            t.state,
            t.held_count,
            t.held_bytes,
            t.bad_chunks,
            t.detail[:1000],
            t.path or "",
        )
        out.append(SendControl(t.spec.origin, encode_control(progress)))
        if t.state in (ReceiverState.RECEIVING, ReceiverState.VERIFYING):
            t.report_due = self._now + self.config.progress_interval

    # ------------------------------------------------------------ sending

    def _open_feeds(self, t: Transfer, out: list[ReplicationEffect]) -> None:
        for feed in t.plan.feeds_from(self.local):
            ranges = merged_ranges(t.plan.subfiles[i] for i in feed.subfiles)
            self._open_feed(t, feed, ranges, out)

    def _open_feed(
        self,
        t: Transfer,
        feed: Feed,
        ranges: tuple[tuple[int, int], ...],
        out: list[ReplicationEffect],
        *,
        source: str = "",
    ) -> FeedOut:
        stream = next(self._stream_ids)
        o = FeedOut(t, feed, stream, ranges)
        o.progress_at = self._now
        t.outs.append(o)
        self._outs[stream] = o
        self._peers[stream] = feed.receiver
        self._deframers[stream] = Deframer()
        self._c.streams_opened += 1
        offer = Offer(t.rid, t.rate, t.dest, ranges, t.spec, t.manifest, source)
        out.append(OpenStream(stream, feed.receiver))
        out.append(StreamSend(stream, (encode_stream_message(offer),)))
        return o

    def _on_feedback(self, o: FeedOut, message: object, out: list[ReplicationEffect]) -> None:
        if not isinstance(message, Have) or o.remote_known:
            raise _ProtocolViolation(f"unexpected {type(message).__name__} from a receiver")
        remote = bytearray(o.transfer.manifest.chunk_count)
        for first, end in message.ranges:
            if end > len(remote):
                raise _ProtocolViolation("HAVE beyond the file")
            remote[first:end] = b"\x01" * (end - first)
        o.remote = remote
        o.remote_known = True
        o.progress_at = self._now
        self._wake(o)

    def _wake(self, o: FeedOut) -> None:
        if not o.in_heap and not o.ended:
            o.in_heap = True
            vtime = o.sent_bytes / o.weight
            heapq.heappush(self._heap, (o.priority, vtime, next(self._heap_seq), o))

    def _bucket_of(self, t: Transfer) -> TokenBucket | None:
        """The token bucket of replication `t` (None: it has no cap and never had)."""
        bucket = self._buckets.get(t.rid)
        if bucket is None and t.rate:
            bucket = TokenBucket(t.rate, self._now, self.config.burst_seconds)
            self._buckets[t.rid] = bucket
        return bucket

    def _wake_by(self, at: float) -> None:
        if self._wake_at is None or at < self._wake_at:
            self._wake_at = at

    def _pump(self, out: list[ReplicationEffect]) -> None:
        """Send what the feeds can send now, best first, within the rate caps: the
        daemon's (every feed waits) and each replication's (its feeds step aside)."""
        now = self._now
        shared = self._bucket
        shared.refill(now)
        stepped_aside: list[FeedOut] = []
        heap = self._heap
        while heap:
            o = heap[0][3]
            if o.ended or o.failed:
                heapq.heappop(heap)
                o.in_heap = False
                continue
            chunk = self._sendable(o)
            if chunk is None:
                heapq.heappop(heap)
                o.in_heap = False
                if not o.ended and o.remote_known and o.next_chunk() is None:
                    self._end(o, out)
                continue
            ready = shared.ready_at(now)
            if ready is not None:
                self._wake_by(ready)
                break
            heapq.heappop(heap)
            o.in_heap = False
            bucket = self._bucket_of(o.transfer)
            if bucket is not None:
                bucket.refill(now)
                ready = bucket.ready_at(now)
                if ready is not None:
                    self._wake_by(ready)
                    stepped_aside.append(o)
                    continue
            length = o.transfer.manifest.chunk_length(chunk)
            self._send_chunk(o, chunk, length, out)
            shared.take(length)
            if bucket is not None:
                bucket.take(length)
            self._wake(o)
        for o in stepped_aside:
            self._wake(o)

    def _sendable(self, o: FeedOut) -> int | None:
        if not o.remote_known or o.outstanding >= self.config.window_chunks:
            return None
        chunk = o.next_chunk()
        if chunk is None:
            return None
        t = o.transfer
        if not t.held[chunk]:
            return None
        if o.after_complete and not t.holds_all(o):
            return None
        return chunk

    def _send_chunk(
        self, o: FeedOut, chunk: int, length: int, out: list[ReplicationEffect]
    ) -> None:
        t = o.transfer
        data = self._fresh.get((t.rid, chunk))
        if data is None:
            try:
                data = memoryview(self._store.read(t.manifest.digest, chunk))
            except ReplicationError as exc:
                o.failed = True
                t.detail = f"cannot read chunk {chunk}: {exc}"
                out.append(CloseStream(o.stream, abort=True))
                return
        out.append(StreamSend(o.stream, (encode_chunk_head(chunk, length), data)))
        o.cursor = chunk + 1
        if not o.outstanding:  # (its receiver's silence counts from here)
            o.progress_at = self._now
        o.outstanding += 1
        o.sent_bytes += length
        self._c.chunks_sent += 1
        self._c.bytes_sent += length
        if o.next_chunk() is None:
            self._end(o, out)

    def _end(self, o: FeedOut, out: list[ReplicationEffect]) -> None:
        o.ended = True
        out.append(StreamSend(o.stream, (encode_stream_message(End()),)))
        out.append(CloseStream(o.stream))
        self._outs.pop(o.stream, None)
        self._deframers.pop(o.stream, None)
        self._peers.pop(o.stream, None)
        self._maybe_forget(o.transfer)

    def _drop_stream(self, stream: int, reason: str, out: list[ReplicationEffect]) -> None:
        out.append(CloseStream(stream, abort=True))
        o = self._outs.pop(stream, None)
        t = self._ins.pop(stream, None)
        self._deframers.pop(stream, None)
        self._peers.pop(stream, None)
        # (the driver's stream_closed finds the stream gone: forget the transfer here)
        if o is not None:
            o.failed = o.ended = True
            o.transfer.detail = f"feed dropped: {reason}"
            self._maybe_forget(o.transfer)
        if t is not None:
            t.ins.discard(stream)
            self._maybe_forget(t)

    # ------------------------------------------------------------ ends

    def _finish_origin(self, t: Transfer, out: list[ReplicationEffect]) -> None:
        if t.finished:
            return
        t.finished = True
        t.report_due = None
        report = self._report(t)
        if report.state == "complete":
            self._c.replications_completed += 1
        else:
            self._c.replications_failed += 1
        out.append(ReplicationUpdate(t.rid, report, final=True))
        out.append(
            ReplicationEvent(
                "replication_finished",
                {
                    "rid": f"{t.rid:016x}",
                    "state": report.state,
                    "seconds": round(report.elapsed, 3),
                    "failed": [r.node for r in report.recipients if r.state != "complete"],
                },
                "info" if report.state == "complete" else "warning",
            )
        )
        for o in t.outs:
            if not o.ended:
                o.ended = True
                out.append(CloseStream(o.stream, abort=True))
                self._outs.pop(o.stream, None)
                self._deframers.pop(o.stream, None)
                self._peers.pop(o.stream, None)
        t.retries.clear()
        done = encode_control(Done(t.rid))
        peers = sorted(t.participants - t.departed - {self.local})
        out.extend(SendControl(peer, done) for peer in peers)
        self._maybe_forget(t)

    def _maybe_forget(self, t: Transfer) -> None:
        """Drop a transfer once it has nothing left to do here."""
        if any(not o.ended for o in t.outs) or t.ins or t.retries:
            return
        if t.is_origin:
            if not t.finished:
                return
        elif t.state not in (ReceiverState.COMPLETE, ReceiverState.FAILED):
            return
        elif t.state == ReceiverState.COMPLETE and not t.done:
            return  # it serves repairs until the origin says DONE (or lingers out)
        if t.report_due is not None and not t.is_origin:
            return
        self._transfers.pop(t.rid, None)
        self._mirrors.pop(t.rid, None)
        self._buckets.pop(t.rid, None)
        if t.store_open:  # (a copy the store refused must not close another's file)
            self._store.close(t.digest)
        if not t.is_origin:
            self._forgotten[t.rid] = t.state == ReceiverState.COMPLETE
            while len(self._forgotten) > MAX_FORGOTTEN:
                self._forgotten.popitem(last=False)

    def _report(self, t: Transfer) -> ReplicationReport:
        recipients = []
        for r in t.recipients.values():
            left = t.manifest.size - r.held_bytes
            eta = left / r.rate if r.rate > 0 and r.state == "receiving" else None
            quiet = self._now - (t.started if r.last_at is None else r.last_at)
            stalled = (
                quiet
                if quiet >= self.config.stall_after and r.state not in ("complete", "failed")
                else None
            )
            recipients.append(
                RecipientReport(
                    r.node,
                    r.state,
                    r.held_bytes,
                    r.bad_chunks,
                    r.rate,
                    eta,
                    r.detail,
                    r.path,
                    stalled,
                )
            )
        states = {r.state for r in recipients}
        state: Literal["hashing", "running", "complete", "failed"] = "running"
        if t.finished:
            state = "complete" if states == {"complete"} else "failed"
        return ReplicationReport(
            t.rid,
            t.manifest.name,
            t.manifest.size,
            t.manifest.digest.hex(),
            state,
            self._now - t.started,
            tuple(recipients),
            t.detail,
        )


class _ProtocolViolation(Exception):
    """A peer broke the stream protocol: its stream is dropped and counted."""
