"""One overlay daemon as a sans-I/O state machine.

It owns the Hop links to its configured neighbours, floods link-state, installs views,
routes every source's messages over that source's tree with explicit destination lists
split per next hop (seed 001, claim 4), paces each source at its tree's bottleneck rate
(seed 000, claim 1) and limits it to a window of messages the slowest destination has not
yet delivered (Spread §2.1). Theory: docs/design/overlay.md.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass, field, replace

from meshcast.compile_hints import mypyc_attr
from meshcast.errors import BufferFull, ConfigError, DecodeError, UsageError
from meshcast.ids import NodeId
from meshcast.link import (
    Delivered,
    HopLink,
    Link,
    LinkConfig,
    LinkEffect,
    LinkEndpoint,
    LinkEstablished,
    LinkFailed,
    LinkStats,
    PeerRestarted,
    Transmit,
)
from meshcast.link.pacer import Pacer
from meshcast.link.secure import RECORD_OVERHEAD, LinkSecurity, SecureLink
from meshcast.overlay.routing import BUILDERS, RoutingTable
from meshcast.overlay.view import LinkStateDatabase, View
from meshcast.wire import HEADER_SIZE, PIECE_HEAD, UDP_IP_OVERHEAD, WHOLE_HEAD
from meshcast.wire.overlay import (
    MAX_HOPS,
    Data,
    Feedback,
    Lsa,
    LsaEntry,
    Upper,
    decode_overlay,
    encode_data_head,
    encode_feedback,
    encode_lsa,
)
from meshcast.wire.packet import STATE_BLOCK

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Neighbour:
    weight: float  # routing cost of the link
    bandwidth_bps: float  # capacity of the link; its Hop pacer runs at this rate
    mtu: int | None = None  # bytes per datagram on this link (None: the link config's)


@dataclass(frozen=True, slots=True)
class OverlayConfig:
    neighbours: Mapping[NodeId, Neighbour]
    upload_bps: Mapping[NodeId, float]  # every daemon's upload capacity, for tree rates
    link: LinkConfig = field(default_factory=LinkConfig)
    policy: str = "shortest-path"
    view_settle_interval: float = 0.05  # s: let a burst of LSAs land before recomputing
    # s: re-originate our LSA (a new sequence number, so it floods across the whole
    # overlay) this long after the last one, even without a change. Links are reliable
    # and a new link exchanges databases, but an LSA dropped by a full link queue would
    # otherwise be missing until the next change. None: only on a change (experiments).
    lsa_refresh_interval: float | None = None
    max_dests_per_packet: int = 50  # destinations listed in one data message
    window_messages: int = 1000  # a source's messages not yet delivered by some destination
    max_outbox_messages: int = 10_000  # accepted but not yet sent (rate or window limited)
    feedback_every: int = 64  # a destination reports progress after this many messages
    feedback_interval: float = 0.05  # s: ...or after this long with unreported progress
    dedup_window: int = 65_536  # recent message ids remembered per source
    rate_share: float = 0.97  # of the tree's bottleneck rate the source's data may use:
    # the rest is for control traffic sharing the links (ACKs, LSAs, progress reports)
    multi_destination: bool = True  # False: one copy per destination (the unicast baseline)
    # A measured link rate is advertised (and the trees rebuilt) only once it differs from
    # the advertised one by more than this fraction of it: hysteresis against churn.
    rate_change_threshold: float = 0.2
    # False: the source sends as fast as its window allows, ignoring the tree's rate. A
    # baseline for the pacing experiment (meshcast.bench.pacing) only; never in a daemon.
    source_pacing: bool = True
    # True: a message only joins its link's queue; the link packs what one input queued
    # into as few datagrams as fit when its timer (due at once) fires. The daemon's event
    # loop runs that timer after the other ready callbacks, so a burst of small messages
    # shares datagrams. False: each message goes out at once (what the simulator's
    # experiments model).
    coalesce_sends: bool = False
    # Every overlay link the cluster config allows, as (a, b) with a < b; None: no check
    # (simulator experiments). With it, views hold only daemons of `upload_bps` (every
    # daemon of the cluster): an LSA from a daemon not listed there, or claiming a link
    # not listed here, is dropped (not stored, not flooded) and counted, whether it was
    # spoofed or sent by a misconfigured daemon.
    allowed_links: frozenset[tuple[NodeId, NodeId]] | None = None

    def __post_init__(self) -> None:
        """Raises `ConfigError` naming the field (the daemon's file is checked before)."""
        if self.policy not in BUILDERS:
            raise ConfigError(
                f"unknown routing policy {self.policy!r}; use one of {', '.join(BUILDERS)}",
                key="policy",
            )
        for key in (
            "max_dests_per_packet",
            "window_messages",
            "max_outbox_messages",
            "feedback_every",
            "dedup_window",
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"must be a positive integer, got {value!r}", key=key)
        for key in ("view_settle_interval", "feedback_interval", "lsa_refresh_interval"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"must be a positive number of seconds, got {value!r}", key=key)
        if self.allowed_links is not None:
            for a, b in self.allowed_links:
                if not a < b or a not in self.upload_bps or b not in self.upload_bps:
                    raise ConfigError(
                        f"allowed link {a}-{b} is not (a, b), a < b, of daemons",
                        key="allowed_links",
                    )
        if not 0 < self.rate_share <= 1:
            raise ConfigError(f"must be in (0, 1], got {self.rate_share!r}", key="rate_share")
        if not 0 <= self.rate_change_threshold < 1:
            raise ConfigError(
                f"must be in [0, 1), got {self.rate_change_threshold!r}",
                key="rate_change_threshold",
            )


@dataclass(slots=True)  # per message: not frozen, __init__ written out (GroupData)
class OverlayDelivered:
    """A message for this daemon arrived (each message is delivered once)."""

    source: NodeId
    seq: int
    payload: bytes
    hops: int  # overlay links it crossed
    upper: int = Upper.RAW  # the protocol the payload is for (wire.overlay.Upper)

    def __init__(
        self, source: NodeId, seq: int, payload: bytes, hops: int, upper: int = Upper.RAW
    ) -> None:
        self.source = source
        self.seq = seq
        self.payload = payload
        self.hops = hops
        self.upper = upper


@dataclass(frozen=True, slots=True)
class ViewInstalled:
    view: View


@dataclass(frozen=True, slots=True)
class ViewAgreed:
    """Every member of the view reported having installed it."""

    view: View


@dataclass(frozen=True, slots=True)
class NeighbourChanged:
    neighbour: NodeId
    up: bool
    reason: str


OverlayEffect = Transmit | OverlayDelivered | ViewInstalled | ViewAgreed | NeighbourChanged


@dataclass(slots=True)
class _SourceState:
    """What a destination remembers about one source incarnation."""

    incarnation: int
    delivered: int = 0
    reported: int = 0
    highest: int = 0  # the highest seq delivered: what progress reports carry
    report_due_at: float | None = None
    recent: deque[int] = field(default_factory=deque)
    recent_set: set[int] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class LinkDrops:
    """Datagrams from one neighbour's address that its links dropped, by cause."""

    malformed: int = 0  # did not decode (or carried a tag this layer cannot check)
    wrong_sender: int = 0  # the header names a daemon other than this neighbour
    stale_epoch: int = 0  # of an earlier (or not yet known) epoch of the neighbour's link
    out_of_window: int = 0  # sequence number outside the receive window
    duplicates: int = 0  # received before (a retransmission that crossed an ACK)
    protocol_violations: int = 0  # decoded, but breaks the link protocol
    # encrypted links (docs/security.md):
    cleartext: int = 0  # not sealed: a daemon without keys, or a forger
    truncated: int = 0  # too short to hold a header and a tag
    unknown_key: int = 0  # a handshake under a key not in our ring
    forged: int = 0  # did not authenticate: forged, altered, or under a wrong key
    replayed: int = 0  # a datagram or handshake seen before
    no_session: int = 0  # sealed for a session we do not have (an old epoch's)

    @classmethod
    def of(cls, stats: LinkStats) -> LinkDrops:
        return cls(
            stats.malformed_dropped,
            stats.foreign_dropped,
            stats.stale_dropped,
            stats.out_of_window_dropped,
            stats.duplicates_dropped,
            stats.protocol_violations,
            stats.cleartext_dropped,
            stats.truncated_dropped,
            stats.unknown_key_dropped,
            stats.forged_dropped,
            stats.replayed_dropped,
            stats.no_session_dropped,
        )

    def __add__(self, other: LinkDrops) -> LinkDrops:
        return LinkDrops(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    @property
    def total(self) -> int:
        return sum(astuple(self))


@dataclass(slots=True)
class _Counters:
    """The counters of `OverlayStats`, bumped in place (`+= 1`, checked by mypy)."""

    data_originated: int = 0
    data_forwarded: int = 0
    data_delivered: int = 0
    duplicates_dropped: int = 0
    unroutable_dropped: int = 0
    malformed_dropped: int = 0
    hop_limit_dropped: int = 0
    lsas_flooded: int = 0
    lsa_refreshes: int = 0
    lsas_unknown_dropped: int = 0
    lsas_bad_link_dropped: int = 0
    views_installed: int = 0
    link_messages_sent: int = 0


@dataclass(frozen=True, slots=True)
class OverlayStats:
    """Counters of one overlay node (a frozen snapshot, `OverlayNode.statistics()`)."""

    data_originated: int = 0
    data_forwarded: int = 0
    data_delivered: int = 0
    duplicates_dropped: int = 0
    unroutable_dropped: int = 0
    malformed_dropped: int = 0
    hop_limit_dropped: int = 0
    lsas_flooded: int = 0
    lsa_refreshes: int = 0  # own LSAs re-originated without a change (lsa_refresh_interval)
    lsas_unknown_dropped: int = 0  # LSAs from a daemon the cluster config does not list
    lsas_bad_link_dropped: int = 0  # LSAs claiming a link the cluster config does not allow
    views_installed: int = 0
    link_messages_sent: int = 0


@mypyc_attr(allow_interpreted_subclasses=True)  # DaemonLayers: tests subclass it
class OverlayNode:
    """The overlay layer of one daemon. Inputs return effects; nothing here does I/O."""

    def __init__(
        self,
        local: NodeId,
        config: OverlayConfig,
        *,
        incarnation: int,
        rng: random.Random,
        security: LinkSecurity | None = None,
    ) -> None:
        self.local = local
        # None: links in the clear (only with `insecure = true`, docs/security.md)
        self.security = security
        self.config = config
        self.incarnation = incarnation
        self._rng = rng
        self._endpoint = LinkEndpoint(local)
        self._up: set[NodeId] = set()
        self._lsdb = LinkStateDatabase(local, incarnation)
        # The bandwidth our LSA reports per link: configured, then measured (update_link_rate)
        self._advertised = {peer: n.bandwidth_bps for peer, n in config.neighbours.items()}
        # drops of links to each neighbour that failed and were replaced (`link_drops`)
        self._retired_drops: dict[NodeId, LinkDrops] = {}
        self._routing = RoutingTable(local, config.policy, config.upload_bps)
        self._view: View | None = None
        self._agreed_digest: bytes | None = None
        self._view_due_at: float | None = None
        self._refresh_at: float | None = None  # when our LSA is next re-originated
        self._seq = 0
        self._outbox: deque[tuple[tuple[NodeId, ...], bytes, int]] = deque()
        # Outbox positions, so `backlogged` needs no scan: messages ever queued, messages
        # that left, and for each destination the position of the latest one for it.
        self._outbox_queued = 0
        self._outbox_left = 0
        self._latest_queued_for: dict[NodeId, int] = {}
        self._pacer: Pacer | None = None
        # Per destination (of its current incarnation, never this daemon): the seqs of our
        # messages it has not reported delivered, oldest first. A report of seq S clears
        # everything up to S, so a message lost on the way (with a failed link) stops
        # counting once a later one arrives.
        self._in_flight: dict[NodeId, deque[int]] = {}
        # destinations with a full window (window_messages in flight), kept up to date by
        # every change of _in_flight: `window_open` runs per message
        self._full: set[NodeId] = set()
        self._sources: dict[NodeId, _SourceState] = {}
        self._next_report_at: float | None = None
        self._counters = _Counters()
        self._started = False
        self._clock = 0.0  # time of the latest input, for next_deadline()
        self._leaving = False

    # ------------------------------------------------------------------ queries

    @property
    def view(self) -> View | None:
        return self._view

    @property
    def routing(self) -> RoutingTable:
        return self._routing

    @property
    def neighbours_up(self) -> frozenset[NodeId]:
        return frozenset(self._up)

    @property
    def endpoint(self) -> LinkEndpoint:
        return self._endpoint

    def backlogged(self, dest: NodeId) -> bool:
        """Does this daemon still hold a message for `dest`, not yet sent: in the outbox
        (waiting for the source's rate or window) or in the queue of the link to the first
        hop towards `dest`? Then what we sent `dest` earlier is on its way, not lost, and
        sending it again would only queue a duplicate behind it. Packets merely
        unacknowledged do not count (a link with delay always has some in flight), nor
        can a forwarding daemon's queues: there the caller's own test must do (the group
        layer's: `dest`'s ACKs stopped advancing). Two counters and a length, no scan."""
        if self._latest_queued_for.get(dest, 0) > self._outbox_left:
            return True
        hop = self._routing.next_hop(self.local, dest)
        if hop is None or hop not in self._endpoint:
            return False
        return self._endpoint.link(hop).queued_messages > 0

    def advertised_bandwidth(self, peer: NodeId) -> float:
        """The bandwidth (bits/s) our LSA reports for the link to `peer`."""
        return self._advertised[peer]

    def link_drops(self, peer: NodeId) -> LinkDrops:
        """What the links to `peer` dropped, the ones replaced after a failure included."""
        drops = self._retired_drops.get(peer, LinkDrops())
        if peer in self._endpoint:
            drops += LinkDrops.of(self._endpoint.link(peer).statistics())
        return drops

    def statistics(self) -> OverlayStats:
        c = self._counters
        return OverlayStats(
            data_originated=c.data_originated,
            data_forwarded=c.data_forwarded,
            data_delivered=c.data_delivered,
            duplicates_dropped=c.duplicates_dropped,
            unroutable_dropped=c.unroutable_dropped,
            malformed_dropped=c.malformed_dropped,
            hop_limit_dropped=c.hop_limit_dropped,
            lsas_flooded=c.lsas_flooded,
            lsa_refreshes=c.lsa_refreshes,
            lsas_unknown_dropped=c.lsas_unknown_dropped,
            lsas_bad_link_dropped=c.lsas_bad_link_dropped,
            views_installed=c.views_installed,
            link_messages_sent=c.link_messages_sent,
        )

    def can_multicast(self) -> bool:
        return len(self._outbox) < self.config.max_outbox_messages

    def memory(self) -> int:
        """Bytes held for others: payloads in the outbox, messages queued, unacknowledged
        or being reassembled on the links (O(outbox): for tests and status, not hot paths)."""
        held = sum(len(payload) for _, payload, _ in self._outbox)
        for peer in self._endpoint.peers:
            stats = self._endpoint.link(peer).statistics()
            held += stats.queued_bytes + stats.reassembly_bytes
        return held

    def window_open(self) -> bool:
        # Every destination in _in_flight is in the view: _pump counts only those, and a
        # new view drops the others.
        return self._view is not None and not self._full

    def _update_window(self, dest: NodeId) -> None:
        """`dest`'s entry of `_full`, after its messages in flight changed."""
        in_flight = self._in_flight.get(dest)
        if in_flight is not None and len(in_flight) >= self.config.window_messages:
            self._full.add(dest)
        else:
            self._full.discard(dest)

    def _give_up_in_flight(self, dests: Iterable[NodeId]) -> None:
        """Stop counting our messages in flight to `dests`: they went a way that broke.

        Some may still arrive; the window then admits up to that many more for a while, a
        bounded excess. Counting lost ones forever would close the window for good once
        a whole window of them was lost: nothing newer could go out to clear them.
        """
        for dest in dests:
            in_flight = self._in_flight.get(dest)
            if in_flight:
                in_flight.clear()
                self._full.discard(dest)

    def next_deadline(self) -> float | None:
        if not self._started:
            return None
        deadline = self._endpoint.next_deadline()  # a running minimum: asked per message
        for at in (self._view_due_at, self._refresh_at, self._next_report_at):
            if at is not None and (deadline is None or at < deadline):
                deadline = at
        if self._outbox and self._pacer is not None and self.window_open():
            at = self._pacer.ready_at(self._clock)
            if deadline is None or at < deadline:
                deadline = at
        return deadline

    # ------------------------------------------------------------------ inputs

    def start(self, now: float) -> list[OverlayEffect]:
        self._started = True
        self._clock = now
        effects: list[OverlayEffect] = []
        for peer in sorted(self.config.neighbours):
            self._open_link(peer, now, effects)
        self._originate(now, effects)
        self._view_due_at = now
        return effects

    def leave(self, now: float) -> list[OverlayEffect]:
        """Withdraw from the overlay before stopping: flood an LSA without links, so the
        others drop this daemon from their views at once instead of after the failure
        timeout. Links stay up to deliver what is in flight; nothing new is sent."""
        self._leaving = True
        self._outbox.clear()
        self._outbox_left = self._outbox_queued
        effects: list[OverlayEffect] = []
        self._originate(now, effects)
        return effects

    def multicast(
        self, dests: Sequence[NodeId], payload: bytes, now: float, *, upper: int = Upper.RAW
    ) -> list[OverlayEffect]:
        """Send one message to the listed daemons (this one included if listed), for
        their protocol `upper` (a `wire.overlay.Upper`; RAW when nothing sits above).

        Raises `BufferFull` when the outbox is full: the caller waits (`can_multicast`).
        """
        if not dests:
            raise UsageError("a multicast needs at least one destination")
        if self._leaving:
            raise UsageError("this daemon is leaving the overlay")
        if len(self._outbox) >= self.config.max_outbox_messages:
            raise BufferFull(f"{len(self._outbox)} messages wait for the source's rate and window")
        if not 0 <= upper <= 0xFF:
            raise UsageError(f"upper protocol must fit one byte, got {upper!r}")
        listed = tuple(sorted(set(dests)))
        self._outbox.append((listed, payload, upper))
        self._outbox_queued += 1
        latest = self._latest_queued_for
        for dest in listed:
            latest[dest] = self._outbox_queued
        effects: list[OverlayEffect] = []
        self._pump(now, effects)
        return effects

    def update_link_rate(
        self, peer: NodeId, measured_bps: float, now: float
    ) -> list[OverlayEffect]:
        """A measurement of the rate the link to `peer` can carry (bits/s), from the driver.

        The link's bandwidth enters the views, hence every daemon's trees and tree rates,
        through our LSA (the view takes the lesser of both ends' reports), so all daemons
        keep building the same trees. A measurement is capped at the configured bandwidth
        (the link's Hop pacer never sends faster) and changes what we advertise only when
        it differs from it by more than `rate_change_threshold`; then a new LSA floods and
        the views and trees are rebuilt everywhere.
        Raises UsageError if `peer` is not a configured neighbour.
        """
        if peer not in self._advertised:
            raise UsageError(f"{peer} is not a neighbour of {self.local}")
        self._clock = now
        rate = min(max(measured_bps, 0.0), self.config.neighbours[peer].bandwidth_bps)
        advertised = self._advertised[peer]
        effects: list[OverlayEffect] = []
        if abs(rate - advertised) > self.config.rate_change_threshold * advertised:
            self._advertised[peer] = rate
            if self._started and peer in self._up:
                self._originate(now, effects)
        return effects

    def datagram_received(self, src: NodeId, datagram: bytes, now: float) -> list[OverlayEffect]:
        self._clock = now
        effects: list[OverlayEffect] = []
        self._on_link_effects(self._endpoint.datagram_received(src, datagram, now), now, effects)
        self._pump(now, effects)
        return effects

    def on_timer(self, now: float) -> list[OverlayEffect]:
        self._clock = now
        effects: list[OverlayEffect] = []
        self._on_link_effects(self._endpoint.on_timer(now), now, effects)
        if self._view_due_at is not None and now >= self._view_due_at:
            self._view_due_at = None
            self._recompute_view(now, effects)
        if self._refresh_at is not None and now >= self._refresh_at:
            self._counters.lsa_refreshes += 1
            self._originate(now, effects)  # sets the next refresh
        if self._next_report_at is not None and now >= self._next_report_at:
            self._send_reports(now, effects)
        self._pump(now, effects)
        return effects

    # ------------------------------------------------------------------ links

    def _open_link(self, peer: NodeId, now: float, effects: list[OverlayEffect]) -> None:
        neighbour = self.config.neighbours[peer]
        link_config = replace(
            self.config.link,
            rate_bps=neighbour.bandwidth_bps,
            mtu=neighbour.mtu or self.config.link.mtu,
        )
        epoch = self._rng.randrange(1, 2**32)
        link: Link
        if self.security is None:
            link = HopLink(self.local, peer, link_config, epoch=epoch)
        else:
            link = SecureLink(self.local, peer, link_config, epoch=epoch, security=self.security)
        if peer in self._endpoint:  # a failed link: its drops stay counted
            self._retired_drops[peer] = self.link_drops(peer)
        self._endpoint.remove(peer)
        self._emit_link_effects(self._endpoint.add(link, now), effects)

    def _on_link_effects(
        self, link_effects: list[LinkEffect], now: float, effects: list[OverlayEffect]
    ) -> None:
        for effect in link_effects:
            if isinstance(effect, Transmit):
                effects.append(effect)
            elif isinstance(effect, Delivered):
                self._on_message(effect.peer, effect.payload, now, effects)
            elif isinstance(effect, LinkEstablished):
                self._neighbour_up(effect.peer, now, effects)
            elif isinstance(effect, LinkFailed):
                self._link_lost(effect.peer)
                self._neighbour_down(effect.peer, effect.reason, now, effects)
                # A fresh link listens and says HELLO at once: there is never a moment
                # when the neighbour's datagrams would find no link (both ends would
                # otherwise retry out of phase forever).
                self._open_link(effect.peer, now, effects)
            elif isinstance(effect, PeerRestarted):
                self._link_lost(effect.peer)
                self._neighbour_down(effect.peer, "peer restarted", now, effects)

    def _emit_link_effects(
        self, link_effects: list[LinkEffect], effects: list[OverlayEffect]
    ) -> None:
        """Effects of a send: only transmissions can come back from it."""
        effects.extend(e for e in link_effects if isinstance(e, Transmit))

    def _link_lost(self, peer: NodeId) -> None:
        """The link to `peer` dropped what it held: our messages queued or unacknowledged
        on it never arrive. The view may not even change (a link back within
        `view_settle_interval`), so the window is told here."""
        tree = self._routing.tree(self.local)
        if tree is None:
            return
        via_peer = tree.next_hops(self.local)
        self._give_up_in_flight(d for d in list(self._in_flight) if via_peer.get(d) == peer)

    def _neighbour_up(self, peer: NodeId, now: float, effects: list[OverlayEffect]) -> None:
        self._up.add(peer)
        effects.append(NeighbourChanged(peer, True, "link established"))
        # Database exchange: the new neighbour learns everything we know at once.
        for lsa in self._lsdb.lsas():
            self._send_link(peer, encode_lsa(lsa), now, effects)
        self._originate(now, effects)

    def _neighbour_down(
        self, peer: NodeId, reason: str, now: float, effects: list[OverlayEffect]
    ) -> None:
        if peer in self._up:
            self._up.discard(peer)
            effects.append(NeighbourChanged(peer, False, reason))
            self._originate(now, effects)

    def _send_link(
        self, peer: NodeId, message: bytes, now: float, effects: list[OverlayEffect]
    ) -> bool:
        link = self._endpoint.link(peer)
        if link.failed:
            return False  # replaced by a fresh link within this same input
        if not link.can_send(len(message)):
            # The link's bounded queue is full: the layer above counts on flow control
            # (source window, rate) to keep this from happening to data.
            log.warning("node %s: link to %s is full, message dropped", self.local, peer)
            return False
        self._counters.link_messages_sent += 1
        flush = not self.config.coalesce_sends
        self._emit_link_effects(link.send(message, now, flush=flush), effects)
        return True

    # ------------------------------------------------------------------ membership

    def _originate(self, now: float, effects: list[OverlayEffect]) -> None:
        up = () if self._leaving else sorted(self._up)
        entries = tuple(
            LsaEntry(peer, self.config.neighbours[peer].weight, self._advertised[peer])
            for peer in up
        )
        digest = self._view.digest if self._view is not None else bytes(8)
        lsa = self._lsdb.originate(entries, digest)
        self._flood(lsa, None, now, effects)
        interval = self.config.lsa_refresh_interval
        self._refresh_at = None if interval is None or self._leaving else now + interval
        self._schedule_view(now)

    def _flood(
        self, lsa: Lsa, came_from: NodeId | None, now: float, effects: list[OverlayEffect]
    ) -> None:
        message = encode_lsa(lsa)
        for peer in sorted(self._up):
            if peer != came_from:
                self._send_link(peer, message, now, effects)
                self._counters.lsas_flooded += 1

    def _schedule_view(self, now: float) -> None:
        if self._view_due_at is None:
            self._view_due_at = now + self.config.view_settle_interval

    def _recompute_view(self, now: float, effects: list[OverlayEffect]) -> None:
        view = self._lsdb.compute_view()
        if self._view is not None and view.digest == self._view.digest:
            self._check_agreed(effects)
            return
        old_paths = self._paths_in_flight()
        self._view = view
        self._routing.install(view)
        self._counters.views_installed += 1
        # Destinations that left stop holding the window; sources that left are forgotten.
        self._in_flight = {d: q for d, q in self._in_flight.items() if d in view}
        # Messages to a destination whose path changed went by a way that broke (or was
        # left): what was lost on it would hold the window forever.
        new_paths = self._paths_in_flight()
        self._give_up_in_flight(d for d, path in old_paths.items() if new_paths.get(d) != path)
        self._full.clear()
        for dest in self._in_flight:
            self._update_window(dest)
        self._sources = {s: st for s, st in self._sources.items() if s in view}
        self._lsdb.forget({NodeId(lsa.origin) for lsa in self._lsdb.lsas()} - set(view.members))
        tree = self._routing.tree(self.local)
        rate = tree.rate_bps if tree is not None else float("inf")
        paced = self.config.source_pacing and rate != float("inf")
        self._pacer = Pacer(rate * self.config.rate_share, 64 * 1024, now) if paced else None
        effects.append(ViewInstalled(view))
        self._originate(now, effects)  # announce the digest we installed

    def _paths_in_flight(self) -> dict[NodeId, tuple[NodeId, ...]]:
        """The tree path to each destination with messages in flight (none: unreachable)."""
        tree = self._routing.tree(self.local) if self._view is not None else None
        paths: dict[NodeId, tuple[NodeId, ...]] = {}
        if tree is None:
            return paths
        for dest, in_flight in self._in_flight.items():
            if not in_flight or dest not in tree.parent:
                continue
            path = [dest]
            while path[-1] != self.local:
                path.append(tree.parent[path[-1]])
            paths[dest] = tuple(path)
        return paths

    def _check_agreed(self, effects: list[OverlayEffect]) -> None:
        view = self._view
        if view is not None and self._agreed_digest != view.digest and self._lsdb.agreed(view):
            self._agreed_digest = view.digest
            effects.append(ViewAgreed(view))

    # ------------------------------------------------------------------ messages

    def _on_message(
        self, peer: NodeId, message: bytes, now: float, effects: list[OverlayEffect]
    ) -> None:
        try:
            decoded = decode_overlay(message)
        except DecodeError as exc:
            self._counters.malformed_dropped += 1
            log.debug("node %s: malformed overlay message from %s: %s", self.local, peer, exc)
            return
        if isinstance(decoded, Data):
            self._on_data(decoded, now, effects)
        elif isinstance(decoded, Lsa):
            if not self._lsa_allowed(decoded, peer):
                return
            origin = NodeId(decoded.origin)
            before = self._lsdb.get(origin)
            if self._lsdb.consider(decoded):
                if before is not None and before.incarnation != decoded.incarnation:
                    self._forget_incarnation(origin)
                self._flood(decoded, peer, now, effects)
                self._schedule_view(now)
            self._check_agreed(effects)
        else:
            self._on_feedback(decoded, now, effects)

    def _lsa_allowed(self, lsa: Lsa, peer: NodeId) -> bool:
        """Does `lsa` speak of configured daemons and links only (when they are known)?"""
        allowed = self.config.allowed_links
        if allowed is None:
            return True
        origin = NodeId(lsa.origin)
        if origin not in self.config.upload_bps:
            self._counters.lsas_unknown_dropped += 1
            log.debug("node %s: drop LSA of unknown daemon %s via %s", self.local, origin, peer)
            return False
        for entry in lsa.entries:
            other = NodeId(entry.neighbour)
            if (min(origin, other), max(origin, other)) not in allowed:
                self._counters.lsas_bad_link_dropped += 1
                log.debug(
                    "node %s: drop LSA of %s via %s: link to %s not configured",
                    self.local,
                    origin,
                    peer,
                    other,
                )
                return False
        return True

    def _on_data(self, data: Data, now: float, effects: list[OverlayEffect]) -> None:
        source = NodeId(data.source)
        remaining = [NodeId(d) for d in data.dests if d != self.local]
        if len(remaining) != len(data.dests):
            self._deliver(source, data, now, effects)
        if remaining:
            if data.hops >= MAX_HOPS:
                self._counters.hop_limit_dropped += 1
                return
            self._counters.data_forwarded += 1
            self._forward(
                source,
                data.incarnation,
                data.seq,
                data.hops + 1,
                data.upper,
                remaining,
                data.payload,
                now,
                effects,
            )

    def _forward(
        self,
        source: NodeId,
        incarnation: int,
        seq: int,
        hops: int,
        upper: int,
        dests: Sequence[NodeId],
        payload: bytes,
        now: float,
        effects: list[OverlayEffect],
    ) -> int:
        """Split `dests` per next hop on `source`'s tree; one copy per next hop (claim 4).

        Returns the wire bytes put on the busiest link, which is what the source's pacer
        must be charged (the tree's rate bounds every link).
        """
        by_hop: dict[NodeId, list[NodeId]] = {}
        for dest in dests:
            hop = self._routing.next_hop(source, dest)
            if hop is None or hop not in self._up:
                self._counters.unroutable_dropped += 1
                continue
            by_hop.setdefault(hop, []).append(dest)
        limit = self.config.max_dests_per_packet if self.config.multi_destination else 1
        busiest = 0
        for hop in sorted(by_hop):
            group = by_hop[hop]
            wire_bytes = 0
            for i in range(0, len(group), limit):
                head = encode_data_head(
                    source, incarnation, seq, hops, upper, tuple(group[i : i + limit])
                )
                self._send_link(hop, head + payload, now, effects)
                wire_bytes += self._wire_size(len(head) + len(payload))
            busiest = max(busiest, wire_bytes)
        return busiest

    def _wire_size(self, message: int) -> int:
        """Bytes one link message puts on the wire: Hop and IP/UDP headers included."""
        sealing = 0 if self.security is None else RECORD_OVERHEAD
        per_datagram = HEADER_SIZE + UDP_IP_OVERHEAD + sealing
        budget = self.config.link.mtu - HEADER_SIZE - STATE_BLOCK.size - sealing
        if message + WHOLE_HEAD.size <= budget:
            return message + WHOLE_HEAD.size + per_datagram
        pieces = -(-message // (budget - PIECE_HEAD.size))
        return message + pieces * (PIECE_HEAD.size + per_datagram)

    def _deliver(
        self, source: NodeId, data: Data, now: float, effects: list[OverlayEffect]
    ) -> None:
        state = self._sources.get(source)
        if state is None or state.incarnation != data.incarnation:
            state = _SourceState(data.incarnation)
            self._sources[source] = state
        if data.seq in state.recent_set:
            self._counters.duplicates_dropped += 1
            return
        state.recent.append(data.seq)
        state.recent_set.add(data.seq)
        if len(state.recent) > self.config.dedup_window:
            state.recent_set.discard(state.recent.popleft())
        state.delivered += 1
        if data.seq > state.highest:
            state.highest = data.seq
        self._counters.data_delivered += 1
        effects.append(OverlayDelivered(source, data.seq, data.payload, data.hops, data.upper))
        if source == self.local:
            return  # delivered at once in _pump: never in flight, nothing to report
        if state.delivered - state.reported >= self.config.feedback_every:
            self._report(source, state, now, effects)
        elif state.report_due_at is None:
            state.report_due_at = now + self.config.feedback_interval
            if self._next_report_at is None or state.report_due_at < self._next_report_at:
                self._next_report_at = state.report_due_at

    # ------------------------------------------------------------------ flow control

    def _report(
        self, source: NodeId, state: _SourceState, now: float, effects: list[OverlayEffect]
    ) -> None:
        state.reported = state.delivered
        state.report_due_at = None
        feedback = Feedback(source, state.incarnation, state.highest, self.local, self.incarnation)
        self._route_feedback(feedback, now, effects)

    def _send_reports(self, now: float, effects: list[OverlayEffect]) -> None:
        self._next_report_at = None
        for source, state in self._sources.items():
            if state.report_due_at is None:
                continue
            if state.report_due_at <= now:
                self._report(source, state, now, effects)
            elif self._next_report_at is None or state.report_due_at < self._next_report_at:
                self._next_report_at = state.report_due_at

    def _route_feedback(self, feedback: Feedback, now: float, effects: list[OverlayEffect]) -> None:
        hop = self._routing.unicast_next_hop(NodeId(feedback.source))
        if hop is None or hop not in self._up:
            self._counters.unroutable_dropped += 1
            return
        self._send_link(hop, encode_feedback(feedback), now, effects)

    def _forget_incarnation(self, daemon: NodeId) -> None:
        """`daemon` restarted: what it delivered before is gone, and so is its old stream.

        Its window restarts empty, so a quick restart (one its neighbours never noticed,
        hence no view change) does not leave our window waiting for progress reports that
        its new incarnation, counting from zero, will never send.
        """
        self._in_flight.pop(daemon, None)
        self._full.discard(daemon)
        self._sources.pop(daemon, None)

    def _on_feedback(self, feedback: Feedback, now: float, effects: list[OverlayEffect]) -> None:
        if feedback.source != self.local:
            self._route_feedback(feedback, now, effects)
            return
        if feedback.incarnation != self.incarnation:
            return  # progress report about an earlier life of ours
        reporter = NodeId(feedback.reporter)
        known = self._lsdb.get(reporter)
        if known is None or known.incarnation != feedback.reporter_incarnation:
            return  # from an incarnation of the reporter we do not (or no longer) count
        in_flight = self._in_flight.get(reporter)
        if in_flight:
            # Everything up to the highest seq it delivered is done: delivered, or lost on
            # the way (a later message overtook it only if it was dropped or is being
            # repaired on a link, whose own buffers bound it).
            highest = feedback.highest_delivered
            while in_flight and in_flight[0] <= highest:
                in_flight.popleft()
            self._update_window(reporter)

    def _pump(self, now: float, effects: list[OverlayEffect]) -> None:
        """Send queued messages while the tree's rate and the window allow."""
        while self._outbox and self._view is not None and self.window_open():
            pacer = self._pacer
            if pacer is not None and not pacer.ready(now):
                return
            dests, payload, upper = self._outbox.popleft()
            self._outbox_left += 1
            self._seq += 1
            self._counters.data_originated += 1
            reachable = [d for d in dests if d in self._view]
            in_flight, window, seq = self._in_flight, self.config.window_messages, self._seq
            for dest in reachable:
                if dest == self.local:
                    continue
                pending = in_flight.get(dest)
                if pending is None:
                    pending = in_flight[dest] = deque()
                pending.append(seq)
                if len(pending) >= window:
                    self._full.add(dest)  # a send only ever closes a window
            if self.local in reachable:
                data = Data(
                    self.local, self.incarnation, self._seq, 0, upper, (self.local,), payload
                )
                self._deliver(self.local, data, now, effects)
            others = [d for d in reachable if d != self.local]
            self._counters.unroutable_dropped += len(dests) - len(reachable)
            if others:
                busiest = self._forward(
                    self.local, self.incarnation, self._seq, 1, upper, others, payload, now, effects
                )
                if pacer is not None:
                    pacer.charge(busiest, now)
