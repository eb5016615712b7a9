"""The lower bound on the time to replicate a file, the yardstick of `meshcast bench replicate`.

Issue 12 defines the bench's ratios against `max(F/u_s, N·F/(u_s + Σu_i), F/min d_i)`: the
minimum distribution time of a fluid model in which only upload and download capacities
limit (R. Kumar, K. W. Ross, "Peer-assisted file distribution: the minimum distribution
time", IEEE HotWeb 2006; also J. Mundinger, R. Weber, G. Weiss, "Optimal scheduling of
peer-to-peer file dissemination", J. Scheduling 2008). No plan of any shape beats it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from meshcast.errors import UsageError

__all__ = ["lower_bound"]


def lower_bound(
    size_bytes: int,
    origin_upload_bps: float,
    uploads_bps: Sequence[float],
    downloads_bps: Sequence[float] | None = None,
) -> float:
    """Seconds no replication of `size_bytes` to `len(uploads_bps)` recipients can beat:
    the largest of

    - F/u_s: the origin must upload every bit at least once;
    - N·F/(u_s + Σu_i): N·F bits must arrive, and the origin and the recipients upload
      them together;
    - F/min d_i: the slowest downloader must receive every bit (only with `downloads_bps`),

    with F = 8·size_bytes bits, u_s the origin's upload and u_i, d_i recipient i's upload
    and download, all in bits per second. Raises `UsageError` for no recipients, a negative
    size, rates that are not positive and finite, or downloads of the wrong length."""
    if size_bytes < 0:
        raise UsageError(f"size {size_bytes} < 0")
    if not uploads_bps:
        raise UsageError("no recipients")
    if downloads_bps is not None and len(downloads_bps) != len(uploads_bps):
        raise UsageError(f"{len(downloads_bps)} downloads for {len(uploads_bps)} recipients")
    rates = [origin_upload_bps, *uploads_bps, *(downloads_bps or ())]
    if not all(math.isfinite(rate) and rate > 0 for rate in rates):
        raise UsageError("rates must be positive and finite")
    bits = 8.0 * size_bytes
    count = len(uploads_bps)
    bound = max(bits / origin_upload_bps, count * bits / (origin_upload_bps + sum(uploads_bps)))
    if downloads_bps is not None:
        bound = max(bound, bits / min(downloads_bps))
    return bound
