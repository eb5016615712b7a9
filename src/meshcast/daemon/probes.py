"""Latency probes: a daemon multicasts one to every other member of its view each
`probe_interval`; a receiver logs how long it took (wall clocks, so only as good as the
hosts' clock sync) and on which tree path. They travel as overlay DATA for `Upper.PROBE`."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from meshcast.errors import DecodeError

_PROBE = struct.Struct("!Qd")  # probe number, sender's wall clock (s)


@dataclass(frozen=True, slots=True)
class Probe:
    number: int
    sent_at: float  # the sender's wall clock, s


def encode_probe(probe: Probe) -> bytes:
    return _PROBE.pack(probe.number, probe.sent_at)


def decode_probe(payload: bytes) -> Probe:
    if len(payload) != _PROBE.size:
        raise DecodeError(f"a probe is {_PROBE.size} bytes, got {len(payload)}")
    number, sent_at = _PROBE.unpack(payload)
    return Probe(number, sent_at)
