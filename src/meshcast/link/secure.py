"""Encrypted, authenticated Hop links: a `HopLink` whose datagrams are sealed on the way
out and opened on the way in (theory and threat model: docs/security.md).

The Hop protocol is unchanged: `SecureLink` is a `HopLink` that seals each datagram it
emits and opens each datagram before the Hop protocol sees it.

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
import struct
from dataclasses import dataclass, field, fields, replace

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from meshcast.ids import NodeId
from meshcast.link.config import LinkConfig
from meshcast.link.events import LinkEffect
from meshcast.link.hop import HopLink
from meshcast.link.replay import ReplayWindow
from meshcast.wire.keys import ClusterKey, KeyRing
from meshcast.wire.packet import (
    FLAG_AUTH,
    HEADER,
    HEADER_SIZE,
    HELLO_BODY,
    MAGIC,
    PREFIX,
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
_HELLO = int(PacketType.HELLO)
_SEQ = HEADER_SIZE - SEQ_SIZE  # offset of the header's seq field
_IDS = struct.Struct("!IIQ")  # sender, epoch, seq: the header from byte 8
_MIN_RECORD = HEADER_SIZE + SEQ_SIZE + TAG_SIZE
# flags byte with AUTH cleared, then a zero key id: what an opened record's header holds
_CLEARED = [bytes((flags & ~FLAG_AUTH, 0)) for flags in range(256)]
# s: older HELLOs are replays, or come from a peer whose clock is that far behind ours
# (the clock skew Kerberos tolerates by default)
MAX_HELLO_AGE = 300.0


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


_SECURITY_COUNTER_NAMES = tuple(f.name for f in fields(SecurityCounters))


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
        self.max_hello_age_us = int(MAX_HELLO_AGE * 1_000_000)
        # Highest HELLO stamp accepted per daemon, kept across link replacements so that a
        # fresh link object cannot be fed an old, recorded HELLO. Bounded by the cluster.
        self.hello_stamps: dict[NodeId, int] = {}
        self._hello_aeads: dict[tuple[bytes, NodeId, NodeId], AESGCM] = {}

    def stamp(self, now: float) -> int:
        """The wall-clock time of `now` in microseconds: HELLO stamps are taken from it."""
        return self.clock_offset_us + int(now * 1_000_000)

    @property
    def keyring(self) -> KeyRing:
        return self._keyring

    @keyring.setter
    def keyring(self, ring: KeyRing) -> None:
        self._keyring = ring
        self._hello_aeads.clear()

    def hello_aead(self, key: ClusterKey, sender: NodeId, receiver: NodeId) -> AESGCM:
        """The AEAD of HELLOs from `sender` to `receiver` under `key` (one key per direction:
        nonces stay unique, and a HELLO cannot be replayed towards another daemon)."""
        index = (key.secret, sender, receiver)
        cached = self._hello_aeads.get(index)
        if cached is None:
            purpose = PURPOSE + b"|" + receiver.to_bytes(4, "big")
            cached = self._hello_aeads[index] = hello_aead(key, sender, purpose)
        return cached

    def link_config(self, config: LinkConfig) -> LinkConfig:
        """`config` for the Hop protocol under the seal: its datagrams shrink by what sealing adds."""
        return replace(config, mtu=config.mtu - RECORD_OVERHEAD)


@dataclass(slots=True)
class _Session:
    """The keys of one pair of epochs (ours, the peer's)."""

    own_epoch: int
    peer_epoch: int
    send: AESGCM = field(repr=False)
    receive: AESGCM = field(repr=False)
    sent: int = 0  # counter of the last record sealed
    window: ReplayWindow = field(default_factory=ReplayWindow)
    own_low: int = field(init=False)  # the key id of records sealed for us
    peer_low: int = field(init=False)  # the key id of records we seal for the peer

    def __post_init__(self) -> None:
        self.own_low = self.own_epoch & 0xFF
        self.peer_low = self.peer_epoch & 0xFF


class SecureLink(HopLink):
    """A `HopLink` whose every datagram is sealed (see the module docstring)."""

    def __init__(
        self,
        local: NodeId,
        peer: NodeId,
        config: LinkConfig,
        *,
        epoch: int,
        security: LinkSecurity,
    ) -> None:
        # The Hop datagrams are cut shorter by what sealing adds.
        super().__init__(local, peer, security.link_config(config), epoch=epoch)
        self._security = security
        self._drops = SecurityCounters()
        self._own_epoch = epoch
        self._own = Ephemeral.generate(security.random_bytes)
        self._stamp = 0
        self._hellos_sent = 0
        self._keyed_epoch = 0
        self._peer_public = b""
        self._peer_key: ClusterKey | None = None  # the key the peer's HELLOs came under
        self._warned_old_hello = False
        self._session: _Session | None = None
        self._previous: _Session | None = None

    # ------------------------------------------------------------------ queries

    @property
    def mtu(self) -> int:
        """Bytes per datagram on the wire, the seal included."""
        return super().mtu + RECORD_OVERHEAD

    def _counter_values(self) -> dict[str, int]:
        values = super()._counter_values()
        drops = self._drops
        values.update((name, getattr(drops, name)) for name in _SECURITY_COUNTER_NAMES)
        return values

    # ------------------------------------------------------------------ inputs

    def datagram_received(self, datagram: bytes, now: float) -> list[LinkEffect]:
        # The hot path (one call per datagram): records are opened inline.
        if len(datagram) < _MIN_RECORD or datagram[:3] != PREFIX:
            return self._open_odd(datagram, now)
        sender, epoch, counter = _IDS.unpack_from(datagram, 8)
        flags = datagram[4]
        if sender != self._peer or not flags & FLAG_AUTH or datagram[3] == _HELLO:
            return self._open_odd(datagram, now)
        session = self._session
        key_id = datagram[5]
        if session is None or session.peer_epoch != epoch or session.own_low != key_id:
            session = self._previous
            if session is None or session.peer_epoch != epoch or session.own_low != key_id:
                self._drops.no_session_dropped += 1
                return []
        window = session.window
        if not window.check(counter):
            self._drops.replayed_dropped += 1
            return []
        try:
            plain = session.receive.decrypt(
                NONCE.pack(epoch, counter), datagram[HEADER_SIZE:], datagram[:HEADER_SIZE]
            )
        except InvalidTag:
            self._drops.forged_dropped += 1
            return []
        window.accept(counter)
        # The Hop datagram again: the header without AUTH and key id, the Hop seq and body.
        opened = b"".join((datagram[:4], _CLEARED[flags], datagram[6:16], plain))
        return super().datagram_received(opened, now)

    def _open_odd(self, datagram: bytes, now: float) -> list[LinkEffect]:
        """Everything but a well-formed record from the peer: a HELLO, a datagram the Hop
        link judges (malformed, wrong sender), or one to drop and count."""
        counters = self._drops
        if len(datagram) < HEADER_SIZE:
            return super().datagram_received(datagram, now)  # malformed
        magic, version, ptype, flags, key_id, _, sender, epoch, seq = HEADER.unpack_from(datagram)
        if magic != MAGIC or version != VERSION or sender != self._peer:
            # Not ours to judge: the Hop link counts it as malformed or foreign.
            return super().datagram_received(datagram, now)
        if not flags & FLAG_AUTH:
            counters.cleartext_dropped += 1
            return []
        if ptype != _HELLO or len(datagram) < HEADER_SIZE + TAG_SIZE:
            counters.truncated_dropped += 1  # a record shorter than _MIN_RECORD, or a HELLO
            return []
        opened = self._open_hello(datagram, key_id, sender, epoch, seq, now)
        if opened is None:
            return []
        return super().datagram_received(opened, now)

    # ------------------------------------------------------------------ receiving

    def _open_hello(
        self, datagram: bytes, key_id: int, sender: int, epoch: int, stamp: int, now: float
    ) -> bytes | None:
        counters = self._drops
        security = self._security
        candidates = security.keyring.candidates(key_id)
        if not candidates:
            counters.unknown_key_dropped += 1
            return None
        header = datagram[:HEADER_SIZE]
        iv = NONCE.pack(epoch, stamp)
        for key in candidates:
            try:
                body = security.hello_aead(key, self._peer, self._local).decrypt(
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
        peer = self._peer
        if stamp <= security.hello_stamps.get(peer, 0):
            counters.replayed_dropped += 1
            return None
        if stamp < security.stamp(now) - security.max_hello_age_us:
            # Recorded long ago: after a restart we no longer know the newest stamp of the
            # peer, but a real HELLO is fresh (the peer's clock may differ by less).
            counters.replayed_dropped += 1
            if not self._warned_old_hello:  # once per link: HELLOs come every few ms
                self._warned_old_hello = True
                log.warning(
                    "link %s->%s: dropped a HELLO %.0f s old: a replay, or the two "
                    "daemons' clocks differ by more than %.0f s (run NTP)",
                    self._local,
                    peer,
                    (security.stamp(now) - stamp) / 1e6,
                    MAX_HELLO_AGE,
                )
            return None
        public = body[HELLO_BODY.size :]
        if epoch != self._keyed_epoch or public != self._peer_public:
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

    def _new_peer_epoch(self, epoch: int, public: bytes) -> None:
        session = self._make_session(self._own_epoch, self._own, epoch, public)
        self._keyed_epoch = epoch
        self._peer_public = public
        self._install(session)

    # ------------------------------------------------------------------ sending

    def _emit(self, datagram: bytes, now: float, effects: list[LinkEffect]) -> None:
        sealed = self._seal(datagram, now)
        if sealed is not None:  # else: no keys yet (counted); the Hop link resends it
            super()._emit(sealed, now, effects)

    def _seal(self, datagram: bytes, now: float) -> bytes | None:
        """What the Hop link's `datagram` becomes on the wire; None: no keys yet."""
        epoch = self._epoch  # the Hop link's, in the header of every datagram it emits
        if epoch != self._own_epoch:
            self._new_own_epoch(epoch)  # the Hop link restarted its stream
        if datagram[3] == _HELLO:
            return self._seal_hello(datagram, now)
        session = self._session
        if session is None or session.own_epoch != epoch:
            # No keys towards the peer yet: the Hop link sends it again once there are.
            self._drops.unsendable_dropped += 1
            return None
        counter = session.sent = session.sent + 1
        header = HEADER.pack(
            MAGIC,
            VERSION,
            datagram[3],
            datagram[4] | FLAG_AUTH,
            session.peer_low,
            0,
            self._local,
            epoch,
            counter,
        )
        return header + session.send.encrypt(NONCE.pack(epoch, counter), datagram[_SEQ:], header)

    def _seal_hello(self, datagram: bytes, now: float) -> bytes:
        security = self._security
        ring = security.keyring
        key = self._peer_key
        if key is None or key not in ring:
            # Until the peer answers, try each of our keys in turn, newest first: during a
            # key rollout the peer may know only one of them.
            key = ring.keys[self._hellos_sent % len(ring.keys)]
        self._hellos_sent += 1
        self._stamp = max(self._stamp + 1, security.stamp(now))
        epoch = self._epoch
        header = HEADER.pack(
            MAGIC,
            VERSION,
            datagram[3],
            datagram[4] | FLAG_AUTH,
            key.key_id,
            0,
            self._local,
            epoch,
            self._stamp,
        )
        body = datagram[HEADER_SIZE:] + self._own.public
        return header + security.hello_aead(key, self._local, self._peer).encrypt(
            NONCE.pack(epoch, self._stamp), body, header
        )

    def _new_own_epoch(self, epoch: int) -> None:
        """The Hop link restarted its stream: a new epoch gets a new key pair."""
        self._own_epoch = epoch
        self._own = Ephemeral.generate(self._security.random_bytes)
        if self._peer_public:
            self._install(
                self._make_session(self._own_epoch, self._own, self._keyed_epoch, self._peer_public)
            )

    def _make_session(
        self, own_epoch: int, own: Ephemeral, peer_epoch: int, peer_public: bytes
    ) -> _Session:
        send, receive = session_keys(
            own,
            peer_public,
            local=self._local,
            local_epoch=own_epoch,
            peer=self._peer,
            peer_epoch=peer_epoch,
            purpose=PURPOSE,
        )
        return _Session(own_epoch, peer_epoch, AESGCM(send), AESGCM(receive))

    def _install(self, session: _Session) -> None:
        self._previous = self._session
        self._session = session
