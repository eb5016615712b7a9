"""Congestion control, loss recovery and retransmission timer of the TCP model, in segments.

Pure bookkeeping, no I/O and no packets: `TcpLink` feeds it ACK events and asks it for a
window and for what to resend. Two senders share Reno window growth (RFC 5681):

* `NewReno`: cumulative ACKs only, fast recovery per RFC 6582 (one hole per RTT);
* `SackReno` with its `Scoreboard`: SACK-based loss recovery per RFC 6675, the sending
  rate in recovery set by Proportional Rate Reduction (RFC 6937), and lost
  retransmissions detected as RACK does (RFC 8985 §6.2), as Linux does by default.

The timer follows RFC 6298 (or the Linux variant of its lower bound).
Theory: docs/design/tcp-model.md.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_right, insort
from collections.abc import Iterable
from dataclasses import dataclass


class RtoEstimator:
    """Smoothed RTT, RTT variance and the retransmission timeout derived from them.

    Karn's rule is the caller's job: it only passes samples of segments sent once.
    """

    def __init__(
        self,
        *,
        initial_rto: float,
        min_rto: float,
        max_rto: float,
        granularity: float,
        linux_floor: bool,
    ) -> None:
        self._min_rto = min_rto
        self._max_rto = max_rto
        self._granularity = granularity
        self._linux_floor = linux_floor
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.min_rtt: float | None = None  # smallest sample so far (RACK's min_RTT)
        self._base = initial_rto  # RTO before back-off
        self.rto = initial_rto  # RTO in force, back-off included
        self.backoffs = 0  # consecutive expiries without forward progress

    def sample(self, rtt: float) -> None:
        """RFC 6298 §2.2-2.3 with alpha = 1/8, beta = 1/4."""
        rtt = max(rtt, 0.0)
        self.min_rtt = rtt if self.min_rtt is None else min(self.min_rtt, rtt)
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        if self._linux_floor:
            # Linux floors the variance term (mdev >= rto_min / 4), not the sum.
            base = self.srtt + max(self._granularity, 4 * self.rttvar, self._min_rto)
        else:
            base = max(self._min_rto, self.srtt + max(self._granularity, 4 * self.rttvar))
        self._base = min(base, self._max_rto)
        if self.backoffs == 0:
            self.rto = self._base

    def back_off(self) -> None:
        """RFC 6298 §5.5: double the timer on every expiry, up to the maximum."""
        self.backoffs += 1
        self.rto = min(self.rto * 2, self._max_rto)

    def progressed(self) -> None:
        """New data was acknowledged: collapse the back-off (as Linux does on progress)."""
        self.backoffs = 0
        self.rto = self._base


@dataclass(frozen=True, slots=True)
class AckOutcome:
    """What the sender must do after a new cumulative ACK."""

    retransmit_head: bool  # a NewReno partial ACK: resend the first unacknowledged segment
    restart_timer: bool  # restart the retransmission timer (RFC 6298 §5.3, RFC 6582 §3.2)


_PLAIN_ACK = AckOutcome(retransmit_head=False, restart_timer=True)


def reno_growth(cwnd: float, ssthresh: float, acked: int) -> float:
    """The window after `acked` segments were delivered (RFC 5681 §3.1, RFC 3465).

    Slow start adds one per segment (Linux counts segments, not ACKs) up to ssthresh;
    the rest goes to congestion avoidance, about one segment per window.
    """
    if cwnd < ssthresh:
        grow = min(float(acked), ssthresh - cwnd)
        cwnd += grow
        acked -= int(grow)
    if acked > 0 and cwnd >= ssthresh:
        cwnd += acked / cwnd
    return cwnd


class NewReno:
    """Congestion window (segments) per RFC 5681 with NewReno fast recovery (RFC 6582)."""

    def __init__(
        self,
        *,
        initial_cwnd: int,
        loss_cwnd: int,
        min_ssthresh: int,
        dupack_threshold: int,
        initial_ssthresh: float,
    ) -> None:
        self._initial_cwnd = initial_cwnd
        self._loss_cwnd = loss_cwnd
        self._min_ssthresh = min_ssthresh
        self._threshold = dupack_threshold
        self.cwnd: float = initial_cwnd
        self.ssthresh: float = initial_ssthresh
        self.dupacks = 0
        self.in_recovery = False
        self.recover = 0  # highest segment sent when recovery or loss last began
        self._partial_seen = False

    @property
    def in_slow_start(self) -> bool:
        return self.cwnd < self.ssthresh

    def window(self, *, limited_transmit: bool) -> int:
        """Segments that may be in flight. RFC 3042 allows one more per early dup ACK."""
        extra = min(self.dupacks, 2) if limited_transmit and not self.in_recovery else 0
        return max(int(self.cwnd), 1) + extra

    def on_new_ack(
        self, acked: int, cum_ack: int, flight: int, *, cwnd_limited: bool
    ) -> AckOutcome:
        """`acked` segments newly acknowledged; `flight` is what remains outstanding."""
        self.dupacks = 0
        if self.in_recovery:
            if cum_ack >= self.recover:
                # Full ACK, RFC 6582 §3.2 step 3 option (1).
                self.in_recovery = False
                self.cwnd = min(self.ssthresh, max(flight, 1) + 1)
                return _PLAIN_ACK
            # Partial ACK: deflate by what was acked, add back one, resend the next hole.
            self.cwnd = max(self.cwnd - acked + 1, 1)
            first = not self._partial_seen
            self._partial_seen = True
            return AckOutcome(retransmit_head=True, restart_timer=first)
        if cwnd_limited:
            # RFC 7661 / Linux tcp_is_cwnd_limited: an idle window proves nothing.
            self.cwnd = reno_growth(self.cwnd, self.ssthresh, acked)
        return _PLAIN_ACK

    def on_dupack(self, cum_ack: int, flight: int, high_sent: int) -> bool:
        """Count a duplicate ACK; True when it triggers a fast retransmit."""
        if self.in_recovery:
            self.cwnd += 1  # each dup ACK means a segment left the network
            return False
        self.dupacks += 1
        # RFC 6582 §3.2 step 2: no second fast retransmit for losses of one window.
        if self.dupacks == self._threshold and cum_ack >= self.recover:
            self.ssthresh = max(flight // 2, self._min_ssthresh)
            self.cwnd = self.ssthresh + self._threshold
            self.recover = high_sent
            self.in_recovery = True
            self._partial_seen = False
            return True
        return False

    def on_timeout(self, flight: int, high_sent: int, *, first: bool) -> None:
        """RFC 5681 §3.1 eq. 4 and RFC 6582 §3.2 step 4."""
        if first:
            # Only the first expiry of an episode sees a meaningful flight size.
            self.ssthresh = max(flight // 2, self._min_ssthresh)
        self.cwnd = self._loss_cwnd
        self.dupacks = 0
        self.in_recovery = False
        self.recover = high_sent

    def restart_after_idle(self) -> None:
        """RFC 5681 §4.1: after an idle RTO, restart from at most the initial window."""
        self.cwnd = min(self.cwnd, self._initial_cwnd)


@dataclass(slots=True)
class _Transmission:
    """The latest transmission of one outstanding segment."""

    order: int  # position in the sender's transmission order (RACK compares these)
    at: float  # s
    retransmitted: bool  # sent more than once: a delivery may be of an older copy


@dataclass(frozen=True, slots=True)
class SackUpdate:
    """What one ACK changed on the scoreboard."""

    delivered: int  # newly cum-ACKed but not SACKed before, plus newly SACKed (RFC 6937)
    newly_sacked: int  # > 0 makes the ACK a duplicate ACK in RFC 6675's sense
    newly_lost: int  # segments newly presumed lost, lost retransmissions included
    lost_retransmissions: int  # retransmissions presumed lost (RACK rule)
    beyond_sent: bool  # a SACK block covered segments never sent (a protocol violation)


class Scoreboard:
    """RFC 6675 scoreboard of the outstanding segments `una` .. `nxt - 1`.

    Each outstanding segment is SACKed, or presumed lost, or neither. A lost one is
    queued for retransmission and stays lost while its retransmission is in flight.
    `pipe` counts what is presumed to be in the network, as RFC 6675 SetPipe() and Linux
    `tcp_packets_in_flight` do: outstanding − SACKed − lost + retransmissions in flight.

    A segment is presumed lost (RFC 6675 IsLost) when `dupthresh` segments above it have
    been SACKed, after a retransmission timeout (all that is not SACKed), or when it is
    the head and recovery starts on duplicate ACKs alone (a peer that sends no SACK). A
    retransmission is presumed lost when a segment sent after it is delivered (RACK,
    RFC 8985 §6.2, with the zero reordering window Linux uses in recovery); a delivery of
    a resent segment sooner than `min_rtt` after its latest copy left is ambiguous and
    does not count (RFC 8985 §6.2 step 2).
    """

    def __init__(self, dupthresh: int) -> None:
        self._dupthresh = dupthresh
        self.una = 1  # first unacknowledged segment (RFC 6675 HighACK + 1)
        self.nxt = 1  # next new segment (RFC 6675 HighData + 1)
        self._sacked: list[int] = []  # SACKed outstanding segments, ascending
        self._sacked_set: set[int] = set()
        self._lost: set[int] = set()  # presumed lost and not SACKed
        self._in_flight_again: set[int] = set()  # lost ones whose retransmission is out
        self._queue: list[int] = []  # heap of lost segments to resend (stale entries skipped)
        self._sent: dict[int, _Transmission] = {}
        self._order = 0
        self._marked_to = 1  # every segment below this that is not SACKed is marked lost

    # ---------------------------------------------------------------- queries

    @property
    def pipe(self) -> int:
        return (
            self.nxt - self.una - len(self._sacked) - len(self._lost) + len(self._in_flight_again)
        )

    @property
    def sacked(self) -> int:
        """Outstanding segments the receiver reported holding."""
        return len(self._sacked)

    @property
    def lost(self) -> int:
        """Outstanding segments presumed lost, resent or not."""
        return len(self._lost)

    def is_lost(self, seq: int) -> bool:
        return seq in self._lost

    def next_lost(self) -> int | None:
        """The lowest lost segment not yet resent (RFC 6675 NextSeg() rule 1)."""
        queue = self._queue
        while queue:
            seq = queue[0]
            if seq in self._lost and seq not in self._in_flight_again:
                return seq
            heapq.heappop(queue)
        return None

    # ---------------------------------------------------------------- events

    def sent(self, seq: int, now: float, *, retransmit: bool) -> None:
        """Segment `seq` left: `nxt` for new data, or a retransmission."""
        self._order += 1
        if seq == self.nxt:
            self.nxt += 1
        self._sent[seq] = _Transmission(self._order, now, retransmit)
        if retransmit and seq in self._lost:
            self._in_flight_again.add(seq)

    def ack(
        self, cum_ack: int, blocks: Iterable[tuple[int, int]], now: float, min_rtt: float
    ) -> SackUpdate:
        """Apply one ACK: `cum_ack` (< `nxt`) and SACK blocks `(first, count)`."""
        delivered: list[_Transmission] = []
        for seq in range(self.una, cum_ack + 1):
            if seq in self._sacked_set:
                self._sacked_set.discard(seq)
            else:
                delivered.append(self._sent[seq])
            self._forget(seq)
            del self._sent[seq]
        if cum_ack >= self.una:
            self.una = cum_ack + 1
            del self._sacked[: bisect_right(self._sacked, cum_ack)]
        newly_sacked = 0
        beyond_sent = False
        for first, count in blocks:
            last = first + count - 1
            if last >= self.nxt:
                beyond_sent = True
                last = self.nxt - 1
            for seq in range(max(first, self.una), last + 1):
                if seq in self._sacked_set:
                    continue
                self._sacked_set.add(seq)
                insort(self._sacked, seq)
                self._forget(seq)
                delivered.append(self._sent[seq])
                newly_sacked += 1
        lost_rtx = self._detect_lost_retransmissions(delivered, now, min_rtt)
        return SackUpdate(
            delivered=len(delivered),
            newly_sacked=newly_sacked,
            newly_lost=lost_rtx + self._mark_lost(),
            lost_retransmissions=lost_rtx,
            beyond_sent=beyond_sent,
        )

    def mark_head_lost(self) -> None:
        """Recovery starts: the head is lost even if too few SACKs say so (Linux)."""
        if self.una < self.nxt and self.una not in self._sacked_set:
            self._mark(self.una)

    def timeout(self) -> None:
        """RTO: everything outstanding and not SACKed is presumed lost (Linux tcp_enter_loss).

        The SACKed segments are kept, so they are not resent, unless the cumulative ACK
        stopped just below one: then the receiver dropped data it had SACKed (reneging,
        RFC 2018 §8) and every mark is forgotten.
        """
        if self.una in self._sacked_set:
            self._sacked.clear()
            self._sacked_set.clear()
        self._in_flight_again.clear()
        self._lost = {s for s in range(self.una, self.nxt) if s not in self._sacked_set}
        self._queue = sorted(self._lost)  # a sorted list is a heap
        self._marked_to = self.nxt

    # ---------------------------------------------------------------- helpers

    def _forget(self, seq: int) -> None:
        self._lost.discard(seq)
        self._in_flight_again.discard(seq)

    def _mark(self, seq: int) -> None:
        self._lost.add(seq)
        heapq.heappush(self._queue, seq)

    def _mark_lost(self) -> int:
        """RFC 6675 IsLost(): `dupthresh` SACKed segments above a hole make it lost."""
        if len(self._sacked) < self._dupthresh:
            return 0
        bound = self._sacked[-self._dupthresh]
        newly = 0
        for seq in range(max(self._marked_to, self.una), bound):
            if seq not in self._sacked_set and seq not in self._lost:
                self._mark(seq)
                newly += 1
        self._marked_to = max(self._marked_to, bound)
        return newly

    def _detect_lost_retransmissions(
        self, delivered: list[_Transmission], now: float, min_rtt: float
    ) -> int:
        if not self._in_flight_again or not delivered:
            return 0
        latest = max(
            (t.order for t in delivered if not t.retransmitted or now - t.at >= min_rtt),
            default=0,
        )
        lost = [seq for seq in self._in_flight_again if self._sent[seq].order < latest]
        for seq in lost:
            self._in_flight_again.discard(seq)
            heapq.heappush(self._queue, seq)
        return len(lost)


class SackReno:
    """Reno window growth with SACK loss recovery (RFC 6675) and PRR (RFC 6937).

    The sender sends while `board.pipe` < `window()`. Recovery starts when the head is
    presumed lost and ends when everything sent before it is acknowledged. In recovery
    PRR sets cwnd on every ACK so that, over the episode, the sender sends ssthresh
    segments per RecoverFS delivered (RFC 6937 §3, as Linux `tcp_cwnd_reduction`):
    the window comes down to ssthresh smoothly, without a burst or a silent half RTT.
    With `prr=False`, cwnd drops to ssthresh at once (RFC 6675 §5 step 4.2).
    """

    def __init__(
        self,
        *,
        initial_cwnd: int,
        loss_cwnd: int,
        min_ssthresh: int,
        dupack_threshold: int,
        initial_ssthresh: float,
        prr: bool,
    ) -> None:
        self._initial_cwnd = initial_cwnd
        self._loss_cwnd = loss_cwnd
        self._min_ssthresh = min_ssthresh
        self._prr = prr
        self.board = Scoreboard(dupack_threshold)
        self.cwnd: float = initial_cwnd
        self.ssthresh: float = initial_ssthresh
        self.in_recovery = False
        self.recover = 0  # RFC 6675 RecoveryPoint: highest segment sent when it began
        self._recover_fs = 1  # RFC 6937 RecoverFS: flight when recovery began
        self._prr_delivered = 0
        self._prr_out = 0

    @property
    def in_slow_start(self) -> bool:
        return self.cwnd < self.ssthresh

    def window(self) -> int:
        """Segments that may be in the pipe (RFC 3042 needs no extra: SACKs shrink pipe)."""
        return max(int(self.cwnd), 1)

    def may_enter_recovery(self, cum_ack: int) -> bool:
        """RFC 6675 §5: no new recovery until the last one's RecoveryPoint is ACKed."""
        return not self.in_recovery and cum_ack >= self.recover

    def enter_recovery(self, flight: int, high_sent: int) -> None:
        """RFC 6675 §5 step 4 and RFC 6937: ssthresh = FlightSize / 2."""
        self.ssthresh = max(flight // 2, self._min_ssthresh)
        self.recover = high_sent
        self.in_recovery = True
        self._recover_fs = max(flight, 1)
        self._prr_delivered = 0
        self._prr_out = 0
        if not self._prr:
            self.cwnd = self.ssthresh

    def end_recovery(self) -> None:
        """Everything up to RecoveryPoint is ACKed: continue from ssthresh (RFC 6937 §3)."""
        self.in_recovery = False
        self.cwnd = self.ssthresh

    def on_ack(self, delivered: int, pipe: int, *, safe: bool, cwnd_limited: bool) -> None:
        """`delivered` segments newly ACKed or SACKed; `pipe` after the scoreboard update.

        `safe`: the ACK advanced the cumulative ACK and revealed no new loss, so PRR may
        catch up by slow start (PRR-SSRB); otherwise it sends no more than was delivered.
        """
        if not self.in_recovery:
            if cwnd_limited:
                self.cwnd = reno_growth(self.cwnd, self.ssthresh, delivered)
            return
        if not self._prr:
            return
        self._prr_delivered += delivered
        if pipe > self.ssthresh:
            # Proportional part: ssthresh/RecoverFS of what was delivered, rounded up.
            quota = math.ceil(self._prr_delivered * self.ssthresh / self._recover_fs)
            sndcnt = quota - self._prr_out
        elif safe:
            limit = max(self._prr_delivered - self._prr_out, delivered) + 1
            sndcnt = min(int(self.ssthresh) - pipe, limit)
        else:
            sndcnt = min(int(self.ssthresh) - pipe, delivered)
        if self._prr_out == 0:
            sndcnt = max(sndcnt, 1)  # the fast retransmit goes out whatever the numbers
        self.cwnd = pipe + max(sndcnt, 0)

    def on_sent(self) -> None:
        """A segment (new or resent) left; PRR counts it against its quota."""
        if self.in_recovery:
            self._prr_out += 1

    def on_timeout(self, flight: int, high_sent: int, *, first: bool) -> None:
        """RFC 5681 §3.1 eq. 4 and RFC 6675 §5.1: no new recovery below RecoveryPoint."""
        if first:
            self.ssthresh = max(flight // 2, self._min_ssthresh)
        self.cwnd = self._loss_cwnd
        self.in_recovery = False
        self.recover = high_sent
        self.board.timeout()

    def restart_after_idle(self) -> None:
        """RFC 5681 §4.1: after an idle RTO, restart from at most the initial window."""
        self.cwnd = min(self.cwnd, self._initial_cwnd)
