"""The replication lower bound max(F/u_s, N·F/(u_s + Σu_i), F/min d_i), on hand-computed cases."""

from __future__ import annotations

import pytest

from meshcast.errors import UsageError
from meshcast.replicate.bound import lower_bound

MB = 1_000_000  # bytes: 8e6 bits


def test_the_origin_upload_limits_few_recipients() -> None:
    # F/u_s = 8e6/1e6 = 8 s; N·F/(u_s + Σu_i) = 4·8e6/5e6 = 6.4 s
    assert lower_bound(MB, 1e6, [1e6] * 4) == pytest.approx(8.0)


def test_the_total_upload_limits_many_recipients() -> None:
    # 10·8e6/(1e6 + 10·1e5) = 40 s > F/u_s = 8 s
    assert lower_bound(MB, 1e6, [1e5] * 10) == pytest.approx(40.0)


def test_the_slowest_download_limits() -> None:
    # F/min d_i = 8e6/1e5 = 80 s beats the 40 s of the uploads
    assert lower_bound(MB, 1e6, [1e5] * 10, [1e7] * 9 + [1e5]) == pytest.approx(80.0)
    # fast downloads change nothing
    assert lower_bound(MB, 1e6, [1e5] * 10, [1e9] * 10) == pytest.approx(40.0)


def test_an_empty_file_takes_no_time() -> None:
    assert lower_bound(0, 1e6, [1e6]) == 0.0


@pytest.mark.parametrize(
    ("size", "origin", "uploads", "downloads"),
    [
        (-1, 1e6, [1e6], None),
        (MB, 1e6, [], None),
        (MB, 0.0, [1e6], None),
        (MB, 1e6, [1e6, -1.0], None),
        (MB, 1e6, [float("nan")], None),
        (MB, 1e6, [1e6], [0.0]),
        (MB, 1e6, [1e6], [1e6, 1e6]),
        (MB, float("inf"), [1e6], None),
    ],
)
def test_bad_inputs_raise_usage_error(
    size: int, origin: float, uploads: list[float], downloads: list[float] | None
) -> None:
    with pytest.raises(UsageError):
        lower_bound(size, origin, uploads, downloads)
