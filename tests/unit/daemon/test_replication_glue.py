"""`DaemonReplication`: the daemon's side of replication alone (no overlay, no sockets):
target resolution, failed answers, JSON reports, and the bounded control backlog."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable

import pytest

from meshcast.daemon.effects import DaemonEffect, DaemonEvent
from meshcast.daemon.replication import (
    MAX_CONTROL_BACKLOG,
    DaemonReplication,
    RateRefused,
    ReplicateAsk,
)
from meshcast.errors import BufferFull, UsageError
from meshcast.ids import NodeId
from meshcast.link.events import Transmit
from meshcast.replicate.engine import (
    HashFile,
    OpenStream,
    RecipientReport,
    ReplicationReport,
    Replicator,
    SendControl,
    StreamSend,
)
from meshcast.replicate.messages import (
    Offer,
    Progress,
    Rate,
    ReceiverState,
    decode_control,
    encode_control,
    encode_stream_message,
)
from meshcast.replicate.plan import PlanSpec, Strategy, Tree, Variant
from meshcast.sim.replication import SyntheticFile, SyntheticStore
from meshcast.wire.client import ErrorCode

A, B, C, D = NodeId(1), NodeId(2), NodeId(3), NodeId(4)
NAMES = {A: "a", B: "b", C: "c", D: "d"}
FILE = SyntheticFile("f", 10_000, 1024)
FANOUT = list(Strategy).index(Strategy.FANOUT)


class Harness:
    """The glue at daemon "a" with a recorded overlay (send_control) and client writer."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.store = SyntheticStore({FILE.manifest.digest: FILE})
        self.replicator = Replicator(A, self.store, rng=random.Random(5))
        self.controls: list[tuple[NodeId, bytes]] = []
        self.full = False  # the overlay's outbox takes nothing
        self.gone: set[NodeId] = set()  # destinations the overlay refuses
        self.reports: list[tuple[int, int, bool, dict[str, object]]] = []
        self.glue = DaemonReplication(
            self.replicator,
            NAMES,
            send_control=self._send_control,
            write_report=self._write_report,
            enabled=enabled,
        )

    def _send_control(self, dest: NodeId, payload: bytes) -> list[DaemonEffect]:
        if self.full:
            raise BufferFull("overlay outbox full")
        if dest in self.gone:
            raise UsageError("no route")
        self.controls.append((dest, payload))
        return [Transmit(dest, payload)]

    def _write_report(self, conn: int, token: int, final: bool, report: bytes) -> None:
        self.reports.append((conn, token, final, json.loads(report)))

    def ask(
        self,
        targets: str,
        *,
        view: Iterable[NodeId] = (A, B, C, D),
        hosts: dict[str, list[NodeId]] | None = None,
        path: str = "f",
        strategy: int = FANOUT,
        buddy: str = "",
    ) -> list[DaemonEffect]:
        out: list[DaemonEffect] = []
        ask = ReplicateAsk(
            token=7,
            path=path,
            targets=targets,
            dest="",
            rate=0.0,
            strategy=strategy,
            variant=int(Variant.K1),
            tree=list(Tree).index(Tree.CHAIN),
            max_connections=9,
            capacity_aware=False,
            buddy=buddy,
        )
        self.glue.request(
            3,
            ask,
            0.0,
            view=view,
            group_hosts=lambda g: (hosts or {}).get(g, []),
            out=out,
        )
        return out

    def start(self, targets: str, **kwargs: object) -> tuple[int, list[DaemonEffect]]:
        """Ask, then hash: the replication's id and the streams it opens."""
        (hashing,) = self.ask(targets, **kwargs)  # type: ignore[arg-type]
        assert isinstance(hashing, HashFile)
        assert hashing.path == "f"
        out: list[DaemonEffect] = []
        self.glue.apply(self.replicator.hashed(hashing.rid, FILE.manifest, None, 0.1), out)
        return hashing.rid, out


def peers_opened(effects: list[DaemonEffect]) -> list[NodeId]:
    return [e.peer for e in effects if isinstance(e, OpenStream)]


# ---------------------------------------------------------------- targets


def test_all_means_every_other_daemon_of_the_view() -> None:
    h = Harness()
    _, out = h.start("all")
    assert peers_opened(out) == [B, C, D]
    assert any(isinstance(e, StreamSend) for e in out)
    assert any(isinstance(e, DaemonEvent) and e.name == "replication_started" for e in out)


@pytest.mark.parametrize(
    ("targets", "expected"), [("c", [C]), ("b,d", [B, D]), (" d , b,d ", [D, B])]
)
def test_names(targets: str, expected: list[NodeId]) -> None:
    h = Harness()
    _, out = h.start(targets)
    assert peers_opened(out) == expected


def test_group_means_the_daemons_hosting_its_members() -> None:
    h = Harness()
    _, out = h.start("group:g", hosts={"g": [D, A, B, D]})
    assert peers_opened(out) == [B, D]  # not the origin, each once


@pytest.mark.parametrize(
    ("targets", "view", "hosts", "detail"),
    [
        ("x", (A, B), {}, "unknown daemon 'x'"),
        ("b,,c", (A, B), {}, "unknown daemon ''"),
        ("a", (A, B), {}, "a is the origin itself"),
        ("b,a", (A, B), {}, "a is the origin itself"),
        ("all", (A,), {}, "no recipients"),
        ("all", (), {}, "no recipients"),
        ("group:g", (A, B), {"g": [A]}, "no other daemon hosts a member of group 'g'"),
        ("group:nobody", (A, B), {}, "group 'nobody'"),
    ],
)
def test_bad_targets_answer_a_failed_report(
    targets: str, view: tuple[NodeId, ...], hosts: dict[str, list[NodeId]], detail: str
) -> None:
    h = Harness()
    assert h.ask(targets, view=view, hosts=hosts) == []
    ((conn, token, final, report),) = h.reports
    assert (conn, token, final, report["state"]) == (3, 7, True, "failed")
    assert detail in str(report["detail"])
    assert h.replicator.statistics().transfers == 0


def test_a_bad_plan_choice_answers_a_failed_report() -> None:
    h = Harness()
    assert h.ask("b", strategy=99) == []
    ((_, _, final, report),) = h.reports
    assert (final, report["state"]) == (True, "failed")


def test_a_disabled_daemon_answers_failed() -> None:
    h = Harness(enabled=False)
    assert h.ask("all") == []
    ((conn, token, final, report),) = h.reports
    assert (conn, token, final, report["state"]) == (3, 7, True, "failed")
    assert "not enabled" in str(report["detail"])


# ---------------------------------------------------------------- reports


def progress(rid: int, state: ReceiverState, held: int, path: str = "") -> bytes:
    return encode_control(Progress(rid, state, held, min(held * 1024, FILE.size), 0, "", path))


def test_reports_are_json_with_daemon_names_and_end_once() -> None:
    h = Harness()
    rid, _ = h.start("b,c")
    out: list[DaemonEffect] = []
    h.glue.apply(
        h.replicator.control_received(B, progress(rid, ReceiverState.RECEIVING, 3), 0.2), out
    )
    h.glue.apply(h.replicator.on_timer(0.3), out)
    running = h.reports[-1]
    assert running[:3] == (3, 7, False)
    report = running[3]
    assert report["rid"] == f"{rid:016x}"
    assert (report["name"], report["size"], report["state"]) == ("f", FILE.size, "running")
    assert report["digest"] == FILE.manifest.digest.hex()
    recipients = {r["daemon"]: r for r in report["recipients"]}  # type: ignore[attr-defined]
    assert set(recipients) == {"b", "c"}
    assert (recipients["b"]["state"], recipients["b"]["held_bytes"]) == ("receiving", 3072)
    assert (recipients["c"]["state"], recipients["c"]["path"]) == ("waiting", None)
    for node, name in ((B, "b"), (C, "c")):
        done = progress(rid, ReceiverState.COMPLETE, FILE.manifest.chunk_count, f"/data/{name}/f")
        h.glue.apply(h.replicator.control_received(node, done, 0.4), out)
    conn, token, final, report = h.reports[-1]
    assert (conn, token, final, report["state"]) == (3, 7, True, "complete")
    paths = {r["daemon"]: r["path"] for r in report["recipients"]}  # type: ignore[attr-defined]
    assert paths == {"b": "/data/b/f", "c": "/data/c/f"}
    count = len(h.reports)
    h.glue.apply(h.replicator.on_timer(1.0), out)
    assert len(h.reports) == count  # nothing after the final report
    status = h.glue.status()
    assert status["counters"]["completed"] == 1  # type: ignore[index]


def test_a_client_that_left_gets_no_reports() -> None:
    h = Harness()
    rid, _ = h.start("b")
    # the first report, at once: the replication's id while the file is hashed
    (first,) = h.reports
    assert first[:3] == (3, 7, False)
    assert (first[3]["rid"], first[3]["state"], first[3]["name"]) == (f"{rid:016x}", "hashing", "f")
    assert [(r["daemon"], r["state"]) for r in first[3]["recipients"]] == [("b", "waiting")]  # type: ignore[attr-defined]
    h.glue.forget_client(3)
    out: list[DaemonEffect] = []
    h.glue.apply(h.replicator.on_timer(0.5), out)
    assert h.reports == [first]


def test_a_daemon_without_a_name_is_reported_by_number() -> None:
    h = Harness()
    r = RecipientReport(NodeId(42), "waiting", 0, 0, 0.0, None, "", "")
    report = h.glue.report_dict(ReplicationReport(1, "f", 0, "", "running", 0.0, (r,)))
    assert report["recipients"][0]["daemon"] == "42"  # type: ignore[index]


# ---------------------------------------------------------------- the control backlog


def controls(n: int, dest: NodeId = B) -> list[SendControl]:
    return [SendControl(dest, b"MCRP" + i.to_bytes(4, "big")) for i in range(n)]


def test_buffer_full_keeps_controls_waiting_until_flush() -> None:
    h = Harness()
    h.full = True
    out: list[DaemonEffect] = []
    h.glue.apply(controls(5), out)
    assert out == []
    assert h.glue.has_backlog()
    h.glue.flush(out)  # still full
    assert out == []
    h.full = False
    h.glue.flush(out)
    assert [payload for _, payload in h.controls] == [c.payload for c in controls(5)]
    assert out == [Transmit(B, c.payload) for c in controls(5)]
    assert not h.glue.has_backlog()
    assert h.glue.controls_dropped == 0


def test_the_backlog_is_bounded_and_keeps_the_newest() -> None:
    h = Harness()
    h.full = True
    out: list[DaemonEffect] = []
    many = controls(MAX_CONTROL_BACKLOG + 10)
    h.glue.apply(many, out)
    assert h.glue.controls_dropped == 10
    h.full = False
    h.glue.flush(out)
    assert [payload for _, payload in h.controls] == [c.payload for c in many[10:]]
    assert h.glue.status()["counters"]["controls_dropped"] == 10  # type: ignore[index]


def test_a_refused_destination_is_dropped_and_the_rest_sent() -> None:
    h = Harness()
    h.gone.add(C)
    out: list[DaemonEffect] = []
    h.glue.apply([*controls(1, B), *controls(1, C), *controls(1, D)], out)
    assert [dest for dest, _ in h.controls] == [B, D]
    assert h.glue.controls_dropped == 1
    assert not h.glue.has_backlog()


# ---------------------------------------------------------------- buddy, SET_RATE, stalls


def test_the_buddy_is_resolved_and_left_out_of_all() -> None:
    h = Harness()
    rid, out = h.start("all", buddy="c")
    assert peers_opened(out) == [C, B, D]  # the buddy is told first, then the recipients fed
    assert h.replicator.runs(rid) == "origin"


@pytest.mark.parametrize(
    ("targets", "buddy", "why"),
    [
        ("b", "zz", "unknown daemon 'zz' as the buddy"),
        ("b", "a", "the buddy a is the origin itself"),
        ("b", "d", "the buddy d is not in this daemon's view"),
        ("b,c", "c", "c is the buddy: it cannot be a recipient too"),
    ],
)
def test_a_bad_buddy_fails_the_request(targets: str, buddy: str, why: str) -> None:
    h = Harness()
    assert h.ask(targets, buddy=buddy, view=(A, B, C)) == []
    ((_, _, final, report),) = h.reports
    assert final
    assert (report["state"], report["detail"]) == ("failed", why)


def test_set_rate_at_the_origin_reaches_every_recipient() -> None:
    h = Harness()
    rid, _ = h.start("b,c")
    h.controls.clear()
    out: list[DaemonEffect] = []
    h.glue.set_rate(rid, 50_000.0, 0.2, out)
    rates = {dest: decode_control(payload) for dest, payload in h.controls}
    assert rates == {B: Rate(rid, 50_000.0), C: Rate(rid, 50_000.0)}
    h.glue.set_rate(rid, 0.0, 0.3, out)  # 0: no cap
    assert decode_control(h.controls[-1][1]) == Rate(rid, 0.0)
    (transfer,) = h.glue.transfers()
    assert transfer["rate"] == 0.0


@pytest.mark.parametrize(
    ("which", "rate", "code"),
    [
        ("other", 1e6, ErrorCode.UNKNOWN_REPLICATION),
        ("received", 1e6, ErrorCode.NOT_THE_ORIGIN),
        ("mine", 1e-3, ErrorCode.BAD_RATE),
    ],
)
def test_set_rate_refusals_are_typed(which: str, rate: float, code: ErrorCode) -> None:
    h = Harness()
    rid, _ = h.start("b")
    if which == "received":  # a replication b originates, with us (a) as a recipient
        other = SyntheticFile("g", 5_000, 1024).manifest
        spec = PlanSpec(B, (A,), other.chunk_count, Strategy.FANOUT)
        offer = Offer(99, 0.0, "", ((0, other.chunk_count),), spec, other)
        h.replicator.stream_accepted(1 << 32, B, 0.2)
        h.replicator.stream_data(1 << 32, encode_stream_message(offer), 0.2)
        rid = 99
    elif which == "other":
        rid += 1
    with pytest.raises(RateRefused) as refused:
        h.glue.set_rate(rid, rate, 0.3, [])
    assert refused.value.code == code


def test_a_stalled_transfer_names_the_daemons_it_waits_on() -> None:
    h = Harness()
    h.start("b,c")  # (FANOUT: the origin feeds both; neither answers its OFFER)
    h.replicator.on_timer(30.0)
    (transfer,) = h.glue.transfers()
    stalled = transfer["stalled"]
    assert isinstance(stalled, dict)
    assert stalled["waiting_on"] == [2, 3]
    assert stalled["waiting_on_daemons"] == ["b", "c"]
    assert stalled["for"] >= 10.0
    assert "2 receivers take no data" in stalled["why"]
