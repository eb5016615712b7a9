"""`DaemonReplication`'s agreed completion, alone (no group layer, no sockets): a
replication to a group ends with exactly one BLOB_HELD body handed to `announce`, built
from the final report (who holds the blob, who misses what and why); one the group layer
cannot take yet waits, bounded, for the next `flush`."""

from __future__ import annotations

import random

from meshcast.daemon.effects import DaemonEffect, DaemonEvent
from meshcast.daemon.replication import (
    MAX_ANNOUNCEMENTS,
    DaemonReplication,
    ReplicateAsk,
)
from meshcast.errors import BufferFull
from meshcast.ids import NodeId
from meshcast.replicate.engine import (
    HashFile,
    RecipientReport,
    ReplicationReport,
    ReplicationUpdate,
    Replicator,
)
from meshcast.replicate.messages import Progress, ReceiverState, encode_control
from meshcast.replicate.plan import Strategy, Tree, Variant
from meshcast.sim.replication import SyntheticFile, SyntheticStore
from meshcast.wire.client import (
    LENGTH,
    BlobHeld,
    BlobMissing,
    FrameType,
    blob_held_body,
    decode,
    encode,
)

A, B, C, D = NodeId(1), NodeId(2), NodeId(3), NodeId(4)
NAMES = {A: "a", B: "b", C: "c", D: "d"}
FILE = SyntheticFile("f.bin", 10_000, 1024)
FANOUT = list(Strategy).index(Strategy.FANOUT)


def event_of(body: bytes) -> BlobHeld:
    """A BLOB_HELD body as the receiving daemons turn it into a frame, decoded."""
    frame = decode(LENGTH.pack(1 + len(body)) + bytes((FrameType.BLOB_HELD,)) + body)
    assert isinstance(frame, BlobHeld)
    return frame


class Harness:
    """The glue at daemon "a" with a recorded group layer (`announce`)."""

    def __init__(self) -> None:
        self.replicator = Replicator(
            A, SyntheticStore({FILE.manifest.digest: FILE}), rng=random.Random(3)
        )
        self.full = False  # the group layer takes nothing now
        self.announced: list[tuple[str, bytes]] = []
        self.reports: list[tuple[bool, bytes]] = []
        self.glue = DaemonReplication(
            self.replicator,
            NAMES,
            send_control=lambda dest, payload: [],
            write_report=lambda conn, token, final, report: self.reports.append((final, report)),
            announce=self._announce,
        )

    def _announce(self, group: str, body: bytes) -> list[DaemonEffect]:
        if self.full:
            raise BufferFull("group window full")
        self.announced.append((group, body))
        return [DaemonEvent("announced", {"group": group})]

    def start(
        self,
        targets: str,
        hosts: dict[str, list[NodeId]],
        *,
        hashed: bool = True,
        denied: str | None = None,
    ) -> int:
        out: list[DaemonEffect] = []
        ask = ReplicateAsk(
            token=7,
            path="f.bin",
            targets=targets,
            dest="",
            rate=0.0,
            strategy=FANOUT,
            variant=int(Variant.K1),
            tree=list(Tree).index(Tree.CHAIN),
            max_connections=9,
            capacity_aware=False,
        )
        self.glue.request(
            3,
            ask,
            0.0,
            view=(A, B, C, D),
            group_hosts=lambda g: hosts.get(g, []),
            out=out,
            send_denied=lambda g: denied,
        )
        if not out:
            return 0
        (hashing,) = out
        assert isinstance(hashing, HashFile)
        if hashed:
            self.glue.apply(self.replicator.hashed(hashing.rid, FILE.manifest, None, 0.1), [])
        return hashing.rid

    def progress(self, node: NodeId, rid: int, state: ReceiverState, detail: str = "") -> None:
        chunks = FILE.manifest.chunk_count if state == ReceiverState.COMPLETE else 3
        held = FILE.size if state == ReceiverState.COMPLETE else 3 * 1024
        message = encode_control(Progress(rid, state, chunks, held, 0, detail, "/copy"))
        self.glue.apply(self.replicator.control_received(node, message, 0.5), [])


def test_a_completed_replication_to_a_group_announces_once() -> None:
    h = Harness()
    rid = h.start("group:g", {"g": [A, B, C]})
    h.progress(B, rid, ReceiverState.COMPLETE)
    assert h.announced == []  # not before the final report
    h.progress(C, rid, ReceiverState.COMPLETE)
    ((group, body),) = h.announced
    assert group == "g"
    assert event_of(body) == BlobHeld(
        group="g",
        rid=f"{rid:016x}",
        name="f.bin",
        size=FILE.size,
        digest=FILE.manifest.digest.hex(),
        origin="a",
        complete=True,
        held_by=("a", "b", "c"),
        missing=(),
    )
    h.glue.apply(h.replicator.on_timer(5.0), [])
    assert len(h.announced) == 1  # nothing after the final report
    assert h.glue.status()["counters"]["blob_events_sent"] == 1  # type: ignore[index]


def test_a_failed_copy_says_who_misses_what_and_why() -> None:
    h = Harness()
    rid = h.start("group:g", {"g": [B, C]})
    h.progress(B, rid, ReceiverState.COMPLETE)
    h.progress(C, rid, ReceiverState.FAILED, "cannot write /data/f.bin: Permission denied")
    ((_, body),) = h.announced
    event = event_of(body)
    assert (event.complete, event.held_by) == (False, ("a", "b"))
    assert event.missing == (
        BlobMissing("c", 3 * 1024, "cannot write /data/f.bin: Permission denied"),
    )


def test_a_file_that_cannot_be_hashed_is_held_by_nobody() -> None:
    h = Harness()
    rid = h.start("group:g", {"g": [B, D]}, hashed=False)
    h.glue.apply(h.replicator.hashed(rid, None, "no such file", 0.1), [])
    ((_, body),) = h.announced
    event = event_of(body)
    assert (event.complete, event.held_by, event.digest) == (False, (), "")
    assert [(m.daemon, m.held_bytes) for m in event.missing] == [("b", 0), ("d", 0)]
    assert all("no such file" in m.reason for m in event.missing)


def test_other_targets_announce_nothing() -> None:
    h = Harness()
    for targets in ("b,c", "all"):
        rid = h.start(targets, {})
        h.glue.apply(h.replicator.hashed(rid, None, "gone", 0.2), [])
    assert h.announced == []


def test_an_event_waits_while_the_group_layer_is_full() -> None:
    h = Harness()
    h.full = True
    rid = h.start("group:g", {"g": [B]})
    h.progress(B, rid, ReceiverState.COMPLETE)
    assert h.announced == []
    assert h.glue.has_backlog()
    out: list[DaemonEffect] = []
    h.glue.flush(out)  # still full
    assert (h.announced, out) == ([], [])
    h.full = False
    h.glue.flush(out)
    assert [g for g, _ in h.announced] == ["g"]
    assert out == [DaemonEvent("announced", {"group": "g"})]
    assert not h.glue.has_backlog()
    h.glue.flush(out)
    assert len(h.announced) == 1  # sent once


def test_waiting_events_are_bounded_and_the_newest_kept() -> None:
    h = Harness()
    h.full = True
    report = ReplicationReport(0, "f", 1, "ab", "complete", 1.0, ())
    for rid in range(1, MAX_ANNOUNCEMENTS + 4):
        h.glue.watch_group(rid, "g", ())
        h.glue.apply([ReplicationUpdate(rid, report, True)], [])
    h.full = False
    h.glue.flush([])
    assert len(h.announced) == MAX_ANNOUNCEMENTS
    assert h.glue.announcements_dropped == 3


def test_long_and_odd_reasons_are_clipped_to_the_format() -> None:
    h = Harness()
    r = RecipientReport(B, "failed", 10, 0, 0.0, None, "bad\nline " + "x" * 400, "")
    report = ReplicationReport(9, "n\tame", 20, "ab" * 32, "failed", 1.0, (r,))
    event = h.glue.blob_held("g", (B, NodeId(77)), report)
    assert event_of(encode_body(event)) == event
    (b, other) = event.missing
    assert (b.daemon, len(b.reason.encode())) == ("b", 255)
    assert "\n" not in b.reason
    assert (other.daemon, other.held_bytes) == ("77", 0)  # a daemon without a name


def encode_body(event: BlobHeld) -> bytes:
    encode(event)  # valid, or ValueError
    return blob_held_body(event)


def test_a_client_that_may_not_send_to_the_group_is_refused() -> None:
    h = Harness()
    assert h.start("group:g", {"g": [B]}, denied="#c#a may not send to group 'g'") == 0
    ((final, report),) = h.reports
    assert final
    assert b"may not send to group 'g': the end of a replication to it is sent there" in report
    assert h.replicator.statistics().transfers == 0
    assert h.start("b", {}, denied="never asked: not a group") != 0  # other targets: no check
