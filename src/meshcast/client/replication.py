"""Bulk replication from the client side: the report types and the `Replication` handle.

`Client.replicate()` sends one REPLICATE (client protocol version 5) and returns a
`Replication`: the daemon answers its token with REPLICATION frames, progress reports and
then exactly one final report. The handle queues them (bounded: a consumer that never
reads loses old progress reports, never the final one) and hands them out with
``async for report in handle`` and ``await handle.wait()``; ``await handle.set_rate(r)``
changes its upload cap while it runs (version 6). Reference: docs/client-api.md.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Self

from meshcast.errors import ClientError, UsageError
from meshcast.wire.client import (
    ALL_TARGETS,
    GROUP_TARGET_PREFIX,
    REPLICATE_STRATEGIES,
    REPLICATE_TREES,
    REPLICATE_VARIANTS,
    parse_targets,
    replication_report_fault,
)

MAX_QUEUED_REPORTS = 64  # progress reports kept for a handle nobody iterates (oldest dropped)
DEFAULT_MAX_CONNECTIONS = 9  # the concurrency k is planned from, as in the engine

ReplicationState = Literal["hashing", "running", "complete", "failed"]
RecipientState = Literal["waiting", "receiving", "verifying", "complete", "failed"]


@dataclass(frozen=True, slots=True)
class RecipientProgress:
    """Where one recipient daemon stands in a replication."""

    daemon: str  # the recipient daemon's name
    state: RecipientState
    held_bytes: int  # bytes of the file it holds, verified
    bad_chunks: int  # chunks it received that failed their hash (fetched again)
    rate: float  # bytes/s over the last reports
    eta: float | None  # seconds to completion at that rate; None: unknown
    detail: str  # why it failed, or what it waits for; "" otherwise
    path: str | None  # where its copy lands (known once placed); None: not yet
    # seconds since its last progress report, once that is [replicate] stall_after or
    # more (its origin waits on it); None: it is progressing (or done)
    stalled: float | None = None

    @property
    def complete(self) -> bool:
        return self.state == "complete"


@dataclass(frozen=True, slots=True)
class ReplicationReport:
    """One report of a replication, as its origin daemon sees it (a REPLICATION frame)."""

    rid: str  # the replication's id: 16 hex digits, the same at every daemon
    name: str  # the file's name
    size: int  # bytes
    digest: str  # BLAKE3 of the whole file, hex ("" while hashing)
    state: ReplicationState
    elapsed: float  # seconds since the daemon took the request
    detail: str  # why it failed (a refused request too), else ""
    recipients: tuple[RecipientProgress, ...]
    final: bool = False  # the last report of this replication

    @property
    def ok(self) -> bool:
        """Complete, and every recipient holds a verified copy."""
        return self.state == "complete" and all(r.complete for r in self.recipients)

    @property
    def held_bytes(self) -> int:
        """Bytes held by all recipients together (of ``size * len(recipients)``)."""
        return sum(r.held_bytes for r in self.recipients)

    @property
    def missing(self) -> tuple[RecipientProgress, ...]:
        """The recipients without a complete copy."""
        return tuple(r for r in self.recipients if not r.complete)

    def to_json(self) -> dict[str, object]:
        """The report as the daemon sent it (the keys of docs/client-protocol.md)."""
        return {
            "rid": self.rid,
            "name": self.name,
            "size": self.size,
            "digest": self.digest,
            "state": self.state,
            "elapsed": self.elapsed,
            "detail": self.detail,
            "recipients": [
                {
                    "daemon": r.daemon,
                    "state": r.state,
                    "held_bytes": r.held_bytes,
                    "bad_chunks": r.bad_chunks,
                    "rate": r.rate,
                    "eta": r.eta,
                    "detail": r.detail,
                    "path": r.path,
                    "stalled": r.stalled,
                }
                for r in self.recipients
            ],
        }


def parse_report(text: str, final: bool) -> ReplicationReport:
    """A `ReplicationReport` from the JSON of a REPLICATION (already checked by the
    decoder; `ValueError` if it is not a valid report)."""
    value = json.loads(text)
    fault = replication_report_fault(value, final)
    if fault is not None:
        raise ValueError(fault)
    assert isinstance(value, dict)
    return ReplicationReport(
        rid=value["rid"],
        name=value["name"],
        size=value["size"],
        digest=value["digest"],
        state=value["state"],
        elapsed=float(value["elapsed"]),
        detail=value["detail"],
        recipients=tuple(_recipient(r) for r in value["recipients"]),
        final=final,
    )


def _recipient(entry: Mapping[str, object]) -> RecipientProgress:
    eta = entry["eta"]
    path = entry["path"]
    rate = entry["rate"]
    assert isinstance(rate, int | float)
    stalled = entry.get("stalled")  # (a key of version 6 daemons)
    if isinstance(stalled, bool) or not isinstance(stalled, int | float):
        stalled = None
    return RecipientProgress(
        daemon=str(entry["daemon"]),
        state=entry["state"],  # type: ignore[arg-type]  # checked: one of RecipientState
        held_bytes=int(entry["held_bytes"]),  # type: ignore[call-overload]
        bad_chunks=int(entry["bad_chunks"]),  # type: ignore[call-overload]
        rate=float(rate),
        eta=None if eta is None else float(eta),  # type: ignore[arg-type]
        detail=str(entry["detail"]),
        path=None if path is None else str(path),
        stalled=None if stalled is None else float(stalled),
    )


class ReplicationFailed(ClientError):
    """A replication ended without every recipient holding a verified copy (or the daemon
    refused it). `.report` is the final report: `.detail` and each recipient's say why."""

    def __init__(self, report: ReplicationReport) -> None:
        missing = ", ".join(
            f"{r.daemon} ({r.state}{': ' + r.detail if r.detail else ''})" for r in report.missing
        )
        why = report.detail or "some recipients have no copy"
        text = f"replication {report.rid} of {report.name!r} failed: {why}"
        super().__init__(f"{text}; missing: {missing}" if missing else text)
        self.report = report


# ---------------------------------------------------------------- the request's arguments


@dataclass(frozen=True, slots=True)
class ReplicateOptions:
    """The checked arguments of `Client.replicate`, as REPLICATE carries them."""

    targets: str
    rate: float  # bytes/s; 0: no cap
    dest: str
    strategy: int
    variant: int
    tree: int
    max_connections: int
    capacity_aware: bool
    buddy: str  # the buddy daemon's name; "": none


def _index(value: object, names: Sequence[str], what: str) -> int:
    if isinstance(value, str) and value.lower() in names:
        return names.index(value.lower())
    known = ", ".join(names)
    raise UsageError(f"unknown {what} {value!r} (known: {known})")


def absolute_path(path: str | os.PathLike[str]) -> str:
    """`path` made absolute against this process's working directory (`UsageError` if it
    is not a path): the daemon resolves nothing, its working directory is not ours."""
    if not isinstance(path, str | os.PathLike):
        raise UsageError(f"path must be a str or path-like, not {type(path).__name__}")
    text = os.fspath(path)
    if not isinstance(text, str) or not text:
        raise UsageError(f"path must be a non-empty str, got {path!r}")
    return os.path.abspath(text)


def targets_text(to: str | Sequence[str]) -> str:
    """REPLICATE's targets from `to`: ``"all"``, ``"group:G"``, ``"name1,name2"`` or a
    sequence of daemon names. `UsageError` naming what is wrong."""
    if isinstance(to, str):
        text = to
    elif isinstance(to, Sequence) and to and all(isinstance(n, str) for n in to):
        if any("," in n for n in to):
            raise UsageError(f"a daemon name has no ',' in it: {list(to)!r}")
        if ALL_TARGETS in to or any(n.startswith(GROUP_TARGET_PREFIX) for n in to):
            raise UsageError(f"give 'all' or 'group:G' as a string, not in a list: {list(to)!r}")
        text = ",".join(to)
    else:
        raise UsageError(f"to must be 'all', 'group:G' or daemon names, not {to!r}")
    try:
        parse_targets(text)
    except ValueError as exc:
        raise UsageError(f"bad replication targets: {exc}") from None
    return text


def rate_value(rate: object) -> float:
    """A rate argument as the wire carries it: bytes/s, 0.0 for None (no cap).
    `UsageError` unless None or a positive finite number."""
    if rate is None:
        return 0.0
    if (
        isinstance(rate, bool)
        or not isinstance(rate, int | float)
        or not (math.isfinite(rate) and rate > 0)
    ):
        raise UsageError(f"rate must be a positive number of bytes/s (or None), got {rate!r}")
    return float(rate)


def rid_value(rid: object) -> int:
    """A replication id: 16 hex digits (as reports and `meshcast status` give it) or an int
    within u64. `UsageError` otherwise."""
    if isinstance(rid, str):
        text = rid.strip().lower()
        if len(text) == 16 and all(c in "0123456789abcdef" for c in text):
            return int(text, 16)
    elif isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid < 1 << 64:
        return rid
    raise UsageError(f"a replication id is 16 hex digits (see meshcast status), not {rid!r}")


def replicate_options(
    to: str | Sequence[str],
    *,
    rate: float | None,
    dest: str | None,
    strategy: str,
    variant: str,
    tree: str,
    max_connections: int,
    capacity_aware: bool,
    buddy: str | None = None,
) -> ReplicateOptions:
    """Check `Client.replicate`'s arguments (`UsageError`) and map the names to the
    indexes REPLICATE carries."""
    bytes_per_second = rate_value(rate)
    if buddy is not None and (not isinstance(buddy, str) or not buddy):
        raise UsageError(f"buddy must be a daemon name (or None), got {buddy!r}")
    if buddy is not None:
        try:
            parse_targets(buddy)
        except ValueError as exc:
            raise UsageError(f"bad buddy name: {exc}") from None
        if "," in buddy or buddy == ALL_TARGETS or buddy.startswith(GROUP_TARGET_PREFIX):
            raise UsageError(f"buddy must be one daemon's name, got {buddy!r}")
    if dest is not None and not isinstance(dest, str):
        raise UsageError(f"dest must be a str (a directory on each recipient), got {dest!r}")
    if (
        isinstance(max_connections, bool)
        or not isinstance(max_connections, int)
        or not 1 <= max_connections <= 255
    ):
        raise UsageError(f"max_connections must be an int within 1..255, got {max_connections!r}")
    if not isinstance(capacity_aware, bool):
        raise UsageError(f"capacity_aware must be True or False, got {capacity_aware!r}")
    return ReplicateOptions(
        targets=targets_text(to),
        rate=bytes_per_second,
        dest=dest or "",
        strategy=_index(strategy, REPLICATE_STRATEGIES, "strategy"),
        variant=_index(variant, REPLICATE_VARIANTS, "variant"),
        tree=_index(tree, REPLICATE_TREES, "tree"),
        max_connections=max_connections,
        capacity_aware=capacity_aware,
        buddy=buddy or "",
    )


# ---------------------------------------------------------------- the handle

RateSetter = Callable[[int, "float | None"], Awaitable[None]]


class Replication:
    """One replication in progress, started by `Client.replicate`.

    ``async for report in handle`` yields its reports (`ReplicationReport`) up to and
    including the final one, then stops. ``await handle.wait()`` returns the final report
    when every recipient holds a verified copy and raises `ReplicationFailed` (with the
    report) otherwise. Both raise `ClientError` if the session ends first: the daemon may
    still be replicating, but this client will hear no more of it.
    """

    def __init__(
        self,
        token: int,
        path: str,
        targets: str,
        set_rate: RateSetter | None = None,
        timeout: float = 5.0,
    ) -> None:
        """Internal: `Client.replicate` makes it (`set_rate`: its client's SET_RATE)."""
        self._set_rate = set_rate
        self._timeout = timeout
        self.token = token  # the REPLICATE's token (u32), unique among this client's
        self.path = path  # the file, on the daemon's host
        self.targets = targets  # as sent: "all", "group:G" or "name1,name2,..."
        self.latest: ReplicationReport | None = None  # the newest report received
        self.reports_dropped = 0  # progress reports dropped because nobody read them
        self._queue: deque[ReplicationReport] = deque()
        self._changed = asyncio.Event()
        self._final: ReplicationReport | None = None
        self._failure: ClientError | None = None

    @property
    def done(self) -> bool:
        """The final report has arrived (or the session ended first)."""
        return self._final is not None or self._failure is not None

    @property
    def final(self) -> ReplicationReport | None:
        return self._final

    def __repr__(self) -> str:
        state = self.latest.state if self.latest is not None else "requested"
        return f"<Replication {self.token} of {self.path!r} to {self.targets!r}: {state}>"

    # ------------------------------------------------------------ fed by the client's reader

    def _report(self, report: ReplicationReport) -> None:
        if self.done:
            return
        self.latest = report
        if report.final:
            self._final = report
        elif len(self._queue) >= MAX_QUEUED_REPORTS:
            self._queue.popleft()  # the newest progress tells more than the oldest
            self.reports_dropped += 1
        self._queue.append(report)
        self._changed.set()

    def _fail(self, error: ClientError) -> None:
        if self.done:
            return
        self._failure = error
        self._changed.set()

    # ------------------------------------------------------------ for the application

    async def next_report(self) -> ReplicationReport | None:
        """The next report not yet taken, waiting for one; None after the final one."""
        while True:
            if self._queue:
                return self._queue.popleft()
            if self._final is not None:
                return None
            if self._failure is not None:
                raise ClientError(str(self._failure), self._failure.code)
            self._changed.clear()
            await self._changed.wait()

    @property
    def rid(self) -> str | None:
        """The replication's id (16 hex digits) once the daemon's first report came."""
        return None if self.latest is None else self.latest.rid

    async def set_rate(self, rate: float | None) -> None:
        """Change the replication's upload cap while it runs: `rate` bytes/s per sender
        (None: no cap beyond the daemons' own), applied at the origin and sent to every
        recipient at once (protocol version 6). Returns once the origin daemon applied it.
        Raises `UsageError` (bad rate, version-5 daemon, replication over),
        `RequestRejected` (the daemon refused: e.g. BAD_RATE, UNKNOWN_REPLICATION once it
        ended) or `ClientError` (no answer within the client's timeout, session over)."""
        value = rate_value(rate)
        if self._set_rate is None:
            raise UsageError("this replication handle cannot change its rate")
        if self.done:
            raise UsageError(f"the replication of {self.path!r} is over")
        try:
            async with asyncio.timeout(self._timeout):
                while self.latest is None:  # its first report names it (at once)
                    if self._failure is not None:
                        raise ClientError(str(self._failure), self._failure.code)
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise ClientError(
                f"no report of the replication of {self.path!r} within {self._timeout} s"
            ) from None
        await self._set_rate(rid_value(self.latest.rid), value or None)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ReplicationReport:
        report = await self.next_report()
        if report is None:
            raise StopAsyncIteration
        return report

    async def wait(self) -> ReplicationReport:
        """The final report once it arrives; `ReplicationFailed` unless every recipient
        completed (`report.ok`); `ClientError` if the session ends first. Reports not
        yet iterated stay queued for ``async for``."""
        while self._final is None:
            if self._failure is not None:
                raise ClientError(str(self._failure), self._failure.code)
            self._changed.clear()
            await self._changed.wait()
        if not self._final.ok:
            raise ReplicationFailed(self._final)
        return self._final


__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "MAX_QUEUED_REPORTS",
    "RecipientProgress",
    "ReplicateOptions",
    "Replication",
    "ReplicationFailed",
    "ReplicationReport",
    "parse_report",
    "rate_value",
    "replicate_options",
    "rid_value",
    "targets_text",
]
