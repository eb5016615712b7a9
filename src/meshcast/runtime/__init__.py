"""The only asyncio and socket code: drives the sans-I/O state machines on real sockets.

Theory of operation: docs/design/runtime.md.
"""

from meshcast.runtime.impair import ImpairedPath, ImpairedSender, Impairment
from meshcast.runtime.loop import run
from meshcast.runtime.stats import DriverStats, ImpairmentStats
from meshcast.runtime.tcp import TcpLinkDriver
from meshcast.runtime.udp import UdpLinkDriver, hop_link_factory, parse_address

__all__ = [
    "DriverStats",
    "ImpairedPath",
    "ImpairedSender",
    "Impairment",
    "ImpairmentStats",
    "TcpLinkDriver",
    "UdpLinkDriver",
    "hop_link_factory",
    "parse_address",
    "run",
]
