"""`meshcast demo` for the link layer: two daemons exchange messages over a lossy emulated link.

Two endpoint processes on loopback, each sending `messages` numbered messages to the
other through one Hop link, while the impairment shim drops `loss` of the datagrams and
delays each by `delay` (both directions). Every message is checked byte for byte on
arrival. A human summary goes to `out` (stdout by default); the exit status says whether
every message arrived exactly once and intact.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from meshcast.ids import NodeId
from meshcast.runtime.peer_process import PeerProcess, PeerProcessError

_DEMO_TIMEOUT = 120.0  # s: the whole exchange; the children are stopped after it anyway


async def run_demo(
    *,
    messages: int = 3000,
    size: int = 1024,
    loss: float = 0.05,
    delay: float = 0.020,
    jitter: float = 0.002,
    seed: int = 1,
    out: TextIO | None = None,
) -> int:
    """Run the exchange, print the summary, stop both processes. 0: all delivered intact."""
    stream = out if out is not None else sys.stdout
    common = [
        "--send",
        str(messages),
        "--expect",
        str(messages),
        "--size",
        str(size),
        "--mixed",
        "--loss",
        str(loss),
        "--delay",
        str(delay),
        "--jitter",
        str(jitter),
        "--max-runtime",
        str(_DEMO_TIMEOUT + 30),
    ]
    _say(
        stream,
        f"meshcast demo: two daemons on 127.0.0.1, one Hop link, {messages} messages each way "
        f"(up to {size} B, some split into pieces),\nemulated link: {loss:.0%} loss, "
        f"{delay * 1000:.0f} ms delay, {jitter * 1000:.0f} ms jitter in each direction.",
    )
    try:
        async with (
            await PeerProcess.start(NodeId(1), *common, "--seed", str(seed)) as one,
            await PeerProcess.start(NodeId(2), *common, "--seed", str(seed + 1)) as two,
        ):
            _say(stream, f"daemon 1 at {_fmt(one.address)}, daemon 2 at {_fmt(two.address)}")
            one.connect(two)
            two.connect(one)
            reports = [
                (await one.wait_event("done", _DEMO_TIMEOUT))["report"],
                (await two.wait_event("done", _DEMO_TIMEOUT))["report"],
            ]
    except (PeerProcessError, TimeoutError) as exc:
        _say(stream, f"demo FAILED: {exc}")
        return 1
    ok = True
    for report, other in (reports, reports[::-1]):
        ok &= _summarise(stream, report, other, messages)
    _say(
        stream, "result: every message arrived exactly once and intact" if ok else "result: FAILED"
    )
    return 0 if ok else 1


def _summarise(stream: TextIO, sender: dict[str, Any], receiver: dict[str, Any], n: int) -> bool:
    link = sender["stats"]["links"][str(receiver["node"])]
    impairment = sender["stats"]["impairment"] or {}
    submitted = impairment.get("submitted", 0)
    lost = impairment.get("lost", 0)
    elapsed = float(receiver["last_delivery_at"]) - float(sender["first_send_at"])
    rate = receiver["bytes_delivered"] / 1e6 / elapsed if elapsed > 0 else 0.0
    _say(
        stream,
        f"\n{sender['node']} -> {receiver['node']}: sent {sender['sent']} messages in "
        f"{link['packets_sent']} datagrams in all ({link['retransmissions']} retransmissions, "
        f"{link['probes_sent']} probes)\n"
        f"  emulated loss: {lost} of {submitted} datagrams dropped "
        f"({lost / max(submitted, 1):.1%}) on this direction\n"
        f"  received {receiver['delivered']} of {n} intact, {receiver['duplicates']} duplicates, "
        f"{receiver['corrupt']} corrupt; NACKs sent by the receiver: "
        f"{receiver['stats']['links'][str(sender['node'])]['nacks_sent']}\n"
        f"  {elapsed:.2f} s from first send to last delivery, {rate:.2f} MB/s, "
        f"{n / elapsed:.0f} messages/s",
    )
    return receiver["delivered"] == n and not receiver["duplicates"] and not receiver["corrupt"]


def _fmt(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def _say(stream: TextIO, text: str) -> None:
    stream.write(text + "\n")
    stream.flush()
