"""Congestion control and retransmission timer of the TCP model, in segments.

Pure arithmetic, no I/O and no packets: `TcpLink` feeds it ACK events and asks it for a
window. NewReno follows RFC 5681 and RFC 6582; the timer follows RFC 6298 (or the Linux
variant of its lower bound). Theory: docs/design/tcp-model.md.
"""

from __future__ import annotations

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
        self._base = initial_rto  # RTO before back-off
        self.rto = initial_rto  # RTO in force, back-off included
        self.backoffs = 0  # consecutive expiries without forward progress

    def sample(self, rtt: float) -> None:
        """RFC 6298 §2.2-2.3 with alpha = 1/8, beta = 1/4."""
        rtt = max(rtt, 0.0)
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
        if not cwnd_limited:
            # RFC 7661 / Linux tcp_is_cwnd_limited: an idle window proves nothing.
            return _PLAIN_ACK
        if self.cwnd < self.ssthresh:
            # Slow start counts acked segments (Linux), not ACKs; the rest goes to CA.
            grow = min(float(acked), self.ssthresh - self.cwnd)
            self.cwnd += grow
            acked -= int(grow)
        if acked > 0 and self.cwnd >= self.ssthresh:
            self.cwnd += acked / self.cwnd
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
