"""Cluster configuration: one TOML file describing daemons, sites, overlay links and policies.

`load_config(path)` reads a file, `parse_config(text)` a string and `default_config()` the
embedded default (``default-cluster.toml`` in this package, used by ``meshcast demo``).
Each returns a `ClusterConfig`, a tree of frozen dataclasses. Every mistake in a file
raises `ConfigError` naming the file, the key path (``daemons[2].port``,
``links.edge[0].b``) and what is wrong; unknown keys are errors, so typos never pass
silently. Host names are never resolved: hosts are IP addresses or ``localhost``.

`dump_config(config)` writes a config back as TOML that parses to an equal config (every
link explicit, every value in base units); a demo that picked free ports with
`ClusterConfig.with_ports` hands the result to its daemon processes that way.

The schema, with every key, type, unit and default, is documented in docs/config.md.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import json
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import Field, dataclass, field, fields, replace
from fractions import Fraction
from functools import cache, partial
from importlib import resources
from pathlib import Path
from typing import Literal, TypeVar

from meshcast.errors import ConfigError, ConfigProblem
from meshcast.group.access import ALLOW_WORDS, AccessPolicy, AccessRule, operations_of
from meshcast.group.config import GroupConfig
from meshcast.group.sessions import SessionConfig
from meshcast.ids import MAX_NODE_ID
from meshcast.link.config import LinkConfig

__all__ = [
    "DEFAULT_SOURCE",
    "ROUTING_POLICIES",
    "ClientsConfig",
    "ClusterConfig",
    "DaemonSpec",
    "Emulation",
    "GroupConfig",
    "LimitsConfig",
    "LinkSpec",
    "MembershipConfig",
    "RoutingPolicy",
    "SecurityConfig",
    "SessionsConfig",
    "SiteSpec",
    "default_config",
    "dump_config",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_rate",
    "parse_size",
    "private_file_fault",
    "read_token_file",
]

RoutingPolicy = Literal["shortest-path", "fanout", "max-throughput"]
ROUTING_POLICIES: tuple[RoutingPolicy, ...] = ("shortest-path", "fanout", "max-throughput")
SiteMesh = Literal["full", "none"]
WanMesh = Literal["full", "gateways", "none"]

DEFAULT_SOURCE = "<embedded default>"
DEFAULT_RESOURCE = "default-cluster.toml"
MAX_NAME_LENGTH = 64  # characters of a cluster, site or daemon name
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")

T = TypeVar("T")


def _typed(value: object, kind: type[T]) -> T:
    assert isinstance(value, kind)
    return value


class _Recorded(Exception):
    """A part of the file is unusable; its problems are already recorded."""


class _Problems:
    """Collects the errors of independent checks, so that a file's every mistake is
    reported at once (`ConfigError.problems`) instead of one per run."""

    def __init__(self) -> None:
        self.found: list[ConfigProblem] = []

    @contextlib.contextmanager
    def check(self) -> Iterator[None]:
        """Run the block; a `ConfigError` it raises is recorded, not propagated."""
        try:
            yield
        except ConfigError as exc:
            self.found.extend(exc.problems)
        except _Recorded:
            pass

    def add(self, message: str, key: str, source: str = "") -> None:
        self.found.append(ConfigProblem(message, key, source))

    def raise_any(self) -> None:
        """Raise one `ConfigError` carrying every problem recorded so far, if any."""
        if self.found:
            raise ConfigError.of(self.found)


# ---------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------

_NUMBER_AND_UNIT = re.compile(
    r"\s*(?P<number>(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*(?P<unit>\S*)\s*\Z"
)
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_SIZE_UNITS = {
    "B": 1,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
    "kB": 10**3,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
}
_DURATION_UNITS = {"us": Fraction(1, 10**6), "µs": Fraction(1, 10**6), "ms": Fraction(1, 1000)}
_DURATION_UNITS |= {"s": Fraction(1), "min": Fraction(60)}


def _toml_type(value: object) -> str:
    """The TOML name of a parsed value's type, for error messages."""
    match value:
        case bool():
            return "boolean"
        case int():
            return "integer"
        case float():
            return "float"
        case str():
            return "string"
        case dict():
            return "table"
        case list():
            return "array"
        case _:
            return "date-time"


def _describe(value: object) -> str:
    return (
        f"{_toml_type(value)} {value!r}"
        if not isinstance(value, (dict, list))
        else _toml_type(value)
    )


def _split_unit(text: str, kind: str, example: str, key: str) -> tuple[Fraction, str]:
    match = _NUMBER_AND_UNIT.match(text)
    if match is None:
        raise ConfigError(f"cannot parse {kind} {text!r}: expected e.g. {example!r}", key=key)
    unit = match["unit"]
    if not unit:
        raise ConfigError(
            f"{kind} {text!r} has no unit: write e.g. {example!r}, or a number without quotes",
            key=key,
        )
    return Fraction(match["number"]), unit


def _plain_number(value: object, kind: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(
            f"must be a number or a string with a unit ({kind}), got {_describe(value)}", key=key
        )
    if not math.isfinite(value):
        raise ConfigError(f"must be finite, got {value!r}", key=key)
    return float(value)


def parse_rate(value: object, key: str = "") -> float:
    """Bits/s from a number (bits/s) or a string such as ``"100Mbit"``, ``"1.5 Gbit"``.

    Units are decimal and case-insensitive: ``bit``, ``kbit``, ``Mbit``, ``Gbit``, ``Tbit``.
    ``bps`` spellings are refused, since ``MBps`` and ``Mbps`` differ eightfold.
    Raises `ConfigError` (with `key`) on anything else. The sign is not checked here.
    """
    if not isinstance(value, str):
        return _plain_number(value, "bits/s", key)
    number, unit = _split_unit(value, "rate", "100Mbit", key)
    multiplier = _RATE_UNITS.get(unit.lower())
    if multiplier is None:
        hint = " (bps spellings are ambiguous)" if unit.lower().endswith(("bps", "/s")) else ""
        raise ConfigError(
            f"unknown rate unit {unit!r} in {value!r}{hint}: use bit, kbit, Mbit, Gbit or Tbit",
            key=key,
        )
    return float(number * multiplier)


def parse_size(value: object, key: str = "") -> int:
    """Bytes from an integer (bytes) or a string such as ``"16MiB"``, ``"1.5 KiB"``, ``"9kB"``.

    Units (case-sensitive): ``B``, ``KiB``, ``MiB``, ``GiB``, ``TiB`` (powers of 1024) and
    ``kB``/``KB``, ``MB``, ``GB``, ``TB`` (powers of 1000). The result must be a whole
    number of bytes. Raises `ConfigError` (with `key`) on anything else.
    """
    if not isinstance(value, str):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(
                f"must be an integer (bytes) or a string with a unit such as '16MiB', "
                f"got {_describe(value)}",
                key=key,
            )
        return value
    number, unit = _split_unit(value, "size", "16MiB", key)
    multiplier = _SIZE_UNITS.get(unit)
    if multiplier is None:
        raise ConfigError(
            f"unknown size unit {unit!r} in {value!r}: use B, KiB, MiB, GiB, TiB, kB, MB, GB or TB",
            key=key,
        )
    size = number * multiplier
    if size.denominator != 1:
        raise ConfigError(f"{value!r} is not a whole number of bytes", key=key)
    return int(size)


def parse_duration(value: object, key: str = "") -> float:
    """Seconds from a number (seconds) or a string such as ``"20ms"``, ``"1.5s"``, ``"250us"``.

    Units (case-sensitive): ``us`` (or ``µs``), ``ms``, ``s``, ``min``. Raises `ConfigError`
    (with `key`) on anything else. The sign is not checked here.
    """
    if not isinstance(value, str):
        return _plain_number(value, "seconds", key)
    number, unit = _split_unit(value, "duration", "20ms", key)
    multiplier = _DURATION_UNITS.get(unit)
    if multiplier is None:
        raise ConfigError(
            f"unknown duration unit {unit!r} in {value!r}: use us, ms, s or min", key=key
        )
    return float(number * multiplier)


# ---------------------------------------------------------------------------------------
# The configuration dataclasses
# ---------------------------------------------------------------------------------------


def _check_name(value: str, key: str) -> None:
    if not (_NAME.match(value) and len(value) <= MAX_NAME_LENGTH):
        raise ConfigError(
            f"must be 1 to {MAX_NAME_LENGTH} letters, digits, '_', '.' or '-' "
            f"starting with a letter or digit, got {value!r}",
            key=key,
        )


def _check_positive(value: float, key: str, unit: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"must be a positive number of {unit}, got {value!r}", key=key)


def _canonical_host(host: str, key: str) -> str:
    """The host as written canonically; refuses anything but an IP address or localhost."""
    if host == "localhost":
        return host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"must be an IP address or 'localhost' (host names are not resolved), got {host!r}",
            key=key,
        ) from None
    if address.is_unspecified or address.is_multicast:
        raise ConfigError(f"must be an address other daemons can send to, got {host!r}", key=key)
    return str(address)


def _endpoint_keys(host: str, port: int) -> set[tuple[str, int]]:
    """Addresses a daemon may answer on: `localhost` collides with 127.0.0.1 and ::1."""
    if host == "localhost":
        return {("localhost", port), ("127.0.0.1", port), ("::1", port)}
    return {(host, port)}


@dataclass(frozen=True, slots=True)
class SiteSpec:
    """A site: daemons close to each other (one data centre, one LAN)."""

    name: str  # identifier: letters, digits, '_', '.', '-'; unique in the cluster
    gateway: str | None = (
        None  # daemon name: this site's end of generated WAN links; None: first daemon
    )

    def __post_init__(self) -> None:
        problems = _Problems()
        with problems.check():
            _check_name(self.name, "name")
        if self.gateway is not None:
            with problems.check():
                _check_name(self.gateway, "gateway")
        problems.raise_any()


@dataclass(frozen=True, slots=True)
class DaemonSpec:
    """One daemon of the overlay. Error keys are the TOML spellings (`id`, `upload`)."""

    name: str  # identifier, unique in the cluster
    node_id: int  # the daemon's id on the wire: 1..2**32-1, unique
    host: str  # IP address (stored canonically) or "localhost"; never resolved
    port: int  # UDP port of the daemon's overlay endpoint, 1..65535
    site: str  # name of the site the daemon belongs to
    upload_bps: float  # bits/s the daemon can send in total, all links together
    download_bps: float  # bits/s the daemon can receive in total

    def __post_init__(self) -> None:
        problems = _Problems()
        with problems.check():
            _check_name(self.name, "name")
        if not 1 <= self.node_id <= MAX_NODE_ID:
            problems.add(f"must be in 1..{MAX_NODE_ID}, got {self.node_id!r}", "id")
        with problems.check():
            object.__setattr__(self, "host", _canonical_host(self.host, "host"))
        if not 1 <= self.port <= 65535:
            problems.add(f"must be in 1..65535, got {self.port!r}", "port")
        with problems.check():
            _check_name(self.site, "site")
        with problems.check():
            _check_positive(self.upload_bps, "upload", "bits/s")
        with problems.check():
            _check_positive(self.download_bps, "download", "bits/s")
        problems.raise_any()

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the daemon's overlay endpoint."""
        return (self.host, self.port)


@dataclass(frozen=True, slots=True)
class Emulation:
    """User-space impairment of one overlay edge, applied in each direction.

    For demos and tests on loopback (kernel netem is not available): each endpoint puts
    the shim (`meshcast.runtime.impair`) on its outgoing path to the other.
    """

    delay: float = 0.0  # s: one-way delay added to every datagram
    jitter: float = 0.0  # s: uniform random extra delay in [0, jitter); reorders datagrams
    loss: float = 0.0  # probability in [0, 1) that a datagram is dropped
    rate_bps: float | None = None  # bits/s of an emulated bottleneck; None: unlimited

    def __post_init__(self) -> None:
        problems = _Problems()
        for key, value in (("delay", self.delay), ("jitter", self.jitter)):
            if not (math.isfinite(value) and value >= 0.0):
                problems.add(f"must be >= 0 s, got {value!r}", key)
        if not 0.0 <= self.loss < 1.0:
            problems.add(f"must be in [0, 1), got {self.loss!r}", "loss")
        if self.rate_bps is not None:
            with problems.check():
                _check_positive(self.rate_bps, "rate", "bits/s")
        problems.raise_any()

    @property
    def is_noop(self) -> bool:
        """True when the emulation changes nothing (no delay, jitter, loss or rate cap)."""
        return self == Emulation()


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """An undirected overlay edge between two daemons, named by daemon name."""

    a: str  # daemon name
    b: str  # daemon name, not a
    weight: float  # routing cost (> 0): shortest-path routing minimises the sum along a path
    bandwidth_bps: float  # bits/s the edge carries in each direction
    emulation: Emulation | None = None  # impairment on both directions; None: none

    def __post_init__(self) -> None:
        problems = _Problems()
        if self.a == self.b:
            problems.add(f"links daemon {self.a!r} to itself", "b")
        with problems.check():
            _check_positive(self.weight, "weight", "cost units")
        with problems.check():
            _check_positive(self.bandwidth_bps, "bandwidth", "bits/s")
        problems.raise_any()

    def other(self, name: str) -> str:
        """The end of the edge that is not `name`."""
        return self.b if name == self.a else self.a


@dataclass(frozen=True, slots=True)
class MembershipConfig:
    """Timers of the daemon membership protocol (overlay layer)."""

    hello_interval: float = 1.0  # s: a daemon tells its overlay neighbours it is alive
    lsa_refresh_interval: float = 10.0  # s: a daemon re-floods its link-state advertisement
    view_settle_interval: float = 0.2  # s: quiet time after a change before a new view installs
    failure_timeout: float = 3.0  # s: no hello from a neighbour for this long: it is down

    def __post_init__(self) -> None:
        problems = _Problems()
        for f in fields(self):
            with problems.check():
                _check_positive(getattr(self, f.name), f"membership.{f.name}", "seconds")
        if not problems.found and self.failure_timeout < 2 * self.hello_interval:
            problems.add(
                f"must be at least 2 × hello_interval ({2 * self.hello_interval!r} s) so one "
                f"lost hello does not fail a daemon, got {self.failure_timeout!r}",
                "membership.failure_timeout",
            )
        problems.raise_any()


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """The cluster key that authenticates and encrypts daemon traffic (docs/security.md).

    The key files are read when a daemon starts and on SIGHUP (`meshcast.runtime.keyfile`),
    not here: tools that only read the cluster file (``meshcast status``) need no key.
    A daemon refuses to start without a key unless `insecure` says so (`check_daemon`).
    """

    key_file: str | None = None  # path of the cluster key; None: no key
    # path of the key being rolled out (docs/security.md, "Keys"); None: no rotation
    next_key_file: str | None = None
    insecure: bool = False  # run without encryption or authentication (loud warnings)

    def __post_init__(self) -> None:
        problems = _Problems()
        if self.insecure and self.key_file is not None:
            problems.add(
                "insecure = true and a key_file contradict each other: remove one",
                "security.insecure",
            )
        if self.next_key_file is not None and self.key_file is None:
            problems.add("needs security.key_file (the key in use)", "security.next_key_file")
        problems.raise_any()

    def check_daemon(self, source: str = "") -> None:
        """Raise `ConfigError` unless a daemon may start with this: a key, or insecure."""
        if self.key_file is None and not self.insecure:
            raise ConfigError(
                "a daemon needs a cluster key: create one with `meshcast keygen FILE` and "
                'name it in the cluster file under [security] as key_file = "FILE" (the same '
                "key on every daemon), or set insecure = true there to run without "
                "encryption or authentication",
                key="security.key_file",
                source=source,
            )


# ---------------------------------------------------------------- [clients]

MIN_TOKEN_LENGTH = 16  # characters of a token secret: shorter ones are guessable
MAX_TOKEN_LENGTH = 128  # characters (the client protocol's MAX_TOKEN bytes)
_SECRET = re.compile(r"[\x21-\x7e]+\Z")  # printable ASCII without space


def _secret_fault(secret: str) -> str | None:
    """What is wrong with a token secret (never echoing it), or None."""
    if not MIN_TOKEN_LENGTH <= len(secret) <= MAX_TOKEN_LENGTH:
        return (
            f"a token secret must have {MIN_TOKEN_LENGTH} to {MAX_TOKEN_LENGTH} characters, "
            f"this one has {len(secret)} (e.g. `openssl rand -hex 32`)"
        )
    if not _SECRET.match(secret):
        return "a token secret must be printable ASCII without spaces"
    return None


def private_file_fault(path: Path, what: str) -> str | None:
    """Refuse a secret file others may read (as ssh refuses its keys), or None if fine."""
    try:
        info = path.stat()
    except OSError as exc:
        return f"cannot read {what} {str(path)!r}: {exc.strerror or exc}"
    if not stat.S_ISREG(info.st_mode):
        return f"{what} {str(path)!r} is not a regular file"
    if info.st_mode & 0o077:
        return (
            f"{what} {str(path)!r} is readable or writable by group or others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {path}"
        )
    return None


def read_token_file(path: str | os.PathLike[str]) -> tuple[tuple[str, str], ...]:
    """The (name, secret) lines of a token file; `ConfigError` (key ``clients.token_file``).

    One token a line: ``NAME SECRET``; blank lines and lines starting with ``#`` are
    skipped. The file must be a regular file of mode 0600 (or stricter).
    """
    file = Path(path)
    key = "clients.token_file"
    fault = private_file_fault(file, "token file")
    if fault is not None:
        raise ConfigError(fault, key=key)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read token file {str(file)!r}: {exc}", key=key) from None
    tokens: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        where = f"token file {str(file)!r} line {number}"
        if len(words) != 2:
            raise ConfigError(f"{where}: expected NAME SECRET, got {len(words)} words", key=key)
        name, secret = words
        if not (_NAME.match(name) and len(name) <= MAX_NAME_LENGTH):
            raise ConfigError(f"{where}: bad token name {name!r}", key=key)
        fault = _secret_fault(secret)
        if fault is not None:
            raise ConfigError(f"{where}: {fault}", key=key)
        tokens.append((name, secret))
    if not tokens:
        raise ConfigError(f"token file {str(file)!r} holds no token", key=key)
    return tuple(tokens)


@dataclass(frozen=True, slots=True)
class ClientsConfig:
    """Who may use a daemon's client sockets, and for what (docs/config.md, "[clients]").

    The token file is read by the daemon when it starts (`load_policy`), not when the
    configuration is loaded: clients and tools read the same cluster file and must not
    need the daemon's secrets.
    """

    # group given the Unix socket, which is then mode 0660; None: 0600, the owner only
    socket_group: str | None = None
    token_file: str | None = None  # path of a file of `NAME SECRET` lines (mode 0600)
    # (name, secret) from [clients.tokens] in the cluster file itself
    tokens: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    rules: tuple[AccessRule, ...] = ()  # [[clients.rule]], first match wins

    def __post_init__(self) -> None:
        problems = _Problems()
        if self.socket_group is not None and not self.socket_group:
            problems.add("must be a group name, got ''", "clients.socket_group")
        # rules naming tokens are checked here only when every token is in this file
        _check_tokens(self.tokens, (), self.rules, problems, check_rules=self.token_file is None)
        problems.raise_any()

    @property
    def has_tokens(self) -> bool:
        """Tokens are configured (in the file or a token file): remote clients may come."""
        return bool(self.tokens) or self.token_file is not None

    def load_policy(self, source: str = "") -> AccessPolicy:
        """The tokens (the token file read now) and rules as a daemon applies them.

        Raises `ConfigError` naming `source` for an unreadable or unsafe token file, a
        token defined twice, or a rule naming a token that does not exist.
        """
        from_file: tuple[tuple[str, str], ...] = ()
        if self.token_file is not None:
            try:
                from_file = read_token_file(self.token_file)
            except ConfigError as exc:
                raise _relocated(exc, "clients.token_file", source) from None
        problems = _Problems()
        _check_tokens(self.tokens, from_file, self.rules, problems, check_rules=True)
        if problems.found:
            raise ConfigError.of([ConfigProblem(p.message, p.key, source) for p in problems.found])
        return AccessPolicy(dict(self.tokens + from_file), self.rules)


def _check_tokens(
    inline: Sequence[tuple[str, str]],
    from_file: Sequence[tuple[str, str]],
    rules: Sequence[AccessRule],
    problems: _Problems,
    *,
    check_rules: bool,
) -> None:
    """Unique names and secrets, good secrets, and (with `check_rules`) rules that name
    only tokens that exist."""
    names: dict[str, str] = {}
    secrets: set[str] = set()
    for origin, pairs in (("tokens", inline), ("token_file", from_file)):
        for name, secret in pairs:
            key = f"clients.{origin}" + (f".{name}" if origin == "tokens" else "")
            if name in names:
                problems.add(f"token {name!r} is also defined in clients.{names[name]}", key)
            names[name] = origin
            fault = _secret_fault(secret)
            if fault is not None:
                problems.add(fault, key)
            elif secret in secrets:
                problems.add(f"token {name!r} has the secret of another token", key)
            secrets.add(secret)
    if not check_rules:
        return
    for i, rule in enumerate(rules):
        unknown = [t for t in rule.tokens or () if t not in names]
        if unknown:
            known = f"tokens are {_names(names)}" if names else "no token is configured"
            problems.add(f"unknown token {unknown[0]!r}; {known}", f"clients.rule[{i}].tokens")


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Bounds a daemon enforces on clients and traffic."""

    max_message_size: int = 16 * 1024 * 1024  # bytes of one client message's payload
    max_dests_per_packet: int = 50  # daemons named in one multi-destination packet
    window_messages: int = 1000  # end-to-end window: outstanding messages per source
    max_clients: int = 1000  # client sessions per daemon
    max_groups_per_client: int = 100  # groups one client session may join
    max_group_name: int = 64  # bytes of a group name (UTF-8)
    handshake_timeout: float = 5.0  # s: a client connection must send HELLO within this
    max_pending_handshakes: int = 64  # client connections waiting for their HELLO at once
    # s: a `block` member that holds senders back this long is disconnected (SLOW_RECEIVER)
    block_timeout: float = 30.0

    def __post_init__(self) -> None:
        problems = _Problems()
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("handshake_timeout", "block_timeout"):
                with problems.check():
                    _check_positive(value, f"limits.{f.name}", "seconds")
            elif value < 1:
                problems.add(f"must be at least 1, got {value!r}", f"limits.{f.name}")
        # What the client protocol can carry (docs/client-protocol.md).
        ceilings = {"max_group_name": 255, "max_message_size": 1 << 30}
        for name, ceiling in ceilings.items():
            if getattr(self, name) > ceiling:
                problems.add(
                    f"must be at most {ceiling} (the client protocol's limit)", f"limits.{name}"
                )
        problems.raise_any()


# SessionConfig's defaults (a slotted dataclass has no class attributes holding them)
_SESSION_DEFAULTS: dict[str, object] = {f.name: f.default for f in fields(SessionConfig)}


@dataclass(frozen=True, slots=True)
class SessionsConfig:
    """[sessions]: the settable part of a daemon's `SessionConfig` (client sessions).

    The rest of `SessionConfig` comes from elsewhere: `limits` (DaemonLimits),
    `max_clients`, `handshake_timeout`, `max_pending_handshakes` and `block_timeout` from
    [limits], `access` from [clients].
    """

    # bytes: frames a paused (slow) `block` or `drop-unreliable` member may be sent beyond
    # its socket's high-water mark before it is disconnected with SLOW_RECEIVER anyway
    max_backlog: int = _typed(_SESSION_DEFAULTS["max_backlog"], int)
    # a STATUS report lists at most this many groups, and this many members of each
    status_max_groups: int = _typed(_SESSION_DEFAULTS["status_max_groups"], int)
    status_max_members: int = _typed(_SESSION_DEFAULTS["status_max_members"], int)

    def __post_init__(self) -> None:
        # SessionConfig's own checks, with the keys of this section
        SessionConfig(
            max_backlog=self.max_backlog,
            status_max_groups=self.status_max_groups,
            status_max_members=self.status_max_members,
        )


@dataclass(frozen=True, slots=True)
class ReplicateConfig:
    """[replicate]: bulk replication (docs/design/replicate.md)."""

    # bits/s each daemon uploads for replication at most; 0: no cap of its own (a request
    # can still set one). Set it a little below the uplink: the engine then decides what
    # goes on the wire first (tree edges before collection) instead of the kernel's queue.
    rate_bps: float = 0.0
    progress_interval: float = 0.25  # s between a recipient's progress reports
    give_up_after: float = 120.0  # s without progress from any recipient: the origin stops
    # s without progress after which `meshcast status` calls a transfer stalled and names
    # the peers it waits on
    stall_after: float = 10.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate_bps) and self.rate_bps >= 0):
            raise ConfigError(f"must be 0 or a positive rate, got {self.rate_bps!r}", key="rate")
        for key in ("progress_interval", "give_up_after", "stall_after"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"must be a positive number of seconds, got {value!r}", key=key)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """A whole cluster: its daemons, sites, overlay links and the policies of every layer.

    Constructing one checks the cross-references (unique names, ids and addresses, known
    sites and daemons, a connected overlay) and raises `ConfigError` naming `source`.
    """

    name: str  # identifier of the cluster
    daemons: tuple[DaemonSpec, ...]  # in file order
    sites: tuple[SiteSpec, ...]  # in file order
    links: tuple[LinkSpec, ...]  # each edge once; loaded: a has the lower node id, sorted
    routing: RoutingPolicy = "shortest-path"  # how a source's routing tree is built
    link: LinkConfig = field(default_factory=LinkConfig)  # Hop link parameters
    membership: MembershipConfig = field(default_factory=MembershipConfig)  # daemon timers
    security: SecurityConfig = field(default_factory=SecurityConfig)  # authentication
    limits: LimitsConfig = field(default_factory=LimitsConfig)  # bounds on clients, traffic
    group: GroupConfig = field(default_factory=GroupConfig)  # the ordering engine's timers, bounds
    sessions: SessionsConfig = field(default_factory=SessionsConfig)  # client sessions
    replicate: ReplicateConfig = field(default_factory=ReplicateConfig)  # bulk replication
    clients: ClientsConfig = field(default_factory=ClientsConfig)  # client access control
    source: str = field(default="<code>", compare=False)  # file path or "<embedded default>"
    # Indexes built by __post_init__: name -> daemon, node id -> daemon, name -> neighbours.
    _by_name: Mapping[str, DaemonSpec] = field(init=False, repr=False, compare=False)
    _by_id: Mapping[int, DaemonSpec] = field(init=False, repr=False, compare=False)
    _adjacent: Mapping[str, tuple[tuple[DaemonSpec, LinkSpec], ...]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        source = self.source
        problems = _Problems()
        try:
            _check_name(self.name, "cluster.name")
        except ConfigError as exc:
            problems.add(_bare_message(exc), "cluster.name", source)
        if self.routing not in ROUTING_POLICIES:
            problems.add(
                f"must be one of {', '.join(ROUTING_POLICIES)}, got {self.routing!r}",
                "cluster.routing",
                source,
            )
        _check_nodes(self.sites, self.daemons, source, problems)
        by_name = {d.name: d for d in self.daemons}
        before_links = len(problems.found)
        _check_links(by_name, self.links, source, problems)
        if len(problems.found) == before_links:  # connectivity needs known link ends
            _check_connected(self.daemons, self.links, source, problems)
        if self.limits.max_message_size > self.link.max_message_size:
            problems.add(
                f"must not exceed link.max_message_size ({self.link.max_message_size} B), "
                f"got {self.limits.max_message_size}",
                "limits.max_message_size",
                source,
            )
        problems.raise_any()
        adjacent: dict[str, list[tuple[DaemonSpec, LinkSpec]]] = {d.name: [] for d in self.daemons}
        for link in self.links:
            adjacent[link.a].append((by_name[link.b], link))
            adjacent[link.b].append((by_name[link.a], link))
        object.__setattr__(self, "_by_name", by_name)
        object.__setattr__(self, "_by_id", {d.node_id: d for d in self.daemons})
        object.__setattr__(self, "_adjacent", {k: tuple(v) for k, v in adjacent.items()})

    def daemon(self, name: str) -> DaemonSpec:
        """The daemon called `name`; `ConfigError` naming it if there is none."""
        spec = self._by_name.get(name)
        if spec is None:
            raise ConfigError(
                f"unknown daemon {name!r}; daemons are {_names(self._by_name)}",
                key="daemons",
                source=self.source,
            )
        return spec

    def by_id(self, node_id: int) -> DaemonSpec:
        """The daemon whose node id is `node_id`; `ConfigError` if there is none."""
        spec = self._by_id.get(node_id)
        if spec is None:
            raise ConfigError(f"no daemon has id {node_id!r}", key="daemons", source=self.source)
        return spec

    def neighbours(self, name: str) -> list[tuple[DaemonSpec, LinkSpec]]:
        """The overlay neighbours of daemon `name`, each with the edge to it, by edge order."""
        self.daemon(name)
        return list(self._adjacent[name])

    def site_members(self, site: str) -> list[DaemonSpec]:
        """The daemons of `site`, in file order (empty for a site without daemons)."""
        return [d for d in self.daemons if d.site == site]

    def with_ports(self, ports: Mapping[str, int]) -> ClusterConfig:
        """A copy whose daemons named in `ports` listen on the given ports instead."""
        for name in ports:
            self.daemon(name)
        daemons = tuple(
            replace(d, port=ports[d.name]) if d.name in ports else d for d in self.daemons
        )
        return replace(self, daemons=daemons)


def _names(names: Iterable[str], limit: int = 12) -> str:
    listed = list(names)
    shown = ", ".join(listed[:limit])
    return shown + (f" … (+{len(listed) - limit} more)" if len(listed) > limit else "")


def _check_nodes(
    sites: Sequence[SiteSpec], daemons: Sequence[DaemonSpec], source: str, problems: _Problems
) -> None:
    """Unique site and daemon names, ids and addresses; known sites and gateways."""
    if not daemons:
        problems.add("at least one daemon is required", "daemons", source)
    site_at: dict[str, int] = {}
    for i, site in enumerate(sites):
        if site.name in site_at:
            problems.add(
                f"duplicate site name {site.name!r} (also sites[{site_at[site.name]}])",
                f"sites[{i}].name",
                source,
            )
        site_at[site.name] = i
    name_at: dict[str, int] = {}
    id_at: dict[int, int] = {}
    endpoint_at: dict[tuple[str, int], int] = {}
    for i, d in enumerate(daemons):
        if d.name in name_at:
            problems.add(
                f"duplicate daemon name {d.name!r} (also daemons[{name_at[d.name]}])",
                f"daemons[{i}].name",
                source,
            )
        name_at[d.name] = i
        if d.node_id in id_at:
            problems.add(
                f"duplicate node id {d.node_id} (also daemons[{id_at[d.node_id]}])",
                f"daemons[{i}].id",
                source,
            )
        id_at[d.node_id] = i
        if d.site not in site_at:
            defined = f"defined sites: {_names(site_at)}" if site_at else "no [[sites]] are defined"
            problems.add(f"unknown site {d.site!r}; {defined}", f"daemons[{i}].site", source)
        for endpoint in _endpoint_keys(d.host, d.port):
            if endpoint in endpoint_at:
                problems.add(
                    f"address {d.host}:{d.port} is already used by daemons[{endpoint_at[endpoint]}]",
                    f"daemons[{i}].port",
                    source,
                )
                break
        endpoint_at.update(dict.fromkeys(_endpoint_keys(d.host, d.port), i))
    for i, site in enumerate(sites):
        if site.gateway is None:
            continue
        if site.gateway not in name_at:
            problems.add(f"unknown daemon {site.gateway!r}", f"sites[{i}].gateway", source)
        elif daemons[name_at[site.gateway]].site != site.name:
            problems.add(
                f"daemon {site.gateway!r} is in site {daemons[name_at[site.gateway]].site!r}, "
                f"not {site.name!r}",
                f"sites[{i}].gateway",
                source,
            )


def _check_links(
    by_name: Mapping[str, DaemonSpec],
    links: Sequence[LinkSpec],
    source: str,
    problems: _Problems,
) -> None:
    pair_at: dict[frozenset[str], int] = {}
    for i, link in enumerate(links):
        for end, name in (("a", link.a), ("b", link.b)):
            if name not in by_name:
                problems.add(
                    f"unknown daemon {name!r}; daemons are {_names(by_name)}",
                    f"links[{i}].{end}",
                    source,
                )
        pair = frozenset((link.a, link.b))
        if pair in pair_at:
            problems.add(
                f"duplicate edge {link.a}–{link.b} (also links[{pair_at[pair]}])",
                f"links[{i}]",
                source,
            )
        pair_at[pair] = i


def _check_connected(
    daemons: Sequence[DaemonSpec], links: Sequence[LinkSpec], source: str, problems: _Problems
) -> None:
    adjacent: dict[str, list[str]] = {d.name: [] for d in daemons}
    for link in links:
        adjacent[link.a].append(link.b)
        adjacent[link.b].append(link.a)
    component_of: dict[str, int] = {}
    components: list[list[str]] = []
    for d in daemons:
        if d.name in component_of:
            continue
        component_of[d.name] = len(components)
        members: list[str] = []
        stack = [d.name]
        while stack:
            name = stack.pop()
            members.append(name)
            for other in adjacent[name]:
                if other not in component_of:
                    component_of[other] = len(components)
                    stack.append(other)
        components.append(members)
    if len(components) > 1:
        order = {d.name: i for i, d in enumerate(daemons)}
        shown = " | ".join(
            "{" + _names(sorted(c, key=order.__getitem__), limit=8) + "}" for c in components
        )
        problems.add(
            f"the overlay graph is disconnected, {len(components)} components: {shown}; "
            f"add [[links.edge]] entries or change links.within_sites / links.between_sites",
            "links",
            source,
        )


def _bare_message(exc: ConfigError) -> str:
    """The message of `exc`'s first problem, without the ``source:key: `` prefix."""
    return exc.problems[0].message


def _relocated(exc: ConfigError, key: str, source: str) -> ConfigError:
    """`exc` with its problems moved to `key` in `source`."""
    return ConfigError.of([ConfigProblem(p.message, key, source) for p in exc.problems])


# ---------------------------------------------------------------------------------------
# Reading TOML
# ---------------------------------------------------------------------------------------

_TOP_KEYS = (
    "cluster",
    "sites",
    "daemons",
    "links",
    "link",
    "membership",
    "security",
    "limits",
    "group",
    "sessions",
    "clients",
    "replicate",
)
_CLIENTS_KEYS = ("socket_group", "token_file", "tokens", "rule")
_RULE_KEYS = ("clients", "tokens", "groups", "allow")
_CLUSTER_KEYS = ("name", "routing")
_SITE_KEYS = ("name", "gateway")
_DAEMON_KEYS = ("name", "id", "host", "port", "site", "upload", "download")
_LINKS_KEYS = (
    "within_sites",
    "between_sites",
    "site_weight",
    "wan_weight",
    "site_emulate",
    "wan_emulate",
    "edge",
)
_EDGE_KEYS = ("a", "b", "weight", "bandwidth", "emulate")
_EMULATE_KEYS = ("delay", "delay_ms", "jitter", "jitter_ms", "loss", "rate")
_SECURITY_KEYS = ("key_file", "next_key_file", "insecure")
_SITE_MESH: dict[str, SiteMesh] = {"full": "full", "none": "none"}
_WAN_MESH: dict[str, WanMesh] = {"full": "full", "gateways": "gateways", "none": "none"}
_POLICIES: dict[str, RoutingPolicy] = {policy: policy for policy in ROUTING_POLICIES}


@dataclass(frozen=True, slots=True)
class _FieldKey:
    """How one dataclass field is spelt and parsed in its TOML section."""

    field: str  # dataclass field name
    kind: Literal["bool", "int", "number", "size", "rate", "duration"]


def _field_keys(dataclass_fields: Iterable[Field[object]]) -> dict[str, _FieldKey]:
    """TOML key -> field: `rate_bps` is spelt `rate`; units follow the field's name."""
    keys: dict[str, _FieldKey] = {}
    for f in dataclass_fields:
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        name = f.name
        if annotation == "bool":
            keys[name] = _FieldKey(name, "bool")
        elif annotation == "float" and name.endswith("_bps"):
            keys[name.removesuffix("_bps")] = _FieldKey(name, "rate")
        elif annotation == "float" and name.endswith(
            ("_interval", "_timeout", "_rtt", "_delay", "_after")
        ):
            keys[name] = _FieldKey(name, "duration")
        elif annotation == "float":
            keys[name] = _FieldKey(name, "number")
        elif annotation == "int" and (
            name.endswith(("_bytes", "_size", "mtu")) or name == "max_backlog"
        ):
            keys[name] = _FieldKey(name, "size")
        elif annotation == "int":
            keys[name] = _FieldKey(name, "int")
        else:
            raise TypeError(f"no TOML spelling for field {name}: {annotation}")
    return keys


_LINK_CONFIG_KEYS = _field_keys(fields(LinkConfig))
_MEMBERSHIP_KEYS = _field_keys(fields(MembershipConfig))
_LIMITS_KEYS = _field_keys(fields(LimitsConfig))
# GroupConfig fields a file may not set: protocol-internal memory bounds whose right value
# follows from the protocol, not from the deployment (duplicate detection, late messages).
_GROUP_INTERNAL = frozenset({"dedup_window", "max_past_views"})
_GROUP_KEYS = _field_keys(f for f in fields(GroupConfig) if f.name not in _GROUP_INTERNAL)
_SESSIONS_KEYS = _field_keys(fields(SessionsConfig))
_REPLICATE_KEYS = _field_keys(fields(ReplicateConfig))
# Keys people put in the wrong one of [link] (Hop parameters) and [links] (overlay edges).
_WRONG_SECTION = {
    "link": (frozenset(_LINKS_KEYS), "overlay edges are configured in [links]"),
    "links": (frozenset(_LINK_CONFIG_KEYS), "Hop link parameters go in [link]"),
}


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class _Reader:
    """Turns the dict tomllib produced into a ClusterConfig, checking every value."""

    def __init__(self, source: str, base_dir: Path, path: Path | None = None) -> None:
        self.source = source
        self.base_dir = base_dir
        self.path = path  # the file read, if any (its mode is checked if it holds secrets)
        self.problems = _Problems()  # every mistake found so far, reported together

    def values(self, getters: Mapping[str, Callable[[], object]]) -> dict[str, object] | None:
        """Each getter's value by name; None if any failed (all failures are recorded)."""
        found = len(self.problems.found)
        values: dict[str, object] = {}
        for name, getter in getters.items():
            with self.problems.check():
                values[name] = getter()
        return values if len(self.problems.found) == found else None

    def error(self, message: str, key: str) -> ConfigError:
        return ConfigError(message, key=key, source=self.source)

    def relocated(self, exc: ConfigError, key: str) -> ConfigError:
        return _relocated(exc, key, self.source)

    # -- structure --------------------------------------------------------------------

    def table(self, value: object, key: str, allowed: Sequence[str]) -> dict[str, object]:
        """`value` as a table whose keys are all in `allowed`."""
        if not isinstance(value, dict):
            hint = "; explicit edges go in [[links.edge]]" if key == "links" else ""
            raise self.error(f"must be a table, got {_describe(value)}{hint}", key)
        for name in value:
            if name not in allowed:  # recorded; the known keys are still checked
                message = self.unknown_key_message(name, key, allowed)
                self.problems.add(message, _key(key, name), self.source)
        return {str(k): v for k, v in value.items() if k in allowed}

    def unknown_key_message(self, name: str, section: str, allowed: Sequence[str]) -> str:
        message = "unknown key"
        if section in _WRONG_SECTION and name in _WRONG_SECTION[section][0]:
            return f"{message} ({_WRONG_SECTION[section][1]})"
        close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
        if not close and len(name) >= 3:  # a truncated or over-long spelling: hello, rate_bps
            close = [k for k in allowed if k.startswith(name) or name.startswith(k)][:1]
        if close:
            message += f"; did you mean {close[0]!r}?"
        else:
            message += f"; expected one of: {', '.join(allowed)}"
        return message

    def array_of_tables(
        self, value: object, key: str, allowed: Sequence[str]
    ) -> list[dict[str, object]]:
        if not isinstance(value, list):
            raise self.error(
                f"must be an array of tables ([[{key}]] entries), got {_describe(value)}", key
            )
        return [self.table(item, f"{key}[{i}]", allowed) for i, item in enumerate(value)]

    def get(
        self,
        table: Mapping[str, object],
        name: str,
        prefix: str,
        convert: Callable[[object, str], T],
    ) -> T | None:
        """The converted value of `name`, or None if the table does not have it."""
        if name not in table:
            return None
        return convert(table[name], _key(prefix, name))

    def need(
        self,
        table: Mapping[str, object],
        name: str,
        prefix: str,
        convert: Callable[[object, str], T],
    ) -> T:
        value = self.get(table, name, prefix, convert)
        if value is None:
            raise self.error("missing required key", _key(prefix, name))
        return value

    # -- scalar converters: (raw value, key) -> typed value --------------------------

    def string(self, value: object, key: str) -> str:
        if not isinstance(value, str):
            raise self.error(f"must be a string, got {_describe(value)}", key)
        return value

    def integer(self, value: object, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"must be an integer, got {_describe(value)}", key)
        return value

    def boolean(self, value: object, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.error(f"must be true or false, got {_describe(value)}", key)
        return value

    def number(self, value: object, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(f"must be a number, got {_describe(value)}", key)
        if not math.isfinite(value):
            raise self.error(f"must be finite, got {value!r}", key)
        return float(value)

    def rate(self, value: object, key: str) -> float:
        return self.located(parse_rate, value, key)

    def size(self, value: object, key: str) -> int:
        return self.located(parse_size, value, key)

    def duration(self, value: object, key: str) -> float:
        return self.located(parse_duration, value, key)

    def located(self, parse: Callable[[object, str], T], value: object, key: str) -> T:
        try:
            return parse(value, key)
        except ConfigError as exc:
            raise self.relocated(exc, key) from None

    def converter(self, kind: str) -> Callable[[object, str], object]:
        converters: dict[str, Callable[[object, str], object]] = {
            "bool": self.boolean,
            "int": self.integer,
            "number": self.number,
            "size": self.size,
            "rate": self.rate,
            "duration": self.duration,
        }
        return converters[kind]

    def build(
        self, factory: Callable[..., T], prefix: str, rename: Mapping[str, str], **kwargs: object
    ) -> T:
        """`factory(**kwargs)`, its ConfigError's key re-rooted at `prefix` and renamed."""
        try:
            return factory(**kwargs)
        except ConfigError as exc:
            problems = []
            for problem in exc.problems:
                relative = problem.key.split(".", 1)[1] if "." in problem.key else problem.key
                key = _key(prefix, rename.get(relative, relative))
                problems.append(ConfigProblem(problem.message, key, self.source))
            raise ConfigError.of(problems) from None

    # -- sections ---------------------------------------------------------------------

    def section(
        self,
        root: Mapping[str, object],
        name: str,
        factory: Callable[..., T],
        keys: Mapping[str, _FieldKey],
    ) -> T:
        """A [name] section of scalar keys mapped onto a config dataclass."""
        table = self.table(root.get(name, {}), name, tuple(keys))
        kwargs = self.values(
            {
                keys[k].field: partial(self.converter(keys[k].kind), v, _key(name, k))
                for k, v in table.items()
            }
        )
        if kwargs is None:
            raise _Recorded
        rename = {spec.field: k for k, spec in keys.items()}
        return self.build(factory, name, rename, **kwargs)

    def security(self, root: Mapping[str, object]) -> SecurityConfig:
        table = self.table(root.get("security", {}), "security", _SECURITY_KEYS)
        values = self.values(
            {
                "key_file": partial(self.get, table, "key_file", "security", self.string),
                "next_key_file": partial(self.get, table, "next_key_file", "security", self.string),
                "insecure": partial(self.get, table, "insecure", "security", self.boolean),
            }
        )
        if values is None:
            raise _Recorded
        paths = {}
        for name in ("key_file", "next_key_file"):
            path = values[name]
            # relative to the cluster file's directory, wherever the daemon is started
            paths[name] = (
                None if path is None else str(self.base_dir / Path(str(path)).expanduser())
            )
        return self.build(
            SecurityConfig, "security", {}, **paths, insecure=bool(values["insecure"])
        )

    def clients(self, root: Mapping[str, object]) -> ClientsConfig:
        """[clients]: socket_group, token_file, [clients.tokens], [[clients.rule]]."""
        table = self.table(root.get("clients", {}), "clients", _CLIENTS_KEYS)
        found = len(self.problems.found)
        values = self.values(
            {
                "socket_group": partial(self.get, table, "socket_group", "clients", self.string),
                "token_file": partial(self.get, table, "token_file", "clients", self.string),
                "tokens": partial(self.get, table, "tokens", "clients", self.token_table),
            }
        )
        entries: list[dict[str, object]] | None = None
        with self.problems.check():
            entries = self.get(
                table, "rule", "clients", lambda v, k: self.array_of_tables(v, k, _RULE_KEYS)
            )
        rules: list[AccessRule] = []
        for i, entry in enumerate(entries or []):
            with self.problems.check():  # every rule is checked, even after a mistake
                rules.append(self.rule(entry, f"clients.rule[{i}]"))
        if values is None or len(self.problems.found) != found:
            raise _Recorded
        token_file = values["token_file"]
        if isinstance(token_file, str):  # read by the daemon when it starts (load_policy)
            token_file = str(self.base_dir / Path(token_file).expanduser())
        tokens = values["tokens"] or ()
        if tokens and self.path is not None:
            fault = private_file_fault(self.path, "cluster file")
            if fault is not None:
                raise self.error(
                    f"holds token secrets, but {fault}; or move them to a token_file",
                    "clients.tokens",
                )
        return self.build(
            ClientsConfig,
            "clients",
            {},
            socket_group=values["socket_group"],
            token_file=token_file,
            tokens=tokens,
            rules=tuple(rules),
        )

    def token_table(self, value: object, key: str) -> tuple[tuple[str, str], ...]:
        """[clients.tokens]: NAME = "SECRET" pairs."""
        if not isinstance(value, dict):
            raise self.error(f'must be a table of NAME = "SECRET", got {_describe(value)}', key)
        pairs: list[tuple[str, str]] = []
        for name, secret in value.items():
            with self.problems.check():
                _check_name(name, _key(key, name))
                pairs.append((name, self.string(secret, _key(key, name))))
        return tuple(pairs)

    def patterns(self, value: object, key: str) -> tuple[str, ...]:
        """A non-empty array of non-empty strings (globs or names)."""
        if not isinstance(value, list):
            raise self.error(f"must be an array of strings, got {_describe(value)}", key)
        if not value:
            hint = "'*' matches every group" if key.endswith("groups") else "leave the key out"
            raise self.error(f"must not be empty ({hint})", key)
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                got = _describe(item) if not isinstance(item, str) else "an empty string"
                raise self.error(f"must be an array of non-empty strings, got {got}", f"{key}[{i}]")
        return tuple(value)

    def rule(self, table: Mapping[str, object], prefix: str) -> AccessRule:
        """One [[clients.rule]]: groups and allow required, clients and tokens optional."""

        def allow(value: object, key: str) -> list[str]:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self.error(
                    f"must be an array of {', '.join(map(repr, ALLOW_WORDS))}, "
                    f"got {_describe(value)}",
                    key,
                )
            for i, word in enumerate(value):
                try:
                    operations_of([word])
                except ValueError as exc:
                    raise self.error(str(exc), f"{key}[{i}]") from None
            return value

        values = self.values(
            {
                "groups": partial(self.need, table, "groups", prefix, self.patterns),
                "allow": partial(self.need, table, "allow", prefix, allow),
                "clients": partial(self.get, table, "clients", prefix, self.patterns),
                "tokens": partial(self.get, table, "tokens", prefix, self.patterns),
            }
        )
        if values is None:
            raise _Recorded
        groups, words = values["groups"], values["allow"]
        clients, tokens = values["clients"], values["tokens"]
        assert isinstance(groups, tuple)
        assert isinstance(words, list)
        assert clients is None or isinstance(clients, tuple)
        assert tokens is None or isinstance(tokens, tuple)
        return AccessRule(groups, operations_of(words), clients, tokens)

    def sites(self, root: Mapping[str, object]) -> tuple[SiteSpec, ...]:
        sites = []
        for i, table in enumerate(self.array_of_tables(root.get("sites", []), "sites", _SITE_KEYS)):
            prefix = f"sites[{i}]"
            values = self.values(
                {
                    "name": partial(self.need, table, "name", prefix, self.string),
                    "gateway": partial(self.get, table, "gateway", prefix, self.string),
                }
            )
            if values is not None:
                with self.problems.check():
                    sites.append(self.build(SiteSpec, prefix, {}, **values))
        return tuple(sites)

    def daemons(self, root: Mapping[str, object]) -> tuple[DaemonSpec, ...]:
        if "daemons" not in root:
            raise self.error("at least one [[daemons]] entry is required", "daemons")
        tables = self.array_of_tables(root["daemons"], "daemons", _DAEMON_KEYS)
        if not tables:
            raise self.error("at least one [[daemons]] entry is required", "daemons")
        explicit: list[int | None] = []
        for i, t in enumerate(tables):
            node_id = None
            with self.problems.check():
                node_id = self.get(t, "id", f"daemons[{i}]", self.integer)
            explicit.append(node_id)
        taken = {node_id for node_id in explicit if node_id is not None}
        free = (n for n in range(1, MAX_NODE_ID + 1) if n not in taken)
        daemons = []
        for i, (table, node_id) in enumerate(zip(tables, explicit, strict=True)):
            prefix = f"daemons[{i}]"
            values = self.values(
                {
                    "name": partial(self.need, table, "name", prefix, self.string),
                    "host": partial(self.need, table, "host", prefix, self.string),
                    "port": partial(self.need, table, "port", prefix, self.integer),
                    "site": partial(self.need, table, "site", prefix, self.string),
                    "upload_bps": partial(self.need, table, "upload", prefix, self.rate),
                    "download_bps": partial(self.need, table, "download", prefix, self.rate),
                }
            )
            if values is None or ("id" in table and node_id is None):
                continue
            with self.problems.check():
                daemons.append(
                    self.build(
                        DaemonSpec,
                        prefix,
                        {},
                        node_id=node_id if node_id is not None else next(free),
                        **values,
                    )
                )
        return tuple(daemons)

    def emulation(self, value: object, key: str) -> Emulation | None:
        table = self.table(value, key, _EMULATE_KEYS)
        getters: dict[str, Callable[[], object]] = {}
        rename: dict[str, str] = {}
        for name in ("delay", "jitter"):
            if name in table and f"{name}_ms" in table:
                raise self.error(f"give {name} or {name}_ms, not both", _key(key, f"{name}_ms"))
            if f"{name}_ms" in table:
                getters[name] = partial(self.millis, table[f"{name}_ms"], _key(key, f"{name}_ms"))
                rename[name] = f"{name}_ms"
            elif name in table:
                getters[name] = partial(self.duration, table[name], _key(key, name))
        if "loss" in table:
            getters["loss"] = partial(self.number, table["loss"], _key(key, "loss"))
        if "rate" in table:
            getters["rate_bps"] = partial(self.rate, table["rate"], _key(key, "rate"))
        kwargs = self.values(getters)
        if kwargs is None:
            raise _Recorded
        emulation = self.build(Emulation, key, rename, **kwargs)
        return None if emulation.is_noop else emulation

    def millis(self, value: object, key: str) -> float:
        """Seconds from a non-negative number of milliseconds."""
        millis = self.number(value, key)
        if millis < 0:
            raise self.error(f"must be >= 0 ms, got {millis!r}", key)
        return millis / 1000

    def links(
        self, root: Mapping[str, object], daemons: Sequence[DaemonSpec], sites: Sequence[SiteSpec]
    ) -> tuple[LinkSpec, ...]:
        table = self.table(root.get("links", {}), "links", _LINKS_KEYS)
        settings = self.values(
            {
                "within": partial(
                    self.get, table, "within_sites", "links", self.choice(_SITE_MESH)
                ),
                "between": partial(
                    self.get, table, "between_sites", "links", self.choice(_WAN_MESH)
                ),
                "site_weight": partial(self.get, table, "site_weight", "links", self.positive),
                "wan_weight": partial(self.get, table, "wan_weight", "links", self.positive),
                "site_emulate": partial(self.get, table, "site_emulate", "links", self.emulation),
                "wan_emulate": partial(self.get, table, "wan_emulate", "links", self.emulation),
            }
        )
        edges = None
        with self.problems.check():
            edges = self.get(
                table, "edge", "links", lambda v, k: self.array_of_tables(v, k, _EDGE_KEYS)
            )
        if settings is None:
            for i, edge in enumerate(edges or []):  # still check each edge's own values
                with self.problems.check():
                    self.edge_values(edge, f"links.edge[{i}]", {d.name for d in daemons})
            raise _Recorded
        within = settings["within"] or "full"
        between = settings["between"] or "gateways"
        site_weight = settings["site_weight"] or 1.0
        wan_weight = settings["wan_weight"] or 10.0
        site_emulation = settings["site_emulate"]
        wan_emulation = settings["wan_emulate"]
        assert isinstance(site_weight, float)
        assert isinstance(wan_weight, float)
        assert site_emulation is None or isinstance(site_emulation, Emulation)
        assert wan_emulation is None or isinstance(wan_emulation, Emulation)

        by_name = {d.name: d for d in daemons}

        def default_emulation(a: str, b: str) -> Emulation | None:
            return site_emulation if by_name[a].site == by_name[b].site else wan_emulation

        def make(
            a: str,
            b: str,
            key: str,
            emulation: Emulation | None,
            weight: float | None = None,
            bandwidth: float | None = None,
        ) -> LinkSpec:
            x, y = sorted((by_name[a], by_name[b]), key=lambda d: d.node_id)
            if weight is None:
                weight = site_weight if x.site == y.site else wan_weight
            if bandwidth is None:
                bandwidth = min(x.upload_bps, y.download_bps, y.upload_bps, x.download_bps)
            return self.build(
                LinkSpec,
                key,
                {},
                a=x.name,
                b=y.name,
                weight=weight,
                bandwidth_bps=bandwidth,
                emulation=emulation,
            )

        generated: dict[frozenset[str], LinkSpec] = {}
        members = {s.name: [d.name for d in daemons if d.site == s.name] for s in sites}
        if within == "full":
            for names in members.values():
                for i, a in enumerate(names):
                    for b in names[i + 1 :]:
                        generated[frozenset((a, b))] = make(
                            a, b, "links.within_sites", site_emulation
                        )
        if between == "full":
            for i, x in enumerate(daemons):
                for y in daemons[i + 1 :]:
                    if x.site != y.site:
                        generated[frozenset((x.name, y.name))] = make(
                            x.name, y.name, "links.between_sites", wan_emulation
                        )
        elif between == "gateways":
            gateways = [s.gateway or members[s.name][0] for s in sites if members[s.name]]
            for i, a in enumerate(gateways):
                for b in gateways[i + 1 :]:
                    generated[frozenset((a, b))] = make(a, b, "links.between_sites", wan_emulation)

        edge_at: dict[frozenset[str], int] = {}
        for i, edge in enumerate(edges or []):
            prefix = f"links.edge[{i}]"
            with self.problems.check():
                values = self.edge_values(edge, prefix, set(by_name))
                a, b = str(values["a"]), str(values["b"])
                pair = frozenset((a, b))
                if pair in edge_at:
                    raise self.error(
                        f"duplicate edge {a}–{b} (also links.edge[{edge_at[pair]}])", prefix
                    )
                edge_at[pair] = i
                emulation = values["emulate"] if "emulate" in edge else default_emulation(a, b)
                weight, bandwidth = values["weight"], values["bandwidth"]
                assert emulation is None or isinstance(emulation, Emulation)
                assert weight is None or isinstance(weight, float)
                assert bandwidth is None or isinstance(bandwidth, float)
                generated[pair] = make(a, b, prefix, emulation, weight, bandwidth)
        order = {d.name: d.node_id for d in daemons}
        return tuple(sorted(generated.values(), key=lambda s: (order[s.a], order[s.b])))

    def edge_values(
        self, edge: Mapping[str, object], prefix: str, names: set[str]
    ) -> dict[str, object]:
        """The checked values of one [[links.edge]]: a, b, weight, bandwidth, emulate."""

        def end(name: str) -> str:
            daemon = self.need(edge, name, prefix, self.string)
            if daemon not in names:
                raise self.error(
                    f"unknown daemon {daemon!r}; daemons are {_names(sorted(names))}",
                    _key(prefix, name),
                )
            return daemon

        values = self.values(
            {
                "a": partial(end, "a"),
                "b": partial(end, "b"),
                "weight": partial(self.get, edge, "weight", prefix, self.number),
                "bandwidth": partial(self.get, edge, "bandwidth", prefix, self.rate),
                "emulate": partial(self.get, edge, "emulate", prefix, self.emulation),
            }
        )
        if values is None:
            raise _Recorded
        if values["a"] == values["b"]:
            raise self.error(f"links daemon {values['a']!r} to itself", _key(prefix, "b"))
        return values

    def choice(self, options: Mapping[str, T]) -> Callable[[object, str], T]:
        def convert(value: object, key: str) -> T:
            text = self.string(value, key)
            if text not in options:
                raise self.error(f"must be one of {', '.join(options)}, got {text!r}", key)
            return options[text]

        return convert

    def positive(self, value: object, key: str) -> float:
        number = self.number(value, key)
        if number <= 0:
            raise self.error(f"must be positive, got {value!r}", key)
        return number

    # -- the whole file ---------------------------------------------------------------

    def cluster(self, root: dict[str, object]) -> ClusterConfig:
        """The whole file. Every section and entry is checked even after a mistake, and
        one `ConfigError` carries them all; checks between entries (duplicates, unknown
        references, links, connectivity) run once every entry is valid on its own."""
        problems = self.problems
        self.table(root, "", _TOP_KEYS)
        cluster: dict[str, object] = {}
        with problems.check():
            cluster = self.table(root.get("cluster", {}), "cluster", _CLUSTER_KEYS)
        parts = self.values(
            {
                "name": partial(self.get, cluster, "name", "cluster", self.string),
                "routing": partial(self.get, cluster, "routing", "cluster", self.choice(_POLICIES)),
                "sites": partial(self.sites, root),
                "daemons": partial(self.daemons, root),
                "link": partial(self.section, root, "link", LinkConfig, _LINK_CONFIG_KEYS),
                "membership": partial(
                    self.section, root, "membership", MembershipConfig, _MEMBERSHIP_KEYS
                ),
                "security": partial(self.security, root),
                "limits": partial(self.section, root, "limits", LimitsConfig, _LIMITS_KEYS),
                "group": partial(self.section, root, "group", GroupConfig, _GROUP_KEYS),
                "sessions": partial(self.section, root, "sessions", SessionsConfig, _SESSIONS_KEYS),
                "clients": partial(self.clients, root),
                "replicate": partial(
                    self.section, root, "replicate", ReplicateConfig, _REPLICATE_KEYS
                ),
            }
        )
        problems.raise_any()
        assert parts is not None
        sites, daemons = parts["sites"], parts["daemons"]
        assert isinstance(sites, tuple)
        assert isinstance(daemons, tuple)
        _check_nodes(sites, daemons, self.source, problems)
        problems.raise_any()  # links are generated from unique, known daemons and sites
        links: tuple[LinkSpec, ...] = ()
        with problems.check():
            links = self.links(root, daemons, sites)
        problems.raise_any()
        return ClusterConfig(
            name=str(parts["name"] or "meshcast"),
            daemons=daemons,
            sites=sites,
            links=links,
            routing=_POLICIES[str(parts["routing"] or "shortest-path")],
            link=_typed(parts["link"], LinkConfig),
            membership=_typed(parts["membership"], MembershipConfig),
            security=_typed(parts["security"], SecurityConfig),
            limits=_typed(parts["limits"], LimitsConfig),
            group=_typed(parts["group"], GroupConfig),
            sessions=_typed(parts["sessions"], SessionsConfig),
            clients=_typed(parts["clients"], ClientsConfig),
            replicate=_typed(parts["replicate"], ReplicateConfig),
            source=self.source,
        )


def _parse(text: str, source: str, base_dir: Path, path: Path | None = None) -> ClusterConfig:
    try:
        root = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", source=source) from None
    return _Reader(source, base_dir, path).cluster(root)


def parse_config(text: str, source: str = "<string>") -> ClusterConfig:
    """Parse TOML `text`; errors name `source`. Relative key files are relative to the cwd."""
    return _parse(text, source, Path.cwd())


def load_config(path: str | os.PathLike[str]) -> ClusterConfig:
    """Read and parse the cluster configuration file at `path`.

    Raises `ConfigError` naming the file if it cannot be read, is not UTF-8, is not valid
    TOML (the message gives line and column) or any value is wrong (naming the key).
    A relative ``security.key_file`` or ``next_key_file`` is taken relative to the
    file's directory.
    """
    file = Path(path)
    source = os.fspath(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", source=source) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"not UTF-8 text: {exc.reason} at byte {exc.start}", source=source
        ) from None
    return _parse(text, source, file.parent.absolute(), file)


@cache
def default_config() -> ClusterConfig:
    """The embedded default: 6 daemons in 3 sites on 127.0.0.1..6 (serves ``meshcast demo``)."""
    text = resources.files("meshcast").joinpath(DEFAULT_RESOURCE).read_text(encoding="utf-8")
    return _parse(text, DEFAULT_SOURCE, Path.cwd())


# ---------------------------------------------------------------------------------------
# Writing TOML
# ---------------------------------------------------------------------------------------


def _toml(value: object) -> str:
    match value:
        case bool():
            return "true" if value else "false"
        case int() | float():
            return repr(value)
        case str():
            return json.dumps(value, ensure_ascii=False)
        case Emulation():
            parts = [
                f"delay = {value.delay!r}",
                f"jitter = {value.jitter!r}",
                f"loss = {value.loss!r}",
            ]
            if value.rate_bps is not None:
                parts.append(f"rate = {value.rate_bps!r}")
            return "{ " + ", ".join(parts) + " }"
        case _:
            raise TypeError(f"cannot write {value!r} as TOML")


def dump_config(config: ClusterConfig) -> str:
    """`config` as TOML that `parse_config` reads back to an equal config.

    Every link is written as an explicit edge (generation off) and every value in base
    units (bits/s, bytes, seconds), so the text does not depend on any default.
    """
    lines = [
        "# meshcast cluster configuration, written by meshcast.config.dump_config",
        f"# from {config.source}",
        "",
        "[cluster]",
        f"name = {_toml(config.name)}",
        f"routing = {_toml(config.routing)}",
    ]
    for site in config.sites:
        lines += ["", "[[sites]]", f"name = {_toml(site.name)}"]
        if site.gateway is not None:
            lines.append(f"gateway = {_toml(site.gateway)}")
    for d in config.daemons:
        lines += [
            "",
            "[[daemons]]",
            f"name = {_toml(d.name)}",
            f"id = {d.node_id}",
            f"host = {_toml(d.host)}",
            f"port = {d.port}",
            f"site = {_toml(d.site)}",
            f"upload = {_toml(d.upload_bps)}",
            f"download = {_toml(d.download_bps)}",
        ]
    lines += ["", "[links]", 'within_sites = "none"', 'between_sites = "none"']
    for link in config.links:
        lines += [
            "",
            "[[links.edge]]",
            f"a = {_toml(link.a)}",
            f"b = {_toml(link.b)}",
            f"weight = {_toml(link.weight)}",
            f"bandwidth = {_toml(link.bandwidth_bps)}",
        ]
        if link.emulation is not None:
            lines.append(f"emulate = {_toml(link.emulation)}")
    for section, value, keys in (
        ("link", config.link, _LINK_CONFIG_KEYS),
        ("membership", config.membership, _MEMBERSHIP_KEYS),
        ("limits", config.limits, _LIMITS_KEYS),
        ("group", config.group, _GROUP_KEYS),
        ("sessions", config.sessions, _SESSIONS_KEYS),
        ("replicate", config.replicate, _REPLICATE_KEYS),
    ):
        lines += ["", f"[{section}]"]
        lines += [f"{k} = {_toml(getattr(value, spec.field))}" for k, spec in keys.items()]
    lines += ["", "[security]"]
    for name in ("key_file", "next_key_file"):
        path = getattr(config.security, name)
        if path is not None:
            lines.append(f"{name} = {_toml(path)}")
    lines.append(f"insecure = {_toml(config.security.insecure)}")
    lines += _dump_clients(config.clients)
    return "\n".join(lines) + "\n"


def _dump_clients(clients: ClientsConfig) -> list[str]:
    """[clients] as TOML lines (secrets of [clients.tokens] included: write the result
    to a file of mode 0600, as `load_config` insists then)."""
    lines = ["", "[clients]"]
    if clients.socket_group is not None:
        lines.append(f"socket_group = {_toml(clients.socket_group)}")
    if clients.token_file is not None:
        lines.append(f"token_file = {_toml(clients.token_file)}")
    if clients.tokens:
        lines += ["", "[clients.tokens]"]
        lines += [f"{name} = {_toml(secret)}" for name, secret in clients.tokens]
    for rule in clients.rules:
        lines += ["", "[[clients.rule]]"]
        for key, values in (("clients", rule.clients), ("tokens", rule.tokens)):
            if values is not None:
                lines.append(f"{key} = [{', '.join(map(_toml, values))}]")
        lines.append(f"groups = [{', '.join(map(_toml, rule.groups))}]")
        lines.append(f"allow = [{', '.join(_toml(str(op)) for op in sorted(rule.allow))}]")
    return lines
