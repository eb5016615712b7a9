"""Cluster keys: the text format of a key file and the ring of keys a daemon accepts.

A cluster key is 32 random bytes shared by every daemon of a cluster. It never encrypts
data: handshakes are authenticated with keys derived from it, and each link epoch derives
its own session keys from an ephemeral X25519 exchange (docs/security.md). Its text form,
one line, is what ``meshcast keygen`` writes::

    meshcast-cluster-key-v1 <64 hex digits>

Lines starting with ``#`` and blank lines are ignored. The key's ``key_id`` (one byte in
every authenticated datagram header) tells the receiver which key of its ring to try; it is
derived from the key, so two daemons agree on it without configuration.

No file I/O here (sans-I/O): `meshcast.runtime.keyfile` reads and writes the files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from meshcast.errors import ConfigError

KEY_SIZE = 32
KEY_PREFIX = "meshcast-cluster-key-v1"


@dataclass(frozen=True, slots=True)
class ClusterKey:
    """One 256-bit cluster key; `key_id` names it on the wire, `fingerprint` in logs."""

    secret: bytes = field(repr=False)
    key_id: int = field(init=False)
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_SIZE:
            raise ValueError(f"a cluster key is {KEY_SIZE} bytes, got {len(self.secret)}")
        digest = hashlib.blake2s(self.secret, person=b"mc-keyid").digest()
        object.__setattr__(self, "key_id", digest[0])
        # Safe to log: a one-way digest, shown so operators can tell keys apart.
        object.__setattr__(self, "fingerprint", digest[:8].hex())


def format_key(key: ClusterKey) -> str:
    """The text a key file holds (ends with a newline)."""
    return (
        "# meshcast cluster key: keep it secret (mode 0600), the same file on every daemon\n"
        f"{KEY_PREFIX} {key.secret.hex()}\n"
    )


def parse_key(text: str, *, source: str = "key file") -> ClusterKey:
    """The one key in `text`; `ConfigError` naming `source` if there is none or it is bad."""
    lines = [line.strip() for line in text.splitlines()]
    keys = [line for line in lines if line and not line.startswith("#")]
    if len(keys) != 1:
        raise ConfigError(f"{source}: expected one '{KEY_PREFIX} <hex>' line, found {len(keys)}")
    prefix, _, digits = keys[0].partition(" ")
    if prefix != KEY_PREFIX:
        raise ConfigError(f"{source}: not a meshcast key file (expected '{KEY_PREFIX} <hex>')")
    try:
        secret = bytes.fromhex(digits.strip())
    except ValueError:
        raise ConfigError(f"{source}: the key is not hexadecimal") from None
    if len(secret) != KEY_SIZE:
        raise ConfigError(
            f"{source}: the key has {len(secret)} bytes, a cluster key has {KEY_SIZE}"
        )
    return ClusterKey(secret)


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The keys a daemon accepts, newest first: its current key and, while a new key is
    rolled out, the next one (which then comes first: new handshakes start with it)."""

    keys: tuple[ClusterKey, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("a key ring holds at least one key")

    @classmethod
    def of(cls, current: ClusterKey, next_key: ClusterKey | None = None) -> KeyRing:
        if next_key is None or next_key.secret == current.secret:
            return cls((current,))
        return cls((next_key, current))

    @property
    def newest(self) -> ClusterKey:
        return self.keys[0]

    def candidates(self, key_id: int) -> list[ClusterKey]:
        """The keys a datagram stamped `key_id` may be under (usually one, or none)."""
        return [key for key in self.keys if key.key_id == key_id]

    def __contains__(self, key: object) -> bool:
        return key in self.keys
