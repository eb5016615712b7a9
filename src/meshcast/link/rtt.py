"""Round-trip time estimator (RFC 6298 smoothing)."""

from __future__ import annotations


class RttEstimator:
    __slots__ = ("rttvar", "samples", "srtt")

    def __init__(self, initial_rtt: float) -> None:
        self.srtt = initial_rtt
        self.rttvar = initial_rtt / 2
        self.samples = 0

    def observe(self, sample: float) -> None:
        if sample < 0:
            return
        if self.samples == 0:
            self.srtt = sample
            self.rttvar = sample / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - sample)
            self.srtt = 0.875 * self.srtt + 0.125 * sample
        self.samples += 1
