"""The datagram size chosen from the route to a peer (`[link] max_path_mtu`)."""

from __future__ import annotations

import socket
import sys

import pytest

from meshcast.runtime import path_mtu
from meshcast.runtime.path_mtu import datagram_mtu, route_mtu

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="IP_MTU is Linux's")


@linux
def test_the_loopback_route_is_larger_than_ethernet() -> None:
    route = route_mtu("127.0.0.1")
    assert route is not None
    family, mtu = route
    assert family == socket.AF_INET
    assert mtu > path_mtu.ETHERNET_MTU


@linux
def test_loopback_peers_get_datagrams_up_to_the_cap() -> None:
    assert datagram_mtu("127.0.0.3", 1400, 65_507) == 65_507  # 65,535 - IP - UDP headers
    assert datagram_mtu("127.0.0.3", 1400, 16_384) == 16_384
    assert datagram_mtu("127.0.0.3", 1400, 1400) == 1400  # the cap at mtu: never larger


def test_an_ethernet_or_unknown_route_keeps_the_configured_mtu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(path_mtu, "route_mtu", lambda host: (socket.AF_INET, 1500))
    assert datagram_mtu("192.0.2.1", 1400, 65_507) == 1400
    monkeypatch.setattr(path_mtu, "route_mtu", lambda host: None)
    assert datagram_mtu("192.0.2.1", 1400, 65_507) == 1400


def test_a_jumbo_frame_route_gets_its_size_less_the_headers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(path_mtu, "route_mtu", lambda host: (socket.AF_INET, 9000))
    assert datagram_mtu("192.0.2.1", 1400, 65_507) == 9000 - 28
    monkeypatch.setattr(path_mtu, "route_mtu", lambda host: (socket.AF_INET6, 9000))
    assert datagram_mtu("2001:db8::1", 1400, 65_507) == 9000 - 48
    assert datagram_mtu("2001:db8::1", 1400, 4000) == 4000
