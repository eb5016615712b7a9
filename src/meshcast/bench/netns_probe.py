"""TCP goodput probe run inside testbed namespaces: `python -m meshcast.bench.netns_probe`.

    recv --bind ADDR --flows F --bytes N [--timeout S]
        prints {"port": P, "udp_port": U}, accepts F connections, reads until each
        closes, then prints {"bytes": B, "end": T}: T is time.monotonic() when the last
        byte arrived. Meanwhile it echoes every datagram that reaches UDP port U.
    send --to ADDR --port P --udp-port U --flows F --bytes N [--timeout S] [--cc NAME]
        prints {"start": T} (time.monotonic() before connecting), makes F connections,
        then sends N bytes of payload split over them, one thread each, and closes them. A further
        thread sends a 64-byte datagram to U every 5 ms and times its echo; at the end it
        prints {"rtt_ms": [sorted round trips of the datagrams that came back]}: the
        queueing delay the transfer adds at the sender's cap, plus a base of ~0.1 ms.

Every namespace shares the kernel's CLOCK_MONOTONIC (there is no time namespace here),
so the caller computes the goodput as B·8 / (end − start). One JSON object per line on
stdout; errors go to stderr with exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import selectors
import socket
import sys
import threading
import time
from collections.abc import Sequence

CHUNK = 1024 * 1024
PING_INTERVAL = 0.005  # seconds between UDP echo requests during a transfer
PING_TIMEOUT = 0.5  # seconds: an echo later than this counts as lost


def _say(obj: dict[str, float | int | list[float]]) -> None:
    print(json.dumps(obj), flush=True)


def receive(bind: str, flows: int, nbytes: int, timeout: float) -> None:
    listener = socket.create_server((bind, 0), backlog=flows)
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind((bind, 0))
    echo.setblocking(False)
    _say({"port": listener.getsockname()[1], "udp_port": echo.getsockname()[1]})
    deadline = time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ)
    sel.register(echo, selectors.EVENT_READ)
    buffer = bytearray(CHUNK)
    accepted = closed = total = 0
    end = time.monotonic()
    while closed < flows:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{closed}/{flows} flows done, {total}/{nbytes} bytes")
        for key, _ in sel.select(timeout=min(remaining, 1.0)):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is listener:
                conn, _ = listener.accept()
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
                accepted += 1
                if accepted == flows:
                    sel.unregister(listener)
                    listener.close()
                continue
            if sock is echo:
                with contextlib.suppress(BlockingIOError):
                    datagram, peer = echo.recvfrom(2048)
                    echo.sendto(datagram, peer)
                continue
            try:
                got = sock.recv_into(buffer)
            except BlockingIOError:
                continue
            if got:
                total += got
                end = time.monotonic()
            else:
                sel.unregister(sock)
                sock.close()
                closed += 1
    if total != nbytes:
        raise ValueError(f"received {total} bytes, expected {nbytes}")
    echo.close()
    _say({"bytes": total, "end": end})


def _ping(to: str, port: int, stop: threading.Event, rtts: list[float]) -> None:
    """Time 64-byte UDP echoes every PING_INTERVAL until `stop`; lost ones are skipped."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((to, port))
        sock.settimeout(PING_TIMEOUT)
        seq = 0
        while not stop.wait(PING_INTERVAL):
            seq += 1
            sent = time.monotonic()
            sock.send(seq.to_bytes(8, "big") + bytes(56))
            try:
                while int.from_bytes(sock.recv(64)[:8], "big") != seq:
                    pass  # a late echo of an earlier ping
            except TimeoutError:
                continue
            except OSError:  # ECONNREFUSED once the receiver has closed
                return
            rtts.append(time.monotonic() - sent)


def send(
    to: str, port: int, udp_port: int, flows: int, nbytes: int, timeout: float, cc: str | None
) -> None:
    _say({"start": time.monotonic()})
    # Every connection is made before any payload moves: a SYN sent while the other
    # flows keep the capped queue full is often dropped there, and its 1 s
    # retransmission timeout would then show up as a gap in the measured goodput.
    socks: list[socket.socket] = []
    try:
        for _ in range(flows):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.settimeout(timeout)
            if cc is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
            sock.connect((to, port))
        _send_all(socks, to, udp_port, nbytes)
    finally:
        for sock in socks:
            sock.close()


def _send_all(socks: list[socket.socket], to: str, udp_port: int, nbytes: int) -> None:
    rtts: list[float] = []
    stop = threading.Event()
    pinger = threading.Thread(target=_ping, args=(to, udp_port, stop, rtts))
    pinger.start()
    payload = memoryview(bytes(CHUNK))
    flows = len(socks)
    shares = [nbytes // flows + (1 if i < nbytes % flows else 0) for i in range(flows)]
    errors: list[BaseException] = []

    def one_flow(sock: socket.socket, share: int) -> None:
        try:
            left = share
            while left > 0:
                step = min(left, CHUNK)
                sock.sendall(payload[:step])
                left -= step
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # wait for the receiver's close: every byte was read
        except OSError as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=one_flow, args=pair) for pair in zip(socks, shares, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    pinger.join()
    if errors:
        raise errors[0]
    _say({"rtt_ms": [round(r * 1e3, 3) for r in sorted(rtts)]})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshcast.bench.netns_probe")
    sub = parser.add_subparsers(dest="mode", required=True)
    recv_p = sub.add_parser("recv")
    recv_p.add_argument("--bind", required=True)
    send_p = sub.add_parser("send")
    send_p.add_argument("--to", required=True)
    send_p.add_argument("--port", type=int, required=True)
    send_p.add_argument("--udp-port", type=int, required=True)
    send_p.add_argument("--cc", help="TCP congestion control (TCP_CONGESTION), e.g. cubic")
    for p in (recv_p, send_p):
        p.add_argument("--flows", type=int, default=1)
        p.add_argument("--bytes", type=int, required=True, dest="nbytes")
        p.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    if args.flows < 1 or args.nbytes < args.flows:
        parser.error("need --flows >= 1 and --bytes >= --flows")
    try:
        if args.mode == "recv":
            receive(args.bind, args.flows, args.nbytes, args.timeout)
        else:
            send(args.to, args.port, args.udp_port, args.flows, args.nbytes, args.timeout, args.cc)
    except (OSError, ValueError) as exc:  # TimeoutError is an OSError
        print(f"netns_probe {args.mode}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
