"""The largest datagram the route to a peer carries, for `[link] max_path_mtu`.

The kernel knows the MTU of the route to an address (IP_MTU on a connected UDP socket):
65,536 on loopback, 9,000 on a jumbo-frame LAN, 1,500 on ordinary Ethernet. Only routes
above Ethernet's 1,500 bytes get larger datagrams: across a WAN the path beyond the first
router is unknown, so the configured `mtu` (1,400 by default) stays.
"""

from __future__ import annotations

import socket
import sys

ETHERNET_MTU = 1500
# Linux's option numbers (<linux/in.h>, <linux/in6.h>); Python does not name them
_IP_MTU, _IPV6_MTU = 14, 24
_HEADERS: dict[int, int] = {socket.AF_INET: 20 + 8, socket.AF_INET6: 40 + 8}  # IP + UDP


def route_mtu(host: str) -> tuple[int, int] | None:
    """(address family, MTU of the route to `host`), or None where the kernel does not say
    (not Linux, an unresolvable or unroutable host)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        family, _, _, _, address = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(address)  # nothing is sent: this only picks the route
            if family == socket.AF_INET6:
                return family, probe.getsockopt(socket.IPPROTO_IPV6, _IPV6_MTU)
            return family, probe.getsockopt(socket.IPPROTO_IP, _IP_MTU)
    except OSError:
        return None


def datagram_mtu(host: str, mtu: int, max_path_mtu: int) -> int:
    """Bytes per datagram towards `host`: `mtu`, or up to `max_path_mtu` where the route
    carries more than Ethernet does."""
    route = route_mtu(host)
    if route is None:
        return mtu
    family, route_bytes = route
    if route_bytes <= ETHERNET_MTU:
        return mtu
    return max(mtu, min(max_path_mtu, route_bytes - _HEADERS.get(family, 48)))
