"""`DaemonNode` alone: fair reading across client connections, reading paused while a
frame waits, the protocol byte of overlay DATA, probes, the bulkhead and strict mode,
and the slow client's backlog handed out a chunk at a time."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import FrozenInstanceError, dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshcast.daemon import (
    ClientClose,
    ClientReading,
    ClientWrite,
    DaemonEffect,
    DaemonEvent,
    DaemonNode,
    DaemonNodeConfig,
)
from meshcast.daemon.clients import ClientStreams
from meshcast.daemon.layers import DaemonLayers
from meshcast.daemon.probes import Probe, decode_probe, encode_probe
from meshcast.errors import ConfigError, DecodeError
from meshcast.group.sessions import SessionEffect, SessionTable
from meshcast.ids import NodeId
from meshcast.link import LinkConfig
from meshcast.overlay.node import OverlayConfig, OverlayNode
from meshcast.sim.daemon import GroupLink, build_daemon_sim
from meshcast.sim.network import LinkModel
from meshcast.wire.client import (
    ErrorCode,
    ErrorReport,
    FrameDecoder,
    Hello,
    Multicast,
    Ping,
    Pong,
    Replicate,
    SetRate,
    Welcome,
    encode,
)
from meshcast.wire.overlay import Upper


class FullOutbox(OverlayNode):
    """An overlay whose outbox reports full while `full` is set."""

    full = False

    def can_multicast(self) -> bool:
        return not self.full and super().can_multicast()


class FaultySessions(SessionTable):
    """A session table whose `connected` returns `answer`'s effects, or raises what it
    raises."""

    answer: Callable[[], list[object]] | None = None

    def connected(
        self, conn: int, now: float | None = None, *, remote: bool = False
    ) -> list[SessionEffect]:
        if self.answer is None:
            return super().connected(conn, now, remote=remote)
        return self.answer()  # type: ignore[return-value]


def lone_daemon(**kwargs: object) -> DaemonNode:
    return DaemonNode(
        NodeId(1),
        DaemonNodeConfig("d1", frames_per_turn=8),
        OverlayConfig(neighbours={}, upload_bps={NodeId(1): 1e9}, link=LinkConfig()),
        incarnation=1,
        rng=random.Random(1),
        wall_clock=lambda: 0.0,
        **kwargs,  # type: ignore[arg-type]
    )


def settle(node: DaemonNode, until: float) -> float:
    """Run the node's timer up to `until` (its view of itself is installed by then)."""
    now = 0.0
    node.start(now)
    for _ in range(10_000):
        deadline = node.next_deadline()
        if deadline is None or deadline > until:
            return until
        now = max(now, deadline)
        node.on_timer(now)
    raise AssertionError("the timer never settled")


def frames_to(conn: int, effects: Sequence[DaemonEffect]) -> list[object]:
    decoder = FrameDecoder()
    for effect in effects:
        if isinstance(effect, ClientWrite) and effect.conn == conn:
            decoder.feed(effect.data)
    return list(decoder)


def test_one_connection_pouring_frames_in_does_not_starve_another() -> None:
    node = lone_daemon()
    now = settle(node, 1.0)
    for conn, name in ((1, "pour"), (2, "other")):
        node.client_connected(conn, now)
        assert isinstance(
            frames_to(conn, node.client_data(conn, encode(Hello(name)), now))[0], Welcome
        )
    burst = b"".join(encode(Ping(i)) for i in range(30))
    effects = node.client_data(1, burst, now)
    # one turn: frames_per_turn frames, then the connection is paused with input waiting
    assert [f.nonce for f in frames_to(1, effects)] == list(range(8))  # type: ignore[attr-defined]
    assert ClientReading(1, paused=True) in effects
    assert node.next_deadline() == now  # the rest is taken at the next turn, right away
    # the other client is served at once, ahead of the rest of the burst
    assert frames_to(2, node.client_data(2, encode(Ping(99)), now)) == [Pong(99)]
    taken: list[int] = []
    effects = []
    for _ in range(10):
        step = node.on_timer(now)
        effects += step
        taken += [f.nonce for f in frames_to(1, step)]  # type: ignore[attr-defined]
    assert taken == list(range(8, 30))
    assert effects[-1] == ClientReading(1, paused=False) or ClientReading(1, False) in effects
    assert node.statistics().client_turns >= 3


def test_a_frame_that_cannot_be_taken_keeps_its_connection_paused() -> None:
    node = lone_daemon(layers=DaemonLayers(overlay=FullOutbox))
    now = settle(node, 1.0)
    node.client_connected(1, now)
    node.client_data(1, encode(Hello("c")), now)
    assert isinstance(node.overlay, FullOutbox)
    node.overlay.full = True
    effects = node.client_data(1, encode(Multicast(("g",), b"x")), now)
    assert ClientReading(1, paused=True) in effects
    assert not frames_to(1, effects)  # not taken, not refused: it waits
    assert node.next_deadline() != now  # and nothing spins meanwhile
    node.overlay.full = False
    effects = node.on_timer(max(now, node.next_deadline() or now))
    effects += node.on_timer(node.next_deadline() or now)
    assert ClientReading(1, paused=False) in effects
    assert node.sessions.statistics().messages_submitted == 1


def test_bytes_that_do_not_decode_end_the_session_with_bad_frame() -> None:
    node = lone_daemon()
    now = settle(node, 1.0)
    node.client_connected(1, now)
    effects = node.client_data(1, b"\x00\x00\x00\x02\xee\xee", now)
    errors = [f for f in frames_to(1, effects) if isinstance(f, ErrorReport)]
    assert [e.code for e in errors] == [ErrorCode.BAD_FRAME]
    assert ClientClose(1) in effects
    assert node.client_data(1, encode(Hello("late")), now) == []  # no longer read


def faulty_sessions(node: DaemonNode, answer: Callable[[], list[object]]) -> None:
    """From now on, `node`'s session table answers a new connection with `answer()`."""
    assert isinstance(node.sessions, FaultySessions)
    node.sessions.answer = answer


def test_a_layer_that_raises_is_contained_and_counted() -> None:
    node = lone_daemon(layers=DaemonLayers(sessions=FaultySessions))
    now = settle(node, 1.0)

    def broken() -> list[object]:
        raise RuntimeError("boom")

    faulty_sessions(node, broken)
    effects = node.client_connected(1, now)
    bugs = [e for e in effects if isinstance(e, DaemonEvent) and e.name == "bug_contained"]
    assert len(bugs) == 1
    assert bugs[0].level == "error"
    assert "boom" in str(bugs[0].fields["error"])
    assert node.statistics().internal_errors == 1
    strict = lone_daemon(contain_bugs=False, layers=DaemonLayers(sessions=FaultySessions))
    settle(strict, 1.0)
    faulty_sessions(strict, broken)
    with pytest.raises(RuntimeError, match="boom"):
        strict.client_connected(1, now)


@dataclass(frozen=True)
class Novel:
    value: int


def test_unknown_effects_are_counted_once_logged_or_fail_in_strict_mode() -> None:
    node = lone_daemon(layers=DaemonLayers(sessions=FaultySessions))
    now = settle(node, 1.0)
    faulty_sessions(node, lambda: [Novel(1), Novel(2)])
    effects = node.client_connected(1, now)
    events = [e for e in effects if isinstance(e, DaemonEvent) and e.name == "unknown_effect"]
    assert len(events) == 1
    assert "Novel" in str(events[0].fields["effect"])
    assert node.statistics().unknown_effects == 2
    strict = lone_daemon(contain_bugs=False, layers=DaemonLayers(sessions=FaultySessions))
    settle(strict, 1.0)
    faulty_sessions(strict, lambda: [Novel(1)])
    with pytest.raises(AssertionError, match=r"unknown effect .*Novel"):
        strict.client_connected(1, now)


def test_overlay_data_goes_to_the_protocol_its_header_names() -> None:
    links = [GroupLink(1, 2, LinkModel(delay=0.001))]
    dsim = build_daemon_sim(links, seed=3, probe_interval=0.2)
    dsim.sim.run(until=1.5)
    dsim.sim.act(NodeId(1), lambda d, now: d.overlay.multicast([NodeId(2)], b"?", now, upper=9))
    dsim.sim.act(
        NodeId(1), lambda d, now: d.overlay.multicast([NodeId(2)], b"bad", now, upper=Upper.PROBE)
    )
    dsim.sim.run(until=2.0)
    stats = dsim.node(NodeId(2)).statistics()
    assert stats.unknown_upper_dropped == 1
    assert stats.probes_malformed == 1
    assert stats.probes_received >= 2  # probe_interval 0.2 s since the view formed
    probes = [e for n, _, e in dsim.events if n == 2 and e.name == "probe_received"]
    assert probes
    assert probes[0].fields["source"] == 1
    assert probes[0].fields["hops"] == 1
    with pytest.raises(FrozenInstanceError):
        stats.probes_received = 0  # type: ignore[misc]


def test_probe_codec_round_trips_and_rejects_other_sizes() -> None:
    assert decode_probe(encode_probe(Probe(7, 12.5))) == Probe(7, 12.5)
    with pytest.raises(DecodeError):
        decode_probe(b"\x00" * 15)


def test_a_slow_clients_backlog_is_handed_out_a_chunk_at_a_time() -> None:
    streams = ClientStreams(write_chunk=100)
    streams.open(1)
    streams.write(1, b"a" * 60)
    assert streams.writing_paused(1)  # the first pause of a slow period
    assert not streams.writing_paused(1)  # not a new one
    for _ in range(5):
        streams.write(1, b"b" * 60)
    assert streams.flush() == []  # queued here, not handed out
    assert streams.backlog_bytes() == 360
    written = b""
    rounds = 0
    while True:
        writes, drained = streams.writing_resumed(1)
        rounds += 1
        assert sum(len(w.data) for w in writes) <= 160  # a chunk (whole frames)
        written += b"".join(w.data for w in writes)
        if drained:
            break
        assert streams.wants_writing(1)
    assert written == b"a" * 60 + b"b" * 300
    assert rounds >= 3
    streams.write(1, b"c")
    assert streams.flush() == [ClientWrite(1, b"c")]  # no longer slow


def test_the_daemon_layer_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="probe_interval"):
        DaemonNodeConfig("d", probe_interval=0.0)
    with pytest.raises(ConfigError, match="frames_per_turn"):
        DaemonNodeConfig("d", frames_per_turn=0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.integers(1, 3),
            st.one_of(
                st.binary(max_size=300),
                st.sampled_from(
                    [
                        encode(Hello("h")),
                        encode(Ping(1)),
                        encode(Multicast(("g",), b"x")),
                        b"\xff\xff\xff\xff",
                        b"\x00\x00\x00\x00",
                    ]
                ),
            ),
        ),
        max_size=25,
    )
)
def test_any_bytes_from_any_client_never_raise_and_stay_bounded(
    chunks: list[tuple[int, bytes]],
) -> None:
    """Strict mode (the simulator's: a layer's exception propagates): whatever clients
    send, the daemon answers with frames or closes and never raises; its turns end (no
    input is left takeable), and a lost connection leaves nothing behind."""
    node = lone_daemon(contain_bugs=False)
    now = settle(node, 1.0)
    for conn in (1, 2, 3):
        node.client_connected(conn, now)
    for conn, data in chunks:
        node.client_data(conn, data, now)
        for _ in range(20):  # the turns of input left waiting
            if node.next_deadline() != now:
                break
            node.on_timer(now)
        assert node.next_deadline() != now  # every takeable frame was taken
    for conn in (1, 2, 3):
        node.client_lost(conn, now + 1)
    assert len(node.clients) == 0
    assert node.sessions.open_sessions() == 0


def test_the_drivers_status_sections_join_the_nodes_at_every_depth() -> None:
    node = lone_daemon(
        status=lambda _now: {
            "daemon": {"pid": 7},
            "counters": {"daemon": {"datagrams_received": 3}},
            "security": {"mode": "encrypted"},
        }
    )
    settle(node, 1.0)
    report = node.sessions.status(1.0)
    assert report["daemon"]["name"] == "d1"  # type: ignore[index]
    assert report["daemon"]["pid"] == 7  # type: ignore[index]
    daemon_counters = report["counters"]["daemon"]  # type: ignore[index]
    assert daemon_counters["datagrams_received"] == 3
    assert daemon_counters["probes_sent"] == 0  # the node's, kept beside the driver's
    assert report["security"] == {"mode": "encrypted"}


def test_set_rate_is_answered_with_a_typed_error_or_ends_an_old_session() -> None:
    node = lone_daemon()
    now = settle(node, 1.0)
    node.client_connected(1, now)
    (welcome,) = frames_to(1, node.client_data(1, encode(Hello("new")), now))
    assert isinstance(welcome, Welcome)
    assert welcome.version == 6
    for frame, code in (
        (SetRate(0xAB, 1e6, 7), ErrorCode.UNKNOWN_REPLICATION),
        (SetRate(0xAB, math.nan, 8), ErrorCode.BAD_RATE),
        (SetRate(0xAB, -1.0, 9), ErrorCode.BAD_RATE),
    ):
        (error,) = frames_to(1, node.client_data(1, encode(frame), now))
        assert isinstance(error, ErrorReport)
        assert (error.code, error.request_id) == (code, frame.token)
    assert frames_to(1, node.client_data(1, encode(Ping(3)), now)) == [Pong(3)]  # goes on
    # a version-5 session may neither SET_RATE nor name a buddy
    old: tuple[tuple[int, SetRate | Replicate, str], ...] = (
        (2, SetRate(0xAB, 1e6, 1), "SET_RATE needs protocol version 6, the session has 5"),
        (3, Replicate("/f", "all", buddy="d2"), "REPLICATE with a buddy needs protocol version 6"),
    )
    for conn, request, text in old:
        node.client_connected(conn, now)
        node.client_data(conn, encode(Hello(f"old{conn}", max_version=5)), now)
        effects = node.client_data(conn, encode(request), now)
        (error,) = [f for f in frames_to(conn, effects) if isinstance(f, ErrorReport)]
        assert error.code == ErrorCode.UNEXPECTED_FRAME
        assert text in error.text
        assert ClientClose(conn) in effects
