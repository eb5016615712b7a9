"""Encrypted, authenticated Hop links: a wrapper that seals what a `HopLink` sends and
opens what it receives (theory and threat model: docs/security.md).

The inner link is unchanged; the wrapper rewrites its datagrams on the way out and in:

* **HELLO** (the handshake) is sealed with `hello_aead` (cluster key, sender, receiver). Its header
  gets ``FLAG_AUTH``, the cluster key's ``key_id`` and, in the ``seq`` field, a stamp that
  only grows (microseconds of the sender's wall clock); the sealed body is the Hop HELLO
  body followed by the sender's X25519 public key for its current epoch. A receiver accepts
  a HELLO only if it authenticates and its stamp is newer than any accepted from that
  daemon: a replayed HELLO, of this epoch or an earlier one, is dropped.
* **Every other datagram** is a record sealed with the session key of its direction: the
  header (``FLAG_AUTH``, ``key_id`` = the low byte of the receiver's epoch, ``seq`` = a
  per-session datagram counter) is associated data; the sealed part is the Hop sequence
  number followed by the rest of the Hop datagram. The nonce is (sender's epoch, counter):
  retransmissions are new datagrams with new counters, so no nonce is used twice.
* Session keys come from X25519 over the two epochs' ephemeral keys (`session_keys`); a
  new epoch on either side makes a new session. The previous session is kept for
  receiving, so datagrams that crossed an epoch change are not lost needlessly.

Drops are counted by cause (`SecurityCounters`). Nothing is allocated for a datagram that
does not authenticate, and each one costs at most one AEAD call per candidate key.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from meshcast.ids import NodeId
from meshcast.link.config import LinkConfig
from meshcast.link.events import LinkEffect, LinkStats, Transmit
from meshcast.link.hop import HopLink
from meshcast.link.replay import ReplayWindow
from meshcast.wire.keys import ClusterKey, KeyRing
from meshcast.wire.packet import (
    FLAG_AUTH,
    HEADER,
    HEADER_SIZE,
    HELLO_BODY,
    MAGIC,
    VERSION,
    PacketType,
)
from meshcast.wire.secure import (
    NONCE,
    PUBLIC_KEY_SIZE,
    TAG_SIZE,
    Ephemeral,
    RandomBytes,
    hello_aead,
    session_keys,
)

log = logging.getLogger(__name__)

PURPOSE = b"link"
SEQ_SIZE = 8
RECORD_OVERHEAD = SEQ_SIZE + TAG_SIZE  # bytes a record adds to the Hop datagram it seals
HELLO_OVERHEAD = PUBLIC_KEY_SIZE + TAG_SIZE
_HELLO = int(PacketType.HELLO)
_SEQ = HEADER_SIZE - SEQ_SIZE  # offset of the header's seq field
_MAX_COUNTER = (1 << 64) - 1


@dataclass(slots=True)
class SecurityCounters:
    """Datagrams the encryption layer dropped, by cause, and the handshakes it accepted."""

    cleartext_dropped: int = 0  # not sealed at all (a daemon without keys, or a forger)
    truncated_dropped: int = 0  # too short to hold a header and a tag
    unknown_key_dropped: int = 0  # a HELLO under a key id not in our ring
    forged_dropped: int = 0  # did not authenticate: forged, altered, or under a wrong key
    replayed_dropped: int = 0  # a record counter or a HELLO stamp seen before
    no_session_dropped: int = 0  # a record of a session we do not have (stale or unknown)
    unsendable_dropped: int = 0  # our own datagrams dropped before a session existed
    handshakes_accepted: int = 0  # HELLOs from a new peer epoch that authenticated


class LinkSecurity:
    """What a daemon's links share to encrypt: its key ring, a source of randomness and a
    clock for HELLO stamps. One per daemon; `keyring` may be replaced while running (key
    rotation): established sessions keep their keys, new handshakes use the new ring.

    ``clock_offset_us`` turns the driver's `now` (seconds, monotonic) into the stamp of a
    HELLO: ``offset + now * 1e6`` must keep growing across restarts of a daemon, so the
    runtime sets it to (wall clock - monotonic clock) at start; the simulator's time only
    grows, so 0 does there.
    """

    def __init__(
        self, keyring: KeyRing, random_bytes: RandomBytes, *, clock_offset_us: int = 0
    ) -> None:
        self._keyring = keyring
        self.random_bytes = random_bytes
        self.clock_offset_us = clock_offset_us
        # Highest HELLO stamp accepted per daemon, kept across link replacements so that a
        # fresh link object cannot be fed an old, recorded HELLO. Bounded by the cluster.
        self.hello_stamps: dict[NodeId, int] = {}
        self._hello_aeads: dict[tuple[bytes, NodeId, NodeId], ChaCha20Poly1305] = {}

    @property
    def keyring(self) -> KeyRing:
        return self._keyring

    @keyring.setter
    def keyring(self, ring: KeyRing) -> None:
        self._keyring = ring
        self._hello_aeads.clear()

    def hello_aead(self, key: ClusterKey, sender: NodeId, receiver: NodeId) -> ChaCha20Poly1305:
        """The AEAD of HELLOs from `sender` to `receiver` under `key` (one key per direction:
        nonces stay unique, and a HELLO cannot be replayed towards another daemon)."""
        index = (key.secret, sender, receiver)
        cached = self._hello_aeads.get(index)
        if cached is None:
            purpose = PURPOSE + b"|" + receiver.to_bytes(4, "big")
            cached = self._hello_aeads[index] = hello_aead(key, sender, purpose)
        return cached

    def link_config(self, config: LinkConfig) -> LinkConfig:
        """`config` for the inner Hop link: its datagrams shrink by what sealing adds."""
        return replace(config, mtu=config.mtu - RECORD_OVERHEAD)


@dataclass(slots=True)
class _Session:
    """The keys of one pair of epochs (ours, the peer's)."""

    own_epoch: int
    peer_epoch: int
    send: ChaCha20Poly1305 = field(repr=False)
    receive: ChaCha20Poly1305 = field(repr=False)
    sent: int = 0  # counter of the last record sealed
    window: ReplayWindow = field(default_factory=ReplayWindow)


class SecureLink:
    """A `HopLink` whose every datagram is sealed (see the module docstring).

    Offers the same interface as the link it wraps (`meshcast.link.events.Link`)."""

    def __init__(self, inner: HopLink, local: NodeId, security: LinkSecurity) -> None:
        self._inner = inner
        self._local = local
        self._security = security
        self._counters = SecurityCounters()
        self._own_epoch = inner.epoch
        self._own = Ephemeral.generate(security.random_bytes)
        self._stamp = 0
        self._hellos_sent = 0
        self._peer_epoch = 0
        self._peer_public = b""
        self._peer_key: ClusterKey | None = None  # the key the peer's HELLOs came under
        self._session: _Session | None = None
        self._previous: _Session | None = None

    # ------------------------------------------------------------------ queries

    @property
    def peer(self) -> NodeId:
        return self._inner.peer

    @property
    def established(self) -> bool:
        return self._inner.established

    @property
    def failed(self) -> bool:
        return self._inner.failed

    @property
    def epoch(self) -> int:
        return self._inner.epoch

    def can_send(self, size: int) -> bool:
        return self._inner.can_send(size)

    def next_deadline(self) -> float | None:
        return self._inner.next_deadline()

    def statistics(self) -> LinkStats:
        return replace(self._inner.statistics(), **asdict(self._counters))

    def security_counters(self) -> SecurityCounters:
        return replace(self._counters)

    # ------------------------------------------------------------------ inputs

    def start(self, now: float) -> list[LinkEffect]:
        return self._seal(self._inner.start(now), now)

    def send(self, payload: bytes, now: float, *, flush: bool = True) -> list[LinkEffect]:
        return self._seal(self._inner.send(payload, now, flush=flush), now)

    def on_timer(self, now: float) -> list[LinkEffect]:
        return self._seal(self._inner.on_timer(now), now)

    def datagram_received(self, datagram: bytes, now: float) -> list[LinkEffect]:
        counters = self._counters
        if len(datagram) < HEADER_SIZE:
            return self._seal(self._inner.datagram_received(datagram, now), now)  # malformed
        magic, version, ptype, flags, key_id, _, sender, epoch, seq = HEADER.unpack_from(datagram)
        if magic != MAGIC or version != VERSION or sender != self._inner.peer:
            # Not ours to judge: the Hop link counts it as malformed or foreign.
            return self._seal(self._inner.datagram_received(datagram, now), now)
        if not flags & FLAG_AUTH:
            counters.cleartext_dropped += 1
            return []
        if len(datagram) < HEADER_SIZE + TAG_SIZE + (0 if ptype == _HELLO else SEQ_SIZE):
            counters.truncated_dropped += 1
            return []
        if ptype == _HELLO:
            opened = self._open_hello(datagram, key_id, sender, epoch, seq)
        else:
            opened = self._open_record(datagram, flags, key_id, epoch, seq)
        if opened is None:
            return []
        return self._seal(self._inner.datagram_received(opened, now), now)

    # ------------------------------------------------------------------ receiving

    def _open_hello(
        self, datagram: bytes, key_id: int, sender: int, epoch: int, stamp: int
    ) -> bytes | None:
        counters = self._counters
        security = self._security
        candidates = security.keyring.candidates(key_id)
        if not candidates:
            counters.unknown_key_dropped += 1
            return None
        header = datagram[:HEADER_SIZE]
        iv = NONCE.pack(epoch, stamp)
        for key in candidates:
            try:
                body = security.hello_aead(key, self._inner.peer, self._local).decrypt(
                    iv, datagram[HEADER_SIZE:], header
                )
                break
            except InvalidTag:
                continue
        else:
            counters.forged_dropped += 1
            return None
        if len(body) != HELLO_BODY.size + PUBLIC_KEY_SIZE:
            counters.forged_dropped += 1  # authentic but not a HELLO we can read
            return None
        peer = self._inner.peer
        if stamp <= security.hello_stamps.get(peer, 0):
            counters.replayed_dropped += 1
            return None
        public = body[HELLO_BODY.size :]
        if epoch != self._peer_epoch or public != self._peer_public:
            try:
                self._new_peer_epoch(epoch, public)
            except ValueError:  # a degenerate public key: no session can come of it
                counters.forged_dropped += 1
                return None
            counters.handshakes_accepted += 1
        security.hello_stamps[peer] = stamp
        self._peer_key = key
        flags = datagram[4] & ~FLAG_AUTH
        plain = HEADER.pack(MAGIC, VERSION, _HELLO, flags, 0, 0, sender, epoch, 0)
        return plain + body[: HELLO_BODY.size]

    def _open_record(
        self, datagram: bytes, flags: int, key_id: int, epoch: int, counter: int
    ) -> bytes | None:
        counters = self._counters
        session = self._session
        if session is None or session.peer_epoch != epoch or session.own_epoch & 0xFF != key_id:
            session = self._previous
            if session is None or session.peer_epoch != epoch or session.own_epoch & 0xFF != key_id:
                counters.no_session_dropped += 1
                return None
        if not session.window.check(counter):
            counters.replayed_dropped += 1
            return None
        try:
            plain = session.receive.decrypt(
                NONCE.pack(epoch, counter), datagram[HEADER_SIZE:], datagram[:HEADER_SIZE]
            )
        except InvalidTag:
            counters.forged_dropped += 1
            return None
        session.window.accept(counter)
        header = bytearray(datagram[:_SEQ])
        header[4] = flags & ~FLAG_AUTH
        header[5] = 0
        return bytes(header) + plain

    def _new_peer_epoch(self, epoch: int, public: bytes) -> None:
        session = self._make_session(self._own_epoch, self._own, epoch, public)
        self._peer_epoch = epoch
        self._peer_public = public
        self._install(session)

    # ------------------------------------------------------------------ sending

    def _seal(self, effects: list[LinkEffect], now: float) -> list[LinkEffect]:
        if self._inner.epoch != self._own_epoch:
            self._new_own_epoch()
        sealed: list[LinkEffect] = []
        for effect in effects:
            if isinstance(effect, Transmit):
                datagram = self._seal_datagram(effect.datagram, now)
                if datagram is None:
                    continue
                effect = Transmit(effect.to, datagram)
            sealed.append(effect)
        return sealed

    def _seal_datagram(self, datagram: bytes, now: float) -> bytes | None:
        if datagram[3] == _HELLO:
            return self._seal_hello(datagram, now)
        session = self._session
        if session is None or session.own_epoch != self._own_epoch or session.sent >= _MAX_COUNTER:
            # No keys towards the peer yet: the Hop link sends it again once there are.
            self._counters.unsendable_dropped += 1
            return None
        session.sent += 1
        epoch = session.own_epoch  # the inner link's, checked above
        header = HEADER.pack(
            MAGIC,
            VERSION,
            datagram[3],
            datagram[4] | FLAG_AUTH,
            session.peer_epoch & 0xFF,
            0,
            self._local,
            epoch,
            session.sent,
        )
        sealed = session.send.encrypt(NONCE.pack(epoch, session.sent), datagram[_SEQ:], header)
        return header + sealed

    def _seal_hello(self, datagram: bytes, now: float) -> bytes:
        security = self._security
        ring = security.keyring
        key = self._peer_key
        if key is None or key not in ring:
            # Until the peer answers, try each of our keys in turn, newest first: during a
            # key rollout the peer may know only one of them.
            key = ring.keys[self._hellos_sent % len(ring.keys)]
        self._hellos_sent += 1
        self._stamp = max(self._stamp + 1, security.clock_offset_us + int(now * 1_000_000))
        _, _, ptype, flags, _, _, sender, epoch, _ = HEADER.unpack_from(datagram)
        header = HEADER.pack(
            MAGIC, VERSION, ptype, flags | FLAG_AUTH, key.key_id, 0, sender, epoch, self._stamp
        )
        body = datagram[HEADER_SIZE:] + self._own.public
        return header + security.hello_aead(key, self._local, self._inner.peer).encrypt(
            NONCE.pack(epoch, self._stamp), body, header
        )

    def _new_own_epoch(self) -> None:
        """The inner link restarted its stream: a new epoch gets a new key pair."""
        self._own_epoch = self._inner.epoch
        self._own = Ephemeral.generate(self._security.random_bytes)
        if self._peer_public:
            self._install(
                self._make_session(self._own_epoch, self._own, self._peer_epoch, self._peer_public)
            )

    def _make_session(
        self, own_epoch: int, own: Ephemeral, peer_epoch: int, peer_public: bytes
    ) -> _Session:
        send, receive = session_keys(
            own,
            peer_public,
            local=self._local,
            local_epoch=own_epoch,
            peer=self._inner.peer,
            peer_epoch=peer_epoch,
            purpose=PURPOSE,
        )
        return _Session(own_epoch, peer_epoch, ChaCha20Poly1305(send), ChaCha20Poly1305(receive))

    def _install(self, session: _Session) -> None:
        self._previous = self._session
        self._session = session
