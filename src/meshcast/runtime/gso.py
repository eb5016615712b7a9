"""UDP generic segmentation offload (GSO, ``UDP_SEGMENT``, Linux >= 4.18): a run of
datagrams to one address that share a size leaves in one `sendmsg` system call, and the
kernel cuts it back into the separate datagrams the receiver reads.

Theory of operation: docs/design/runtime.md, "UDP segmentation offload". The kernel's
rules (net/ipv4/udp.c `udp_send_skb`, tools/testing/selftests/net/udpgso.c): every
segment but the last has the size given in the control message, the last may be shorter;
at most `MAX_SEGMENTS` segments; the payload fits one IP datagram (`MAX_PAYLOAD`); a
segment larger than the route's MTU is refused (EMSGSIZE), as are sockets without UDP
checksums (EINVAL) and IPsec routes (EIO). Anything not sent this way goes through the
event loop's transport (`sendto`), as every datagram did before.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
import sys
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)  # <linux/udp.h>; Python may not name it
MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS: 64 since 4.18 (newer kernels allow more; 64 is safe)
MAX_PAYLOAD = 65_507  # 65,535 - 20 (IPv4 header) - 8 (UDP header); IPv6 allows 20 more
ENV = "MESHCAST_UDP_GSO"  # "0"/"off"/"no"/"false": never use GSO (for comparisons)
_SEGMENT_SIZE = struct.Struct("=H")  # the control message's payload: a native u16
# errors that say GSO cannot work towards an address (the route, the device, the kernel)
_REFUSED = frozenset({errno.EINVAL, errno.EIO, errno.EMSGSIZE, errno.ENOPROTOOPT, errno.EOPNOTSUPP})

Address = tuple[str, int]


def gso_wanted(environ: Mapping[str, str]) -> bool:
    """False when `ENV` turns GSO off."""
    return environ.get(ENV, "").strip().lower() not in {"0", "off", "no", "false"}


def gso_supported(sock: socket.socket) -> bool:
    """Whether the kernel knows ``UDP_SEGMENT`` on `sock`. Asked once, before any send:
    a kernel older than 4.18 ignores an unknown SOL_UDP control message and would send
    the whole run as one datagram, but refuses the option here (ENOPROTOOPT)."""
    if not sys.platform.startswith("linux") or sock.type != socket.SOCK_DGRAM:
        return False
    try:
        sock.getsockopt(socket.SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


class SegmentingSender:
    """Sends the datagrams one input produced for one address: runs of equal size in one
    `sendmsg` each with ``UDP_SEGMENT``, everything else through `transport.sendto`.

    The order of the datagrams to an address holds: a run goes through the transport
    whenever the transport still holds datagrams of its own (it would send them later)
    or the socket is full (BlockingIOError: the transport queues the run behind).
    """

    def __init__(
        self, sock: socket.socket, transport: asyncio.DatagramTransport, *, enabled: bool
    ) -> None:
        self._sock = sock
        self._sendto = transport.sendto
        # what the transport still holds (both asyncio's and uvloop's have it; the
        # abstract DatagramTransport does not promise it): without it, no GSO
        self._buffered: Callable[[], int] | None = getattr(transport, "get_write_buffer_size", None)
        self.enabled = enabled and self._buffered is not None
        self.gso_sends = 0  # sendmsg calls that carried a run of 2 or more datagrams
        self.gso_datagrams = 0  # the datagrams those runs carried
        self._refused: set[Address] = set()  # addresses GSO failed towards: sendto only

    def send(self, datagrams: list[bytes], address: Address) -> None:
        """Hand `datagrams` (in the order they are to leave) to `address`."""
        sendto = self._sendto
        count = len(datagrams)
        if count == 1 or not self.enabled or address in self._refused:
            for datagram in datagrams:
                sendto(datagram, address)
            return
        start = 0
        while start < count:
            end = run_end(datagrams, start)
            if end - start < 2 or not self._send_run(datagrams[start:end], address):
                for index in range(start, end):
                    sendto(datagrams[index], address)
            start = end

    def _send_run(self, run: list[bytes], address: Address) -> bool:
        """One `sendmsg` for `run`; False if it must go through the transport instead."""
        buffered = self._buffered
        if buffered is None or buffered() or address in self._refused:
            return False
        control = [(socket.SOL_UDP, UDP_SEGMENT, _SEGMENT_SIZE.pack(len(run[0])))]
        try:
            self._sock.sendmsg(run, control, 0, address)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in _REFUSED:
                self._refused.add(address)
                log.debug("UDP GSO towards %s refused (%s): sendto from now on", address, exc)
            return False  # the transport sends each and reports its own errors
        self.gso_sends += 1
        self.gso_datagrams += len(run)
        return True


def run_end(datagrams: list[bytes], start: int) -> int:
    """The end (exclusive) of the longest run from `start` one GSO send can carry: each
    datagram the size of the first, the last one possibly shorter, at most
    `MAX_SEGMENTS`, at most `MAX_PAYLOAD` bytes in all."""
    size = len(datagrams[start])
    if size == 0:  # a segment size of 0 means "no segmentation" to the kernel
        return start + 1
    total = size
    end = start + 1
    limit = min(len(datagrams), start + MAX_SEGMENTS)
    while end < limit:
        length = len(datagrams[end])
        if length > size or length == 0 or total + length > MAX_PAYLOAD:
            break
        total += length
        end += 1
        if length < size:  # a shorter datagram can only be the last segment
            break
    return end
