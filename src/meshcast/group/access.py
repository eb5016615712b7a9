"""Client access control of one daemon (sans-I/O): tokens and per-group rules.

`AccessPolicy` answers two questions for `SessionTable`:

* `authenticate(secret)`: the name of the configured token whose secret this is, or None.
  The SHA-256 of the offered secret is compared with that of every configured secret
  using `hmac.compare_digest`, all of them each time: equal-length digests compared in
  constant time, so neither the time taken, an early exit nor a length tells a guesser
  how close it came.
* `allowed(who, group)`: the operations (`Operation.JOIN`, `Operation.SEND`) a session
  may perform on a group. Rules are tried in order and the **first** whose selectors all
  match decides (as in a firewall: globs have no natural "most specific" order, and
  first-match lets an operator read the outcome top-down). No rule matching: a *local*
  session (Unix socket, loopback TCP) may do everything; a *remote* one (a TCP port open
  beyond loopback, always token-authenticated) may do nothing when rules exist, and
  everything when there are none (the token alone is the key).

Selectors of a rule: `clients` (globs over the client name, the part of the private name
the client asked for: self-chosen, so an identification, not an authentication),
`tokens` (token names) and `groups` (globs over group names). A selector left out
matches everything; `groups` is always given. Globs are `fnmatch` patterns matched
case-sensitively (`*`, `?`, `[seq]`), as names are compared byte for byte.

Theory and examples: docs/security.md, "Clients and access control"; the config keys:
docs/config.md, "[clients]".
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from fnmatch import translate

from meshcast.errors import ConfigError

__all__ = [
    "ALLOW_WORDS",
    "EVERYTHING",
    "NOTHING",
    "AccessPolicy",
    "AccessRule",
    "Operation",
    "Principal",
    "operations_of",
]


class Operation(StrEnum):
    """What a rule may allow on a group."""

    JOIN = "join"  # become a member: receive its messages and views
    SEND = "send"  # MULTICAST to it (members or not: groups are open)


# The words of a rule's `allow`: "read" is "join" spelt for read-only rules (a member
# receives; without "send" it cannot send).
ALLOW_WORDS: Mapping[str, Operation] = {
    "join": Operation.JOIN,
    "read": Operation.JOIN,
    "send": Operation.SEND,
}
EVERYTHING = frozenset(Operation)
NOTHING: frozenset[Operation] = frozenset()


def operations_of(words: Iterable[str]) -> frozenset[Operation]:
    """The operations `allow` words grant; ValueError naming an unknown word."""
    granted: set[Operation] = set()
    for word in words:
        operation = ALLOW_WORDS.get(word)
        if operation is None:
            known = ", ".join(ALLOW_WORDS)
            raise ValueError(f"unknown operation {word!r}; allowed: {known}")
        granted.add(operation)
    return frozenset(granted)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def _compiled(patterns: tuple[str, ...] | None) -> re.Pattern[str] | None:
    if patterns is None:
        return None
    return re.compile("|".join(f"(?:{translate(p)})" for p in patterns), re.DOTALL)


@dataclass(frozen=True, slots=True)
class AccessRule:
    """One `[[clients.rule]]`: who (clients, tokens), which groups, what is allowed."""

    groups: tuple[str, ...]  # globs over group names, at least one
    allow: frozenset[Operation]  # empty: a deny rule
    clients: tuple[str, ...] | None = None  # globs over client names; None: any client
    tokens: tuple[str, ...] | None = None  # token names; None: any session, with token or not
    _groups: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    _clients: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Raises `ConfigError` naming the field."""
        if not self.groups:
            raise ConfigError("a rule needs at least one group pattern", key="groups")
        for what, values in (("clients", self.clients), ("tokens", self.tokens)):
            if values is not None and not values:
                raise ConfigError(f"{what} is empty: leave it out to match every session", key=what)
        object.__setattr__(self, "_groups", _compiled(self.groups))
        object.__setattr__(self, "_clients", _compiled(self.clients))

    def matches(self, client: str, token: str | None, group: str) -> bool:
        """Do all of this rule's selectors match the session and the group?"""
        assert self._groups is not None
        if self._clients is not None and self._clients.match(client) is None:
            return False
        if self.tokens is not None and token not in self.tokens:
            return False
        return self._groups.match(group) is not None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a session is, for the rules: its client name, its token, where it came from."""

    client: str  # the client part of the private name
    token: str | None = None  # the name of the token it presented, if any
    remote: bool = False  # came in on a TCP port open beyond loopback


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """The tokens and rules of one daemon (from the cluster file's `[clients]`)."""

    tokens: Mapping[str, str] = field(default_factory=dict, repr=False)  # name -> secret
    rules: tuple[AccessRule, ...] = ()
    _secrets: tuple[tuple[str, bytes], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_secrets", tuple((n, _digest(s)) for n, s in self.tokens.items()))

    @property
    def has_tokens(self) -> bool:
        return bool(self.tokens)

    def authenticate(self, secret: str) -> str | None:
        """The name of the token `secret` is, or None. Compares its digest with every
        configured secret's in constant time each (`hmac.compare_digest`)."""
        offered = _digest(secret)
        found: str | None = None
        for name, expected in self._secrets:
            if hmac.compare_digest(offered, expected) and found is None:
                found = name
        return found

    def decide(self, who: Principal, group: str) -> tuple[frozenset[Operation], int | None]:
        """The operations `who` may perform on `group`, and the index of the rule that
        decided (None: the default applied)."""
        for index, rule in enumerate(self.rules):
            if rule.matches(who.client, who.token, group):
                return rule.allow, index
        if who.remote and self.rules:
            return NOTHING, None
        return EVERYTHING, None

    def allowed(self, who: Principal, group: str) -> frozenset[Operation]:
        return self.decide(who, group)[0]
